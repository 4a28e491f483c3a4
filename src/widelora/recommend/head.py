"""The learning rate of a fresh head: its own stability edge, found on cached features (nearly free).

Why the head needs its own rate. The adapters are small perturbations of a pretrained map; their learning rate
is bounded by how fast the *body's* output may move (seed 001's stability analysis). A fresh classification head
is the opposite: it starts from random noise and must learn a whole linear model on the body's features. With
fixed features that is softmax regression — convex, no feature-learning/stability trade-off — so its best
learning rate sits just below its *own* edge, which is unrelated to the adapters'. Training it at the adapters'
lr (LoRA+'s reference puts 2-D non-adapter parameters in A's group) undertrains it: that is what made the
recommended setup lose the first `make demo`.

How the edge is found. The head's inputs of the probe's first steps are cached (widelora.recommend.probe), so an
LR range test on a copy of the head costs only the head's own tiny matmuls — no forward or backward through the
body. The same stopping rule (loss rise over its running minimum, or non-finite) reads its curve; the head's
learning rate is then edge / HEAD_EDGE_FACTOR (widelora.recommend.rules), calibrated in docs/results/recommend.md.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from widelora.recommend.edge import Reading, StopRule, Verdict
from widelora.recommend.rules import geometric_lrs

HEAD_STEPS = 64
HEAD_LR_RANGE = (1e-5, 10.0)


def head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class logits; mean squared error for a single regression output."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def head_range_test(
    head: nn.Module,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int = HEAD_STEPS,
    lr_range: tuple[float, float] = HEAD_LR_RANGE,
    rule: StopRule | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Verdict, list[Reading]]:
    """Range test of a *copy* of `head` on cached (features, labels) chunks; the head itself is untouched."""
    if not inputs:
        raise ValueError("the head range test needs cached (features, labels) from the probe")
    rule = rule or StopRule()
    trial = copy.deepcopy(head).float().train()
    params = [p for p in trial.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr_range[0], betas=betas, eps=eps, weight_decay=0.0)
    chunks = _full_batch(inputs)
    readings: list[Reading] = []
    for k, lr in enumerate(geometric_lrs(lr_range[0], lr_range[1], steps)):
        feats, labels = chunks[k % len(chunks)]
        for group in opt.param_groups:
            group["lr"] = lr
        loss = head_loss(trial(feats.float()), labels)
        value = float(loss.detach())
        if math.isfinite(value):
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        readings.append(Reading(k, lr, value))
        if rule.scan(readings).stop_step is not None:
            break
    return rule.scan(readings), readings


def _full_batch(inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All cached chunks as one batch (a smooth, deterministic curve); chunks of unequal shapes stay apart."""
    shapes = {tuple(f.shape[1:]) for f, _ in inputs}
    if len(shapes) != 1:
        return inputs
    return [(torch.cat([f for f, _ in inputs]), torch.cat([y for _, y in inputs]))]

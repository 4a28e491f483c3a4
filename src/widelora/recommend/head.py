"""The learning rate of a fresh head: the step its first Adam update can take, found on cached features.

Why the head needs its own rate. The adapters are small perturbations of a pretrained map; their learning rate
is bounded by how fast the *body's* output may move (seed 001's stability analysis). A fresh classification
head is the opposite: it starts from noise and must learn a whole linear model on the body's features, and its
learning rate has nothing to do with the adapters' edge. Training it at the adapters' lr (LoRA+'s reference
puts 2-D non-adapter parameters in A's group) undertrains it: that is what made the recommended setup lose the
first `make demo`.

Why not a range test. On the probe's few dozen cached examples the head's problem (softmax regression on ~n
features) is separable: its loss falls to zero at every large learning rate and never turns up, so an LR range
test finds no edge (measured: "not reached" up to lr 10 on MiniLM). What does have a scale is the *per-step
output change*: Adam's first step (bias-corrected) moves every weight by exactly lr · sign(g), so the logits
move by lr · Σ_j |h_j|-sized amounts. The line search below finds the step size η₁ that minimizes the loss
along that first update direction — the largest per-step change the head can usefully make — on the cached
features (no forward or backward through the body; a few hundred tiny matmuls). The head's learning rate is
then HEAD_STEP_MULTIPLIER × η₁ (widelora.recommend.rules), calibrated on head-only training in
docs/results/recommend.md.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from widelora.recommend.rules import geometric_lrs

LINE_POINTS = 61
LINE_RANGE = (1e-5, 10.0)


def head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class logits; mean squared error for a single regression output."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def first_step_size(
    head: nn.Module,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    points: int = LINE_POINTS,
    lr_range: tuple[float, float] = LINE_RANGE,
) -> tuple[float, list[tuple[float, float]]]:
    """η₁ = argmin over a geometric grid of L(θ₀ − η · sign(∇L(θ₀))) on the cached (features, labels).

    Returns η₁ and the line's (η, loss) curve. `head` itself is never modified (a copy is used).
    """
    if not inputs:
        raise ValueError("the head's step size needs cached (features, labels) from the probe")
    trial = copy.deepcopy(head).float().train()
    params = list(trial.parameters())
    chunks = _full_batch(inputs)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        loss0 = sum(head_loss(trial(f.float()), y) for f, y in chunks) / len(chunks)
        grads = torch.autograd.grad(loss0, params)
    start = [p.detach().clone() for p in params]
    directions = [g.sign() for g in grads]
    curve: list[tuple[float, float]] = [(0.0, float(loss0.detach()))]
    with torch.no_grad():
        for eta in geometric_lrs(lr_range[0], lr_range[1], points):
            for p, p0, d in zip(params, start, directions, strict=True):
                p.copy_(p0 - eta * d)
            loss = sum(float(head_loss(trial(f.float()), y)) for f, y in chunks) / len(chunks)
            curve.append((eta, loss if math.isfinite(loss) else math.inf))
    best = min(curve[1:], key=lambda c: c[1])
    return best[0], curve


def _full_batch(inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All cached chunks as one batch; chunks of unequal shapes (token-level heads) stay apart."""
    shapes = {tuple(f.shape[1:]) for f, _ in inputs}
    if len(shapes) != 1:
        return inputs
    return [(torch.cat([f for f, _ in inputs]), torch.cat([y for _, y in inputs]))]

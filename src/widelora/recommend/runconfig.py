"""A recommendation for a `RunConfig`: what `widelora recommend`, `finetune --auto` and `setup: recommended`
share.

The run's own adapter choices that are the user's to make (targets, rank, alpha) are kept — the probe measures
the learning rate *for that adapter* — and everything the theory decides (init, method, ratio, learning rates)
comes from `widelora.recommend`. Under torchrun every process probes its own batches; rank 0's choice is then
broadcast so that all processes train with the same learning rates.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from widelora.recommend.api import recommend
from widelora.recommend.probe import PROBE_STEPS, REFERENCE_ROWS, plan_probe
from widelora.recommend.setup import Recommendation

#: Run length assumed when a config gives epochs instead of steps and the caller cannot count them.
ASSUMED_STEPS = 1000


def run_batch(cfg: Any) -> int:
    """Examples per optimizer step of the run (all processes)."""
    return cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))


def batches_needed(steps: int, batch: int) -> int:
    """How many run batches the probe will read (it cycles through them if given fewer)."""
    plan = plan_probe(steps, batch)
    if plan is None:
        return 1
    return min(PROBE_STEPS, math.ceil(plan.steps * plan.batch_size / batch)) + math.ceil(
        REFERENCE_ROWS / batch
    )


def recommend_for_config(
    cfg: Any,
    model: nn.Module,
    batches: list[dict],
    steps: int | None = None,
    targets_given: bool = True,
    ratio: float | None = None,
) -> Recommendation:
    """The recommendation for the run `cfg` describes, probed on `batches` (its first training batches);
    `ratio`: a LoRA+ ratio to use instead of the width rule's (the probe then measures the lr for it)."""
    total = steps or cfg.steps or ASSUMED_STEPS
    targets = cfg.targets if targets_given else None
    if targets == "auto":
        from widelora.methods.plop import place

        targets = list(place(model, batches, progress=False).targets)
    rec = recommend(
        model,
        batches,
        steps=total,
        task=cfg.task,
        batch_size=run_batch(cfg),
        targets=targets,
        rank=cfg.rank,
        alpha=cfg.alpha,
        ratio=ratio,
        trainable=list(cfg.trainable) or None,
        seed=cfg.seed,
    )
    if not (steps or cfg.steps):
        rec.reasons["lr"] += f" (run length unknown: assumed {ASSUMED_STEPS} steps for the probe's budget)"
    return _agree_across_processes(rec)


def _agree_across_processes(rec: Recommendation) -> Recommendation:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rec
    values = torch.tensor([rec.lr, rec.head_lr or 0.0], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.broadcast(values, src=0)
    rec.lr, head = (float(v) for v in values.cpu())
    rec.head_lr = head if rec.head_lr is not None else None
    return rec


def recommended_setup(cfg: Any, model: nn.Module, batches: list[dict], steps: int | None = None):
    """The `setup: recommended` of a run's start-up (widelora.train.setups): a SetupChoice from the probe."""
    from widelora.train.setups import SetupChoice

    rec = recommend_for_config(cfg, model, batches, steps=steps)
    if int(os.environ.get("RANK", "0")) == 0 and getattr(cfg, "progress", False):
        print(rec.table(), flush=True)
    return SetupChoice(
        targets=rec.targets,
        init=rec.init,
        method=rec.method,
        lr=rec.lr,
        ratio=rec.ratio,
        head_lr=rec.head_lr,
        probe=(rec.probe or {}).get("version"),
    )

"""The width study's plain reference: one configuration at a time, the way one would first write it.

``ToyModel`` (widelora's LoRALinear), autograd and ``torch.optim.AdamW`` — no cached features, no hand-written
backward. Same weights, initial adapters, batches and divergence rule as the batched engine, so their losses
agree (the tests check 1e-10 in float64); ``bench/width_study.py`` times the engine against it. It can also
carry the feature monitor, which gives the δ1/δ2 split the batched engine does not trace.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from widelora.divergence import DivergenceRule
from widelora.experiments.toy import FrozenWeights, ToyData, ToyModel, student_weights
from widelora.experiments.width_config import DTYPES, WidthStudyConfig, lr_factor
from widelora.experiments.width_engine import batch_schedule, initial_adapters


@dataclass
class SingleRun:
    """One (width, init, lr, seed) trained the plain way; ``losses[t-1]`` is the batch loss of step t."""

    losses: np.ndarray
    train_loss: float
    test_loss: float
    diverged_step: int
    seconds: float
    monitor_rows: list[dict] | None = (
        None  # FeatureMonitor records (Z_A, Z_B, δ1, δ2 on the training batches)
    )
    monitor_summary: dict | None = None


def run_single(
    config: WidthStudyConfig,
    data: ToyData,
    width: int,
    init: str,
    lr: float,
    seed: int,
    frozen: FrozenWeights | None = None,
    monitor_every: int | None = None,
    ratio: float | None = None,
) -> SingleRun:
    """Train one configuration with autograd and ``torch.optim.AdamW`` (lr_B = ratio · lr).

    ``ratio`` defaults to the config's only ratio. ``monitor_every=k`` attaches a
    ``widelora.features.FeatureMonitor`` recording every k-th training step.
    """
    if ratio is None:
        if len(config.ratios) != 1:
            raise ValueError(f"ratio: the config has ratios {config.ratios}; pass the one to run")
        ratio = config.ratios[0]
    t0 = time.perf_counter()
    dtype = DTYPES[config.dtype]
    fw = frozen or student_weights(config.d, width, seed, dtype)
    A0, B0, w_h = initial_adapters(config, data, fw, init, seed)
    if w_h is not None:
        fw = FrozenWeights(fw.w_in, w_h, fw.w_out)
    model = ToyModel(fw, rank=config.rank, alpha=config.alpha)
    with torch.no_grad():
        model.hidden.lora_A.copy_(A0)
        model.hidden.lora_B.copy_(B0)
    opt = torch.optim.AdamW(
        [{"params": [model.hidden.lora_A], "lr": lr}, {"params": [model.hidden.lora_B], "lr": lr * ratio}],
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    x, y = data.x_train.to(dtype), data.y_train.to(dtype)
    rule = DivergenceRule(factor=config.diverge_factor, smoothing=0.0)
    with torch.no_grad():
        initial = F.mse_loss(model(x), y).clamp_min(1e-12)
    sched = batch_schedule(config.n_train, config.batch_size, config.steps, seed)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(config.schedule, k + 1, config.steps)
    )
    losses = np.full(config.steps, math.nan)
    diverged = -1
    mon = None
    if monitor_every is not None:
        from widelora.features import FeatureMonitor

        mon = FeatureMonitor(model, every=monitor_every).attach()
    for t in range(1, config.steps + 1):
        idx = sched[t - 1]
        loss = F.mse_loss(model(x[idx]), y[idx])
        if rule.exceeded(loss.detach(), initial):
            diverged = t
            break
        losses[t - 1] = loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if mon is not None:
            mon.step(t)
    with torch.no_grad():
        train = F.mse_loss(model(x), y).item() if diverged < 0 else math.nan
        test = (
            F.mse_loss(model(data.x_test.to(dtype)), data.y_test.to(dtype)).item()
            if diverged < 0
            else math.nan
        )
    if mon is not None:
        mon.detach()
    return SingleRun(
        losses,
        train,
        test,
        diverged,
        time.perf_counter() - t0,
        mon.to_rows() if mon else None,
        mon.summary() if mon else None,
    )

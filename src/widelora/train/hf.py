"""Glue for Hugging Face `Trainer`: widelora's optimizer + schedule, and the feature monitor as a callback.

Why: many users already train with `Trainer`. Two lines give them LoRA+ / preconditioned optimizers and the
Z_A / Z_B / δ statistics without leaving it:

    opt, sched = widelora.train.hf.optimizers(model, lr=2e-4, method="loraplus", num_training_steps=1000)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched),
                      callbacks=[widelora.train.hf.MonitorCallback(every=10)])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from widelora.train.config import DECAYS
from widelora.train.loop import make_schedule, monitor_row


class _Sched:
    """The few RunConfig fields `make_schedule` reads."""

    def __init__(self, warmup: float, decay: str):
        self.warmup, self.decay = warmup, decay


def optimizers(
    model: nn.Module,
    lr: float,
    num_training_steps: int,
    method: str = "adamw",
    warmup: float = 0.0,
    decay: str = "linear",
    **optimizer_options: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """`(optimizer, scheduler)` for `Trainer(optimizers=...)`: `widelora.create_optimizer` + warmup/decay.

    `warmup` < 1 is a fraction of `num_training_steps`, otherwise a number of steps; `optimizer_options` go to
    `create_optimizer` (ratio, weight_decay, betas, eps, ...).
    """
    import widelora as wl

    if not isinstance(num_training_steps, int) or num_training_steps <= 0:
        raise ValueError(f"num_training_steps={num_training_steps!r} must be a positive int")
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r} is not valid; valid: {list(DECAYS)}")
    if not isinstance(warmup, (int, float)) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be >= 0")
    opt = wl.create_optimizer(model, lr=lr, method=method, **optimizer_options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule(_Sched(warmup, decay), num_training_steps))
    return opt, sched


class MonitorCallback(TrainerCallback):
    """Runs `widelora.monitor.FeatureMonitor` inside a Trainer; logs layer-averaged stats every `every` steps.

    Per-layer records stay available as `callback.monitor.records` / `.to_rows()` after training. Limitation:
    Trainer has no "evaluation begins" hook, so an evaluation that runs right after a recorded step's boundary
    adds its forwards to the next record; use `eval_strategy="no"` or an `every` that avoids eval steps.
    """

    def __init__(self, every: int = 10, **monitor_options: Any):
        self.every = every
        self.options = monitor_options
        self.monitor = None
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from widelora.monitor import FeatureMonitor

        self.monitor = FeatureMonitor(model, every=self.every, **self.options).attach()

    def on_step_end(self, args, state, control, **kwargs):
        records = self.monitor.step(state.global_step)
        if records:
            row = {f"monitor/{k}": v for k, v in monitor_row(records).items() if v is not None}
            self.history.append({"step": state.global_step, **row})
            state.log_history.append({"step": state.global_step, **row})

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.detach()

"""Glue for Hugging Face `Trainer`: widelora's optimizer + schedule, adapter-only saving, and the feature monitor.

Why: many users already train with `Trainer`. A few lines give them LoRA+ / preconditioned optimizers, checkpoints
that hold the adapter (exactly what `widelora.save_adapter` writes, so an init that moved the base weights —
pissa, lora_ga — still reloads to the trained model) and the Z_A / Z_B / δ statistics without leaving it:

    opt, sched = widelora.train.hf.optimizers(model, lr=2e-4, method="loraplus", num_training_steps=1000)
    trainer = widelora.train.hf.Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched),
                                        callbacks=[widelora.train.hf.MonitorCallback(every=10)])

`widelora.train.hf.Trainer` is `transformers.Trainer` with `AdapterSaving` mixed in; mix it into other Trainer
subclasses (e.g. TRL's) the same way. Saving goes through Trainer's `_save`, which every save path (`save_model`,
checkpoints) calls; DeepSpeed ZeRO-3 / FSDP sharded states are not supported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback

import widelora as wl
from widelora.errors import UserError
from widelora.train.config import DECAYS
from widelora.train.metrics import monitor_row
from widelora.train.schedule import make_schedule


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
    if (
        isinstance(num_training_steps, bool)
        or not isinstance(num_training_steps, int)
        or num_training_steps <= 0
    ):
        raise UserError(f"num_training_steps={num_training_steps!r} must be a positive int")
    if decay not in DECAYS:
        raise UserError(f"decay={decay!r} is not valid; valid: {list(DECAYS)}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < float("inf"):
        raise UserError(f"warmup={warmup!r} must be a finite number >= 0")
    opt = wl.create_optimizer(model, lr=lr, method=method, **optimizer_options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule(_Sched(warmup, decay), num_training_steps))
    return opt, sched


class AdapterSaving:
    """Trainer mixin: `save_model` and checkpoints write the adapter (`widelora.save_adapter`), not the full model,
    and `train(resume_from_checkpoint=...)` loads it back into the adapted model."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        wl.save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if not os.path.isfile(os.path.join(resume_from_checkpoint, "adapter_config.json")):
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            return
        wl.load_adapter(self.accelerator.unwrap_model(model), resume_from_checkpoint)


class Trainer(AdapterSaving, transformers.Trainer):
    """`transformers.Trainer` whose saved models and checkpoints are widelora adapters (see `AdapterSaving`)."""


class MonitorCallback(TrainerCallback):
    """Runs `widelora.features.FeatureMonitor` inside a Trainer; logs layer-averaged stats every `every` steps.

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
        self.monitor = wl.FeatureMonitor(model, every=self.every, **self.options).attach()

    def on_step_end(self, args, state, control, **kwargs):
        records = self.monitor.step(state.global_step)
        if records:
            row = {f"monitor/{k}": v for k, v in monitor_row(records).items() if v is not None}
            self.history.append({"step": state.global_step, **row})
            state.log_history.append({"step": state.global_step, **row})

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.detach()

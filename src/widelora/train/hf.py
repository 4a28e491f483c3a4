"""Glue for Hugging Face `Trainer`: widelora's optimizer, adapter-only saving, and the feature monitor in the
logs.

Why: many users already train with `Trainer`. `widelora.train.hf.Trainer` builds widelora's optimizer (LoRA+,
the preconditioned ones, a separate head learning rate) in Trainer's own `create_optimizer` hook, from the
model Trainer actually trains (after accelerate / FSDP / DeepSpeed wrapping, where Trainer refuses a
ready-made `optimizers=`), and with `TrainingArguments`' `learning_rate`, `weight_decay`, Adam betas and
epsilon, so command-line overrides, hyperparameter searches and Trainer's schedulers act on it:

    trainer = widelora.train.hf.Trainer(model=model, args=TrainingArguments(..., learning_rate=2e-4),
                                        train_dataset=ds, method="loraplus", optimizer_options={"ratio": 16},
                                        callbacks=[widelora.train.hf.MonitorCallback(every=10)])

A plain `transformers.Trainer` (or TRL's) gets the same optimizer through
`optimizer_cls_and_kwargs=widelora.train.hf.optimizer_cls_and_kwargs(args, method="loraplus")`, which reads
the arguments when the optimizer is built. `optimizers(model, lr, ...)` still returns a ready-made pair for
setups without FSDP / DeepSpeed. Checkpoints hold the adapter (`widelora.save_adapter`, so an init that moved
the base weights — pissa, lora_ga — still reloads to the trained model); DeepSpeed ZeRO-3 / FSDP sharded
states are not saved by it. `MonitorCallback` puts |Z_A|, |Z_B|, the δ2 share, instability flags and every
parameter group's learning rate into Trainer's logs, so `report_to` (tensorboard, wandb, mlflow) receives
them."""

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
from widelora.train.metrics import group_learning_rates, monitor_stats
from widelora.train.schedule import make_schedule


class _Sched:
    """The few RunConfig fields `make_schedule` reads."""

    def __init__(self, warmup: float, decay: str):
        self.warmup, self.decay = warmup, decay


#: Optimizer settings that come from TrainingArguments and must not be given twice.
FROM_ARGUMENTS = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "betas": "adam_beta1 / adam_beta2",
    "eps": "adam_epsilon",
}


def check_optimizer_options(method: str, options: dict[str, Any]) -> None:
    """A known method, and no option that TrainingArguments already sets (it would be silently overridden)."""
    from widelora.methods.optim import available_methods

    if method not in available_methods():
        raise UserError(f"method={method!r} is unknown; valid methods: {available_methods()}")
    twice = sorted(set(options) & set(FROM_ARGUMENTS))
    if twice:
        where = ", ".join(f"{k} -> TrainingArguments.{FROM_ARGUMENTS[k]}" for k in twice)
        raise UserError(
            f"optimizer options {twice} come from the training arguments: set them there ({where})"
        )


def optimizer_from_arguments(
    model: nn.Module, args: transformers.TrainingArguments, method: str = "adamw", **options: Any
) -> torch.optim.Optimizer:
    """`widelora.create_optimizer` over `model` with the learning rate, weight decay, Adam betas and epsilon
    of `args`, read now (so a change to `args` before training starts is honoured); `options` are the method's
    own (ratio, head_lr, embedding_lr, ...)."""
    check_optimizer_options(method, options)
    return wl.create_optimizer(
        model, lr=args.learning_rate, method=method, weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **options,
    )  # fmt: skip


class OptimizerFactory:
    """transformers' optimizer-factory protocol (`Trainer(optimizer_cls_and_kwargs=(factory, kwargs))`):
    Trainer calls `OptimizerFactory()(model, **kwargs)` inside `create_optimizer`, with the model it
    trains."""

    def __call__(
        self, model: nn.Module, *, args: transformers.TrainingArguments, method: str = "adamw", **options: Any
    ) -> torch.optim.Optimizer:
        return optimizer_from_arguments(model, args, method, **options)


def optimizer_cls_and_kwargs(
    args: transformers.TrainingArguments, method: str = "adamw", **options: Any
) -> tuple[type, dict[str, Any]]:
    """For `transformers.Trainer(args=args, optimizer_cls_and_kwargs=...)`: widelora's optimizer, built when
    training starts over the model Trainer trains, from `args`' learning rate, weight decay, betas and eps
    (pass the same `args` object as to the Trainer)."""
    check_optimizer_options(method, options)
    return OptimizerFactory, {"args": args, "method": method, **options}


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
    """Trainer mixin: `save_model` and checkpoints write the adapter (`widelora.save_adapter`), not the full
    model, and `train(resume_from_checkpoint=...)` loads it back into the adapted model."""

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
    """`transformers.Trainer` with widelora's optimizer built in `create_optimizer` from the training
    arguments (`method`, `optimizer_options`; see the module doc), adapter checkpoints (`AdapterSaving`), and
    every parameter group's learning rate in the logs. `optimizers=` or `optimizer_cls_and_kwargs=` still
    win."""

    def __init__(
        self,
        *args: Any,
        method: str = "adamw",
        optimizer_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.widelora_method = method
        self.widelora_optimizer_options = dict(optimizer_options or {})
        check_optimizer_options(method, self.widelora_optimizer_options)
        super().__init__(*args, **kwargs)
        if not any(isinstance(c, GroupLearningRates) for c in self.callback_handler.callbacks):
            self.add_callback(GroupLearningRates())
        log_before_trackers(self)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """widelora's optimizer over the model being trained, unless one was given."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer = optimizer_from_arguments(
                self.model if model is None else model,
                self.args,
                self.widelora_method,
                **self.widelora_optimizer_options,
            )
            return self.optimizer
        return super().create_optimizer(model)


def log_before_trackers(trainer: transformers.Trainer) -> None:
    """Move widelora's logging callbacks in front of the others, so the values they add to a log reach
    `report_to`'s callbacks (Trainer calls callbacks in order and puts user callbacks last). `hf.Trainer` does
    this itself, and so does `widelora.train.trl.WideloraSetup`; call it on other Trainers after
    construction."""
    handler = trainer.callback_handler
    ours = [c for c in handler.callbacks if isinstance(c, GroupLearningRates)]
    handler.callbacks = ours + [c for c in handler.callbacks if not isinstance(c, GroupLearningRates)]


def _add_to_logs(state: Any, logs: dict[str, float], values: dict[str, float]) -> None:
    """Add `values` to the log being emitted and to its copy in `state.log_history`."""
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)


class GroupLearningRates(TrainerCallback):
    """Adds every parameter group's learning rate to each log (`lr/A`, `lr/B`, `lr/head`), as used by the step
    being logged: Trainer logs only the first group's, which under LoRA+ is A's."""

    _used: dict[str, float] | None = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # the rates this step uses (the scheduler moves them before the log)
            self._used = group_learning_rates(optimizer)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is not None and optimizer is not None:
            _add_to_logs(state, logs, self._used or group_learning_rates(optimizer))


class MonitorCallback(GroupLearningRates):
    """Runs `widelora.features.FeatureMonitor` inside a Trainer; its numbers go into Trainer's logs.

    Every `every` steps the monitor records each adapted layer; the next log gets the record summarized across
    layers (`monitor/z_a`, `monitor/z_a_max`, `monitor/z_b`, `monitor/delta2_share`, ...,
    `monitor/internal_instability_layers`, `monitor/output_instability_layers`) and every group's learning
    rate, so `report_to` trackers receive them (with `hf.Trainer`, or after `log_before_trackers(trainer)`).
    Per-layer records stay available as `callback.monitor.records` / `.to_rows()` after training. Limitation:
    Trainer has no "evaluation begins" hook, so an evaluation that runs right after a recorded step's boundary
    adds its forwards to the next record; use `eval_strategy="no"` or an `every` that avoids eval steps.
    """

    def __init__(self, every: int = 10, **monitor_options: Any):
        self.every = every
        self.options = monitor_options
        self.monitor = None
        self.history: list[dict] = []
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.monitor = wl.FeatureMonitor(model, every=self.every, **self.options).attach()

    def on_step_end(self, args, state, control, **kwargs):
        records = self.monitor.step(state.global_step)
        if records:
            row = {
                f"monitor/{k}": v for k, v in monitor_stats(self.monitor, records).items() if v is not None
            }
            self.history.append({"step": state.global_step, **row})
            self._pending = row

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            _add_to_logs(state, logs, self._pending)
            self._pending = {}
        super().on_log(args, state, control, logs=logs, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.detach()

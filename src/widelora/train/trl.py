"""widelora inside TRL's `SFTTrainer` (any `transformers.Trainer`): inits, optimizers, monitor with PEFT.

Why: `SFTTrainer(peft_config=...)` wraps the model with PEFT inside its constructor, so an optimizer built
beforehand holds no adapter parameters, and a factory handed to `optimizers=` silently ignores the learning
rate and weight decay of `TrainingArguments`. `WideloraSetup` acts after the wrapping instead:

- at the end of `__init__` it initializes the adapters PEFT just added with a widelora scheme (`init=`); a
  data-driven scheme (lora_one, lora_ga) reads `init_batches` batches from the trainer's own train dataloader;
- `create_optimizer` (Trainer's own hook, called when training starts; under FSDP with the wrapped model)
  builds `widelora.create_optimizer(method=...)` over the model the trainer trains, with `learning_rate`,
  `weight_decay`, `adam_beta1/2` and `adam_epsilon` taken from the arguments, so a command-line
  `--learning_rate`, a sweep or HF's schedulers act on it as on Trainer's own AdamW (each LoRA+ group keeps
  its ratio under the schedule);
- a W-moving init (pissa, lora_ga) is saved through `widelora.save_adapter`, which folds the move back in, so
  the saved adapter applies to the original base weights; otherwise PEFT saves as usual.

    trainer = widelora.train.trl.SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                                            peft_config=LoraConfig(...), init="init_a", method="loraplus",
                                            optimizer_options={"ratio": 16},
                                            callbacks=[widelora.train.hf.MonitorCallback(every=10)])

Mix `WideloraSetup` in front of another Trainer subclass the same way (`class T(WideloraSetup, Trainer)`).
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
import trl
from torch import nn

import widelora as wl
from widelora.errors import UserError
from widelora.lora.pairs import lora_pairs
from widelora.methods.init import get_scheme
from widelora.train.hf import (
    AdapterSaving,
    GroupLearningRates,
    check_optimizer_options,
    log_before_trackers,
    optimizer_from_arguments,
)

#: Batch keys a causal LM's forward accepts (collators add masks of their own, e.g. TRL's completion_mask).
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


def _check_setup(init: str | None, method: str, optimizer_options: dict, kwargs: dict) -> None:
    if init is not None:
        get_scheme(init)
    check_optimizer_options(method, optimizer_options)
    optimizers = kwargs.get("optimizers") or (None, None)
    if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
        raise UserError(
            "WideloraSetup builds the optimizer itself: drop "
            "optimizers=/optimizer_cls_and_kwargs=, or drop the widelora trainer and pass your own"
        )


class WideloraSetup:
    """Trainer mixin: widelora's init after PEFT wraps the model, widelora's optimizer from the training
    arguments (see the module doc). Keyword arguments: `init` (a scheme name, None keeps PEFT's init),
    `init_options` (passed to the scheme), `init_batches` (for data-driven schemes), `seed`, `method`
    ("adamw", "loraplus", "lora_one_precond", "scaled_gd", ...) and `optimizer_options` (ratio,
    embedding_lr, head_lr, ...)."""

    def __init__(
        self,
        *args: Any,
        init: str | None = None,
        init_options: dict[str, Any] | None = None,
        init_batches: int = 8,
        seed: int | None = None,
        method: str = "adamw",
        optimizer_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        optimizer_options = dict(optimizer_options or {})
        _check_setup(init, method, optimizer_options, kwargs)
        if isinstance(init_batches, bool) or not isinstance(init_batches, int) or init_batches < 1:
            raise UserError(f"init_batches={init_batches!r} must be a positive int")
        self.widelora_method = method
        self.widelora_optimizer_options = optimizer_options
        super().__init__(*args, **kwargs)
        if not any(isinstance(c, GroupLearningRates) for c in self.callback_handler.callbacks):
            self.add_callback(GroupLearningRates())
        log_before_trackers(self)
        if init is not None:
            self._widelora_initialize(init, dict(init_options or {}), init_batches, seed)

    def _widelora_initialize(
        self, scheme: str, options: dict[str, Any], n_batches: int, seed: int | None
    ) -> None:
        batches = None
        if get_scheme(scheme).needs_data:
            device = self.args.device
            loader = self.get_train_dataloader()
            batches = [
                {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
                for batch in islice(loader, n_batches)
            ]
        self.model.to(self.args.device)
        wl.initialize(
            self.model, scheme, seed=self.args.seed if seed is None else seed, batches=batches, **options
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """widelora's optimizer over the trained model, with the training arguments' lr, decay, betas, eps."""
        if self.optimizer is None:
            self.optimizer = optimizer_from_arguments(
                self.model if model is None else model,
                self.args,
                self.widelora_method,
                **self.widelora_optimizer_options,
            )
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """PEFT saves as usual, unless an init moved W: `widelora.save_adapter` then folds the move in."""
        model = self.accelerator.unwrap_model(self.model)
        if any(p.base_offset is not None for p in lora_pairs(model)):
            AdapterSaving._save(self, output_dir, state_dict=state_dict)
        else:
            super()._save(output_dir, state_dict=state_dict)


class SFTTrainer(WideloraSetup, trl.SFTTrainer):
    """`trl.SFTTrainer` with widelora's init and optimizer (see `WideloraSetup` and the module doc)."""

"""Mixed precision of widelora's loop: autocast for half-precision bases, loss scaling for float16, and
gradient checkpointing.

Why loss scaling for float16 only: float16 keeps 5 exponent bits, so small activation gradients underflow to
zero in the backward pass (the paper's RoBERTa presets train in float16, as its reference code does with
loss scaling); bfloat16 has float32's exponent range and needs none. The scaler multiplies the loss before
backward, unscales the gradients before clipping, and skips (and halves the scale on) a step whose gradients
overflowed. It is one code path for every dtype: disabled, it is the identity.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError


def precision(cfg: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """Forwards under a bfloat16/float16 base run in autocast: the float32 adapters meet the base weights in
    the base's dtype (on CPU too), while their gradients and the optimizer state stay float32."""
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))


def make_scaler(cfg: Any, device: torch.device) -> torch.amp.GradScaler:
    """A dynamic loss scaler, enabled for a float16 base (on CUDA and on CPU alike)."""
    return torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")


def enable_gradient_checkpointing(model: nn.Module, model_name: str) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them.

    Non-reentrant checkpointing: gradients reach the adapters inside a block although the block's input (the
    frozen embeddings' output) needs none, so no `enable_input_require_grads` hook is needed, and the
    recomputed forward replays the same RNG (dropout) so losses and gradients equal the plain run's."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"gradient_checkpointing=true is not valid for model {model_name!r}: its transformers class "
            f"{type(model).__name__} does not support gradient checkpointing; set "
            "gradient_checkpointing=false"
        )
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

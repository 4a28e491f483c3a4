"""The training loss of a model on one batch, and moving a batch to a device (used by the gradient
estimate)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError

LossFn = Callable[[nn.Module, Any], torch.Tensor]

__all__ = ["LossFn", "compute_loss", "move_batch"]


def move_batch(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensor, mapping or sequence of tensors) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def compute_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The scalar training loss of ``model`` on ``batch``: ``loss_fn(model, batch)`` or ``outputs.loss``."""
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"batches must be mappings of model inputs (e.g. input_ids, attention_mask, labels) when no "
                f"loss_fn is given; got a batch of type {type(batch).__name__}. "
                "Pass loss_fn=(model, batch) -> loss."
            )
        outputs = model(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is None:
            raise UserError(
                "the model returned no loss for the batch (keys: "
                f"{sorted(batch)}); include 'labels' in each batch or pass loss_fn=(model, batch) -> loss"
            )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise UserError(
            f"the loss must be a scalar tensor; got {type(loss).__name__} {getattr(loss, 'shape', '')}"
        )
    return loss

"""Leave the model exactly as it was found: snapshot before a probe, restore after (bit for bit).

A probe trains the model for a few steps; the user's run must then start from the very same state. What a few
training steps can change: trainable tensors (adapters, a head), buffers (BatchNorm statistics), the
`requires_grad` flags the probe flips, train/eval mode, the random number generators (dropout draws, and
`attach` draws adapter inits), an optimizer's state if one is passed, and — when the probe attached adapters
itself — the model's modules. `ModelSnapshot` records the first six; `temporary_adapters` undoes the last.
Frozen weights are never written by the probe (they are not in its optimizer); tests check that too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from widelora.lora.layer import LoRALinear


class ModelSnapshot:
    """Copies of everything a few training steps can change; `restore()` writes them back in place."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, tensors: bool = True
    ) -> None:
        """`tensors=False` skips the copies of trainable tensors (for a block that trains none of them)."""
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad] if tensors else []
        self.params = {id(p): (p, p.detach().clone()) for p in trainable}
        self.grads = {
            id(p): (p, None if p.grad is None else p.grad.detach().clone()) for p, _ in self.params.values()
        }
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.optimizer = optimizer
        self.optimizer_state = _clone(optimizer.state_dict()) if optimizer is not None else None

    @torch.no_grad()
    def restore(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for p, saved in self.params.values():
            p.copy_(saved)
        for p, grad in self.grads.values():
            p.grad = None if grad is None else grad.clone()
        for b, saved in self.buffers:
            b.copy_(saved)
        for m, mode in self.modes:
            m.training = mode
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(_clone(self.optimizer_state))


def _clone(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


@contextmanager
def preserved(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, tensors: bool = True
) -> Iterator[ModelSnapshot]:
    """`with preserved(model):` — whatever happens inside (including an exception), the model is restored."""
    snap = ModelSnapshot(model, optimizer, tensors)
    try:
        yield snap
    finally:
        snap.restore()


@contextmanager
def temporary_adapters(model: nn.Module, **attach_kwargs: Any) -> Iterator[nn.Module]:
    """Attach widelora adapters for the block, then put the original layers back (no merge, W untouched).

    The RNG state and `requires_grad` flags are restored by the caller's `preserved` block; this undoes the
    module surgery and the trainable-module bookkeeping `attach` adds.
    """
    from widelora import attach

    before = {id(m) for m in model.modules() if isinstance(m, LoRALinear)}
    had_trainable = hasattr(model, "_widelora_trainable")
    old_trainable = getattr(model, "_widelora_trainable", None)
    attach(model, **attach_kwargs)
    try:
        yield model
    finally:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear) and id(module) not in before:
                parent_name, _, leaf = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, module.base_layer)
        if had_trainable:
            model._widelora_trainable = old_trainable
        elif hasattr(model, "_widelora_trainable"):
            del model._widelora_trainable

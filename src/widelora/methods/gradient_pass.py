"""One backward pass per batch that accumulates each hooked linear module's weight gradient G = Σ gᵀ x.

Why its own module: this is the memory-critical mechanics under `widelora.methods.gradients` (which plans
groups and batches): forward hooks keep each module's input, tensor hooks on its output turn every arriving
output gradient into G at once, and autograd is asked only for the few graph leaves the hooks created, so no
activation outlives what a training step would keep.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError
from widelora.methods.model_loss import LossFn, compute_loss, move_batch


class _Tap:
    """Forward hook on one linear module: keeps the input of every call and hooks its output's gradient.

    The output itself is kept only when it is a graph leaf the tap created (the first adapted layers, the
    targets of the backward call); the others are referenced weakly, so the estimate holds no activation that
    a training step would have freed.
    """

    def __init__(self, on_grad: Callable[[int, torch.Tensor], None]) -> None:
        self.on_grad = on_grad
        self.calls: list[torch.Tensor | None] = []
        self.leaves: list[torch.Tensor] = []
        self.others: list[weakref.ref] = []

    def clear(self) -> None:
        self.calls.clear()
        self.leaves.clear()
        self.others.clear()

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:  # upstream of everything trainable: make it a graph leaf
            output = output.detach().requires_grad_(True)
            self.leaves.append(output)
        else:
            self.others.append(weakref.ref(output))
        i = len(self.calls)
        self.calls.append(args[0].detach())
        output.register_hook(lambda g: self.on_grad(i, g))
        return output


def estimate_group(
    model: nn.Module,
    group: dict[str, tuple[nn.Module, tuple[int, int]]],
    data: list[Any],
    loss_fn: LossFn | None,
    device: torch.device | str,
    bar: Any,
    on_done: Callable[[str, torch.Tensor], None],
) -> None:
    """One pass over ``data`` for ``group``; each G is accumulated in a tensor hook as its output gradient
    arrives (never all output gradients at once) and handed to ``on_done`` when its last call is in."""
    sums: dict[str, torch.Tensor] = {}  # allocated on first use: with one batch, G's live one at a time
    taps = {name: _Tap(lambda i, g, name=name: accumulate(name, i, g)) for name in group}
    handles = [mod.register_forward_hook(taps[name]) for name, (mod, _) in group.items()]
    pending: dict[str, int] = {}
    finished: set[str] = set()
    last = False

    def finish(name: str) -> None:
        finished.add(name)
        total = sums.pop(name, None)
        if total is None:
            total = torch.zeros(group[name][1], dtype=torch.float32, device=device)
        on_done(name, total.div_(len(data)).cpu())

    def accumulate(name: str, i: int, g: torch.Tensor) -> None:
        x = taps[name].calls[i]
        taps[name].calls[i] = None  # free the reference as soon as it is used
        g2 = g.reshape(-1, g.shape[-1]).float()
        x2 = x.reshape(-1, x.shape[-1]).float()
        if name in sums:
            sums[name].addmm_(g2.T, x2)
        else:
            sums[name] = g2.T @ x2
        pending[name] -= 1
        if last and pending[name] == 0:
            finish(name)

    try:
        for index, batch in enumerate(data):
            last = index == len(data) - 1
            for tap in taps.values():
                tap.clear()
            loss = compute_loss(model, move_batch(batch, device), loss_fn)
            if not any(tap.calls for tap in taps.values()):
                raise UserError(
                    f"none of the target modules ({', '.join(list(group)[:3])}, ...) ran in the "
                    "forward pass; check that they belong to this model"
                )
            if not loss.requires_grad:
                raise UserError("the loss does not depend on any target module's output; check loss_fn")
            for name, tap in taps.items():
                pending[name] = len(tap.calls)
            # Differentiate only toward the graph leaves the taps created (the first adapted layers): the
            # hooks do the work on the way, and autograd returns only those few output gradients.
            leaves = [out for tap in taps.values() for out in tap.leaves]
            if not leaves:
                leaves = [o for tap in taps.values() for ref in tap.others if (o := ref()) is not None]
            if not leaves:  # e.g. gradient checkpointing freed every output: any leaf of the graph will do
                leaves = _graph_leaves(loss)
            torch.autograd.grad(loss, leaves, allow_unused=True)
            del loss
            bar.update(1)
        for name in group:
            if name not in finished:
                finish(name)  # calls whose output did not reach the loss: what arrived is complete
    finally:
        for h in handles:
            h.remove()
        for tap in taps.values():
            tap.clear()


def _graph_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The tensors requiring grad that `loss`'s graph starts from (e.g. an input made to require grad for
    gradient checkpointing): differentiating toward them runs the whole backward, so every tap fires."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(fn for fn, _ in node.next_functions)
    return list(found.values())

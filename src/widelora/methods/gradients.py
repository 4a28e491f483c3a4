"""Full-gradient estimation for frozen weights, shared by the gradient-informed inits (LoRA-One, LoRA-GA).

Why hooks instead of ``requires_grad`` on every weight: for a linear map ``y = W x`` the gradient is
``dL/dW = sum_tokens grad_y^T x``, so capturing the layer's input in a forward hook and its output gradient
in the backward pass gives ``G`` directly, without autograd keeping a gradient buffer for every frozen
parameter of the model (embeddings and heads included). When a memory budget is given, the target modules
are processed in groups (each group a full pass over the batches), so at most one group's ``G`` matrices
are being accumulated at a time beyond the results already finished.

``G`` is returned in the ``(out, in)`` orientation of ``LoRAPair.weight`` whatever the layer stores
(``nn.Linear`` or GPT-2's ``Conv1D``), averaged over batches as the references do: each batch contributes the
gradient of its own mean loss, and the sum is divided by the number of batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError
from widelora.lora.modules import is_linear, linear_shape
from widelora.methods.gradient_pass import estimate_group
from widelora.methods.model_loss import LossFn, compute_loss, move_batch

__all__ = [
    "compute_loss",
    "consume_gradients",
    "estimate_gradients",
    "group_by_budget",
    "iter_gradients",
    "move_batch",
]


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer (nn.Linear or transformers' Conv1D, which stores (in, out))."""
    if not is_linear(module):
        raise TypeError(
            f"module {type(module).__name__} is not a linear layer; only linear layers can be adapted"
        )
    return linear_shape(module)


def group_by_budget(
    shapes: Mapping[str, tuple[int, int]], memory_budget: int | None, bytes_per_element: int = 4
) -> list[list[str]]:
    """Split module names into consecutive groups whose fp32 gradients fit in ``memory_budget`` bytes.

    ``None`` means one group. A single module larger than the budget still gets a group of its own.
    """
    names = list(shapes)
    if memory_budget is None:
        return [names] if names else []
    if memory_budget <= 0:
        raise UserError(f"memory_budget must be a positive number of bytes or None; got {memory_budget}")
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        size = shapes[name][0] * shapes[name][1] * bytes_per_element
        if current and used + size > memory_budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


@contextmanager
def _frozen(model: nn.Module):
    """Temporarily turn off requires_grad everywhere (hooks supply the only needed graph), then restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def estimate_gradients(
    model: nn.Module,
    modules: Mapping[str, nn.Module] | Sequence[Any],
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    memory_budget: int | None = None,
    train_mode: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Average full gradient ``dL/dW`` (fp32, ``(out, in)``, on CPU) of each target module's frozen weight.

    ``modules`` is either ``{name: linear module}`` or a sequence of LoRA pairs (the adapted module is
    hooked; its input is the base layer's input and its output gradient the base output's, so the result is
    the gradient of the base weight ``W``; the caller makes the adapted model compute the base function, e.g.
    by zeroing ``B`` during the estimate, as ``widelora.methods.gradient_svd`` does). ``batches`` yields
    model-input mappings with ``labels``, or anything ``loss_fn(model, batch)`` understands; at most
    ``num_batches`` are used. ``memory_budget`` (bytes) bounds the gradient matrices accumulated per pass;
    use :func:`iter_gradients` to also consume each group before the next is computed. The model is put in
    eval mode during estimation unless ``train_mode`` (the references use train mode; it only matters with
    dropout) and restored afterwards; no parameter's ``requires_grad`` or ``.grad`` is changed.
    """
    grads: dict[str, torch.Tensor] = {}
    for group in iter_gradients(
        model,
        modules,
        batches,
        loss_fn=loss_fn,
        num_batches=num_batches,
        memory_budget=memory_budget,
        train_mode=train_mode,
        progress=progress,
        device=device,
    ):
        grads.update(group)
    return grads


def iter_gradients(
    model: nn.Module,
    modules: Mapping[str, nn.Module] | Sequence[Any],
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    memory_budget: int | None = None,
    train_mode: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Like :func:`estimate_gradients`, one memory-budget group at a time (``{name: G}`` per group).

    Prefer :func:`consume_gradients` when each ``G`` can be reduced on its own: it never holds a finished
    ``G`` beyond the moment it is handed over.
    """
    plan = _plan(model, modules, batches, num_batches, memory_budget, device)
    for group in plan.groups:
        done: dict[str, torch.Tensor] = {}
        _run(model, plan, [group], loss_fn, train_mode, progress, done.__setitem__)
        yield {name: done[name] for name in group}


def consume_gradients(
    model: nn.Module,
    modules: Mapping[str, nn.Module] | Sequence[Any],
    batches: Iterable[Any],
    on_done: Callable[[str, torch.Tensor], None],
    *,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    memory_budget: int | None = None,
    train_mode: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> None:
    """Hand each module's averaged ``G`` to ``on_done(name, G)`` as soon as it is complete.

    Why: with one batch (or in the last batch) a module's ``G`` is complete the moment its output gradient
    arrives in the backward pass, so it is reduced (e.g. to SVD factors) there and freed before the next
    layer's gradient exists: the full-size gradients of all adapted weights are never held together. With
    several batches the running sums of a memory-budget group are held between batches (``memory_budget``
    bounds them, at one extra pass over the batches per group).
    """
    plan = _plan(model, modules, batches, num_batches, memory_budget, device)
    _run(model, plan, plan.groups, loss_fn, train_mode, progress, on_done)


class _Plan:
    def __init__(self, targets, data, device, groups) -> None:
        self.targets, self.data, self.device, self.groups = targets, data, device, groups


def _plan(model, modules, batches, num_batches, memory_budget, device) -> _Plan:
    """Check every input before anything runs; resolve modules, batches, device and budget groups."""
    targets = _resolve_modules(modules)
    if not targets:
        raise UserError("modules is empty: there is no adapted weight to estimate a gradient for")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise UserError(f"num_batches must be a positive integer or None; got {num_batches!r}")
    if batches is None:
        raise UserError("batches is None: gradient estimation needs data (an iterable of batches)")
    data = list(itertools.islice(iter(batches), num_batches))
    if not data:
        raise UserError("batches yielded no batch: gradient estimation needs at least one batch")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    shapes = {name: shape for name, (_, shape) in targets.items()}
    return _Plan(targets, data, device, group_by_budget(shapes, memory_budget))


def _run(model, plan: _Plan, groups, loss_fn, train_mode, progress, on_done) -> None:
    was_training = model.training
    model.train(train_mode)
    bar = _progress(len(groups) * len(plan.data), progress)
    try:
        with _frozen(model):
            for group in groups:
                estimate_group(
                    model, {n: plan.targets[n] for n in group}, plan.data, loss_fn, plan.device, bar, on_done
                )
    finally:
        bar.close()
        model.train(was_training)


def _resolve_modules(
    modules: Mapping[str, nn.Module] | Sequence[Any],
) -> dict[str, tuple[nn.Module, tuple[int, int]]]:
    """{name: (module to hook, (out, in))}."""
    if isinstance(modules, Mapping):
        return {name: (mod, _weight_shape(mod)) for name, mod in modules.items()}
    resolved: dict[str, tuple[nn.Module, tuple[int, int]]] = {}
    for item in modules:
        # Hook the adapted wrapper, not its base layer: a fused forward may never call base_layer, while the
        # wrapper always sees x and, with y = W x + s·B A x, its output gradient is the base output's
        # gradient.
        module = getattr(item, "module", None)
        name = getattr(item, "name", None)
        if module is None or name is None:
            raise TypeError(
                f"modules must be a mapping name -> module or a sequence of LoRA pairs; "
                f"got an item of type {type(item).__name__}"
            )
        resolved[name] = (module, (int(item.fan_out), int(item.fan_in)))
    return resolved


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="estimating gradients", unit="batch", leave=False)

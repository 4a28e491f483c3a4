"""Add LoRA layers to a model, and merge / unmerge / unload them.

`add_adapters` validates everything (targets, rank against every matched layer, alpha, trainable modules)
before it touches the model, so a failing call leaves the model exactly as it was. Initializing the new
adapters is the job of `widelora.methods`; the user-facing `widelora.attach` (widelora/api.py) composes the
two.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from widelora.errors import UserError
from widelora.lora.layer import SCALINGS, LoRALinear
from widelora.lora.modules import is_linear, linear_shape, output_head_names
from widelora.lora.shared_input import link_siblings

ALL_LINEAR = "all-linear"  # every linear layer except the output heads (widelora.lora.modules)

Targets = str | Sequence[str]


def _describe_modules(model: nn.Module, limit: int = 40) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear(m)})
    shown = ", ".join(leaves[:limit]) + (" ..." if len(leaves) > limit else "")
    return f"linear module names in this model: [{shown}]"


def match_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the modules `targets` selects.

    A list selects modules whose name equals an entry or ends with "." + entry (PEFT's rule); a string is a
    regular expression that must match the full module name; "all-linear" selects every linear layer except
    the output head.
    """
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            heads = output_head_names(model)
            names = [n for n, m in model.named_modules() if n and is_linear(m) and n not in heads]
        else:
            try:
                pattern = re.compile(targets)
            except re.error as exc:
                raise UserError(f"targets={targets!r} is not a valid regular expression: {exc}") from exc
            names = [n for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    elif isinstance(targets, Iterable):
        wanted = list(targets)
        if not wanted or not all(isinstance(t, str) and t for t in wanted):
            raise UserError(
                f"targets must be a non-empty list of module names, a regex string or "
                f"{ALL_LINEAR!r}; got {targets!r}"
            )
        names = [
            n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in wanted)
        ]
        matched_any = {t for t in wanted if any(n == t or n.endswith("." + t) for n in names)}
        missing = [t for t in wanted if t not in matched_any]
        if missing and names:
            raise UserError(f"targets {missing} match no module; {_describe_modules(model)}")
    else:
        raise UserError(f"targets must be a list of names, a regex string or {ALL_LINEAR!r}; got {targets!r}")
    # Layers that are already adapted (and their inner base layers) are never wrapped twice.
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    names = [n for n in names if not any(n == a or n.startswith(a + ".") for a in adapted)]
    if not names:
        raise UserError(f"targets={targets!r} match no module; {_describe_modules(model)}")
    wrong = [n for n in names if not is_linear(model.get_submodule(n))]
    if wrong:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in wrong})
        raise UserError(
            f"targets={targets!r} select modules that are not linear layers ({', '.join(wrong[:5])}"
            f"{' ...' if len(wrong) > 5 else ''}; types {kinds}); LoRA wraps nn.Linear and Conv1D only. "
            f"{_describe_modules(model)}"
        )
    return names


def _check_hyperparameters(rank: object, alpha: object, scaling: str, dropout: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"rank={rank!r} is not valid; rank must be a positive integer")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise UserError(f"alpha={alpha!r} is not valid; alpha must be a positive number")
    if scaling not in SCALINGS:
        raise UserError(f"scaling={scaling!r} is not valid; choose one of {list(SCALINGS)}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout={dropout!r} is not valid; dropout must be in [0, 1)")


@dataclass
class Added:
    """What `add_adapters` changed: the new layers, and how to undo the whole call (used on a failed init)."""

    layers: list[LoRALinear]
    _undo: Callable[[], None]

    def undo(self) -> None:
        self._undo()


def _kept_trainable(model: nn.Module) -> set[int]:
    """Parameters a later `add_adapters` must not freeze: earlier adapters and earlier `trainable` modules."""
    keep = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)}
    for extra in getattr(model, "_widelora_trainable", []):
        for name, module in model.named_modules():
            if name == extra or name.endswith("." + extra):
                keep.update(id(p) for p in module.parameters())
    return keep


def _untie(model: nn.Module, prefix: str, module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Give `module` its own copy of every parameter it shares with the rest of the model (tied LM heads).

    PEFT's `modules_to_save` trains a copy of the module, so a tied `lm_head` is trained without changing the
    input embeddings; widelora does the same, so the saved adapter (which lists only the head) reloads
    exactly.
    """
    outside: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not (name.startswith(prefix + ".") or name == prefix):
            outside.add(id(p))
    untied = []
    for sub_name, sub in module.named_modules():
        for p_name, p in list(sub.named_parameters(recurse=False)):
            if id(p) in outside:
                setattr(sub, p_name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                untied.append((sub, p_name, p))
                where = f"{prefix}.{sub_name}" if sub_name else prefix
                warnings.warn(
                    f"trainable: {where}.{p_name} is tied to another module's weight (e.g. the input "
                    f"embeddings); {where} now trains its own copy, as PEFT's modules_to_save does; the tied "
                    "module stays frozen",
                    stacklevel=4,
                )
    return untied


def mark_trainable(model: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Make the modules `names` selects (PEFT's suffix rule) trainable, untying shared weights; returns the
    untied.

    They are remembered in `model._widelora_trainable`, so `save_adapter` writes them as `modules_to_save` and
    a later `add_adapters` keeps them trainable.
    """
    untied: list[tuple[nn.Module, str, nn.Parameter]] = []
    for n, module in list(model.named_modules()):
        if n and any(n == t or n.endswith("." + t) for t in names):
            untied += _untie(model, n, module)
            for p in module.parameters():
                p.requires_grad_(True)
    model._widelora_trainable = sorted(set(getattr(model, "_widelora_trainable", None) or []) | set(names))
    return untied


def add_adapters(
    model: nn.Module,
    targets: Targets,
    rank: int = 8,
    alpha: float | None = None,
    scaling: str = "standard",
    dropout: float = 0.0,
    trainable: Sequence[str] = (),
) -> Added:
    """Wrap the selected linear layers with (zero) LoRA adapters and freeze everything else.

    Earlier adapters and earlier `trainable` modules stay trainable. `alpha=None` means `alpha = rank`.
    `trainable` names extra modules (e.g. a classifier head) kept trainable and saved as PEFT
    `modules_to_save`; a trainable module whose weight is tied to another module gets its own copy (see
    `_untie`). The adapters' values are left to the caller (`widelora.attach` initializes them; `load_adapter`
    copies them from a file).
    """
    alpha = float(rank) if alpha is None and isinstance(rank, int) else alpha
    _check_hyperparameters(rank, alpha, scaling, dropout)
    names = match_targets(model, targets)
    too_big = []
    for n in names:
        out_f, in_f = linear_shape(model.get_submodule(n))
        if rank > min(out_f, in_f):
            too_big.append(f"{n} ({out_f}x{in_f})")
    if too_big:
        raise UserError(
            f"rank={rank} exceeds min(out, in) for {', '.join(too_big[:5])}; choose rank <= "
            "the smallest dimension of every target"
        )
    if isinstance(trainable, str):
        raise UserError(f"trainable={trainable!r} must be a list of module names, not a string")
    extra = list(trainable)
    all_names = {n for n, _ in model.named_modules()}
    unknown = [t for t in extra if t not in all_names and not any(n.endswith("." + t) for n in all_names)]
    if unknown:
        raise UserError(f"trainable={unknown} match no module; modules: {sorted(all_names)[:30]}")

    # Validated: now change the model, remembering enough to undo it.
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    previous_trainable = getattr(model, "_widelora_trainable", None)
    keep = _kept_trainable(model)
    for p in model.parameters():
        p.requires_grad_(id(p) in keep and p.requires_grad)
    new_layers: list[LoRALinear] = []
    for n in names:
        parent_name, _, leaf = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(getattr(parent, leaf), rank=rank, alpha=alpha, scaling=scaling, dropout=dropout)
        setattr(parent, leaf, layer)
        new_layers.append(layer)
    untied = mark_trainable(model, extra)
    link_siblings(model, LoRALinear)

    def undo() -> None:
        _unwrap(model, new_layers)
        link_siblings(model, LoRALinear)
        for sub, p_name, original in untied:
            setattr(sub, p_name, original)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        if previous_trainable is None:
            del model._widelora_trainable
        else:
            model._widelora_trainable = previous_trainable

    return Added(new_layers, undo)


def _unwrap(model: nn.Module, layers: Sequence[LoRALinear]) -> None:
    targets = {id(layer) for layer in layers}
    for name, module in list(model.named_modules()):
        if id(module) in targets:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, module.base_layer)


def _widelora_layers(model: nn.Module) -> list[LoRALinear]:
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise UserError(f"model ({type(model).__name__}) has no widelora LoRA layers")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; forward then costs what the base model costs."""
    for layer in _widelora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (exact up to float rounding of the add/subtract)."""
    for layer in _widelora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back: returns a model with no LoRA modules."""
    layers = _widelora_layers(model)
    for layer in layers:
        layer.merge()
    _unwrap(model, layers)
    return model


def set_shared_input(model: nn.Module, enabled: bool) -> None:
    """Switch the stacked A products of siblings that read one input on or off (on by default; fused only)."""
    for layer in _widelora_layers(model):
        layer.use_shared_input = bool(enabled)


def set_fused(model: nn.Module, enabled: bool) -> None:
    """Switch the fused autograd path of every widelora layer on or off (it is on by default)."""
    for layer in _widelora_layers(model):
        layer.use_fused = bool(enabled)

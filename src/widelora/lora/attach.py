"""Attach LoRA layers to a model, and merge / unmerge / unload them.

`attach` validates everything (targets, rank against every matched layer, alpha, scheme) before it touches the
model, so a failing call leaves the model exactly as it was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from torch import nn

from widelora.lora.layer import SCALINGS, LoRALinear
from widelora.lora.modules import is_linear, linear_shape, output_head_names

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
                raise ValueError(f"targets={targets!r} is not a valid regular expression: {exc}") from exc
            names = [n for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    elif isinstance(targets, Iterable):
        wanted = list(targets)
        if not wanted or not all(isinstance(t, str) and t for t in wanted):
            raise TypeError(f"targets must be a non-empty list of module names, a regex string or "
                            f"{ALL_LINEAR!r}; got {targets!r}")
        names = [n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in wanted)]
        matched_any = {t for t in wanted if any(n == t or n.endswith("." + t) for n in names)}
        missing = [t for t in wanted if t not in matched_any]
        if missing and names:
            raise ValueError(f"targets {missing} match no module; {_describe_modules(model)}")
    else:
        raise TypeError(f"targets must be a list of names, a regex string or {ALL_LINEAR!r}; got {targets!r}")
    # Layers that are already adapted (and their inner base layers) are never wrapped twice.
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    names = [n for n in names if not any(n == a or n.startswith(a + ".") for a in adapted)]
    if not names:
        raise ValueError(f"targets={targets!r} match no module; {_describe_modules(model)}")
    wrong = [n for n in names if not is_linear(model.get_submodule(n))]
    if wrong:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in wrong})
        raise ValueError(
            f"targets={targets!r} select modules that are not linear layers ({', '.join(wrong[:5])}"
            f"{' ...' if len(wrong) > 5 else ''}; types {kinds}); LoRA wraps nn.Linear and Conv1D only. "
            f"{_describe_modules(model)}"
        )
    return names


def _check_hyperparameters(rank: object, alpha: object, scaling: str, dropout: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank={rank!r} is not valid; rank must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r} is not valid; alpha must be a positive number")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is not valid; choose one of {list(SCALINGS)}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not valid; dropout must be in [0, 1)")


def attach(
    model: nn.Module,
    targets: Targets,
    rank: int = 8,
    alpha: float | None = None,
    init: str = "init_a",
    scaling: str = "standard",
    dropout: float = 0.0,
    seed: int | None = None,
    trainable: Sequence[str] = (),
) -> nn.Module:
    """Wrap the selected linear layers with LoRA adapters, freeze everything else, and initialize the adapters.

    `alpha=None` means `alpha = rank` (scale 1 with standard scaling). `trainable` names extra modules (e.g. a
    classifier head) kept trainable; they are saved as PEFT `modules_to_save`. Returns the same model.
    """
    from widelora.methods.init import get_scheme, initialize

    alpha = float(rank) if alpha is None and isinstance(rank, int) else alpha
    _check_hyperparameters(rank, alpha, scaling, dropout)
    scheme = get_scheme(init)
    if scheme.needs_data:
        raise ValueError(
            f"init={init!r} needs data: attach with a random scheme (e.g. init='init_a') and then call "
            f"widelora.initialize(model, {init!r}, batches=...)"
        )
    names = match_targets(model, targets)
    too_big = []
    for n in names:
        out_f, in_f = linear_shape(model.get_submodule(n))
        if rank > min(out_f, in_f):
            too_big.append(f"{n} ({out_f}x{in_f})")
    if too_big:
        raise ValueError(f"rank={rank} exceeds min(out, in) for {', '.join(too_big[:5])}; choose rank <= "
                         "the smallest dimension of every target")
    extra = list(trainable)
    all_names = {n for n, _ in model.named_modules()}
    unknown = [t for t in extra if t not in all_names and not any(n.endswith("." + t) for n in all_names)]
    if unknown:
        raise ValueError(f"trainable={unknown} match no module; modules: {sorted(all_names)[:30]}")

    # Validated: now change the model (remembering enough to undo it if the initialization fails).
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    previous_trainable = getattr(model, "_widelora_trainable", None)
    for p in model.parameters():
        p.requires_grad_(False)
    new_layers: list[LoRALinear] = []
    for n in names:
        parent_name, _, leaf = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(getattr(parent, leaf), rank=rank, alpha=alpha, scaling=scaling, dropout=dropout)
        setattr(parent, leaf, layer)
        new_layers.append(layer)
    for n, module in model.named_modules():
        if n and any(n == t or n.endswith("." + t) for t in extra):
            for p in module.parameters():
                p.requires_grad_(True)
    model._widelora_trainable = sorted(set(getattr(model, "_widelora_trainable", [])) | set(extra))
    try:
        initialize(model, init, seed=seed, only={id(layer) for layer in new_layers})
    except Exception:
        _unwrap(model, new_layers)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        if previous_trainable is None:
            del model._widelora_trainable
        else:
            model._widelora_trainable = previous_trainable
        raise
    return model


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
        raise ValueError(f"model ({type(model).__name__}) has no widelora LoRA layers")
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


def set_fused(model: nn.Module, enabled: bool) -> None:
    """Switch the fused autograd path of every widelora layer on or off (it is on by default)."""
    for layer in _widelora_layers(model):
        layer.use_fused = bool(enabled)

"""Optimizers for LoRA as a registry of methods: `create_optimizer`, parameter groups, and plain AdamW.

Each method is one registered builder in its own module (LoRA+ in `loraplus.py`, the LoRA-One / scaled-GD
preconditioner in `lora_one.py`). Parameter groups are built from the LoRA pair view (B matrices are found by
identity, not by name), so they are right for widelora and PEFT models alike; the user's weight decay is
always honoured.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError
from widelora.lora.pairs import lora_pairs
from widelora.methods.setup_args import UNSET, resolve


@dataclass(frozen=True)
class OptimizerSpec:
    lr: float
    ratio: float = 16.0
    weight_decay: float = 0.0
    embedding_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    head_lr: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


OptimizerBuilder = Callable[[nn.Module, OptimizerSpec], torch.optim.Optimizer]
_METHODS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Register `fn(model, spec) -> torch.optim.Optimizer` as a method of `create_optimizer`."""

    def decorator(fn: OptimizerBuilder) -> OptimizerBuilder:
        _METHODS[name] = fn
        return fn

    return decorator


def available_methods() -> list[str]:
    return sorted(_METHODS)


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """Map each parameter (by id) to its full name and the module that owns it."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (f"{mod_name}.{p_name}" if mod_name else p_name, module))
    return owners


def _is_no_decay(name: str, module: nn.Module) -> bool:
    """Biases and normalization weights take no weight decay (HF Trainer's and PEFT's rule)."""
    return "bias" in name.rsplit(".", 1)[-1] or "norm" in type(module).__name__.lower()


def _embedding_adapter_ids(model: nn.Module) -> set[int]:
    try:
        from peft.tuners.lora import Embedding as PeftLoraEmbedding
    except ImportError:  # pragma: no cover
        return set()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, PeftLoraEmbedding):
            for p in module.parameters():
                if p.requires_grad:
                    ids.add(id(p))
    return ids


@dataclass(frozen=True)
class ParamRole:
    """What a trainable parameter is, as far as choosing its learning rate and weight decay goes."""

    is_adapter: bool  # a LoRA factor (A or B) of some pair
    is_b: bool  # the B factor of a pair
    is_embedding_adapter: bool  # a PEFT LoRA factor on an embedding layer
    no_decay: bool  # a bias or a normalization weight
    ndim: int


# A group rule: (group name, lr, weight decay) for one parameter. Groups are listed in this order.
GroupRule = Callable[[ParamRole, OptimizerSpec], tuple[str, float, float]]
GROUP_ORDER = ("A", "B", "B_no_decay", "embedding", "no_decay", "head", "head_no_decay")


def plain_rule(role: ParamRole, spec: OptimizerSpec) -> tuple[str, float, float]:
    """One learning rate for everything; biases and norms without weight decay."""
    return ("no_decay", spec.lr, 0.0) if role.no_decay else ("A", spec.lr, spec.weight_decay)


def param_groups(model: nn.Module, spec: OptimizerSpec, rule: GroupRule = plain_rule) -> list[dict[str, Any]]:
    """Trainable parameters in named groups, each parameter placed by `rule` (see `plain_rule`, LoRA+'s rule).

    With `spec.head_lr` set, every trainable parameter that is not an adapter factor (a fresh classification
    head, modules_to_save, biases, norms) goes to the "head" / "head_no_decay" groups at `head_lr` instead,
    whatever the rule.
    """
    pairs = lora_pairs(model)
    adapter_ids = {id(t) for p in pairs for t in (p.A, p.B)}
    b_ids = {id(p.B) for p in pairs}
    emb_ids = _embedding_adapter_ids(model)
    owners = _owners(model)
    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        name, owner = owners.get(id(p), ("", model))
        role = ParamRole(
            id(p) in adapter_ids, id(p) in b_ids, id(p) in emb_ids, _is_no_decay(name, owner), p.ndim
        )
        if spec.head_lr is not None and not role.is_adapter and not role.is_embedding_adapter:
            key, lr, wd = (
                ("head_no_decay", spec.head_lr, 0.0)
                if role.no_decay
                else ("head", spec.head_lr, spec.weight_decay)
            )
        else:
            key, lr, wd = rule(role, spec)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "name": key})["params"].append(p)
    if not groups:
        raise UserError(f"model ({type(model).__name__}) has no trainable parameters; attach adapters first")
    return sorted(
        groups.values(), key=lambda g: GROUP_ORDER.index(g["name"]) if g["name"] in GROUP_ORDER else 99
    )


@register_optimizer("adamw")
def _adamw(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """AdamW with one learning rate for A and B (vanilla LoRA)."""
    return torch.optim.AdamW(param_groups(model, spec), lr=spec.lr, betas=spec.betas, eps=spec.eps)


# Old optimizer names kept working: "lora_one" named both an init scheme and an optimizer until 0.2.
_DEPRECATED_ALIASES = {"lora_one": "lora_one_precond"}


def _canonical_method(method: object) -> str:
    if isinstance(method, str) and method in _DEPRECATED_ALIASES:
        new = _DEPRECATED_ALIASES[method]
        warnings.warn(
            f"optimizer method {method!r} is deprecated (it is also an init scheme's name); use {new!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        method = new
    if not isinstance(method, str) or method not in _METHODS:
        raise UserError(f"optimizer method {method!r} is unknown; valid methods: {available_methods()}")
    return method


def _positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UserError(f"{name}={value!r} is not valid; {name} must be a positive finite number")


OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "lr": UNSET,
    "method": "adamw",
    "ratio": 16.0,
    "weight_decay": 0.0,
    "embedding_lr": 1e-6,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "head_lr": None,
}


def create_optimizer(
    model: nn.Module,
    lr: float = UNSET,
    method: str = UNSET,
    ratio: float = UNSET,
    weight_decay: float = UNSET,
    embedding_lr: float = UNSET,
    betas: tuple[float, float] = UNSET,
    eps: float = UNSET,
    head_lr: float | None = UNSET,
    setup: object | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of `model` (widelora or PEFT adapters).

    `method`: "adamw" (one lr, the default), "loraplus" (lr_B = ratio · lr), or any registered method (e.g.
    the preconditioned "lora_one_precond" / "scaled_gd"). `head_lr` gives every trainable parameter that is
    not an adapter factor (a fresh head, modules_to_save, biases, norms) its own learning rate; None keeps
    them with the adapters. Defaults: ratio 16, weight_decay 0, embedding_lr 1e-6, betas (0.9, 0.999), eps
    1e-8. `setup` is any object with `optimizer_kwargs() -> dict` (e.g. a `widelora.recommend`
    recommendation): its values fill every argument not passed explicitly; explicit arguments win. `options`
    go to the method.
    """
    passed = {
        "lr": lr,
        "method": method,
        "ratio": ratio,
        "weight_decay": weight_decay,
        "embedding_lr": embedding_lr,
        "betas": betas,
        "eps": eps,
        "head_lr": head_lr,
    }
    args = resolve("create_optimizer", setup, "optimizer_kwargs", passed, OPTIMIZER_DEFAULTS)
    if args["lr"] is UNSET:
        raise UserError(
            "create_optimizer needs lr=..., or setup=<an object whose optimizer_kwargs() gives it>"
        )
    method = _canonical_method(args["method"])
    _positive("lr", args["lr"])
    _positive("ratio", args["ratio"])
    _positive("eps", args["eps"])
    _positive("embedding_lr", args["embedding_lr"])
    if args["head_lr"] is not None:
        _positive("head_lr", args["head_lr"])
    wd, betas = args["weight_decay"], args["betas"]
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise UserError(f"weight_decay={wd!r} is not valid; it must be a finite number >= 0")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise UserError(f"betas={betas!r} is not valid; it must be two numbers in [0, 1)")
    spec = OptimizerSpec(
        lr=float(args["lr"]),
        ratio=float(args["ratio"]),
        weight_decay=float(wd),
        embedding_lr=float(args["embedding_lr"]),
        betas=(float(betas[0]), float(betas[1])),
        eps=float(args["eps"]),
        head_lr=None if args["head_lr"] is None else float(args["head_lr"]),
        options=dict(options),
    )
    return _METHODS[method](model, spec)

"""Initialization schemes for LoRA pairs, as a registry, and the zero-product schemes (B A = 0 at the start).

A new scheme is one registered function; the methods that move W or need data live in their own modules
(`pissa.py`, `lora_one.py`, `lora_ga.py`).

A scheme maps the model's pairs to new values (`InitUpdate`s). `initialize` computes every update first,
checks them, and only then writes, so a failing scheme leaves the model untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError
from widelora.lora.pairs import LoRAPair, require_pairs


@dataclass
class InitUpdate:
    """New adapter values for one pair (float tensors; cast to the layer's dtype on write).

    `weight` replaces the frozen base weight (out, in) for schemes that keep the output unchanged by moving W
    (PiSSA, LoRA-GA); `offset = (B0, A0)` records that move, `W_new = W_orig - scale · B0 A0`, so a portable
    adapter can fold it back in.
    """

    A: torch.Tensor
    B: torch.Tensor
    weight: torch.Tensor | None = None
    offset: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class InitContext:
    """What a scheme may use: the model, a seeded generator, data for gradient-informed schemes, options."""

    model: nn.Module
    generator: torch.Generator
    batches: Iterable[Any] | None = None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def original_weight(self, pair: LoRAPair) -> torch.Tensor:
        """The base weight as the user loaded it: undoes an earlier PiSSA/LoRA-GA move (W_res + s·B0 A0)."""
        w = pair.weight.detach().float()
        offset = pair.base_offset
        if offset is not None:
            b0, a0 = offset
            w = w + pair.scale * (b0.float() @ a0.float()).to(w.device)
        return w


SchemeFn = Callable[[list[LoRAPair], InitContext], dict[str, InitUpdate]]


@dataclass(frozen=True)
class InitScheme:
    name: str
    fn: SchemeFn
    needs_data: bool
    description: str


_SCHEMES: dict[str, InitScheme] = {}


def register_init(
    name: str, needs_data: bool = False, description: str = ""
) -> Callable[[SchemeFn], SchemeFn]:
    """Register `fn(pairs, ctx) -> {pair.name: InitUpdate}` under `name`."""

    def decorator(fn: SchemeFn) -> SchemeFn:
        if name in _SCHEMES and _SCHEMES[name].fn is not fn:
            raise UserError(f"an init scheme named {name!r} is already registered")
        _SCHEMES[name] = InitScheme(
            name, fn, needs_data, description or (fn.__doc__ or "").strip().split("\n")[0]
        )
        return fn

    return decorator


def unregister_init(name: str) -> None:
    """Remove a registered scheme (tests and notebooks that register throwaway schemes clean up with this)."""
    if name not in _SCHEMES:
        raise UserError(f"init scheme {name!r} is not registered; registered schemes: {available_schemes()}")
    del _SCHEMES[name]


def per_pair(fn: Callable[[LoRAPair, InitContext], InitUpdate]) -> SchemeFn:
    """Lift a scheme that treats each pair on its own into a registry function."""

    def scheme(pairs: list[LoRAPair], ctx: InitContext) -> dict[str, InitUpdate]:
        return {p.name: fn(p, ctx) for p in pairs}

    scheme.__doc__ = fn.__doc__
    return scheme


def available_schemes() -> list[str]:
    return sorted(_SCHEMES)


def get_scheme(name: str) -> InitScheme:
    if not isinstance(name, str) or name not in _SCHEMES:
        raise UserError(f"init scheme {name!r} is unknown; valid schemes: {available_schemes()}")
    return _SCHEMES[name]


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


@register_init("init_a")
@per_pair
def _init_a(pair: LoRAPair, ctx: InitContext) -> InitUpdate:
    """Init[A] (the paper's recommendation): B = 0, A ~ N(0, 1/fan_in)."""
    std = ctx.options.get("std", 1.0 / math.sqrt(pair.fan_in))
    return InitUpdate(
        A=_normal((pair.rank, pair.fan_in), std, ctx.generator), B=torch.zeros(pair.fan_out, pair.rank)
    )


@register_init("init_b")
@per_pair
def _init_b(pair: LoRAPair, ctx: InitContext) -> InitUpdate:
    """Init[B]: A = 0, B ~ N(0, 1/r)."""
    std = ctx.options.get("std", 1.0 / math.sqrt(pair.rank))
    return InitUpdate(
        A=torch.zeros(pair.rank, pair.fan_in), B=_normal((pair.fan_out, pair.rank), std, ctx.generator)
    )


@register_init("kaiming")
@per_pair
def _kaiming(pair: LoRAPair, ctx: InitContext) -> InitUpdate:
    """PEFT's and loralib's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
    bound = 1.0 / math.sqrt(pair.fan_in)
    a = torch.rand((pair.rank, pair.fan_in), generator=ctx.generator) * (2 * bound) - bound
    return InitUpdate(A=a, B=torch.zeros(pair.fan_out, pair.rank))


@register_init("gaussian")
@per_pair
def _gaussian(pair: LoRAPair, ctx: InitContext) -> InitUpdate:
    """PEFT's "gaussian": A ~ N(0, (1/r)^2), B = 0."""
    return InitUpdate(
        A=_normal((pair.rank, pair.fan_in), 1.0 / pair.rank, ctx.generator),
        B=torch.zeros(pair.fan_out, pair.rank),
    )


def _seeded_generator(seed: int | None) -> torch.Generator:
    if seed is None:  # follow the global torch seed, so torch.manual_seed still makes runs reproducible
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is not valid; seed must be an int or None")
    return torch.Generator().manual_seed(seed)


def _check_update(pair: LoRAPair, update: InitUpdate, scheme: str) -> None:
    expected = {"A": (pair.rank, pair.fan_in), "B": (pair.fan_out, pair.rank)}
    for key, shape in expected.items():
        t = getattr(update, key)
        if tuple(t.shape) != shape:
            raise UserError(
                f"init scheme {scheme!r} produced {key} of shape {tuple(t.shape)} for {pair.name}; "
                f"expected {shape}"
            )
    for key in ("A", "B", "weight"):
        t = getattr(update, key)
        if t is not None and not torch.isfinite(t).all():
            raise UserError(
                f"init scheme {scheme!r} produced non-finite values in {key} of {pair.name}; "
                "the model was left unchanged"
            )


def _check_unshared(model: nn.Module, moving: list[LoRAPair], scheme: str) -> None:
    """A scheme that moves W must not move a weight another module shares (a tied LM head's embeddings)."""
    if not moving:
        return
    count: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        count[id(param)] = count.get(id(param), 0) + 1
    tied = [p.name for p in moving if count.get(id(p.base_layer.weight), 0) > 1]
    if tied:
        raise UserError(
            f"init scheme {scheme!r} moves the base weight, but {tied[:3]} share their weight with another "
            "module (tied input/output embeddings): moving it would change that module too. Choose a scheme "
            "that leaves W alone (e.g. 'init_a') for these layers, or untie the weights first"
        )


def initialize(
    model: nn.Module,
    scheme: str = "init_a",
    seed: int | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    only: set[int] | None = None,
    **options: Any,
) -> nn.Module:
    """Re-initialize the adapters of `model` (widelora or PEFT) with a registered scheme.

    Gradient-informed schemes need `batches` (and `loss_fn` when the model's output has no `.loss`). `only`
    restricts the call to pairs whose module id is in the set (used by `attach` for freshly added layers).
    """
    spec = get_scheme(scheme)
    pairs = require_pairs(model)
    if only is not None:
        pairs = [p for p in pairs if id(p.module) in only]
    if spec.needs_data and batches is None:
        raise UserError(
            f"init scheme {scheme!r} estimates gradients and needs data: pass batches=<an iterable "
            "of model inputs> (and loss_fn=... if the model output has no .loss)"
        )
    ctx = InitContext(
        model=model, generator=_seeded_generator(seed), batches=batches, loss_fn=loss_fn, options=options
    )
    updates = spec.fn(pairs, ctx)
    missing = [p.name for p in pairs if p.name not in updates]
    if missing:
        raise UserError(f"init scheme {scheme!r} returned no update for {missing[:5]}")
    for p in pairs:
        _check_update(p, updates[p.name], scheme)
    _check_unshared(model, [p for p in pairs if updates[p.name].weight is not None], scheme)
    with torch.no_grad():
        for p in pairs:
            u = updates[p.name]
            if u.weight is not None:
                p.set_weight(u.weight.to(p.weight.device))
            elif p.base_offset is not None:  # leaving a moved-W scheme: put the user's W back
                p.set_weight(ctx.original_weight(p))
            p.set_base_offset(
                None
                if u.offset is None
                else tuple(t.detach().to(device=p.A.device, dtype=torch.float32).clone() for t in u.offset)
            )
            p.A.copy_(u.A.to(device=p.A.device, dtype=p.A.dtype))
            p.B.copy_(u.B.to(device=p.B.device, dtype=p.B.dtype))
    return model

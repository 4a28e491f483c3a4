"""Gradient-informed initializations: LoRA-One and LoRA-GA (registered as "lora_one" and "lora_ga").

Both start from ``G = dL/dW``, the full gradient of every adapted frozen weight on the base model, averaged over
a few batches (``widelora.methods.gradients``), and put a truncated SVD of it into the adapter:

- ``lora_one`` (Zhang, Liu et al. 2025; reference YuanheZ/LoRA-One): ``U, S, V = svd(-G)``,
  ``B0 = U_r sqrt(S_r) / sqrt(S_0 gamma)``, ``A0 = sqrt(S_r) V_r^T / sqrt(S_0 gamma)``, so
  ``s B0 A0 = (s / (gamma sigma_1)) [-G]_r``: the model after initialization already includes one normalized,
  truncated full-gradient step. ``W`` is NOT adjusted. ``gamma`` defaults to the reference's 128.
- ``lora_ga`` (Wang et al. 2024; reference Outsider565/LoRA-GA): ``U, S, V = svd(+G)``, ``A0 = V[:, :r]^T``,
  ``B0 = U[:, r:2r]``, both times ``m^(1/4) / sqrt(gamma)`` (m = fan-out, gamma = 16, the reference's "stable"
  scale), and ``W <- W - s B0 A0`` so the initial output is unchanged. The move of ``W`` is recorded as the
  pair's base offset ``(B0, A0)``; ``widelora.save_adapter`` folds it back in (a rank-2r PEFT adapter holding
  ``[B_f, -B0] [A_f; A0]``), so the saved adapter on the UNMODIFIED base reproduces the finetuned model.

Gradients are taken on the base function: during the estimate every ``B`` is zeroed and a previously moved
``W`` is put back (both restored afterwards), so a second initialization sees the same model as the first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import torch

from widelora.lora.pairs import LoRAPair
from widelora.methods.gradients import iter_gradients
from widelora.methods.init import InitContext, InitUpdate, register_init

__all__ = ["SVD_MODES", "lora_ga_factors", "lora_one_factors", "pair_gradients"]

SVD_MODES = ("auto", "exact", "lowrank")
_EXACT_MAX_DIM = 1024  # "auto": exact SVD when min(out, in) is at most this, randomized otherwise

_COMMON_OPTIONS = {"num_batches", "memory_budget", "svd", "niter", "q", "train_mode", "progress"}
_LORA_ONE_OPTIONS = _COMMON_OPTIONS | {"gamma"}
_LORA_GA_OPTIONS = _COMMON_OPTIONS | {"gamma"}


def _svd(g: torch.Tensor, k: int, mode: str, q: int | None, niter: int,
         generator_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets of ``g`` (float64 for exact): U (m, >=k), S (>=k,), V (n, >=k), descending."""
    m, n = g.shape
    if mode not in SVD_MODES:
        raise ValueError(f"svd={mode!r} is not valid; choose one of {list(SVD_MODES)}")
    if mode == "auto":
        mode = "exact" if min(m, n) <= _EXACT_MAX_DIM else "lowrank"
    if mode == "exact":
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        return u, s, vh.mT
    q = min(max(q if q is not None else 2 * k, k), min(m, n))
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global RNG: keep it seeded and private
        torch.manual_seed(generator_seed)
        u, s, v = torch.svd_lowrank(g.float(), q=q, niter=niter)
    return u.double(), s.double(), v.double()


def _check_rank(name: str, rank: int, needed: int, shape: tuple[int, int], scheme: str) -> None:
    if needed > min(shape):
        raise ValueError(
            f"{scheme}: rank {rank} is too large for {name} with weight shape {shape}: the gradient has at most "
            f"rank {min(shape)} and {scheme} needs {needed} singular directions; use rank <= "
            f"{min(shape) // (needed // rank)}"
        )


def _numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > s[0] * max(s.shape[0], 1) * torch.finfo(torch.float32).eps).sum())


def lora_one_factors(
    grad: torch.Tensor, rank: int, gamma: float = 128.0, svd: str = "auto", q: int | None = None,
    niter: int = 16, seed: int = 0, name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-One's (B0, A0) from a gradient G (out × in): ``B0 A0 = [-G]_r / (gamma · sigma_1)``."""
    _check_positive("gamma", gamma)
    _check_rank(name, rank, rank, tuple(grad.shape), "lora_one")
    u, s, v = _svd(-grad, rank, svd, q if q is not None else min(512, min(grad.shape)), niter, seed)
    if not torch.isfinite(s).all() or s[0] <= 0:
        raise ValueError(f"lora_one: the gradient of {name} is zero or not finite (sigma_1 = {float(s[0])}); the "
                         "loss does not depend on this weight on the given data")
    if _numerical_rank(s) < rank:
        warnings.warn(f"lora_one: the gradient of {name} has numerical rank {_numerical_rank(s)} < rank {rank}; "
                      "the extra directions are ~0 (more data would fill them)", stacklevel=3)
    root = s[:rank].sqrt()
    denom = math.sqrt(float(s[0]) * gamma)
    b0 = u[:, :rank] * root / denom
    a0 = (root[:, None] * v[:, :rank].T) / denom
    return b0.float(), a0.float()


def lora_ga_factors(
    grad: torch.Tensor, rank: int, gamma: float = 16.0, svd: str = "auto", q: int | None = None,
    niter: int = 4, seed: int = 0, name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's (B0, A0) from a gradient G (out × in): ``A0 = V[:, :r]^T``, ``B0 = U[:, r:2r]``, stable scale."""
    _check_positive("gamma", gamma)
    _check_rank(name, rank, 2 * rank, tuple(grad.shape), "lora_ga")
    m = grad.shape[0]
    u, s, v = _svd(grad, 2 * rank, svd, q if q is not None else min(4 * rank, min(grad.shape)), niter, seed)
    if not torch.isfinite(s).all() or s[0] <= 0:
        raise ValueError(f"lora_ga: the gradient of {name} is zero or not finite; the loss does not depend on "
                         "this weight on the given data")
    factor = m ** 0.25 / math.sqrt(gamma)
    a0 = v[:, :rank].T * factor
    b0 = u[:, rank:2 * rank] * factor
    return b0.float(), a0.float()


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not valid; {name} must be a positive finite number")


def _check_options(scheme: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"init scheme {scheme!r} got unknown options {unknown}; valid options: {sorted(allowed)}")
    svd = options.get("svd", "auto")
    if svd not in SVD_MODES:
        raise ValueError(f"svd={svd!r} is not valid; choose one of {list(SVD_MODES)}")


@contextmanager
def _base_function(pairs: list[LoRAPair], ctx: InitContext) -> Iterator[None]:
    """Make the adapted model compute the user's base model: B = 0 and a moved W put back; restore on exit."""
    saved = []
    try:
        with torch.no_grad():
            for p in pairs:
                w_saved = None
                if p.base_offset is not None:
                    w_saved = p.weight.detach().clone()
                    p.set_weight(ctx.original_weight(p).to(p.weight.device))
                saved.append((p, p.B.detach().clone(), w_saved))
                p.B.zero_()
        yield  # outside no_grad: the caller differentiates
    finally:
        with torch.no_grad():
            for p, b, w in saved:
                p.B.copy_(b)
                if w is not None:
                    p.set_weight(w)


def _gradient_groups(pairs: list[LoRAPair], ctx: InitContext):
    if ctx.batches is None:
        raise ValueError("gradient-informed init schemes need data: pass batches=<an iterable of model inputs>")
    opts = ctx.options
    return iter_gradients(
        ctx.model, pairs, ctx.batches, loss_fn=ctx.loss_fn, num_batches=opts.get("num_batches"),
        memory_budget=opts.get("memory_budget"), train_mode=bool(opts.get("train_mode", False)),
        progress=bool(opts.get("progress", True)),
    )


def pair_gradients(pairs: list[LoRAPair], ctx: InitContext) -> dict[str, torch.Tensor]:
    """``G = dL/dW`` (out × in, fp32) for every pair, estimated on the base function from ``ctx.batches``."""
    grads: dict[str, torch.Tensor] = {}
    with _base_function(pairs, ctx), closing(_gradient_groups(pairs, ctx)) as groups:
        for group in groups:
            grads.update(group)
    return grads


def _factors(pairs: list[LoRAPair], ctx: InitContext,
             fn: Callable[[LoRAPair, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B0, A0) per pair, each group's gradients turned into factors before the next group is estimated."""
    by_name = {p.name: p for p in pairs}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with _base_function(pairs, ctx), closing(_gradient_groups(pairs, ctx)) as groups:
        for group in groups:
            for name in list(group):
                out[name] = fn(by_name[name], group.pop(name))
    return out


def _seed(ctx: InitContext) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator).item())


def _precheck(pairs: list[LoRAPair], factor: int, scheme: str) -> None:
    """Rank errors before any gradient is computed (the estimate can take minutes)."""
    for p in pairs:
        _check_rank(p.name, p.rank, factor * p.rank, (p.fan_out, p.fan_in), scheme)


@register_init("lora_one", needs_data=True,
               description="LoRA-One: one normalized, SVD-truncated full-gradient step (W unchanged)")
def lora_one(pairs: list[LoRAPair], ctx: InitContext) -> dict[str, InitUpdate]:
    """LoRA-One: ``s B0 A0 = (s / (gamma sigma_1)) [-G]_r``; W unchanged. Options: gamma (128), svd, q, niter."""
    _check_options("lora_one", ctx.options, _LORA_ONE_OPTIONS)
    gamma = ctx.options.get("gamma", 128.0)
    _check_positive("gamma", gamma)
    _precheck(pairs, 1, "lora_one")
    seed = _seed(ctx)
    opts = ctx.options
    factors = _factors(pairs, ctx, lambda p, g: lora_one_factors(
        g, p.rank, gamma=gamma, svd=opts.get("svd", "auto"), q=opts.get("q"), niter=opts.get("niter", 16),
        seed=seed, name=p.name))
    return {p.name: InitUpdate(A=factors[p.name][1], B=factors[p.name][0]) for p in pairs}


@register_init("lora_ga", needs_data=True,
               description="LoRA-GA: gradient singular vectors in A and B, W moved so the output is unchanged")
def lora_ga(pairs: list[LoRAPair], ctx: InitContext) -> dict[str, InitUpdate]:
    """LoRA-GA (reference variant): A0 = V_r^T, B0 = U_[r:2r], scale m^(1/4)/sqrt(gamma); W <- W - s B0 A0."""
    _check_options("lora_ga", ctx.options, _LORA_GA_OPTIONS)
    gamma = ctx.options.get("gamma", 16.0)
    _check_positive("gamma", gamma)
    _precheck(pairs, 2, "lora_ga")
    seed = _seed(ctx)
    opts = ctx.options
    factors = _factors(pairs, ctx, lambda p, g: lora_ga_factors(
        g, p.rank, gamma=gamma, svd=opts.get("svd", "auto"), q=opts.get("q"), niter=opts.get("niter", 4),
        seed=seed, name=p.name))
    updates = {}
    for p in pairs:
        b0, a0 = factors[p.name]
        w = ctx.original_weight(p)
        new_w = (w.double() - p.scale * (b0.double() @ a0.double())).float()
        updates[p.name] = InitUpdate(A=a0, B=b0, weight=new_w, offset=(b0.clone(), a0.clone()))
    return updates

"""Shared machinery of the gradient-informed inits (LoRA-One, LoRA-GA): gradients on the base function, SVD.

Both start from ``G = dL/dW``, the full gradient of every adapted frozen weight on the base model, averaged
over a few batches (``widelora.methods.gradients``), and put a truncated SVD of it into the adapter. Gradients
are taken on the base function: during the estimate every ``B`` is zeroed and a previously moved ``W`` is put
back (both restored afterwards), so a second initialization sees the same model as the first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import torch

from widelora.errors import UserError
from widelora.lora.pairs import LoRAPair
from widelora.methods.gradients import consume_gradients, iter_gradients
from widelora.methods.init import InitContext

__all__ = ["COMMON_OPTIONS", "SVD_MODES", "choose_svd", "gradient_factors", "pair_gradients", "truncated_svd"]

SVD_MODES = ("auto", "exact", "lowrank")
# "auto": randomized SVD only where it is far cheaper and its error is negligible: the sketch width q is at
# most a quarter of min(out, in) and the matrix is not small. Elsewhere exact SVD (float64).
_LOWRANK_MIN_DIM = 128
_LOWRANK_MAX_FRACTION = 0.25

COMMON_OPTIONS = {"num_batches", "memory_budget", "svd", "niter", "q", "train_mode", "progress"}


def choose_svd(shape: tuple[int, int], q: int, mode: str = "auto") -> str:
    """ "exact" or "lowrank" for a gradient of ``shape`` truncated through a sketch of width ``q``."""
    if mode not in SVD_MODES:
        raise UserError(f"svd={mode!r} is not valid; choose one of {list(SVD_MODES)}")
    if mode != "auto":
        return mode
    small = min(shape)
    return "lowrank" if small > _LOWRANK_MIN_DIM and q <= _LOWRANK_MAX_FRACTION * small else "exact"


def truncated_svd(
    g: torch.Tensor, k: int, mode: str, q: int | None, niter: int, generator_seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets of ``g`` (float64): U (m, >=k), S (>=k,), V (n, >=k), descending.

    The randomized path (``torch.svd_lowrank``, a Halko-style range finder with ``niter`` power iterations
    over a sketch of ``q`` >= k columns, default 2k) is the references' choice; it is seeded privately so
    the global RNG is untouched and results are reproducible.
    """
    m, n = g.shape
    q = min(max(q if q is not None else 2 * k, k), min(m, n))
    if choose_svd((m, n), q, mode) == "exact":
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        return u, s, vh.mT
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global RNG: keep it private
        torch.manual_seed(generator_seed)
        u, s, v = torch.svd_lowrank(g.float(), q=q, niter=niter)
    return u.double(), s.double(), v.double()


def check_rank(name: str, rank: int, needed: int, shape: tuple[int, int], scheme: str) -> None:
    if needed > min(shape):
        raise UserError(
            f"{scheme}: rank {rank} is too large for {name} with weight shape {shape}: the gradient has at "
            "most "
            f"rank {min(shape)} and {scheme} needs {needed} singular directions; use rank <= "
            f"{min(shape) // (needed // rank)}"
        )


def numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > s[0] * max(s.shape[0], 1) * torch.finfo(torch.float32).eps).sum())


def check_positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UserError(f"{name}={value!r} is not valid; {name} must be a positive finite number")


def check_options(scheme: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(
            f"init scheme {scheme!r} got unknown options {unknown}; valid options: {sorted(allowed)}"
        )
    svd = options.get("svd", "auto")
    if svd not in SVD_MODES:
        raise UserError(f"svd={svd!r} is not valid; choose one of {list(SVD_MODES)}")


@contextmanager
def base_function(pairs: list[LoRAPair], ctx: InitContext) -> Iterator[None]:
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


def gradient_groups(pairs: list[LoRAPair], ctx: InitContext):
    if ctx.batches is None:
        raise UserError(
            "gradient-informed init schemes need data: pass batches=<an iterable of model inputs>"
        )
    opts = ctx.options
    return iter_gradients(
        ctx.model,
        pairs,
        ctx.batches,
        loss_fn=ctx.loss_fn,
        num_batches=opts.get("num_batches"),
        memory_budget=opts.get("memory_budget"),
        train_mode=bool(opts.get("train_mode", False)),
        progress=bool(opts.get("progress", True)),
    )


def pair_gradients(pairs: list[LoRAPair], ctx: InitContext) -> dict[str, torch.Tensor]:
    """``G = dL/dW`` (out × in, fp32) for every pair, estimated on the base function from ``ctx.batches``."""
    grads: dict[str, torch.Tensor] = {}
    with base_function(pairs, ctx), closing(gradient_groups(pairs, ctx)) as groups:
        for group in groups:
            grads.update(group)
    return grads


def gradient_factors(
    pairs: list[LoRAPair],
    ctx: InitContext,
    fn: Callable[[LoRAPair, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B0, A0) per pair, each group's gradients turned into factors before the next group is estimated."""
    if ctx.batches is None:
        raise UserError(
            "gradient-informed init schemes need data: pass batches=<an iterable of model inputs>"
        )
    by_name = {p.name: p for p in pairs}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    opts = ctx.options
    with base_function(pairs, ctx):
        consume_gradients(
            ctx.model,
            pairs,
            ctx.batches,
            lambda name, g: out.__setitem__(name, fn(by_name[name], g)),
            loss_fn=ctx.loss_fn,
            num_batches=opts.get("num_batches"),
            memory_budget=opts.get("memory_budget"),
            train_mode=bool(opts.get("train_mode", False)),
            progress=bool(opts.get("progress", True)),
        )
    return {p.name: out[p.name] for p in pairs}


def svd_seed(ctx: InitContext) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator).item())


def precheck_ranks(pairs: list[LoRAPair], factor: int, scheme: str) -> None:
    """Rank errors before any gradient is computed (the estimate can take minutes)."""
    for p in pairs:
        check_rank(p.name, p.rank, factor * p.rank, (p.fan_out, p.fan_in), scheme)


def scheme_factors(
    scheme: str,
    pairs: list[LoRAPair],
    ctx: InitContext,
    allowed: set[str],
    default_gamma: float,
    rank_factor: int,
    factor_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What every gradient-SVD init does before its own formula: check its options, gamma and the ranks
    (before the costly estimate), draw the SVD seed, and turn each pair's gradient into (B0, A0) with
    ``factor_fn(G, rank, gamma=, svd=, q=, niter=, seed=, name=)``."""
    check_options(scheme, ctx.options, allowed)
    gamma = ctx.options.get("gamma", default_gamma)
    check_positive("gamma", gamma)
    precheck_ranks(pairs, rank_factor, scheme)
    seed = svd_seed(ctx)
    opts = ctx.options
    return gradient_factors(
        pairs,
        ctx,
        lambda p, g: factor_fn(
            g,
            p.rank,
            gamma=gamma,
            svd=opts.get("svd", "auto"),
            q=opts.get("q"),
            niter=opts.get("niter", 4),
            seed=seed,
            name=p.name,
        ),
    )

"""LoRA-GA (Wang et al. 2024; reference Outsider565/LoRA-GA), registered as the init scheme "lora_ga".

``U, S, V = svd(+G)``, ``A0 = V[:, :r]^T``, ``B0 = U[:, r:2r]``, both times ``m^(1/4) / sqrt(gamma)`` (m =
fan-out, gamma = 16, the reference's "stable" scale), and ``W <- W - s B0 A0`` so the initial output is
unchanged. The move of ``W`` is recorded as the pair's base offset ``(B0, A0)``; ``widelora.save_adapter``
folds it back in (a rank-2r PEFT adapter holding ``[B_f, -B0] [A_f; A0]``), so the saved adapter on the
UNMODIFIED base reproduces the finetuned model. ``G`` is estimated by ``widelora.methods.gradient_svd``.
"""

from __future__ import annotations

import math

import torch

from widelora.errors import UserError
from widelora.lora.pairs import LoRAPair
from widelora.methods.gradient_svd import (
    COMMON_OPTIONS,
    check_positive,
    check_rank,
    scheme_factors,
    truncated_svd,
)
from widelora.methods.init import InitContext, InitUpdate, register_init

__all__ = ["lora_ga", "lora_ga_factors"]

_OPTIONS = COMMON_OPTIONS | {"gamma"}


def lora_ga_factors(
    grad: torch.Tensor,
    rank: int,
    gamma: float = 16.0,
    svd: str = "auto",
    q: int | None = None,
    niter: int = 4,
    seed: int = 0,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's (B0, A0) from a gradient G (out × in): ``A0 = V[:, :r]^T``, ``B0 = U[:, r:2r]``, scaled."""
    check_positive("gamma", gamma)
    check_rank(name, rank, 2 * rank, tuple(grad.shape), "lora_ga")
    m = grad.shape[0]
    u, s, v = truncated_svd(
        grad, 2 * rank, svd, q if q is not None else min(4 * rank, min(grad.shape)), niter, seed
    )
    if not torch.isfinite(s).all() or s[0] <= 0:
        raise UserError(
            f"lora_ga: the gradient of {name} is zero or not finite; the loss does not depend on "
            "this weight on the given data"
        )
    factor = m**0.25 / math.sqrt(gamma)
    a0 = v[:, :rank].T * factor
    b0 = u[:, rank : 2 * rank] * factor
    return b0.float(), a0.float()


@register_init(
    "lora_ga",
    needs_data=True,
    description="LoRA-GA: gradient singular vectors in A and B, W moved so the output is unchanged",
)
def lora_ga(pairs: list[LoRAPair], ctx: InitContext) -> dict[str, InitUpdate]:
    """LoRA-GA (reference variant): A0 = V_r^T, B0 = U_[r:2r], scale m^(1/4)/sqrt(gamma); W <- W - s B0 A0."""
    factors = scheme_factors("lora_ga", pairs, ctx, _OPTIONS, 16.0, 2, lora_ga_factors)
    updates = {}
    for p in pairs:
        b0, a0 = factors[p.name]
        w = ctx.original_weight(p)
        new_w = (w.double() - p.scale * (b0.double() @ a0.double())).float()
        updates[p.name] = InitUpdate(A=a0, B=b0, weight=new_w, offset=(b0.clone(), a0.clone()))
    return updates

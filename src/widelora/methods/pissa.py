"""PiSSA (Meng et al. 2024), registered as the init scheme "pissa": the principal singular directions of W.

The adapter starts as the top-r part of W (``B0 = U_r sqrt(S_r/s)``, ``A0 = sqrt(S_r/s) V_r^T``) and the base
keeps the residual ``W - s B0 A0``, so the output is unchanged at the start while training moves W's most
important directions. The move of W is recorded as the pair's base offset; ``widelora.save_adapter`` folds it
back in so the saved adapter applies to the unmodified base.
"""

from __future__ import annotations

import torch

from widelora.lora.pairs import LoRAPair
from widelora.methods.init import InitContext, InitUpdate, per_pair, register_init


@register_init("pissa")
@per_pair
def _pissa(pair: LoRAPair, ctx: InitContext) -> InitUpdate:
    """PiSSA: W's principal singular directions in the adapter, the residual in the base (same output)."""
    w = ctx.original_weight(pair)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = pair.rank
    root = torch.sqrt(s[:r] / pair.scale)
    b = (u[:, :r] * root).float()
    a = (root[:, None] * vh[:r]).float()
    residual = (w.double() - pair.scale * (b.double() @ a.double())).float()
    return InitUpdate(A=a, B=b, weight=residual, offset=(b.clone(), a.clone()))

"""The residual base weight PEFT builds when it loads a PiSSA or OLoRA adapter, computed as PEFT computes it.

A PEFT adapter whose config says `init_lora_weights="pissa"` (or "olora") was trained on `W_res = W - s·B0
A0`, where (B0, A0) come from an SVD (PiSSA) or QR (OLoRA) of the user's W. `PeftModel.from_pretrained`
recomputes W_res from the fresh base before loading the factors; so must widelora, or its outputs differ. The
arithmetic below follows `peft.tuners.lora.layer.LoraLayer.pissa_init` / `olora_init` step by step in float32,
so the residual matches PEFT's to the last bit on the same machine.
"""

from __future__ import annotations

import torch

from widelora.errors import UserError


def _pissa(w: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    v, s, uh = torch.linalg.svd(w, full_matrices=False)
    sr = s[:rank] / scale
    a0 = torch.diag(torch.sqrt(sr)) @ uh[:rank]
    b0 = v[:, :rank] @ torch.diag(torch.sqrt(sr))
    return b0, a0


def _olora(w: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, r = torch.linalg.qr(w)
    return q[:, :rank].contiguous(), r[:rank].contiguous()


_FACTORS = {"pissa": _pissa, "olora": _olora}


def residual_factors(
    init: str, weight: torch.Tensor, rank: int, scale: float, transposed: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_res in stored orientation and dtype, B0, A0) for a PEFT `init_lora_weights` of "pissa" or "olora".

    `weight` is the base weight as stored (Conv1D: (in, out), `transposed=True`). PEFT's OLoRA does not
    transpose Conv1D weights (its factors would not fit the layer), so OLoRA on a Conv1D is refused.
    """
    if init == "olora" and transposed:
        raise UserError(
            f"{name}: an OLoRA adapter on a Conv1D (GPT-2 style) layer cannot be rebuilt: PEFT's OLoRA "
            "does not support fan_in_fan_out layers"
        )
    w = weight.detach().to(torch.float32)
    w = w.T if transposed else w
    b0, a0 = _FACTORS[init](w, rank, scale)
    residual = w - scale * b0 @ a0
    residual = residual.T if transposed else residual
    return residual.to(weight.dtype), b0, a0

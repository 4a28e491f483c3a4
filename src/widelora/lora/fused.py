"""A fused autograd path for the LoRA-adapted linear layer.

``y = x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ`` with a frozen ``W``. The plain module path (``base(x) + B(A(drop(x))) *
s``) allocates three (N × out) tensors in the forward pass and an extra (N × in) tensor for the sum of the two
input gradients in the backward pass, and runs each through a separate elementwise kernel. This function does
the same arithmetic with two matrix multiplies that accumulate in place (``addmm_``), saves only ``x`` (an
input, so no copy), the parameters (references, no copy) and the thin ``x Aᵀ`` (N × r), and never computes a
gradient for the frozen ``W`` unless asked to.

Backward (``g`` = grad of y, flattened to (N, out)):
``grad_x = g W + s (g B) A``, ``grad_A = s (g B)ᵀ x``, ``grad_B = s gᵀ (x Aᵀ)``.

Why ``x Aᵀ`` is saved rather than recomputed: it costs N·r elements (r/in of what ``x`` already costs, about
3% at r = 16, in = 576) while recomputing it costs another N·in·r multiply-adds in every backward pass; see
``bench/step_time.py --fused-variants`` for the measurement. PEFT's plain path saves the same tensor (the
input of ``lora_B``), so saving it never costs more memory than PEFT.

Scope, checked by :func:`can_fuse` (the caller falls back to the plain path when it returns False):
- no adapter dropout (dropout_p == 0, or the layer is in eval mode), because dropout makes the A-branch input
  differ from ``x`` and would have to be saved as a mask or a copy;
- ``x`` must flatten to (N, in) as a view: contiguous, or at most 2-D (a strided 2-D ``x`` is fine for
  ``mm``); anything else would force a copy of ``x`` that the plain path does not make;
- ``x`` and ``W`` share one floating dtype and device, and autocast is off (autocast would cast the operands
  per op, which a custom Function cannot reproduce exactly). ``A`` and ``B`` may be wider (float32 adapters on
  a bfloat16/float16 base): they are cast to ``x``'s dtype (r·(in+out) numbers, never an N-sized tensor) and
  their gradients come back in their own dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["can_fuse", "fused_lora_linear"]


class _FusedLoRALinear(torch.autograd.Function):
    """Custom forward/backward for the LoRA-adapted linear; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        weight_transposed: bool,
        save_xa: bool,
    ) -> torch.Tensor:
        in_features = x.shape[-1]
        out_features = B.shape[0]
        x2 = x.reshape(-1, in_features)  # a view: can_fuse guarantees it
        w_t = weight if weight_transposed else weight.t()  # (in, out) view, no copy
        a, b = A.to(x.dtype), B.to(x.dtype)  # float32 adapters on a half base: cast the thin factors, not x
        xa = torch.mm(x2, a.t())  # (N, r)
        y = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)
        y.addmm_(xa, b.t(), alpha=scale)  # y += s · xa Bᵀ, in place
        ctx.scale = scale
        ctx.weight_transposed = weight_transposed
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, A, B, xa if save_xa else None)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, A, B, xa = ctx.saved_tensors
        a, b = A.to(x.dtype), B.to(x.dtype)
        scale = ctx.scale
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        g = grad_y.reshape(-1, B.shape[0])
        grad_x = grad_w = grad_bias = grad_a = grad_bb = None

        if need_x or need_a:
            gb = torch.mm(g, b)  # (N, r)
            gb.mul_(scale)  # scale the thin factor, never an (N, out) or (N, in) tensor
            if need_x:
                grad_x = torch.mm(g, weight.t() if ctx.weight_transposed else weight)  # g W, (N, in)
                grad_x.addmm_(gb, a)  # += s (g B) A, in place
                grad_x = grad_x.view(x.shape)
            if need_a:
                grad_a = torch.mm(gb.t(), x2).to(A.dtype)  # (r, in)
        if need_bb:
            if xa is None:
                xa = torch.mm(x2, a.t())
            grad_bb = torch.mm(g.t(), xa).mul_(scale).to(B.dtype)  # (out, r)
        if need_w:  # only when the caller un-froze W
            grad_w = torch.mm(x2.t(), g) if ctx.weight_transposed else torch.mm(g.t(), x2)
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_bb, None, None, None


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    weight_transposed: bool = False,
    save_xa: bool = True,
) -> torch.Tensor:
    """Return ``x Wᵀ (+ bias) + scale · (x Aᵀ) Bᵀ`` through the fused autograd function.

    ``weight`` is (out, in) as in ``nn.Linear``, or (in, out) with ``weight_transposed=True`` (GPT-2
    ``Conv1D``). ``A`` is (r, in), ``B`` is (out, r). ``x`` has any number of leading dims. Call
    :func:`can_fuse` first; this function checks shapes (cheap) but not the conditions that would make it
    silently copy ``x``. ``save_xa=False`` recomputes ``x Aᵀ`` in backward instead of saving it (N·r less
    memory, more compute).
    """
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {tuple(x.shape)}")
    in_features = x.shape[-1]
    w_in, w_out = (
        (weight.shape[0], weight.shape[1]) if weight_transposed else (weight.shape[1], weight.shape[0])
    )
    if weight.dim() != 2 or w_in != in_features:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} (weight_transposed={weight_transposed}); expected "
            f"{'(in, out)' if weight_transposed else '(out, in)'} with in = x.shape[-1] = {in_features}"
        )
    if A.dim() != 2 or A.shape[1] != in_features:
        raise ValueError(f"A has shape {tuple(A.shape)}; expected (r, {in_features})")
    if B.dim() != 2 or B.shape != (w_out, A.shape[0]):
        raise ValueError(f"B has shape {tuple(B.shape)}; expected ({w_out}, {A.shape[0]}) = (out, r)")
    if bias is not None and bias.shape != (w_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({w_out},)")
    return _FusedLoRALinear.apply(x, weight, bias, A, B, float(scale), bool(weight_transposed), bool(save_xa))


def can_fuse(
    x: torch.Tensor,
    dropout_p: float,
    weight: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
) -> bool:
    """True when :func:`fused_lora_linear` computes exactly what the plain path does, without copying ``x``.

    ``dropout_p`` is the EFFECTIVE adapter dropout: pass 0 when the layer is in eval mode. The optional
    tensors are checked for a shared dtype and device with ``x``.
    """
    if dropout_p > 0.0:
        return False
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        return False
    if x.dim() > 2 and not x.is_contiguous():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if weight is not None and (weight.dtype != x.dtype or weight.device != x.device):
        return False
    # the adapters may be float32 on a half-precision base: they are cast, x never is
    return all(t is None or (t.is_floating_point() and t.device == x.device) for t in (A, B))

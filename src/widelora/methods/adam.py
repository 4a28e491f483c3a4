"""The Adam(W) update on one tensor, written once for every hand-rolled optimizer in widelora.

torch.optim.AdamW covers the ordinary case; widelora needs the update by hand where the gradient is changed
first (the LoRA-One / scaled-GD preconditioner) or where many configurations are stacked into one tensor with
a learning rate per configuration (the width-study engine, where `lr` is a tensor that broadcasts against
`p`).
"""

from __future__ import annotations

import math

import torch

EPS_FORMS = ("torch", "reference")


@torch.no_grad()
def adamw_step_(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
    eps_form: str = "torch",
) -> None:
    """One decoupled-weight-decay Adam step, in place on `p`, `exp_avg` and `exp_avg_sq`; `step` counts from
    1.

    `eps_form="torch"` is torch.optim.AdamW's: `p -= lr/(1-b1^t) · m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
    `eps_form="reference"` is the LoRA-One / Riemannian-preconditioner references':
    `p -= lr·sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps)` (eps added before the bias correction).
    The moments may be wider than `p` (float32 state for a half-precision parameter); `grad` must match them.
    """
    if eps_form not in EPS_FORMS:
        raise ValueError(f"eps_form={eps_form!r} is not valid; choose one of {list(EPS_FORMS)}")
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2_sqrt = math.sqrt(1.0 - beta2**step) if bias_correction else 1.0
    if eps_form == "torch":
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        p.sub_(((lr / bc1) * exp_avg / denom).to(p.dtype))
    else:
        update = exp_avg / (exp_avg_sq.sqrt() + eps)
        p.add_(update.to(p.dtype), alpha=-(lr * bc2_sqrt / bc1))

"""LoRA-One (Zhang, Liu et al. 2025; reference YuanheZ/LoRA-One): its init and its preconditioned optimizer.

The init, registered as the scheme "lora_one": ``U, S, V = svd(-G)`` of the full gradient G of each adapted
weight (``widelora.methods.gradient_svd``), ``B0 = U_r sqrt(S_r) / sqrt(S_0 gamma)``,
``A0 = sqrt(S_r) V_r^T / sqrt(S_0 gamma)``, so ``s B0 A0 = (s / (gamma sigma_1)) [-G]_r``: the model after
initialization already includes one normalized, truncated full-gradient step. ``W`` is NOT adjusted. ``gamma``
defaults to the reference's 128.

The optimizer, registered as "lora_one_precond" and "scaled_gd" (the old optimizer name "lora_one" still
works, with a deprecation warning, since it is also the init's name). Before the Adam moments, each adapter
gradient is multiplied by the inverse Gram matrix of its partner:

    g_A <- (B^T B + lam I)^-1 g_A          g_B <- g_B (A A^T + lam I)^-1

which makes the update of the product ``B A`` invariant to how the product is split between the factors
(Zhang & Pilanci 2024), and is LoRA-One's second ingredient (Zhang, Liu et al. 2025).

``method="scaled_gd"`` and ``method="lora_one_precond"`` are the SAME algorithm with the same defaults:
LoRA-One's reference optimizer (YuanheZ/LoRA-One ``AdamWr``) is a verbatim copy of the
Riemannian-preconditioner reference's (pilancilab/Riemannian_Preconditioned_LoRA ``AdamWr``). Both names exist
so code written after either paper reads naturally. ``scaled_gd`` with ``adam=False`` gives the paper's plain
scaled gradient descent (reference ``SGDr``); it is accepted under either name.

Choices, and how to get the references' instead:
- pairs come from ``widelora.lora.pairs.lora_pairs`` (by object identity), never from parameter order (the
  references zip consecutive parameters, which breaks silently if the order changes);
- ``bias_correction=True`` by default; both references default to ``correct_bias=False`` — pass
  ``bias_correction=False`` to reproduce them. With correction the step is ``lr·sqrt(1-b2^t)/(1-b1^t)`` and
  the denominator ``sqrt(v) + eps`` (the references' formula);
- both preconditioners use the factors' values before the step (the papers' simultaneous update). The
  references precondition ``g_B`` with the already-updated ``A`` (an in-place alias); ``sequential=True``
  reproduces that;
- ``lam`` (default 1e-6, the references'; PEFT's port uses 1e-2 with a pseudo-inverse) regularizes the r×r
  solve, done in float32 at least;
- weight decay is decoupled (``p <- p (1 - lr·wd)`` before the step, as torch's AdamW); the references apply
  it after the step;
- LoRA+ composes: ``loraplus=True`` puts ``B`` (and 1-D parameters) at ``lr · ratio``. Off by default, since
  the references use one learning rate.
Parameters that belong to no pair (a classifier head, biases, embedding adapters) get plain AdamW.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError
from widelora.lora.pairs import LoRAPair, lora_pairs
from widelora.methods.adam import adamw_step_
from widelora.methods.gradient_svd import (
    COMMON_OPTIONS,
    check_positive,
    check_rank,
    numerical_rank,
    scheme_factors,
    truncated_svd,
)
from widelora.methods.init import InitContext, InitUpdate, register_init
from widelora.methods.loraplus import loraplus_groups
from widelora.methods.optim import OptimizerSpec, param_groups, register_optimizer

__all__ = ["METHOD_OPTIONS", "PreconditionedAdamW", "lora_one", "lora_one_factors", "precondition_gradients"]

_OPTIONS = COMMON_OPTIONS | {"gamma"}


def lora_one_factors(
    grad: torch.Tensor,
    rank: int,
    gamma: float = 128.0,
    svd: str = "auto",
    q: int | None = None,
    niter: int = 4,
    seed: int = 0,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-One's (B0, A0) from a gradient G (out × in): ``B0 A0 = [-G]_r / (gamma · sigma_1)``."""
    check_positive("gamma", gamma)
    check_rank(name, rank, rank, tuple(grad.shape), "lora_one")
    # q = 4r, niter = 4 (LoRA-GA's reference sketch; LoRA-One's own uses q = 512, niter = 16, which costs
    # more than an exact SVD at these sizes): "auto" then takes the randomized path only where q <= min/4.
    q = q if q is not None else min(4 * rank, min(grad.shape))
    u, s, v = truncated_svd(-grad, rank, svd, q, niter, seed)
    if not torch.isfinite(s).all() or s[0] <= 0:
        raise UserError(
            f"lora_one: the gradient of {name} is zero or not finite (sigma_1 = {float(s[0])}); the "
            "loss does not depend on this weight on the given data"
        )
    if numerical_rank(s) < rank:
        warnings.warn(
            f"lora_one: the gradient of {name} has numerical rank {numerical_rank(s)} < rank {rank}; "
            "the extra directions are ~0 (more data would fill them)",
            stacklevel=3,
        )
    root = s[:rank].sqrt()
    denom = math.sqrt(float(s[0]) * gamma)
    b0 = u[:, :rank] * root / denom
    a0 = (root[:, None] * v[:, :rank].T) / denom
    return b0.float(), a0.float()


@register_init(
    "lora_one",
    needs_data=True,
    description="LoRA-One: one normalized, SVD-truncated full-gradient step (W unchanged)",
)
def lora_one(pairs: list[LoRAPair], ctx: InitContext) -> dict[str, InitUpdate]:
    """LoRA-One: ``s B0 A0 = (s / (gamma sigma_1)) [-G]_r``; W unchanged. Options: gamma, svd, q, niter."""
    factors = scheme_factors("lora_one", pairs, ctx, _OPTIONS, 128.0, 1, lora_one_factors)
    return {p.name: InitUpdate(A=factors[p.name][1], B=factors[p.name][0]) for p in pairs}


# ----------------------------------------------------------------------------------- the preconditioner
METHOD_OPTIONS = ("lam", "bias_correction", "sequential", "loraplus", "adam")


def _gram_solve_left(b: torch.Tensor, g_a: torch.Tensor, lam: float) -> torch.Tensor:
    """(B^T B + lam I)^-1 g_A, computed in float32 or wider."""
    dtype = torch.promote_types(b.dtype, torch.float32)
    b32 = b.detach().to(dtype)
    gram = b32.T @ b32
    return _solve(gram, g_a.to(dtype), lam).to(g_a.dtype)


def _gram_solve_right(a: torch.Tensor, g_b: torch.Tensor, lam: float) -> torch.Tensor:
    """g_B (A A^T + lam I)^-1 = ((A A^T + lam I)^-1 g_B^T)^T (the Gram matrix is symmetric)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a32 = a.detach().to(dtype)
    gram = a32 @ a32.T
    return _solve(gram, g_b.to(dtype).T, lam).T.to(g_b.dtype)


def _solve(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    if lam > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + lam * eye, rhs)
    return torch.linalg.pinv(gram, hermitian=True) @ rhs


def precondition_gradients(
    a: torch.Tensor, b: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor, lam: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed form: ``((B^T B + lam I)^-1 g_A, g_B (A A^T + lam I)^-1)``."""
    return _gram_solve_left(b, g_a, lam), _gram_solve_right(a, g_b, lam)


class PreconditionedAdamW(torch.optim.Optimizer):
    """AdamW whose LoRA gradients are preconditioned by the partner factor's Gram matrix (see module doc).

    ``partners`` maps each adapter parameter (by identity) to its role ("A" or "B") and its partner; build it
    with :meth:`partners_from_pairs`. Parameters not in ``partners`` are updated by plain AdamW.
    """

    def __init__(
        self,
        params: Iterable[Any],
        partners: dict[int, tuple[str, nn.Parameter]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lam: float = 1e-6,
        bias_correction: bool = True,
        sequential: bool = False,
        adam: bool = True,
    ) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise UserError(f"lam={lam!r} is not valid; lam must be a finite number >= 0 (reference: 1e-6)")
        for flag_name, flag in (
            ("bias_correction", bias_correction),
            ("sequential", sequential),
            ("adam", adam),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name}={flag!r} is not valid; {flag_name} must be True or False")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.partners = dict(partners)
        self.lam = float(lam)
        self.bias_correction = bias_correction
        self.sequential = sequential
        self.adam = adam

    @staticmethod
    def partners_from_pairs(pairs: Iterable[LoRAPair]) -> dict[int, tuple[str, nn.Parameter]]:
        """{id(A): ("A", B), id(B): ("B", A)} for every pair: pairing by the LoRA pair view, not by order."""
        partners: dict[int, tuple[str, nn.Parameter]] = {}
        for p in pairs:
            partners[id(p.A)] = ("A", p.B)
            partners[id(p.B)] = ("B", p.A)
        return partners

    def _scaled_grad(self, p: torch.Tensor) -> torch.Tensor:
        grad = p.grad
        role = self.partners.get(id(p))
        if role is None:
            return grad
        kind, partner = role
        if kind == "A":
            return _gram_solve_left(partner, grad, self.lam)
        return _gram_solve_right(partner, grad, self.lam)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p in (p for _, p in entries):
            if p.grad.is_sparse:
                raise RuntimeError("PreconditionedAdamW does not support sparse gradients")
        is_b = [self.partners.get(id(p), ("", None))[0] == "B" for _, p in entries]
        if self.sequential:  # the references: A first (with the current B), then B with the updated A
            first = [e for e, b in zip(entries, is_b, strict=True) if not b]
            second = [e for e, b in zip(entries, is_b, strict=True) if b]
            self._apply(first, [self._scaled_grad(p) for _, p in first])
            self._apply(second, [self._scaled_grad(p) for _, p in second])
        else:  # simultaneous: every preconditioner from the pre-step values
            self._apply(entries, [self._scaled_grad(p) for _, p in entries])
        return loss

    def _apply(self, entries: list[tuple[dict, torch.Tensor]], grads: list[torch.Tensor]) -> None:
        for (group, p), grad in zip(entries, grads, strict=True):
            lr, wd = group["lr"], group["weight_decay"]
            if not self.adam:
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(grad.to(p.dtype), alpha=-lr)
                continue
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            state["step"] += 1
            adamw_step_(
                p,
                grad.to(state["exp_avg"].dtype),
                state["exp_avg"],
                state["exp_avg_sq"],
                lr=lr,
                step=state["step"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=wd,
                bias_correction=self.bias_correction,
                eps_form="reference",
            )


def _build(method: str) -> Callable[[nn.Module, OptimizerSpec], torch.optim.Optimizer]:
    def build(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
        opts = dict(spec.options)
        unknown = sorted(set(opts) - set(METHOD_OPTIONS))
        if unknown:
            raise UserError(
                f"optimizer method {method!r} got unknown options {unknown}; "
                f"valid options: {list(METHOD_OPTIONS)}"
            )
        loraplus = opts.pop("loraplus", False)
        if not isinstance(loraplus, bool):
            raise UserError(f"loraplus={loraplus!r} is not valid; loraplus must be True or False")
        pairs = lora_pairs(model)
        if not pairs:
            raise UserError(
                f"optimizer method {method!r} preconditions LoRA pairs, but model "
                f"({type(model).__name__}) has none; attach adapters first"
            )
        groups = loraplus_groups(model, spec) if loraplus else param_groups(model, spec)
        return PreconditionedAdamW(
            groups,
            PreconditionedAdamW.partners_from_pairs(pairs),
            lr=spec.lr,
            betas=spec.betas,
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            lam=opts.get("lam", 1e-6),
            bias_correction=opts.get("bias_correction", True),
            sequential=opts.get("sequential", False),
            adam=opts.get("adam", True),
        )

    build.__doc__ = (
        f"{method}: AdamW on (B^T B + lam I)^-1 g_A and g_B (A A^T + lam I)^-1 (widelora.methods.lora_one)."
    )
    return build


register_optimizer("lora_one_precond")(_build("lora_one_precond"))
register_optimizer("scaled_gd")(_build("scaled_gd"))

"""The width study's batched engine: every seed × (ratio, lr) configuration of one (width, init) in one pass.

Why it is fast. Everything before the adapter is frozen, so per (width, seed) we cache ``h = φ(W_in x)`` and
``u = W_in x + W_h h`` for the whole data set once (the n×n product with W_h never runs during training). Then
all configurations train together: A is stacked to (S, C, r, n), B (kept transposed) to (S, C, r, n), forward
and backward are written out by hand as batched matmuls, and AdamW is applied to the stacked tensors with a
learning rate per configuration (lr_A = lr, lr_B = ratio · lr: LoRA+ is just another axis).
``width_reference.run_single`` is the plain autograd loop the tests compare against.

Per step and configuration, with the batch's cached rows h_b, u_b, targets y_b (b rows) and s = alpha/r::

    Z_A = h_b Aᵀ,  Y_h = u_b + s Z_A Bᵀ,  out = φ(Y_h) w_out,  loss = mean_b (out - y_b)²
    g = 2 (out - y)/b,  M = 1[Y_h > 0]
    ∂B = s · diag(w_out) Mᵀ (g ⊙ Z_A),   ∂A = (s · g ⊙ M (diag(w_out) B))ᵀ h_b
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from widelora.divergence import DivergenceRule
from widelora.experiments.toy import FrozenWeights, ToyData, ToyModel, derive_seed, student_weights
from widelora.experiments.width_config import _FULL_LOSS_ELEMS, DTYPES, WidthStudyConfig, lr_factor
from widelora.experiments.width_results import ChunkResult
from widelora.features import gram_norms
from widelora.methods.adam import adamw_step_


@dataclass
class WidthCache:
    """Per-seed frozen features of one width: h = φ(W_in x), u = W_in x + W_h h (train and test)."""

    width: int
    h_train: torch.Tensor  # (S, N, n)
    u_train: torch.Tensor
    h_test: torch.Tensor  # (S, N_test, n)
    u_test: torch.Tensor
    w_out: torch.Tensor  # (S, n)
    frozen: list[FrozenWeights]


def features(x: torch.Tensor, fw: FrozenWeights, w_h: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(h, u) of the rows of x: the frozen part of the forward, computed once per (width, seed)."""
    y_in = x @ fw.w_in.T
    h = F.relu(y_in)
    return h, y_in + h @ (fw.w_h if w_h is None else w_h).T


def build_cache(config: WidthStudyConfig, data: ToyData, width: int) -> WidthCache:
    """Frozen student weights for every seed and the cached features (the expensive n×n product, once)."""
    dtype = DTYPES[config.dtype]
    hs, us, hts, uts, wo, frozen = [], [], [], [], [], []
    for seed in config.seeds:
        fw = student_weights(config.d, width, seed, dtype)
        h, u = features(data.x_train.to(dtype), fw)
        ht, ut = features(data.x_test.to(dtype), fw)
        hs.append(h), us.append(u), hts.append(ht), uts.append(ut), wo.append(fw.w_out), frozen.append(fw)
    return WidthCache(
        width, torch.stack(hs), torch.stack(us), torch.stack(hts), torch.stack(uts), torch.stack(wo), frozen
    )


def batch_schedule(n_train: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) row indices: epochs of a seeded permutation, the last partial batch dropped."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "batches"))
    per_epoch = n_train // batch_size
    epochs = -(-steps // per_epoch)
    rows = [
        torch.randperm(n_train, generator=gen)[: per_epoch * batch_size].view(per_epoch, batch_size)
        for _ in range(epochs)
    ]
    return torch.cat(rows)[:steps]


def initial_adapters(
    config: WidthStudyConfig, data: ToyData, fw: FrozenWeights, init: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A0, B0, W_h or None) from widelora's init registry applied to the toy student.

    Any registered scheme works; gradient-informed ones get the training set as their batches. W_h is returned
    only when the scheme moved the base weight (PiSSA, LoRA-GA), so the cache must be rebuilt for it.
    """
    from widelora.methods.init import get_scheme, initialize

    spec = get_scheme(init)  # ValueError listing the valid schemes
    model = ToyModel(fw, rank=config.rank, alpha=config.alpha)
    kwargs: dict[str, Any] = {}
    if spec.needs_data:
        b = config.batch_size
        batches = [
            (data.x_train[i : i + b].to(fw.w_in.dtype), data.y_train[i : i + b].to(fw.w_in.dtype))
            for i in range(0, min(config.n_train, 8 * b), b)
        ]
        kwargs = {"batches": batches, "loss_fn": lambda m, batch: F.mse_loss(m(batch[0]), batch[1])}
    initialize(model, init, seed=derive_seed(seed, model.width, "init"), **kwargs)
    w_h = model.hidden.base_layer.weight.detach()
    moved = not torch.equal(w_h, fw.w_h)
    return (
        model.hidden.lora_A.detach().clone(),
        model.hidden.lora_B.detach().clone(),
        w_h.clone() if moved else None,
    )


def evenly(steps: int, points: int, start: int) -> np.ndarray:
    return np.unique(np.linspace(start, steps, min(points, steps + 1 - start)).round().astype(int))


@torch.no_grad()
def full_loss(h, u, w_out, y, A, Bt, scale, max_elems: int = _FULL_LOSS_ELEMS) -> torch.Tensor:
    """Mean squared error of every (seed, config) on a full data set (A, Bt both (S, C, r, n)), in slices."""
    S, C, r, n = A.shape
    N = h.shape[1]
    step = max(1, max_elems // max(1, S * N * n))
    out = []
    for c0 in range(0, C, step):
        a, b = A[:, c0 : c0 + step], Bt[:, c0 : c0 + step]
        k = a.shape[1]
        z_a = torch.bmm(h, a.reshape(S, k * r, n).transpose(1, 2)).view(S, N, k, r).transpose(1, 2)
        y_h = u[:, None].repeat(1, k, 1, 1)
        y_h.view(S * k, N, n).baddbmm_(z_a.reshape(S * k, N, r), b.reshape(S * k, r, n), alpha=scale)
        y_h.clamp_min_(0)
        pred = torch.stack([torch.mv(y_h[i].view(-1, n), w_out[i]) for i in range(S)]).view(S, k, N)
        out.append(((pred - y[None, None]) ** 2).mean(-1))
    return torch.cat(out, dim=1)


def adamw_(p, g, m, v, lr, t, beta1, beta2, eps, wd) -> None:
    """torch.optim.AdamW's update on stacked parameters; lr broadcasts against p (per-config lrs)."""
    adamw_step_(p, g, m, v, lr=lr, step=t, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)


def config_lrs(config: WidthStudyConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(lr_A, lr_B) per configuration, ratio-major: config c = ratio_index · len(lrs) + lr_index."""
    lr_a = torch.tensor(config.lrs, dtype=torch.float64).repeat(len(config.ratios))
    lr_b = lr_a * torch.tensor(config.ratios, dtype=torch.float64).repeat_interleave(len(config.lrs))
    return lr_a.to(dtype), lr_b.to(dtype)


@torch.no_grad()
def train_chunk(
    config: WidthStudyConfig,
    cache: WidthCache,
    data: ToyData,
    A0: torch.Tensor,
    B0: torch.Tensor,
    init: str = "",
    u_train: torch.Tensor | None = None,
    u_test: torch.Tensor | None = None,
    schedules: torch.Tensor | None = None,
    curve_points: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> ChunkResult:
    """Train every (seed, ratio, lr) of one (width, init) in one batched pass.

    A0 (S, r, n) and B0 (S, n, r) are the per-seed initial adapters; u_* override the cache when an init moved
    W_h. ``on_step(k)`` is called every few steps with the number of steps done since the last call.
    """
    t0 = time.perf_counter()
    dtype = DTYPES[config.dtype]
    S, C, r, n, b = len(config.seeds), config.configs, config.rank, cache.width, config.batch_size
    s = config.scale
    h, w_out = cache.h_train, cache.w_out
    u = cache.u_train if u_train is None else u_train
    ut = cache.u_test if u_test is None else u_test
    y, y_test = data.y_train.to(dtype), data.y_test.to(dtype)
    if schedules is None:
        schedules = torch.stack([batch_schedule(config.n_train, b, config.steps, sd) for sd in config.seeds])
    A = A0.to(dtype)[:, None].repeat(1, C, 1, 1).contiguous()  # (S, C, r, n)
    # B is kept transposed, Bt = Bᵀ (S, C, r, n): every product then runs along contiguous n (3-4× faster)
    Bt = B0.to(dtype).transpose(1, 2)[:, None].repeat(1, C, 1, 1).contiguous()
    mA, vA, mB, vB = (torch.zeros_like(A), torch.zeros_like(A), torch.zeros_like(Bt), torch.zeros_like(Bt))
    lr_a, lr_b = (x.view(1, C, 1, 1).repeat(S, 1, 1, 1) for x in config_lrs(config, dtype))
    beta1, beta2 = config.betas
    seed_idx = torch.arange(S)[:, None]
    wrow = w_out[:, None, None, :]  # (S, 1, 1, n)

    rule = DivergenceRule(
        factor=config.diverge_factor, smoothing=0.0
    )  # the paper's protocol: raw batch losses
    loss0 = full_loss(h, u, w_out, y, A[:, :1], Bt[:, :1], s)[:, 0]  # (S,) initial train loss
    initial = loss0.clamp_min(1e-12)[:, None]
    diverged = torch.full((S, C), -1, dtype=torch.long)

    trace_steps = evenly(config.steps, config.trace_points, 0)
    curve_steps = evenly(config.steps, curve_points or config.curve_points, 1)
    z_a_tr, z_b_tr, curve, eval_train, eval_test = [], [], [], [], []
    window = torch.zeros(S, C, dtype=dtype)
    window_len = 0

    def trace() -> (
        None
    ):  # on the full train set; Z_A by one bmm, ||Z_B|| through the r×r Gram (monitor's math)
        z = (
            torch.bmm(h, A.view(S, C * r, n).transpose(1, 2)).view(S, -1, C, r).transpose(1, 2)
        )  # (S, C, N, r)
        z_a_tr.append(z.norm(dim=-1).mean(-1)), z_b_tr.append(gram_norms(z, Bt.transpose(-1, -2), s).mean(-1))

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:  # full-data-set losses; nan where diverged
        nan = torch.tensor(math.nan, dtype=dtype)
        alive = diverged < 0
        return (
            torch.where(alive, full_loss(h, u, w_out, y, A, Bt, s), nan),
            torch.where(alive, full_loss(cache.h_test, ut, w_out, y_test, A, Bt, s), nan),
        )

    curve_set, trace_set, eval_set = (
        set(curve_steps.tolist()),
        set(trace_steps.tolist()),
        set(config.eval_steps),
    )
    if trace_steps[0] == 0:
        trace()
    pending = 0
    y_h = torch.empty(S, C, b, n, dtype=dtype)
    for t in range(1, config.steps + 1):
        idx = schedules[:, t - 1]  # (S, b)
        hb, ub, yb = h[seed_idx, idx], u[seed_idx, idx], y[idx]  # (S, b, n), (S, b, n), (S, b)
        z_a = (
            torch.bmm(hb, A.view(S, C * r, n).transpose(1, 2)).view(S, b, C, r).transpose(1, 2)
        )  # (S, C, b, r)
        y_h.copy_(ub[:, None])  # Y_h = u_b + s Z_A Bᵀ, accumulated in place in a reused buffer
        y_h.view(S * C, b, n).baddbmm_(z_a.reshape(S * C, b, r), Bt.view(S * C, r, n), alpha=s)
        act = y_h.clamp_min_(0.0)
        # φ(Y_h) w_out as one matrix-vector product per seed (a batched (.., n) @ (n, 1) is ~20× slower
        # on CPU)
        pred = torch.stack([torch.mv(act[i].view(C * b, n), w_out[i]) for i in range(S)]).view(S, C, b)
        err = pred - yb[:, None]  # (S, C, b)
        loss = (err * err).mean(-1)
        g = err * (2.0 / b)
        d_act = act.sign_().mul_(g[..., None])  # ∂loss/∂(φ(Y_h)) / w_out, masked by φ'; reuses the buffer
        gBt = (z_a.transpose(-1, -2) @ d_act).mul_(wrow).mul_(s)  # (S, C, r, n) = (∂B)ᵀ
        dz_a = (d_act @ (Bt * wrow).transpose(-1, -2)).mul_(s)  # (S, C, b, r)
        gA = torch.bmm(dz_a.transpose(1, 2).reshape(S, b, C * r).transpose(1, 2), hb).view(S, C, r, n)

        newly = rule.exceeded(loss, initial) & (diverged < 0)
        if newly.any():  # a diverged configuration is frozen at zero (its numbers are reported as nan)
            diverged[newly] = t
            lr_a[newly] = 0.0
            lr_b[newly] = 0.0
            for tensor in (A, Bt, mA, vA, mB, vB, gA, gBt):
                tensor[newly] = 0.0
        factor = lr_factor(config.schedule, t, config.steps)
        adamw_(A, gA, mA, vA, lr_a * factor, t, beta1, beta2, config.eps, config.weight_decay)
        adamw_(Bt, gBt, mB, vB, lr_b * factor, t, beta1, beta2, config.eps, config.weight_decay)

        window += torch.where(diverged >= 0, torch.full_like(loss, math.nan), loss)
        window_len += 1
        if t in curve_set:
            curve.append(window / window_len)
            window = torch.zeros(S, C, dtype=dtype)
            window_len = 0
        if t in trace_set:
            trace()
        if t in eval_set:
            tr, te = evaluate()
            eval_train.append(tr), eval_test.append(te)
        pending += 1
        if on_step is not None and (pending >= 25 or t == config.steps):
            on_step(pending)
            pending = 0

    train, test = evaluate()

    def stacked(values: list[torch.Tensor]) -> np.ndarray:
        return torch.stack(values, -1).double().numpy() if values else np.zeros((S, C, 0))

    return ChunkResult(
        width=n,
        init=init,
        lrs=list(config.lrs),
        seeds=list(config.seeds),
        train_loss=train.double().numpy(),
        test_loss=test.double().numpy(),
        diverged_step=diverged.numpy(),
        curve_steps=curve_steps,
        curve=stacked(curve),
        trace_steps=trace_steps,
        z_a=stacked(z_a_tr),
        z_b=stacked(z_b_tr),
        seconds=time.perf_counter() - t0,
        fingerprint=config.fingerprint(),
        ratios=list(config.ratios),
        eval_steps=np.asarray(config.eval_steps, dtype=int),
        eval_train_loss=stacked(eval_train),
        eval_test_loss=stacked(eval_test),
    )

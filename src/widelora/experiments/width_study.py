"""The width study of the initialization paper (seed 001, Section 3.7, Figures 2–3), fast.

For each width n and init scheme, finetune the toy student (``widelora.experiments.toy``) on the teacher's data
for every learning rate × seed, read off the optimal learning rate, and fit how it scales with n.

Why it is fast. Everything before the adapter is frozen, so per (width, seed) we cache ``h = φ(W_in x)`` and
``u = W_in x + W_h h`` for the whole data set once (the n×n product with W_h never runs during training). Then
all learning rates × seeds of one (width, init) train in ONE pass: A is stacked to (S, L, r, n), B to
(S, L, n, r), forward and backward are written out by hand as batched matmuls, and AdamW is applied to the
stacked tensors (the same arithmetic as ``torch.optim.AdamW``). ``run_single`` is the plain reference — the
``ToyModel`` with widelora's LoRALinear, autograd and ``torch.optim.AdamW``, one configuration at a time — used
by the tests (same loss curves) and by ``bench/width_study.py`` (speed-up).

Per step and configuration, with the batch's cached rows h_b, u_b, targets y_b (b rows) and s = alpha/r::

    Z_A = h_b Aᵀ,  Y_h = u_b + s Z_A Bᵀ,  out = φ(Y_h) w_out,  loss = mean_b (out - y_b)²
    g = 2 (out - y)/b,  M = 1[Y_h > 0]
    ∂B = s · diag(w_out) Mᵀ (g ⊙ Z_A),   ∂A = (s · g ⊙ M (diag(w_out) B))ᵀ h_b

Results are written per (width, init) chunk (``chunks/w<n>_<init>.json``, atomically), so an interrupted run
resumes by skipping finished chunks.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from widelora.experiments.toy import FrozenWeights, ToyData, ToyModel, derive_seed, make_data, student_weights
from widelora.files import atomic_write_text
from widelora.monitor import gram_norms

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, t: int, steps: int) -> float:
    """Multiplier of the base LR at step t (1-based) of ``steps``: the LR used by the t-th update."""
    if schedule == "constant":
        return 1.0
    frac = (t - 1) / steps
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"schedule: got {schedule!r}; expected one of {list(SCHEDULES)}")


def lr_grid(low_exp: float, high_exp: float, per_octave: int = 1) -> tuple[float, ...]:
    """Learning rates 2^k for k from low_exp to high_exp in steps of 1/per_octave."""
    if per_octave < 1 or high_exp < low_exp:
        raise ValueError(f"lr_grid: need per_octave >= 1 and high_exp >= low_exp, got {low_exp}, {high_exp}, "
                         f"{per_octave}")
    k = round((high_exp - low_exp) * per_octave)
    return tuple(float(2.0 ** (low_exp + i / per_octave)) for i in range(k + 1))


@dataclass
class WidthStudyConfig:
    """Every choice of the study. The paper leaves steps, batch size and the LR grid unstated: see
    ``docs/results/width_study.md`` for why the defaults are what they are."""

    widths: tuple[int, ...] = tuple(2**k for k in range(7, 14))
    inits: tuple[str, ...] = ("init_a", "init_b")
    lrs: tuple[float, ...] = lr_grid(-15, -3)  # 13 points, a factor 2 apart: 3.1e-5 ... 0.125
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 500
    batch_size: int = 16
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank, i.e. s = 1 as in the paper's eq. (4)
    ratio: float = 1.0  # LoRA+: lr_B = ratio · lr_A (lr is lr_A); 1 = plain AdamW
    betas: tuple[float, float] = (0.9, 0.99)  # Appendix B.1.1
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"  # LR multiplier over steps: "constant" | "linear" (to 0) | "cosine" (to 0)
    d: int = 5
    teacher_width: int = 1000
    teacher_rank: int = 20
    n_train: int = 1000
    n_test: int = 100
    data_seed: int = 0  # teacher and data set; fixed across seeds (seeds vary the student and the batches)
    select_by: str = "train"  # which final loss the optimum is read from: "train" | "test"
    trace_points: int = 41  # |Z_A|, |Z_B| on the full train set at this many evenly spaced steps
    curve_points: int = 100  # mean batch loss over this many windows
    diverge_factor: float = 100.0  # batch loss above this × the initial train loss counts as diverged
    dtype: str = "float32"
    # torch threads per process; None = 1. Parallelism comes from `workers`: on a busy machine one process with
    # 2 OpenMP threads is many times slower than 2 single-thread processes (its threads wait for each other).
    threads: int | None = None
    workers: int = 2  # processes, each given whole widths (2 cores: 2 workers of 1 thread beat 1 of 2 threads)

    # fields that do not change the numbers, so a resumed run may differ in them
    _NON_RESULT = ("threads", "workers", "select_by", "widths", "inits")

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.inits = tuple(str(i) for i in self.inits)
        self.lrs = tuple(float(x) for x in self.lrs)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, valid: str) -> ValueError:
            return ValueError(f"{name}: got {value!r}; expected {valid}")

        if not self.widths or any(w < 1 for w in self.widths) or len(set(self.widths)) != len(self.widths):
            raise bad("widths", self.widths, "distinct positive ints")
        if not self.inits or len(set(self.inits)) != len(self.inits):
            raise bad("inits", self.inits, "distinct init scheme names, e.g. ('init_a', 'init_b')")
        if not self.lrs or any(not (x > 0 and math.isfinite(x)) for x in self.lrs):
            raise bad("lrs", self.lrs, "positive finite learning rates")
        if list(self.lrs) != sorted(set(self.lrs)):
            raise bad("lrs", self.lrs, "strictly increasing learning rates")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise bad("seeds", self.seeds, "distinct ints")
        for name in ("steps", "batch_size", "rank", "d", "teacher_width", "teacher_rank", "n_train", "n_test",
                     "trace_points", "curve_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, v, "an int >= 1")
        if self.batch_size > self.n_train:
            raise bad("batch_size", self.batch_size, f"at most n_train={self.n_train}")
        if self.alpha is not None and not self.alpha > 0:
            raise bad("alpha", self.alpha, "a positive number or None (alpha = rank)")
        if not self.ratio > 0:
            raise bad("ratio", self.ratio, "a positive number")
        if not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", self.betas, "two numbers in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"one of {list(SCHEDULES)}")
        if self.select_by not in ("train", "test"):
            raise bad("select_by", self.select_by, "'train' or 'test'")
        if self.dtype not in DTYPES:
            raise bad("dtype", self.dtype, f"one of {sorted(DTYPES)}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise bad("workers", self.workers, "an int >= 1")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", self.threads, "None or an int >= 1")
        if not self.diverge_factor > 1:
            raise bad("diverge_factor", self.diverge_factor, "a number > 1")

    @property
    def scale(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    @classmethod
    def quick(cls, **overrides: Any) -> WidthStudyConfig:
        """A small study for demos and smoke tests (well under a minute on 2 cores)."""
        base = {"widths": (128, 512, 2048), "lrs": lr_grid(-14, -4), "seeds": (0,), "steps": 300, "trace_points": 16,
                    "curve_points": 50, "workers": 1}
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> WidthStudyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def fingerprint(self) -> dict:
        """The fields a chunk's numbers depend on (width and init are part of the chunk itself)."""
        d = self.to_dict()
        for k in self._NON_RESULT:
            d.pop(k, None)
        return json.loads(json.dumps(d))


# ------------------------------------------------------------------------------------------------- data


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


def _features(x: torch.Tensor, fw: FrozenWeights, w_h: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    y_in = x @ fw.w_in.T
    h = F.relu(y_in)
    return h, y_in + h @ (fw.w_h if w_h is None else w_h).T


def build_cache(config: WidthStudyConfig, data: ToyData, width: int) -> WidthCache:
    """Frozen student weights for every seed and the cached features (the expensive n×n product, once)."""
    dtype = DTYPES[config.dtype]
    hs, us, hts, uts, wo, frozen = [], [], [], [], [], []
    for seed in config.seeds:
        fw = student_weights(config.d, width, seed, dtype)
        h, u = _features(data.x_train.to(dtype), fw)
        ht, ut = _features(data.x_test.to(dtype), fw)
        hs.append(h), us.append(u), hts.append(ht), uts.append(ut), wo.append(fw.w_out), frozen.append(fw)
    return WidthCache(width, torch.stack(hs), torch.stack(us), torch.stack(hts), torch.stack(uts), torch.stack(wo),
                      frozen)


def batch_schedule(n_train: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) row indices: epochs of a seeded permutation, the last partial batch dropped."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "batches"))
    per_epoch = n_train // batch_size
    epochs = -(-steps // per_epoch)
    rows = [torch.randperm(n_train, generator=gen)[: per_epoch * batch_size].view(per_epoch, batch_size)
            for _ in range(epochs)]
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
        batches = [(data.x_train[i : i + config.batch_size].to(fw.w_in.dtype),
                    data.y_train[i : i + config.batch_size].to(fw.w_in.dtype))
                   for i in range(0, min(config.n_train, 8 * config.batch_size), config.batch_size)]
        kwargs = {"batches": batches, "loss_fn": lambda m, b: F.mse_loss(m(b[0]), b[1])}
    initialize(model, init, seed=derive_seed(seed, model.width, "init"), **kwargs)
    w_h = model.hidden.base_layer.weight.detach()
    moved = not torch.equal(w_h, fw.w_h)
    return (model.hidden.lora_A.detach().clone(), model.hidden.lora_B.detach().clone(),
            w_h.clone() if moved else None)


# ---------------------------------------------------------------------------------------- the batched engine


@dataclass
class ChunkResult:
    """All learning rates × seeds of one (width, init). Arrays are indexed [seed, lr] (and [.., point])."""

    width: int
    init: str
    lrs: list[float]
    seeds: list[int]
    train_loss: np.ndarray  # final loss on the full train set, nan if diverged
    test_loss: np.ndarray
    diverged_step: np.ndarray  # -1 if never diverged
    curve_steps: np.ndarray  # (P,) last step of each window
    curve: np.ndarray  # (S, L, P) mean batch loss per window
    trace_steps: np.ndarray  # (R,) steps at which traces were taken (0 = before training)
    z_a: np.ndarray  # (S, L, R) mean over train set of ||A x||
    z_b: np.ndarray  # (S, L, R) mean over train set of ||s B A x||
    seconds: float = 0.0
    fingerprint: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = _nan_to_none(v.tolist()) if isinstance(v, np.ndarray) else v
        return out

    @classmethod
    def from_json(cls, d: dict) -> ChunkResult:
        kw = dict(d)
        for k in ("train_loss", "test_loss", "curve", "z_a", "z_b"):
            kw[k] = np.array(_none_to_nan(d[k]), dtype=float)
        for k in ("diverged_step", "curve_steps", "trace_steps"):
            kw[k] = np.array(d[k], dtype=int)
        return cls(**kw)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _none_to_nan(v: Any) -> Any:
    if isinstance(v, list):
        return [_none_to_nan(x) for x in v]
    return math.nan if v is None else v


def _evenly(steps: int, points: int, start: int) -> np.ndarray:
    return np.unique(np.linspace(start, steps, min(points, steps + 1 - start)).round().astype(int))


@torch.no_grad()
def _full_loss(h, u, w_out, y, A, Bt, scale, max_elems=1 << 23) -> torch.Tensor:
    """Mean squared error of every (seed, lr) on a full data set (A, Bt both (S, L, r, n)), chunked over lrs."""
    S, L, r, n = A.shape
    N = h.shape[1]
    step = max(1, max_elems // max(1, S * N * n))
    out = []
    for l0 in range(0, L, step):
        a, b = A[:, l0 : l0 + step], Bt[:, l0 : l0 + step]
        k = a.shape[1]
        z_a = torch.bmm(h, a.reshape(S, k * r, n).transpose(1, 2)).view(S, N, k, r).transpose(1, 2)
        y_h = u[:, None].repeat(1, k, 1, 1)
        y_h.view(S * k, N, n).baddbmm_(z_a.reshape(S * k, N, r), b.reshape(S * k, r, n), alpha=scale)
        y_h.clamp_min_(0)
        pred = torch.stack([torch.mv(y_h[i].view(-1, n), w_out[i]) for i in range(S)]).view(S, k, N)
        out.append(((pred - y[None, None]) ** 2).mean(-1))
    return torch.cat(out, dim=1)


def _adamw_(p, g, m, v, lr, t, beta1, beta2, eps, wd) -> None:
    """torch.optim.AdamW's update on stacked parameters; lr broadcasts against p (per-config learning rates)."""
    if wd:
        p.mul_(1.0 - lr * wd)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1**t
    bc2_sqrt = math.sqrt(1.0 - beta2**t)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.sub_((lr / bc1) * m / denom)


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
    on_step: Any = None,
) -> ChunkResult:
    """Train every (seed, lr) of one (width, init) in one batched pass.

    A0 (S, r, n) and B0 (S, n, r) are the per-seed initial adapters; u_* override the cache when an init moved
    W_h. ``on_step(k)`` is called every few steps with the number of steps done since the last call.
    """
    t0 = time.perf_counter()
    dtype = DTYPES[config.dtype]
    S, L, r, n, b = len(config.seeds), len(config.lrs), config.rank, cache.width, config.batch_size
    s = config.scale
    h, w_out = cache.h_train, cache.w_out
    u = cache.u_train if u_train is None else u_train
    ut = cache.u_test if u_test is None else u_test
    y = data.y_train.to(dtype)
    if schedules is None:
        schedules = torch.stack([batch_schedule(config.n_train, b, config.steps, sd) for sd in config.seeds])
    A = A0.to(dtype)[:, None].repeat(1, L, 1, 1).contiguous()  # (S, L, r, n)
    # B is kept transposed, Bt = Bᵀ (S, L, r, n): every product then runs along contiguous n (3-4× faster)
    Bt = B0.to(dtype).transpose(1, 2)[:, None].repeat(1, L, 1, 1).contiguous()
    mA, vA, mB, vB = (torch.zeros_like(A), torch.zeros_like(A), torch.zeros_like(Bt), torch.zeros_like(Bt))
    lr = torch.tensor(config.lrs, dtype=dtype).view(1, L, 1, 1).repeat(S, 1, 1, 1)
    beta1, beta2 = config.betas
    seed_idx = torch.arange(S)[:, None]
    wrow = w_out[:, None, None, :]  # (S, 1, 1, n)

    loss0 = _full_loss(h, u, w_out, y, A[:, :1], Bt[:, :1], s)[:, 0]  # (S,) initial train loss
    limit = (config.diverge_factor * loss0.clamp_min(1e-12))[:, None]
    diverged = torch.full((S, L), -1, dtype=torch.long)

    trace_steps = _evenly(config.steps, config.trace_points, 0)
    points = curve_points or config.curve_points
    curve_steps = _evenly(config.steps, points, 1)
    z_a_tr, z_b_tr, curve = [], [], []
    window = torch.zeros(S, L, dtype=dtype)
    window_len = 0

    def trace() -> None:  # on the full train set; Z_A by one bmm, ||Z_B|| through the r×r Gram (monitor's math)
        z = torch.bmm(h, A.view(S, L * r, n).transpose(1, 2)).view(S, -1, L, r).transpose(1, 2)  # (S, L, N, r)
        z_a_tr.append(z.norm(dim=-1).mean(-1)), z_b_tr.append(gram_norms(z, Bt.transpose(-1, -2), s).mean(-1))

    curve_set, trace_set = set(curve_steps.tolist()), set(trace_steps.tolist())
    if trace_steps[0] == 0:
        trace()
    pending = 0
    y_h = torch.empty(S, L, b, n, dtype=dtype)
    for t in range(1, config.steps + 1):
        idx = schedules[:, t - 1]  # (S, b)
        hb, ub, yb = h[seed_idx, idx], u[seed_idx, idx], y[idx]  # (S, b, n), (S, b, n), (S, b)
        z_a = torch.bmm(hb, A.view(S, L * r, n).transpose(1, 2)).view(S, b, L, r).transpose(1, 2)  # (S, L, b, r)
        y_h.copy_(ub[:, None])  # Y_h = u_b + s Z_A Bᵀ, accumulated in place in a reused buffer
        y_h.view(S * L, b, n).baddbmm_(z_a.reshape(S * L, b, r), Bt.view(S * L, r, n), alpha=s)
        act = y_h.clamp_min_(0.0)
        # φ(Y_h) w_out as one matrix-vector product per seed (a batched (.., n) @ (n, 1) is ~20× slower on CPU)
        pred = torch.stack([torch.mv(act[i].view(L * b, n), w_out[i]) for i in range(S)]).view(S, L, b)
        err = pred - yb[:, None]  # (S, L, b)
        loss = (err * err).mean(-1)
        g = err * (2.0 / b)
        d_act = act.sign_().mul_(g[..., None])  # ∂loss/∂(φ(Y_h)) / w_out, masked by φ'; reuses the buffer
        gBt = (z_a.transpose(-1, -2) @ d_act).mul_(wrow).mul_(s)  # (S, L, r, n) = (∂B)ᵀ
        dz_a = (d_act @ (Bt * wrow).transpose(-1, -2)).mul_(s)  # (S, L, b, r)
        gA = torch.bmm(dz_a.transpose(1, 2).reshape(S, b, L * r).transpose(1, 2), hb).view(S, L, r, n)

        bad = ~torch.isfinite(loss) | (loss > limit)
        newly = bad & (diverged < 0)
        if newly.any():
            diverged[newly] = t
            lr[newly] = 0.0
            for tensor in (A, Bt, mA, vA, mB, vB, gA, gBt):
                tensor[newly] = 0.0
        lr_t = lr * lr_factor(config.schedule, t, config.steps)
        _adamw_(A, gA, mA, vA, lr_t, t, beta1, beta2, config.eps, config.weight_decay)
        _adamw_(Bt, gBt, mB, vB, lr_t * config.ratio, t, beta1, beta2, config.eps, config.weight_decay)

        window += torch.where(diverged >= 0, torch.full_like(loss, math.nan), loss)
        window_len += 1
        if t in curve_set:
            curve.append(window / window_len)
            window = torch.zeros(S, L, dtype=dtype)
            window_len = 0
        if t in trace_set:
            trace()
        pending += 1
        if on_step is not None and (pending >= 25 or t == config.steps):
            on_step(pending)
            pending = 0

    alive = diverged < 0
    train = _full_loss(h, u, w_out, y, A, Bt, s)
    test = _full_loss(cache.h_test, ut, w_out, data.y_test.to(dtype), A, Bt, s)
    nan = torch.full_like(train, math.nan)
    train, test = torch.where(alive, train, nan), torch.where(alive, test, nan)
    z_a_arr = torch.stack(z_a_tr, -1)
    z_b_arr = torch.stack(z_b_tr, -1)
    return ChunkResult(
        width=n, init=init, lrs=list(config.lrs), seeds=list(config.seeds),
        train_loss=train.double().numpy(), test_loss=test.double().numpy(), diverged_step=diverged.numpy(),
        curve_steps=curve_steps, curve=torch.stack(curve, -1).double().numpy(),
        trace_steps=trace_steps, z_a=z_a_arr.double().numpy(), z_b=z_b_arr.double().numpy(),
        seconds=time.perf_counter() - t0, fingerprint=config.fingerprint(),
    )


# ----------------------------------------------------------------------------------- the plain reference loop


@dataclass
class SingleRun:
    """One (width, init, lr, seed) trained the plain way; ``losses[t-1]`` is the batch loss of step t."""

    losses: np.ndarray
    train_loss: float
    test_loss: float
    diverged_step: int
    seconds: float
    monitor_rows: list[dict] | None = None  # FeatureMonitor records (Z_A, Z_B, δ1, δ2 on the training batches)
    monitor_summary: dict | None = None


def run_single(
    config: WidthStudyConfig, data: ToyData, width: int, init: str, lr: float, seed: int,
    frozen: FrozenWeights | None = None, monitor_every: int | None = None,
) -> SingleRun:
    """The straightforward experiment: ToyModel (widelora LoRALinear), autograd, torch.optim.AdamW.

    Same weights, initial adapters, batches and divergence rule as the batched engine, so their losses agree.
    ``monitor_every=k`` attaches a ``widelora.monitor.FeatureMonitor`` recording every k-th training step (the
    δ1/δ2 split the batched engine does not trace).
    """
    t0 = time.perf_counter()
    dtype = DTYPES[config.dtype]
    fw = frozen or student_weights(config.d, width, seed, dtype)
    A0, B0, w_h = initial_adapters(config, data, fw, init, seed)
    if w_h is not None:
        fw = FrozenWeights(fw.w_in, w_h, fw.w_out)
    model = ToyModel(fw, rank=config.rank, alpha=config.alpha)
    with torch.no_grad():
        model.hidden.lora_A.copy_(A0)
        model.hidden.lora_B.copy_(B0)
    opt = torch.optim.AdamW(
        [{"params": [model.hidden.lora_A], "lr": lr}, {"params": [model.hidden.lora_B], "lr": lr * config.ratio}],
        betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
    )
    x, y = data.x_train.to(dtype), data.y_train.to(dtype)
    with torch.no_grad():
        limit = config.diverge_factor * max(F.mse_loss(model(x), y).item(), 1e-12)
    sched = batch_schedule(config.n_train, config.batch_size, config.steps, seed)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(config.schedule, k + 1, config.steps))
    losses = np.full(config.steps, math.nan)
    diverged = -1
    mon = None
    if monitor_every is not None:
        from widelora.monitor import FeatureMonitor

        mon = FeatureMonitor(model, every=monitor_every).attach()
    for t in range(1, config.steps + 1):
        idx = sched[t - 1]
        loss = F.mse_loss(model(x[idx]), y[idx])
        value = loss.item()
        if not math.isfinite(value) or value > limit:
            diverged = t
            break
        losses[t - 1] = value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if mon is not None:
            mon.step(t)
    with torch.no_grad():
        train = F.mse_loss(model(x), y).item() if diverged < 0 else math.nan
        test = F.mse_loss(model(data.x_test.to(dtype)), data.y_test.to(dtype)).item() if diverged < 0 else math.nan
    if mon is not None:
        mon.detach()
    return SingleRun(losses, train, test, diverged, time.perf_counter() - t0,
                     mon.to_rows() if mon else None, mon.summary() if mon else None)


# ---------------------------------------------------------------------------------------------- the study


def chunk_path(out_dir: Path, width: int, init: str) -> Path:
    return Path(out_dir) / "chunks" / f"w{width}_{init}.json"


def load_chunk(path: Path, config: WidthStudyConfig) -> ChunkResult | None:
    """A finished chunk written by the same configuration, or None (missing, unreadable or stale)."""
    try:
        chunk = ChunkResult.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return chunk if chunk.fingerprint == config.fingerprint() else None


@dataclass
class Optimum:
    """The optimal learning rate of one (width, init), read from the seed-mean final loss."""

    width: int
    init: str
    lr_grid: float  # the best grid point
    lr: float  # refined: vertex of a parabola through log-loss at the best point and its neighbours
    loss: float
    at_edge: bool  # best point is the first or last of the grid: the true optimum may lie outside it
    per_seed: list[float]  # best grid point of each seed


def _refine(log_lrs: np.ndarray, log_loss: np.ndarray, i: int) -> float:
    """Vertex of the parabola through (i-1, i, i+1) in (log lr, log loss); the grid point if not interior/convex."""
    if i == 0 or i == len(log_lrs) - 1 or not np.isfinite(log_loss[i - 1 : i + 2]).all():
        return float(log_lrs[i])
    x, y = log_lrs[i - 1 : i + 2], log_loss[i - 1 : i + 2]
    a, b_, _ = np.polyfit(x, y, 2)
    if a <= 0:
        return float(log_lrs[i])
    return float(np.clip(-b_ / (2 * a), x[0], x[2]))


def find_optimum(chunk: ChunkResult, select_by: str = "train") -> Optimum:
    loss = chunk.train_loss if select_by == "train" else chunk.test_loss
    loss = np.where(np.isfinite(loss), loss, np.inf)
    mean = loss.mean(axis=0)  # over seeds; a seed that diverged makes that lr infinite
    lrs = np.asarray(chunk.lrs)
    if not np.isfinite(mean).any():
        return Optimum(chunk.width, chunk.init, math.nan, math.nan, math.nan, True, [math.nan] * loss.shape[0])
    i = int(np.argmin(mean))
    log_lr = _refine(np.log(lrs), np.log(mean), i)
    per_seed = [float(lrs[int(np.argmin(row))]) if np.isfinite(row).any() else math.nan for row in loss]
    return Optimum(chunk.width, chunk.init, float(lrs[i]), float(math.exp(log_lr)), float(mean[i]),
                   i in (0, len(lrs) - 1), per_seed)


@dataclass
class WidthStudyResult:
    """Everything the study produced; ``out_dir`` holds the same as files."""

    config: WidthStudyConfig
    chunks: dict[tuple[int, str], ChunkResult]
    optima: list[Optimum]
    fits: dict[str, Any]  # init -> theory.SlopeFit (refined optima over widths)
    seconds: float  # wall time of this call
    out_dir: Path | None = None
    figures: list[Path] = field(default_factory=list)
    loaded: int = 0  # chunks taken from a previous run (resume)

    @property
    def compute_seconds(self) -> float:
        """Sum of the chunks' training times (over workers, so it can exceed the wall time)."""
        return float(sum(c.seconds for c in self.chunks.values()))

    def chunk(self, width: int, init: str) -> ChunkResult:
        return self.chunks[(width, init)]

    def rows(self) -> list[dict]:
        """One row per (width, init, seed, lr): final losses and divergence."""
        rows = []
        for (width, init), c in sorted(self.chunks.items()):
            for si, seed in enumerate(c.seeds):
                for li, lr in enumerate(c.lrs):
                    rows.append({"width": width, "init": init, "seed": seed, "lr": lr,
                                     "train_loss": float(c.train_loss[si, li]), "test_loss": float(c.test_loss[si, li]),
                                     "diverged_step": int(c.diverged_step[si, li])})
        return rows

    def exponent_rows(self) -> list[dict]:
        from widelora.theory import exponent_table

        return exponent_table(self.fits)


def fit_optima(optima: Sequence[Optimum], confidence: float = 0.95) -> dict[str, Any]:
    """Log–log slope of the optimal LR vs width per init, with a t-interval (needs >= 3 widths)."""
    from widelora.theory import fit_loglog_slope

    fits = {}
    for init in dict.fromkeys(o.init for o in optima):
        pts = [(o.width, o.lr) for o in optima if o.init == init and math.isfinite(o.lr)]
        if len({w for w, _ in pts}) >= 3:
            fits[init] = fit_loglog_slope([w for w, _ in pts], [v for _, v in pts], confidence=confidence)
    return fits


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn("[bold]width study[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())
    prog.start()
    prog.add_task("", total=total)
    return prog


def _run_chunks(
    config: WidthStudyConfig, data: ToyData, todo: list[tuple[int, str]], out: Path | None, advance: Any = None
) -> dict[tuple[int, str], ChunkResult]:
    """Train the listed (width, init) chunks, one width's cache at a time; write each chunk as it finishes.

    ``advance(k)`` receives progress in units of steps × width (roughly proportional to compute).
    """
    dtype = DTYPES[config.dtype]
    chunks: dict[tuple[int, str], ChunkResult] = {}
    for width in dict.fromkeys(w for w, _ in todo):
        cache = build_cache(config, data, width)
        for init in [i for w, i in todo if w == width]:
            A0s, B0s, u_tr, u_te = [], [], [], []
            moved = False
            for si, seed in enumerate(config.seeds):
                a0, b0, w_h = initial_adapters(config, data, cache.frozen[si], init, seed)
                A0s.append(a0), B0s.append(b0)
                if w_h is not None:  # the scheme moved W_h (PiSSA, LoRA-GA): u must be recomputed
                    moved = True
                    u_tr.append(_features(data.x_train.to(dtype), cache.frozen[si], w_h)[1])
                    u_te.append(_features(data.x_test.to(dtype), cache.frozen[si], w_h)[1])
                else:
                    u_tr.append(cache.u_train[si]), u_te.append(cache.u_test[si])
            step_cb = (lambda k, _w=width: advance(k * _w)) if advance is not None else None
            chunk = train_chunk(config, cache, data, torch.stack(A0s), torch.stack(B0s), init=init,
                                u_train=torch.stack(u_tr) if moved else None,
                                u_test=torch.stack(u_te) if moved else None, on_step=step_cb)
            chunks[(width, init)] = chunk
            if out is not None:
                atomic_write_text(chunk_path(out, width, init), json.dumps(chunk.to_json()))
        del cache
    return chunks


def _worker(config_dict: dict, out: str, todo: list, counter: Any, errors: Any) -> None:
    """Subprocess entry: one thread, its share of the widths, chunks written to ``out``."""
    try:
        config = WidthStudyConfig.from_dict(config_dict)
        torch.set_num_threads(config.threads or 1)
        data = make_data(config.d, config.teacher_width, config.teacher_rank, config.n_train, config.n_test,
                         config.data_seed, DTYPES[config.dtype])

        def advance(k: float) -> None:
            with counter.get_lock():
                counter.value += k

        _run_chunks(config, data, [tuple(t) for t in todo], Path(out), advance)
    except BaseException:  # report to the parent, which raises
        import traceback

        errors.put(traceback.format_exc())
        raise


def _partition(todo: list[tuple[int, str]], workers: int) -> list[list[tuple[int, str]]]:
    """Whole widths to workers, largest first to the least loaded (a width's cache is built once)."""
    by_width: dict[int, list[tuple[int, str]]] = {}
    for w, i in todo:
        by_width.setdefault(w, []).append((w, i))
    loads = [0.0] * workers
    parts: list[list[tuple[int, str]]] = [[] for _ in range(workers)]
    for w in sorted(by_width, key=lambda w: -w * len(by_width[w])):
        k = loads.index(min(loads))
        parts[k].extend(by_width[w])
        loads[k] += w * len(by_width[w])
    return [p for p in parts if p]


def _run_parallel(
    config: WidthStudyConfig, todo: list[tuple[int, str]], out: Path | None, progress: bool
) -> dict[tuple[int, str], ChunkResult]:
    """Run the chunks in ``config.workers`` processes (1 torch thread each); chunks come back through files."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="widelora-width-")
        out = Path(tmp.name)
    counter, errors = ctx.Value("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(config.to_dict(), str(out), part, counter, errors), daemon=True)
             for part in _partition(todo, config.workers)]
    prog = _progress(progress, sum(config.steps * w for w, _ in todo))
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            if prog is not None:
                prog.update(prog.task_ids[0], completed=counter.value)
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    finally:
        for p in procs:
            if p.is_alive() and any(q.exitcode not in (None, 0) for q in procs):
                p.terminate()
            p.join()
        if prog is not None:
            prog.stop()
    if any(p.exitcode != 0 for p in procs):
        msg = errors.get() if not errors.empty() else f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"a width-study worker failed:\n{msg}")
    chunks = {}
    for w, i in todo:
        chunk = load_chunk(chunk_path(out, w, i), config)
        if chunk is None:
            raise RuntimeError(f"worker finished but chunk w{w}_{i} is missing in {out}")
        chunks[(w, i)] = chunk
    if tmp is not None:
        tmp.cleanup()
    return chunks


def run_width_study(
    config: WidthStudyConfig,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = True,
    figures: bool = True,
) -> WidthStudyResult:
    """Run (or resume) the study; write chunks, results.csv, optima.csv, summary.json, report.md and figures.

    With ``resume`` (the default) a chunk already in ``out_dir/chunks`` from the same configuration is loaded,
    not recomputed; a chunk from a different configuration is recomputed and overwritten.
    """
    if not isinstance(config, WidthStudyConfig):
        raise TypeError(f"config: expected a WidthStudyConfig, got {type(config).__name__}")
    from widelora.methods.init import get_scheme

    for init in config.inits:  # before anything is written: the ValueError lists the registered schemes
        get_scheme(init)
    t_start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or 1)  # restored below: a library call must not change the caller's
    try:
        return _run_study(config, out, progress, resume, figures, t_start)
    finally:
        torch.set_num_threads(prev_threads)


def _run_study(
    config: WidthStudyConfig, out: Path | None, progress: bool, resume: bool, figures: bool, t_start: float
) -> WidthStudyResult:
    dtype = DTYPES[config.dtype]
    data = make_data(config.d, config.teacher_width, config.teacher_rank, config.n_train, config.n_test,
                     config.data_seed, dtype)

    chunks: dict[tuple[int, str], ChunkResult] = {}
    todo: list[tuple[int, str]] = []
    for width in config.widths:
        for init in config.inits:
            done = load_chunk(chunk_path(out, width, init), config) if (out is not None and resume) else None
            if done is not None:
                chunks[(width, init)] = done
            else:
                todo.append((width, init))
    if todo and config.workers > 1 and len({w for w, _ in todo}) > 1:
        chunks.update(_run_parallel(config, todo, out, progress))
    elif todo:
        prog = _progress(progress, sum(config.steps * w for w, _ in todo))
        advance = (lambda k: prog.advance(prog.task_ids[0], k)) if prog is not None else None
        try:
            chunks.update(_run_chunks(config, data, todo, out, advance))
        finally:
            if prog is not None:
                prog.stop()

    optima = [find_optimum(chunks[(w, i)], config.select_by) for i in config.inits for w in config.widths]
    fits = fit_optima(optima)
    result = WidthStudyResult(config, chunks, optima, fits, time.perf_counter() - t_start, out,
                              loaded=len(chunks) - len(todo))
    if out is not None:
        write_results(result, out)
        if figures:
            from widelora.experiments.width_figures import make_figures, write_report

            result.figures = make_figures(result, out / "figures")
            write_report(result, out / "report.md")
    return result


def load_results(out_dir: str | os.PathLike) -> WidthStudyResult:
    """A finished study read back from its folder (config.json + chunks), e.g. to re-plot or compare studies."""
    out = Path(out_dir)
    try:
        config = WidthStudyConfig.from_dict(json.loads((out / "config.json").read_text()))
    except FileNotFoundError:
        raise ValueError(f"out_dir: {str(out)!r} has no config.json; is it a width-study folder?") from None
    chunks = {}
    for w in config.widths:
        for i in config.inits:
            chunk = load_chunk(chunk_path(out, w, i), config)
            if chunk is None:
                raise ValueError(f"out_dir: chunk w{w}_{i} is missing or stale in {str(out)!r}; run the study "
                                 "again on this folder to finish it")
            chunks[(w, i)] = chunk
    optima = [find_optimum(chunks[(w, i)], config.select_by) for i in config.inits for w in config.widths]
    return WidthStudyResult(config, chunks, optima, fit_optima(optima), 0.0, out, loaded=len(chunks))


def write_results(result: WidthStudyResult, out: Path) -> None:
    """results.csv (every run), optima.csv, summary.json (config, optima, fits, timing)."""
    rows = result.rows()
    atomic_write_text(out / "results.csv", _csv(rows))
    atomic_write_text(out / "optima.csv", _csv([asdict(o) | {"per_seed": json.dumps(o.per_seed)} for o in result.optima]))
    summary = {
        "config": result.config.to_dict(),
        "seconds": result.seconds,
        "compute_seconds": result.compute_seconds,
        "chunks_loaded": result.loaded,
        "chunk_seconds": {f"w{w}_{i}": c.seconds for (w, i), c in sorted(result.chunks.items())},
        "optima": [asdict(o) for o in result.optima],
        "fits": {k: v.as_dict() for k, v in result.fits.items()},
        "exponents": result.exponent_rows(),
    }
    atomic_write_text(out / "summary.json", json.dumps(_nan_to_none(json.loads(json.dumps(summary, default=str))),
                                                   indent=2))


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()

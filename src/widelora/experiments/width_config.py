"""Every choice of the width study, checked before anything runs — including whether it fits in memory.

The paper (seed 001, Section 3.7, Appendix B.1.1) leaves the step budget, batch size and learning-rate grid
unstated; ``docs/results/width_study.md`` says why the defaults are what they are. A width is not just a
number here: the frozen ``W_h`` of a student of width n holds n² floats, so 2^24 would need about a petabyte.
The config estimates the peak memory of the largest width before any work starts and refuses clearly when it
will not fit.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from widelora.errors import UserError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SCHEDULES = ("constant", "linear", "cosine")
SELECT_BY = ("train", "test")
_FULL_LOSS_ELEMS = (
    1 << 23
)  # the batched full-data-set loss is computed in slices of at most this many elements


def lr_factor(schedule: str, t: int, steps: int) -> float:
    """Multiplier of the base LR at step t (1-based) of ``steps``: the LR used by the t-th update."""
    if schedule == "constant":
        return 1.0
    frac = (t - 1) / steps
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise UserError(f"schedule: got {schedule!r}; expected one of {list(SCHEDULES)}")


def lr_grid(low_exp: float, high_exp: float, per_octave: int = 1) -> tuple[float, ...]:
    """Learning rates 2^k for k from low_exp to high_exp in steps of 1/per_octave."""
    if per_octave < 1 or high_exp < low_exp:
        raise UserError(
            f"lr_grid: need per_octave >= 1 and high_exp >= low_exp, got {low_exp}, {high_exp}, {per_octave}"
        )
    k = round((high_exp - low_exp) * per_octave)
    return tuple(float(2.0 ** (low_exp + i / per_octave)) for i in range(k + 1))


def default_memory_limit_gb() -> float:
    """80 % of this machine's physical memory (the study shares it with everything else that runs)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        total = 16 * 2**30
    return 0.8 * total / 2**30


def _human(nbytes: float) -> str:
    for unit, size in (("PB", 2**50), ("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes / 2**10:.3g} KB"


@dataclass
class WidthStudyConfig:
    """Every choice of the study; one (width, init) trains the grid seeds × ratios × lrs in one pass."""

    widths: tuple[int, ...] = tuple(2**k for k in range(7, 14))
    inits: tuple[str, ...] = ("init_a", "init_b")
    lrs: tuple[float, ...] = lr_grid(-15, -3)  # 13 points, a factor 2 apart: 3.1e-5 ... 0.125
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    ratios: tuple[float, ...] = (1.0,)  # LoRA+: lr_B = ratio · lr_A (lr is lr_A); 1 = plain AdamW
    steps: int = 500
    eval_steps: tuple[int, ...] = ()  # earlier budgets at which the full train/test losses are also recorded
    batch_size: int = 16
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank, i.e. s = 1 as in the paper's eq. (4)
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
    # torch threads per process; None = 1. Parallelism comes from `workers`: on a busy machine one process
    # with 2 OpenMP threads is many times slower than 2 single-thread processes (the threads wait on each
    # other).
    threads: int | None = None
    workers: int = (
        2  # processes, each given whole widths (2 cores: 2 workers of 1 thread beat 1 of 2 threads)
    )
    memory_limit_gb: float | None = (
        None  # refuse a study whose estimated peak is above this; None: 80 % of RAM
    )

    # fields that do not change the numbers, so a resumed run may differ in them
    _NON_RESULT = ("threads", "workers", "select_by", "widths", "inits", "memory_limit_gb")

    def __post_init__(self) -> None:
        self.widths = _tuple(self.widths, int, "widths")
        self.inits = _tuple(self.inits, str, "inits")
        self.lrs = _tuple(self.lrs, float, "lrs")
        self.seeds = _tuple(self.seeds, int, "seeds")
        self.ratios = _tuple(self.ratios, float, "ratios")
        self.eval_steps = _tuple(self.eval_steps, int, "eval_steps")
        self.betas = _tuple(self.betas, float, "betas")  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Every field checked; a UserError names the key, the value and what would be valid."""
        if not self.widths or any(w < 1 for w in self.widths) or len(set(self.widths)) != len(self.widths):
            raise _bad("widths", self.widths, "distinct positive ints")
        if not self.inits or len(set(self.inits)) != len(self.inits):
            raise _bad("inits", self.inits, "distinct init scheme names, e.g. ('init_a', 'init_b')")
        for name in ("lrs", "ratios"):
            values = getattr(self, name)
            if not values or any(not (x > 0 and math.isfinite(x)) for x in values):
                raise _bad(name, values, "positive finite numbers")
            if list(values) != sorted(set(values)):
                raise _bad(name, values, "strictly increasing numbers")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise _bad("seeds", self.seeds, "distinct ints")
        for name in (
            "steps",
            "batch_size",
            "rank",
            "d",
            "teacher_width",
            "teacher_rank",
            "n_train",
            "n_test",
            "trace_points",
            "curve_points",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(name, v, "an int >= 1")
        if any(not 1 <= t < self.steps for t in self.eval_steps) or list(self.eval_steps) != sorted(
            set(self.eval_steps)
        ):
            raise _bad("eval_steps", self.eval_steps, f"increasing steps in [1, steps={self.steps})")
        if self.batch_size > self.n_train:
            raise _bad("batch_size", self.batch_size, f"at most n_train={self.n_train}")
        if self.alpha is not None and not self.alpha > 0:
            raise _bad("alpha", self.alpha, "a positive number or None (alpha = rank)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise _bad("betas", self.betas, "two numbers in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise _bad("schedule", self.schedule, f"one of {list(SCHEDULES)}")
        if self.select_by not in SELECT_BY:
            raise _bad("select_by", self.select_by, f"one of {list(SELECT_BY)}")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, f"one of {sorted(DTYPES)}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise _bad("workers", self.workers, "an int >= 1")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise _bad("threads", self.threads, "None or an int >= 1")
        if not (self.diverge_factor > 1 and math.isfinite(self.diverge_factor)):
            raise _bad("diverge_factor", self.diverge_factor, "a finite number > 1")
        if self.memory_limit_gb is not None and not (
            self.memory_limit_gb > 0 and math.isfinite(self.memory_limit_gb)
        ):
            raise _bad(
                "memory_limit_gb", self.memory_limit_gb, "a positive number of GiB or None (80 % of RAM)"
            )
        self.check_memory()

    @property
    def scale(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def configs(self) -> int:
        """Configurations trained together per (width, init) and seed: ratios × lrs."""
        return len(self.ratios) * len(self.lrs)

    def memory_bytes(self, width: int) -> dict[str, float]:
        """Estimated peak bytes of one (width, init) pass, by part (what ``check_memory`` compares)."""
        item = torch.finfo(DTYPES[self.dtype]).bits // 8
        S, C, n, r, b = len(self.seeds), self.configs, width, self.rank, self.batch_size
        return {
            # the frozen n×n W_h of every seed, plus the copies a ToyModel makes while an init scheme runs
            "frozen W_h (n² per seed)": item * (S + 3) * n * n,
            "cached features": item * 2 * S * (self.n_train + self.n_test) * n,
            # A, Bᵀ, their Adam moments and gradients, update temporaries; the (b × n) activation buffer
            "adapters and optimizer state": item * (12 * S * C * r * n + S * C * b * n + 4 * S * b * n),
            "full-data-set loss": item * 3 * max(_FULL_LOSS_ELEMS, S * self.n_train * n),
        }

    def check_memory(self) -> None:
        """Refuse a study whose largest width would not fit (the ``workers`` largest widths run at once)."""
        limit_gb = self.memory_limit_gb if self.memory_limit_gb is not None else default_memory_limit_gb()
        concurrent = sorted(self.widths, reverse=True)[: max(1, min(self.workers, len(self.widths)))]
        total = sum(sum(self.memory_bytes(w).values()) for w in concurrent)
        if total <= limit_gb * 2**30:
            return
        parts = self.memory_bytes(concurrent[0])
        largest = max(parts, key=parts.get)
        limit = f"the limit is {limit_gb:.3g} GiB (memory_limit_gb; default 80 % of this machine's memory)"
        if largest == "frozen W_h (n² per seed)":
            raise UserError(
                f"widths: {concurrent[0]} needs about {_human(total)} of memory ({_human(parts[largest])} "
                f"for the frozen n×n weights alone); {limit}. Use smaller widths."
            )
        what = "seeds × ratios × lrs" if largest == "adapters and optimizer state" else "seeds"
        raise UserError(
            f"{what}: {len(self.seeds)} × {len(self.ratios)} × {len(self.lrs)} "
            f"configurations at width {concurrent[0]} need about {_human(total)} of memory; "
            f"{limit}. Use fewer seeds, ratios or learning rates (or fewer workers)."
        )

    @classmethod
    def quick(cls, **overrides: Any) -> WidthStudyConfig:
        """A small study for smoke tests (well under a minute on 2 cores); not for conclusions (3 widths)."""
        base = {
            "widths": (128, 512, 2048),
            "lrs": lr_grid(-14, -4),
            "seeds": (0,),
            "steps": 300,
            "trace_points": 16,
            "curve_points": 50,
            "workers": 1,
        }
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> WidthStudyConfig:
        """The inverse of ``to_dict``; a folder from before ratios were an axis (``ratio: x``) still loads."""
        data = dict(data)
        if "ratio" in data and "ratios" not in data:
            data["ratios"] = (data.pop("ratio"),)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def fingerprint(self) -> dict:
        """The fields a chunk's numbers depend on (width and init are part of the chunk itself)."""
        d = self.to_dict()
        for k in self._NON_RESULT:
            d.pop(k, None)
        return json.loads(json.dumps(d))


def _bad(name: str, value: Any, valid: str) -> UserError:
    return UserError(f"{name}: got {value!r}; expected {valid}")


def _tuple(values: Any, kind: type, name: str) -> tuple:
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        items = tuple(values)
        if kind is int and any(isinstance(v, bool) or float(v) != int(v) for v in items):
            raise ValueError
        return tuple(kind(v) for v in items)
    except (TypeError, ValueError, OverflowError):
        raise _bad(name, values, f"a sequence of {kind.__name__}") from None

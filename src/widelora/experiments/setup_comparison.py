"""Compare training setups from a sweep's trials: each at its own best learning rate, paired by seed.

Why its own module: the evaluation of widelora's recommended setup (``bench/recommend_eval.py``, issue 12) and
``widelora demo`` ask the same questions of stored trials — which learning rate is each setup's best (and is
it bracketed by the grid), how far apart are two setups at their own best (a per-seed paired difference, since
the same seed means the same data split, order and evaluation set), and does the ranking change between half
and full budget. A setup without an lr grid (an untuned recommendation whose probe picks the learning rate)
is one cell whose per-seed learning rates are read from the trials.

Values are the headline metric of finished trials; a trial that diverged or failed is counted, never averaged
in, and a cell with such a trial cannot be a setup's best (its mean would describe only the lucky seeds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINISHED = ("done", "diverged", "failed")
#: Final-metric keys where a trial function records the learning rate it chose itself (probe, finder).
CHOSEN_LR_KEYS = ("chosen_lr", "lr")


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN standard error for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var / len(vals))


@dataclass
class Cell:
    """The seeds of one setup at one learning rate (``lr`` None: the setup chose its own per seed)."""

    lr: float | None
    by_seed: dict[int, float] = field(default_factory=dict)
    lr_by_seed: dict[int, float] = field(default_factory=dict)
    diverged: int = 0
    failed: int = 0

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return mean_se(self.by_seed.values())[0]

    @property
    def se(self) -> float:
        return mean_se(self.by_seed.values())[1]

    @property
    def clean(self) -> bool:
        """Every trial of the cell finished with a finite metric."""
        return self.n > 0 and self.diverged == 0 and self.failed == 0


@dataclass
class SetupResult:
    """One setup's cells, by learning rate (a single ``None`` cell for a setup that picks its own)."""

    label: str
    cells: dict[float | None, Cell] = field(default_factory=dict)

    @property
    def grid(self) -> list[float]:
        return sorted(lr for lr in self.cells if lr is not None)

    def best(self, goal: str, min_seeds: int = 1) -> Cell | None:
        """The clean cell with the best seed mean among those with at least ``min_seeds`` seeds."""
        ok = [c for c in self.cells.values() if c.clean and c.n >= min_seeds and math.isfinite(c.mean)]
        if not ok:
            return None
        return max(ok, key=lambda c: c.mean if goal == "max" else -c.mean)

    def bracketed(self, goal: str, min_seeds: int = 1) -> bool | None:
        """Whether the best lr has a grid point on each side (None for a setup without a grid)."""
        best = self.best(goal, min_seeds)
        grid = self.grid
        if best is None or best.lr is None or len(grid) < 3:
            return None
        return grid[0] < best.lr < grid[-1]


def metric_at(curves: Mapping[str, list[tuple[int, float]]], name: str, step: int) -> float | None:
    """The value of metric ``name`` logged at exactly ``step`` (None when there is none)."""
    for s, v in curves.get(name, []):
        if s == step:
            return v
    return None


def collect(
    trials: Iterable[Any],
    metric: str,
    setup_axis: str = "setup",
    curves: Mapping[str, Mapping[str, list[tuple[int, float]]]] | None = None,
    at_step: int | None = None,
) -> dict[str, SetupResult]:
    """Group stored trials (``TrialRecord``-like: id, config, labels, status, final) by setup label and lr.

    With ``curves`` and ``at_step`` the value is the metric logged at that step (the half-budget check reads
    the validation evaluation at half the steps) instead of the final one.
    """
    out: dict[str, SetupResult] = {}
    for t in trials:
        if t.status not in FINISHED:
            continue  # pending or running: not a result yet
        label = str(t.labels.get(setup_axis, "all"))
        setup = out.setdefault(label, SetupResult(label))
        has_grid = "lr" in t.labels
        lr = float(t.config["lr"]) if has_grid else None
        cell = setup.cells.setdefault(lr, Cell(lr))
        seed = int(t.config.get("seed", 0))
        if at_step is None:
            value = t.final.get(metric)
        else:
            value = metric_at((curves or {}).get(t.id, {}), metric, at_step) if t.status == "done" else None
        if t.status == "done" and value is not None and math.isfinite(value):
            cell.by_seed[seed] = float(value)
            chosen = next((t.final[k] for k in CHOSEN_LR_KEYS if t.final.get(k) is not None), None)
            if chosen is None:
                chosen = t.config.get("lr") if has_grid else _lr_from_run_dir(getattr(t, "run_dir", None))
            if chosen is not None:
                cell.lr_by_seed[seed] = float(chosen)
        elif t.status == "failed":
            cell.failed += 1
        elif t.status in ("done", "diverged"):
            cell.diverged += 1
    return out


def _lr_from_run_dir(run_dir: str | None) -> float | None:
    """The learning rate a run chose itself, from its ``result.json`` (``setup.lr``, written by finetune)."""
    if not run_dir:
        return None
    try:
        result = json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    lr = (result.get("setup") or {}).get("lr") if isinstance(result, dict) else None
    return float(lr) if isinstance(lr, (int, float)) else None


@dataclass
class Gap:
    """``a`` minus ``b`` paired by seed: mean ± standard error over the seeds both have (relative: in %)."""

    mean: float
    se: float
    n: int
    relative: bool = False

    def text(self, scale: float = 1.0, unit: str = "") -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        unit = "%" if self.relative else unit
        err = f" ± {scale * self.se:.1f}" if math.isfinite(self.se) else ""
        return f"{scale * self.mean:+.1f}{err}{unit} ({self.n} seed{'s' if self.n != 1 else ''})"


def paired_gap(a: Cell | None, b: Cell | None, relative: bool = False) -> Gap:
    """Per-seed difference a − b (``relative``: 100 · (a / b − 1), e.g. perplexity), mean ± s.e."""
    if a is None or b is None:
        return Gap(math.nan, math.nan, 0, relative)
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    if relative:
        diffs = [100.0 * (a.by_seed[s] / b.by_seed[s] - 1.0) for s in seeds]
    else:
        diffs = [a.by_seed[s] - b.by_seed[s] for s in seeds]
    m, se = mean_se(diffs)
    return Gap(m, se, len(diffs), relative)


def ranking(setups: Mapping[str, SetupResult], goal: str, min_seeds: int = 1) -> list[str]:
    """Setup labels from best to worst by their best cell's mean (setups without a clean cell last)."""

    def key(label: str) -> float:
        best = setups[label].best(goal, min_seeds)
        if best is None:
            return math.inf
        return -best.mean if goal == "max" else best.mean

    return sorted(setups, key=key)


def within_target(gap: Gap, baseline: Cell | None, goal: str, floor: float) -> bool | None:
    """Issue 12's first target: the setup is no worse than the baseline by more than max(one seed s.e. of
    the baseline, ``floor``) — ``floor`` in the metric's units (1 accuracy point = 0.01), or in % when
    relative."""
    if baseline is None or not math.isfinite(gap.mean):
        return None
    se = baseline.se if math.isfinite(baseline.se) else 0.0
    if gap.relative:
        se = 100.0 * se / baseline.mean if baseline.mean else 0.0
    allowed = max(se, floor)
    worse_by = -gap.mean if goal == "max" else gap.mean
    return worse_by <= allowed

"""Calibration of widelora's defaults on the width study: the LoRA+ ratio vs width, and the stability edge vs
the optimal learning rate.

Two questions the recommended setup needs answered with numbers, not folklore:

1. Which ratio lr_B / lr_A is best, and does it grow with width? (LoRA+ says Θ(n) in the infinite-width limit
   under Adam; papers use 2^4 at widths 1k–4k.) For each width we read the (ratio, lr) pair with the lowest
   seed-mean loss, fit the optimal ratio against n in log–log, and measure the gain over ratio 1, each at its
   own best learning rate.
2. How far below the stability edge is the optimum? The edge is the largest learning rate that does not
   diverge within the budget (every smaller one does not either — what an LR range test finds); the optimum is
   the argmin of the loss. Their ratio is the factor a probe divides the edge by.

Seed errors: every per-width number is also computed per seed; intervals are means ± standard errors of log2
values over seeds (log2, because the grids are powers of two and errors are multiplicative).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from widelora.experiments.width_results import ChunkResult, load_chunk, refine_vertex
from widelora.theory import fit_loglog_slope


@dataclass
class LossGrid:
    """Losses of one (width, init) over seeds × ratios × lrs: [seed, ratio, lr], nan where a run diverged."""

    width: int
    init: str
    seeds: list[int]
    ratios: list[float]
    lrs: list[float]
    steps: int
    loss: np.ndarray
    diverged_step: np.ndarray  # [seed, ratio, lr], -1 if never
    budgets: dict[int, np.ndarray] = field(default_factory=dict)  # earlier budget -> loss [seed, ratio, lr]

    @classmethod
    def from_chunks(cls, chunks: Sequence[ChunkResult], select_by: str = "train") -> LossGrid:
        """One grid from chunks of the same (width, init, seeds, lrs) that differ only in their ratios."""
        first = chunks[0]
        for c in chunks:
            if (c.width, c.init, c.seeds, c.lrs) != (first.width, first.init, first.seeds, first.lrs):
                raise ValueError("chunks: expected the same width, init, seeds and lrs in every chunk")
        order = sorted((r, c, ri) for c in chunks for ri, r in enumerate(c.ratios))
        loss = np.stack([c.losses(select_by, r) for r, c, _ in order], axis=1)
        div = np.stack([c.grid(c.diverged_step)[:, ri] for _, c, ri in order], axis=1)
        budgets = {}
        for t in sorted(set.intersection(*(set(c.eval_steps.tolist()) for c in chunks))):
            budgets[int(t)] = np.stack([c.losses(select_by, r, budget=t) for r, c, _ in order], axis=1)
        return cls(
            first.width,
            first.init,
            list(first.seeds),
            [r for r, _, _ in order],
            list(first.lrs),
            int(first.curve_steps[-1]),
            loss,
            div,
            budgets,
        )

    def at(self, budget: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(loss, diverged-within-budget) at ``budget`` steps (the full run when None)."""
        if budget is None or budget == self.steps:
            return self.loss, self.diverged_step > 0
        if budget not in self.budgets:
            raise KeyError(f"budget: {budget} was not recorded; budgets are {sorted(self.budgets)}")
        d = self.diverged_step
        return self.budgets[budget], (d > 0) & (d <= budget)


def _mean_log2_se(values: Sequence[float]) -> tuple[float, float]:
    """Geometric mean and the standard error of log2 over seeds (nan when fewer than 2 finite values)."""
    v = np.log2(np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float))
    if v.size == 0:
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(2.0 ** v.mean()), se


def _argmin_refined(xs: Sequence[float], values: np.ndarray) -> tuple[int, float]:
    """Grid argmin of ``values`` and its parabola-refined position (in x, log–log)."""
    i = int(np.nanargmin(values))
    return i, float(2.0 ** (refine_vertex(np.log2(xs), np.log2(values), i)))


@dataclass
class RatioOptimum:
    """The best LoRA+ ratio at one width, and what tuning it gains over ratio 1."""

    width: int
    init: str
    ratio_grid: float  # ratio of the seed-mean best (ratio, lr) pair
    ratio: float  # refined: parabola through the best loss per ratio (log–log)
    lr: float  # lr_A at the best pair
    loss: float
    at_edge: bool  # best ratio is the grid's first or last
    per_seed_ratio: list[float]  # each seed's best ratio (each at its own best lr)
    ratio_log2_se: float
    lr_ratio1: float  # best lr at ratio 1 and its loss
    loss_ratio1: float
    gain: float  # loss at ratio 1 / loss at the best ratio, each at its own best lr (> 1: the ratio helps)
    gain_log2_se: float  # over seeds, paired at the seed-mean choices
    best_loss_per_ratio: list[float]
    # the same gain without selection bias: both choices made on half the seeds, measured on the others
    gain_heldout: float = math.nan


def _seed_mean(loss: np.ndarray) -> np.ndarray:
    """Mean over seeds; a configuration where any seed diverged is infinite (it is not a safe choice)."""
    return np.where(np.isfinite(loss), loss, np.inf).mean(axis=0)


def best_ratio(grid: LossGrid, budget: int | None = None) -> RatioOptimum:
    loss, _ = grid.at(budget)
    mean = _seed_mean(loss)  # [ratio, lr]
    per_ratio = mean.min(axis=1)
    ri, ratio = _argmin_refined(grid.ratios, per_ratio)
    li = int(np.argmin(mean[ri]))
    per_seed = []
    for s in range(loss.shape[0]):
        row = np.where(np.isfinite(loss[s]), loss[s], np.inf).min(axis=1)
        per_seed.append(_argmin_refined(grid.ratios, row)[1] if np.isfinite(row).any() else math.nan)
    _, se = _mean_log2_se(per_seed)
    if 1.0 in grid.ratios:
        r1 = grid.ratios.index(1.0)
        l1 = int(np.argmin(mean[r1]))
        paired = np.log2(loss[:, r1, l1] / loss[:, ri, li])
        gain = float(mean[r1, l1] / mean[ri, li])
        gain_se = float(np.std(paired, ddof=1) / math.sqrt(len(paired))) if len(paired) > 1 else math.nan
        lr1, loss1 = grid.lrs[l1], float(mean[r1, l1])
    else:
        gain = gain_se = lr1 = loss1 = math.nan
    return RatioOptimum(
        grid.width,
        grid.init,
        grid.ratios[ri],
        ratio,
        grid.lrs[li],
        float(mean[ri, li]),
        ri in (0, len(grid.ratios) - 1),
        per_seed,
        se,
        lr1,
        loss1,
        gain,
        gain_se,
        [float(x) for x in per_ratio],
        heldout_gain(grid, loss),
    )


def heldout_gain(grid: LossGrid, loss: np.ndarray) -> float:
    """Gain of the tuned ratio over ratio 1 when both (ratio, lr) choices are made on one half of the seeds
    and measured on the other half (both ways, geometric mean): the best of many noisy configurations looks
    better than it is on the seeds it was picked on, and this removes that bias."""
    n = loss.shape[0]
    if n < 2 or 1.0 not in grid.ratios:
        return math.nan
    r1 = grid.ratios.index(1.0)
    halves = (np.arange(n) < n // 2, np.arange(n) >= n // 2)
    logs = []
    for pick, test in (halves, halves[::-1]):
        m_pick, m_test = _seed_mean(loss[pick]), _seed_mean(loss[test])
        best = np.unravel_index(int(np.argmin(m_pick)), m_pick.shape)
        plain = int(np.argmin(m_pick[r1]))
        logs.append(math.log2(m_test[r1, plain] / m_test[best]))
    return float(2.0 ** np.mean(logs))


@dataclass
class EdgeOptimum:
    """Stability edge and optimal learning rate of one (width, init, ratio) at one budget, and their ratio."""

    width: int
    init: str
    ratio: float
    budget: int
    edge: float  # geometric mean over seeds of the largest LR below the first diverging one
    edge_log2_se: float
    edge_censored: bool  # no LR of the grid diverged for some seed: the edge is at least the grid's top
    per_seed_edge: list[float]
    optimum: float  # refined optimum of the seed-mean loss
    optimum_grid: float
    per_seed_optimum: list[float]
    factor: float  # edge / optimum (both seed summaries)
    factor_log2_mean: float  # mean over seeds of log2(edge_s / optimum_s): the per-seed factor
    factor_log2_se: float


def stability_edge(diverged: np.ndarray, lrs: Sequence[float]) -> tuple[float, bool]:
    """Largest lr below the first diverging one of one seed (diverged: bool per lr); (edge, censored)."""
    bad = np.flatnonzero(diverged)
    if bad.size == 0:
        return float(lrs[-1]), True
    first = int(bad[0])
    return (float(lrs[first - 1]) if first > 0 else math.nan), False


def edge_and_optimum(grid: LossGrid, ratio: float = 1.0, budget: int | None = None) -> EdgeOptimum:
    loss, diverged = grid.at(budget)
    ri = grid.ratios.index(float(ratio))
    loss, diverged = loss[:, ri], diverged[:, ri]
    edges, censored = zip(*(stability_edge(diverged[s], grid.lrs) for s in range(loss.shape[0])), strict=True)
    edge, edge_se = _mean_log2_se(edges)
    mean = _seed_mean(loss)
    li, optimum = _argmin_refined(grid.lrs, mean)
    per_seed_opt = [float(grid.lrs[int(np.argmin(np.where(np.isfinite(r), r, np.inf)))]) for r in loss]
    per_seed_factor = [e / o for e, o in zip(edges, per_seed_opt, strict=True)]
    f_mean, f_se = _mean_log2_se(per_seed_factor)
    return EdgeOptimum(
        grid.width,
        grid.init,
        float(ratio),
        budget or grid.steps,
        edge,
        edge_se,
        any(censored),
        list(edges),
        optimum,
        float(grid.lrs[li]),
        per_seed_opt,
        edge / optimum,
        math.log2(f_mean) if math.isfinite(f_mean) else math.nan,
        f_se,
    )


def slope(widths: Sequence[int], values: Sequence[float]) -> dict | None:
    """Log–log slope vs width with its 95 % t-interval, or None with fewer than 3 usable points."""
    pts = [(w, v) for w, v in zip(widths, values, strict=True) if np.isfinite(v) and v > 0]
    if len({w for w, _ in pts}) < 3:
        return None
    fit = fit_loglog_slope([w for w, _ in pts], [v for _, v in pts])
    return {
        "slope": fit.slope,
        "ci_low": fit.ci_low,
        "ci_high": fit.ci_high,
        "r2": fit.r2,
        "points": len(pts),
    }


def load_grids(folders: Sequence[str | Path], select_by: str = "train") -> dict[tuple[int, str], LossGrid]:
    """Grids from width-study folders that differ only in their ratios (or one folder with a ratio axis)."""
    from widelora.experiments.width_config import WidthStudyConfig

    by_key: dict[tuple[int, str], list[ChunkResult]] = {}
    for folder in folders:
        config = WidthStudyConfig.from_dict(json.loads((Path(folder) / "config.json").read_text()))
        for path in sorted((Path(folder) / "chunks").glob("w*_*.json")):
            chunk = load_chunk(path, config)
            if chunk is None:  # written by an older version of the study: accept it when its numbers match
                chunk = ChunkResult.from_json(json.loads(path.read_text()))
                chunk.ratios = (
                    [float(chunk.fingerprint.get("ratio", 1.0))]
                    if "ratio" in chunk.fingerprint
                    else chunk.ratios
                )
            by_key.setdefault((chunk.width, chunk.init), []).append(chunk)
    return {k: LossGrid.from_chunks(v, select_by) for k, v in sorted(by_key.items())}

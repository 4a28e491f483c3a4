"""How much the measured optimal-LR exponents depend on choices the paper leaves open: step budget, LR grid.

One study run with ``eval_steps`` records the losses at several budgets, and a fine grid (half-octave)
contains two factor-2 grids (its even and odd points); so one run answers both questions without retraining.
For each (budget, grid) the optima are read the study's way (seed-mean loss, parabola refinement) and the
log–log slope is fitted with its 95 % t-interval; the verdict says plainly whether the interval contains the
predicted exponent.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from widelora.experiments.width_results import (
    ChunkResult,
    WidthStudyResult,
    find_optimum,
    load_results,
    nan_to_none,
)
from widelora.theory import INFORMATIVE_CI_WIDTH, fit_loglog_slope, predict


def sub_grid(chunk: ChunkResult, keep: slice) -> ChunkResult:
    """The same chunk restricted to a subset of its learning rates (one ratio only)."""
    if len(chunk.ratios) != 1:
        raise ValueError("chunk: sub_grid needs a chunk with a single ratio")
    idx = np.arange(len(chunk.lrs))[keep]
    names = (
        "train_loss",
        "test_loss",
        "diverged_step",
        "curve",
        "z_a",
        "z_b",
        "eval_train_loss",
        "eval_test_loss",
    )
    take = {k: getattr(chunk, k)[:, idx] for k in names if getattr(chunk, k) is not None}
    return replace(chunk, lrs=[chunk.lrs[i] for i in idx], **take)


def verdict(slope: float, lo: float, hi: float, init: str) -> str:
    """Plain words: does the interval hold the predicted exponent (Init[B]: -1; Init[A]: in [-1, -1/2])?"""
    if hi - lo > INFORMATIVE_CI_WIDTH:
        return "not determined (interval wider than 0.5)"
    try:
        p_lo, p_hi = predict(init).optimal_lr_range
    except ValueError:
        return "no prediction"
    if hi < p_lo:
        return f"excludes the prediction (interval below {p_lo:g})"
    if lo > p_hi:
        return f"excludes the prediction (interval above {p_hi:g})"
    return "consistent with the prediction"


def sensitivity(result: WidthStudyResult) -> list[dict]:
    """Rows (init, budget, grid) → slope, interval, verdict, optima per width."""
    cfg = result.config
    budgets = [*cfg.eval_steps, cfg.steps]
    grids = {
        "full": slice(None),
        "every other point (even)": slice(0, None, 2),
        "every other point (odd)": slice(1, None, 2),
    }
    rows = []
    for init in cfg.inits:
        for budget in budgets:
            for name, keep in grids.items():
                optima = [
                    find_optimum(sub_grid(result.chunk(w, init), keep), cfg.select_by, budget=budget)
                    for w in sorted(cfg.widths)
                ]
                pts = [(o.width, o.lr) for o in optima if np.isfinite(o.lr)]
                row = {
                    "init": init,
                    "budget": budget,
                    "grid": name,
                    "slope": np.nan,
                    "ci_low": np.nan,
                    "ci_high": np.nan,
                    "r2": np.nan,
                    "verdict": "no fit (fewer than 3 widths with an optimum)",
                    "optima": {o.width: o.lr for o in optima},
                    "at_grid_edge": [o.width for o in optima if o.at_edge],
                }
                if len(pts) >= 3:
                    fit = fit_loglog_slope([w for w, _ in pts], [v for _, v in pts])
                    row |= {
                        "slope": fit.slope,
                        "ci_low": fit.ci_low,
                        "ci_high": fit.ci_high,
                        "r2": fit.r2,
                        "verdict": verdict(fit.slope, fit.ci_low, fit.ci_high, init),
                    }
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| init | budget (steps) | LR grid | slope [95% CI] | R² | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = {"init_a": "Init[A]", "init_b": "Init[B]"}.get(r["init"], r["init"])
        lines.append(
            f"| {name} | {r['budget']} | {r['grid']} | {r['slope']:.2f} [{r['ci_low']:.2f}, "
            f"{r['ci_high']:.2f}] | {r['r2']:.2f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Exponent sensitivity to step budget and LR grid.")
    ap.add_argument("study", help="a width-study folder run with --eval-steps and a half-octave LR grid")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    rows = sensitivity(load_results(args.study))
    print(markdown(rows))
    if args.out:
        from widelora.files import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(nan_to_none(json.loads(json.dumps(rows))), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()

"""The calibration report: per width the optimal ratio, the edge, the optimum and their factor, with fits over
width — the JSON behind docs/results/ratio_calibration.json, and its command line.

    python -m widelora.experiments.calibration_report --out docs/results/ratio_calibration.json \
        --setup NAME RATIO_STUDIES EDGE_STUDIES
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from widelora.experiments.ratio_calibration import (
    LossGrid,
    best_ratio,
    edge_and_optimum,
    load_grids,
    slope,
)
from widelora.experiments.width_results import nan_to_none


def calibrate(
    ratio_grids: dict[tuple[int, str], LossGrid], edge_grids: dict[tuple[int, str], LossGrid]
) -> dict:
    """The machine-readable calibration: per width the optimal ratio, edge, optimum, factor, seed errors."""
    out: dict = {"ratio": {}, "edge": {}}
    for init in sorted({i for _, i in ratio_grids}):
        rows = [asdict(best_ratio(g)) for (w, i), g in sorted(ratio_grids.items()) if i == init]
        out["ratio"][init] = {
            "per_width": rows,
            "optimal_ratio_vs_width": slope([r["width"] for r in rows], [r["ratio"] for r in rows]),
            "edge_at_best_ratio": [
                asdict(edge_and_optimum(ratio_grids[(r["width"], init)], r["ratio_grid"])) for r in rows
            ],
        }
    for (_width, init), g in sorted(edge_grids.items()):
        for ratio in g.ratios:
            for budget in [*sorted(g.budgets), g.steps]:
                row = asdict(edge_and_optimum(g, ratio, budget))
                out["edge"].setdefault(f"{init}@ratio{ratio:g}", {}).setdefault(str(budget), []).append(row)
    fits = {}
    for key, by_budget in out["edge"].items():
        for budget, rows in by_budget.items():
            ws = [r["width"] for r in rows]
            fits.setdefault(key, {})[budget] = {
                "edge_vs_width": slope(ws, [r["edge"] for r in rows]),
                "optimum_vs_width": slope(ws, [r["optimum"] for r in rows]),
                "factor_vs_width": slope(ws, [r["factor"] for r in rows]),
            }
    out["edge_fits"] = fits
    return nan_to_none(json.loads(json.dumps(out)))


def _width_dependence(fit: dict | None) -> str:
    if fit is None:
        return "no fit"
    if fit["ci_low"] <= 0.0 <= fit["ci_high"]:
        return "no detectable width dependence (the slope's 95% interval contains 0)"
    return (
        f"grows with width (slope {fit['slope']:.2f})"
        if fit["slope"] > 0
        else f"falls with width (slope {fit['slope']:.2f})"
    )


def summarize(cal: dict) -> dict:
    """The few numbers a recommendation needs, with their seed errors and whether they depend on width."""
    out: dict = {"ratio": {}, "factor": {}}
    for init, block in cal["ratio"].items():
        rows = block["per_width"]
        log_r = np.log2([r["ratio"] for r in rows])
        log_g = np.log2([r["gain"] for r in rows if r["gain"]])
        fit = block["optimal_ratio_vs_width"]
        out["ratio"][init] = {
            "optimal_ratio_per_width": {r["width"]: r["ratio"] for r in rows},
            "optimal_ratio_geomean_over_widths": float(2 ** log_r.mean()),
            "optimal_ratio_log2_spread_over_widths": float(log_r.std(ddof=1)),
            "optimal_ratio_vs_width": fit,
            "width_dependence": _width_dependence(fit),
            # LoRA+ under Adam predicts lr_A ∝ n^-1 and lr_B ∝ n^0 at the optimum: the two halves of the ratio
            "lr_a_at_best_vs_width": slope([r["width"] for r in rows], [r["lr"] for r in rows]),
            "lr_b_at_best_vs_width": slope(
                [r["width"] for r in rows], [r["lr"] * r["ratio_grid"] for r in rows]
            ),
            "gain_geomean_over_widths": float(2 ** log_g.mean()) if log_g.size else None,
            "gain_per_width": {r["width"]: r["gain"] for r in rows},
            "gain_heldout_per_width": {r["width"]: r["gain_heldout"] for r in rows},
            "gain_heldout_geomean_over_widths": float(
                2 ** np.mean(np.log2([r["gain_heldout"] for r in rows]))
            ),
        }
    for key, by_budget in cal["edge"].items():
        per_budget = {}
        for budget, rows in by_budget.items():
            f = np.array([r["factor_log2_mean"] for r in rows if r["factor_log2_mean"] is not None])
            fit = cal["edge_fits"][key][budget]["factor_vs_width"]
            per_budget[budget] = {
                "factor_per_width": {
                    r["width"]: 2 ** r["factor_log2_mean"] for r in rows if r["factor_log2_mean"] is not None
                },
                "factor_geomean_over_widths": float(2 ** f.mean()) if f.size else None,
                "factor_log2_spread_over_widths": float(f.std(ddof=1)) if f.size > 1 else None,
                "edge_censored_widths": [r["width"] for r in rows if r["edge_censored"]],
                "factor_vs_width": fit,
                "width_dependence": _width_dependence(fit),
            }
        out["factor"][key] = per_budget
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Calibrate the LoRA+ ratio and the edge/optimum factor.")
    ap.add_argument(
        "--setup",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "RATIO_STUDIES", "EDGE_STUDIES"),
        help="a named setup (e.g. the LR schedule) and comma-separated width-study folders: those "
        "varying the ratio, and those for edge vs optimum; repeat for several setups",
    )
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    from widelora.files import atomic_write_text

    result = {}
    for name, ratio_dirs, edge_dirs in args.setup:
        cal = calibrate(load_grids(ratio_dirs.split(",")), load_grids(edge_dirs.split(",")))
        cal["summary"] = nan_to_none(json.loads(json.dumps(summarize(cal))))
        cal["sources"] = {"ratio_studies": ratio_dirs.split(","), "edge_studies": edge_dirs.split(",")}
        result[name] = cal
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":  # pragma: no cover
    main()

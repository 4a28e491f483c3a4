"""Width-study evidence for the claims ledger: a study folder reduced to one committed JSON file.

A study folder (chunks of every run) is too big to commit; the ledger needs its ``summary.json`` (fitted
exponents with intervals) and, for the feature claim (seed 001, Figure 3), the adapter's internal feature
``|Z_A|`` and output ``|Z_B|`` at the end of training at each (width, init)'s optimal grid learning rate, seed
mean. `export_study` writes both into one file; `feature_growth_part` judges "|Z_A| grows with width".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from widelora.errors import FileProblem
from widelora.files import atomic_write_text
from widelora.report.verdicts import Part


def features_at_optimum(
    optima: Iterable[Mapping[str, Any]], chunk_of: Callable[[int, str], Any]
) -> dict[str, dict[str, list[float]]]:
    """{init: {"widths", "z_a", "z_b"}}: final |Z_A|, |Z_B| (seed mean) at each width's optimal grid LR.

    ``optima`` are the summary's rows (width, init, lr_grid, ratio); ``chunk_of(width, init)`` gives the chunk
    with the traces. Only the first ratio of a study that varies it is read (plain AdamW when ratio 1 is
    first)."""
    out: dict[str, dict[str, list[float]]] = {}
    rows = list(optima)
    first_ratio = rows[0].get("ratio", 1.0) if rows else 1.0
    for opt in rows:
        if opt.get("ratio", 1.0) != first_ratio:
            continue
        chunk = chunk_of(opt["width"], opt["init"])
        column = chunk.ratio_index(opt.get("ratio", 1.0)) * len(chunk.lrs) + chunk.lrs.index(opt["lr_grid"])
        row = out.setdefault(opt["init"], {"widths": [], "z_a": [], "z_b": []})
        row["widths"].append(opt["width"])
        row["z_a"].append(float(np.nanmean(chunk.z_a[:, column, -1])))
        row["z_b"].append(float(np.nanmean(chunk.z_b[:, column, -1])))
    return out


def export_study(folder: str | Path, out: str | Path) -> Path:
    """The study's summary.json plus ``features_at_optimum``, written to ``out`` (one small file). Chunks are
    read as they are (a study made by another version of the code is still readable)."""
    from widelora.experiments.width_results import ChunkResult, chunk_path

    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FileProblem(
            folder / "summary.json", f"cannot be read ({exc})", "finish the study first"
        ) from None

    def chunk_of(width: int, init: str) -> Any:
        path = chunk_path(folder, width, init)
        try:
            return ChunkResult.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise FileProblem(path, f"is not a readable width-study chunk ({exc})") from None

    summary["features_at_optimum"] = features_at_optimum(summary.get("optima", []), chunk_of)
    summary["budgets"] = fits_by_budget(summary, chunk_of)
    text = json.dumps(
        summary, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v
    )
    return atomic_write_text(Path(out), text + "\n")


def fits_by_budget(summary: Mapping[str, Any], chunk_of: Callable[[int, str], Any]) -> dict[str, Any]:
    """{budget: {"fits", "optima"}} for every earlier budget the study recorded (``--eval-steps``): the
    optimum per (width, init) read the study's way at that step, and the exponent fit over widths. One run
    with a constant learning rate thereby answers the step-budget question without retraining."""
    from dataclasses import asdict

    from widelora.experiments.width_results import find_optimum, fit_optima

    cfg = summary["config"]
    select_by = cfg.get("select_by", "train")
    inits, widths = cfg.get("inits", []), cfg.get("widths", [])
    if not inits or not widths:
        return {}
    budgets = [int(b) for b in getattr(chunk_of(widths[0], inits[0]), "eval_steps", [])]
    out: dict[str, Any] = {}
    for budget in budgets:
        optima = [find_optimum(chunk_of(w, i), select_by, None, budget) for i in inits for w in widths]
        out[str(budget)] = {
            "fits": {k: f.as_dict() for k, f in fit_optima(optima).items()},
            "optima": [asdict(o) for o in optima],
        }
    return out


def feature_growth_part(name: str, features: dict[str, list[float]] | None) -> Part:
    """ "|Z_A| grows with width": the log-log slope of |Z_A| at the optimum over widths, its 95% interval
    above zero (holds), below zero (contradicted), or containing zero (tie)."""
    from widelora.theory import fit_loglog_slope

    text = f"{name}: |Z_A| at the optimal learning rate grows with width"
    if not features or len(features.get("widths", [])) < 3:
        return Part(text, "missing", "no |Z_A| at the optimum in the study file (export it with --refresh)")
    fit = fit_loglog_slope(features["widths"], features["z_a"])
    detail = (
        f"|Z_A| ∝ n^{fit.slope:+.2f} [{fit.ci_low:+.2f}, {fit.ci_high:+.2f}] (95% CI, {fit.n_points} widths)"
    )
    if fit.ci_low > 0:
        return Part(text, "holds", detail)
    if fit.ci_high < 0:
        return Part(text, "contradicted", detail)
    return Part(text, "tie", detail + "; the interval contains 0")


def shares_by_width(rows: Iterable[Mapping[str, Any]], init: str) -> dict[int, float]:
    """Seed-mean δ2 share per width for ``init`` (rows of bench/claims_delta_split.py)."""
    by: dict[int, list[float]] = {}
    for r in rows:
        if r["init"] == init and r.get("delta2_share") is not None:
            by.setdefault(int(r["width"]), []).append(float(r["delta2_share"]))
    return {w: sum(v) / len(v) for w, v in by.items()}


def delta_split_parts(rows: list[Mapping[str, Any]] | None) -> list[Part]:
    """Theorem 2 on the toy model, at each init's optimal learning rate: (1) under Init[B] δ2's share of the
    feature update shrinks with width (log-log slope over widths, 95% interval below 0); (2) it is below
    Init[A]'s at every width measured (at none: contradicted; at some: a tie)."""
    from widelora.theory import fit_loglog_slope

    shrink = "Init[B]: δ2's share of the feature update shrinks with width (B undertrained)"
    below = "Init[B]'s δ2 share is below Init[A]'s at every width"
    b, a = shares_by_width(rows or [], "init_b"), shares_by_width(rows or [], "init_a")
    if len(b) < 3:
        return [Part(shrink, "missing", "no δ-split file yet"), Part(below, "missing", "no δ-split file yet")]
    widths = sorted(b)
    fit = fit_loglog_slope(widths, [b[w] for w in widths])
    detail = (
        f"share ∝ n^{fit.slope:+.2f} [{fit.ci_low:+.2f}, {fit.ci_high:+.2f}] (95% CI, {len(widths)} widths)"
    )
    outcome = "holds" if fit.ci_high < 0 else "contradicted" if fit.ci_low > 0 else "tie"
    parts = [Part(shrink, outcome, detail)]
    both = [w for w in widths if w in a]
    if not both:
        return [*parts, Part(below, "missing", "no Init[A] runs at the same widths")]
    lower = sum(b[w] < a[w] for w in both)
    outcome = "holds" if lower == len(both) else "contradicted" if lower == 0 else "tie"
    return [*parts, Part(below, outcome, f"lower at {lower} of {len(both)} widths")]

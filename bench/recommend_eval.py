"""Issue 12's comparison from evaluation-sweep stores: every setup at its own best learning rate, the
untuned recommendation against PEFT default's best-of-grid, a fixed 2e-4 and the LR finder, tuned against
tuned, and the ranking at half against full budget.

Reads one or more stores (a grid sweep, e.g. examples/sweeps/eval_minilm_topics.yaml, and a sweep of setups
that choose their own learning rate); setups are matched by their ``setup`` label. Gaps are per-seed paired
differences (the same seed is the same data split, order and test set for every setup), mean ± standard error.

    python bench/recommend_eval.py sweeps/eval-minilm-topics sweeps/eval-minilm-topics-untuned \
        --json docs/results/recommend_eval_minilm.json --figure docs/figures/eval/minilm.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from widelora.experiments.setup_comparison import (
    Cell,
    SetupResult,
    collect,
    paired_gap,
    ranking,
    within_target,
)
from widelora.experiments.setup_figures import plot_setups
from widelora.report.export import export_results, open_results

BASELINE = "PEFT default (Kaiming A, AdamW)"
TUNED = "recommend (tuned)"
UNTUNED = "recommend v2 (untuned)"  # probe v2 (examples/sweeps/eval_*_untuned.yaml)
UNTUNED_V1 = "recommend (untuned)"  # probe v1, kept for the record (the own-lr stores)
FINDER = "LR finder (fastai)"


HELDOUT_METRIC = "heldout_accuracy"  # validation ∪ test, from bench/heldout_eval.py's heldout.json files
#: The metrics a comparison can be judged on (--metric), with their direction; the default is the store's own.
METRIC_GOALS = {"accuracy": "max", HELDOUT_METRIC: "max", "eval_loss": "min", "perplexity": "min"}


def pooled_heldout(res: Any) -> int:
    """Put each trial's pooled validation ∪ test accuracy (its run folder's heldout.json) into its final
    metrics as `heldout_accuracy`; returns how many trials lack one (they then have no value)."""
    missing = 0
    for t in res.trials:
        path = Path(t.run_dir or "") / "heldout.json"
        if t.run_dir and path.is_file():
            numbers = json.loads(path.read_text())
            t.final[HELDOUT_METRIC] = numbers["accuracy"]
            t.final["heldout_examples"] = numbers["examples"]
        elif t.status == "done":
            missing += 1
    return missing


def load(
    stores: list[str], judged_on: str | None = None
) -> tuple[str, str, dict[str, SetupResult], dict[str, SetupResult], dict[str, Any]]:
    """Setups from every store at full budget and at half budget (the validation evaluation at steps / 2);
    `judged_on`: a final metric of METRIC_GOALS instead of the store's own (HELDOUT_METRIC: the pooled
    validation ∪ test accuracy instead of the test accuracy)."""
    heldout = judged_on == HELDOUT_METRIC
    full: dict[str, SetupResult] = {}
    half: dict[str, SetupResult] = {}
    metric = goal = ""
    info: dict[str, Any] = {"stores": [], "trial_wall_seconds": 0.0, "trials": 0}
    for path in stores:
        res = open_results(path)
        metric, goal = res.metric, res.goal
        if heldout and not str(path).endswith(".json"):  # an export already carries heldout_accuracy
            info["trials_without_heldout"] = info.get("trials_without_heldout", 0) + pooled_heldout(res)
        if judged_on:
            metric, goal = judged_on, METRIC_GOALS[judged_on]
        base = res.spec.get("base", {})
        steps, every = base.get("steps"), base.get("eval_every")
        full.update(collect(res.trials, metric))
        if steps and every and steps % 2 == 0 and (steps // 2) % every == 0:
            logged = res.metric if heldout or not judged_on else judged_on  # the curves hold no pooled value
            half.update(collect(res.trials, logged, curves=res.curves, at_step=steps // 2))  # validation
        info.setdefault("loss_curves", {}).update(loss_curves(res))
        info.setdefault("final_loss", {}).update(collect(res.trials, "eval_loss"))
        secs = [t.seconds for t in res.trials if t.seconds is not None]
        cpu = [t.final.get("cpu_s") for t in res.trials if t.final.get("cpu_s") is not None]
        info["cpu_s_recorded"] = info.get("cpu_s_recorded", 0.0) + sum(cpu)
        info["trials_with_cpu_s"] = info.get("trials_with_cpu_s", 0) + len(cpu)
        info["stores"].append(
            {
                "path": str(res.path),
                "name": res.name,
                "trials": len(res.trials),
                "counts": res.counts,
                "wall_seconds_sum": sum(secs),
            }
        )
        info["trial_wall_seconds"] += sum(secs)
        info["trials"] += len(res.trials)
    return metric, goal, full, half, info


def export(stores: list[str], folder: Path) -> list[Path]:
    """Each live store as a small JSON (widelora.report.export) that this script reads back like the store;
    the learning rate a self-tuning run chose (in its run folder) and the pooled held-out accuracy
    (heldout.json, when bench/heldout_eval.py made one) are copied into its final metrics first."""
    from widelora.experiments.setup_comparison import _lr_from_run_dir
    from widelora.files import atomic_write_text
    from widelora.report.summary import load_results

    out = []
    for path in stores:
        res = load_results(path)
        pooled_heldout(res)
        for t in res.trials:
            if "lr" not in t.labels and "chosen_lr" not in t.final:
                lr = _lr_from_run_dir(t.run_dir)
                if lr is not None:
                    t.final["chosen_lr"] = lr
        target = folder / f"{res.name}.json"
        out.append(atomic_write_text(target, json.dumps(export_results(res), indent=1) + "\n"))
    return out


def loss_curves(res: Any) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """Held-out loss over steps per setup and seed (step 0 and the last step: test; between: validation)."""
    out: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for t in res.trials:
        if t.status != "done":
            continue
        curve = res.curves.get(t.id, {}).get("eval_loss", [])
        if len(curve) > 3 and "lr" not in t.labels:  # the own-lr runs, which evaluate every few steps
            label = str(t.labels.get("setup", "all"))
            out.setdefault(label, {})[int(t.config.get("seed", 0))] = curve
    return out


def steps_to_target(
    full: dict[str, SetupResult],
    losses: dict[str, SetupResult],
    curves: dict[str, dict[int, list[tuple[int, float]]]],
    goal: str,
    min_seeds: int,
    steps: int,
) -> list[dict[str, Any]]:
    """Issue 12's third target: the first evaluated step at which a setup's held-out loss is at or below PEFT
    default's final held-out loss (its best grid cell, same seed), as a fraction of the run."""
    from widelora.experiments.setup_comparison import mean_se

    base = full.get(BASELINE)
    best = base.best(goal, min_seeds) if base else None
    if best is None:
        return []
    rows = []
    for label, per_seed in curves.items():
        fractions = {}
        for seed, curve in per_seed.items():
            target = losses[BASELINE].cells[best.lr].by_seed.get(seed) if BASELINE in losses else None
            if target is None:
                continue
            hit = next((step for step, loss in curve if step > 0 and loss <= target), None)
            fractions[seed] = (hit / steps) if hit is not None else math.inf
        finite = [v for v in fractions.values() if math.isfinite(v)]
        m, se = mean_se(finite)
        rows.append(
            {
                "setup": label,
                "fraction_by_seed": fractions,
                "mean": m,
                "se": se,
                "not_reached": sum(not math.isfinite(v) for v in fractions.values()),
            }
        )
    return rows


def setup_rows(
    full: dict[str, SetupResult], half: dict[str, SetupResult], goal: str, min_seeds: int
) -> list[dict[str, Any]]:
    order_full = ranking(full, goal, min_seeds)
    order_half = ranking(half, goal, min_seeds) if half else []
    rows = []
    for label in order_full:
        s = full[label]
        best = s.best(goal, min_seeds)
        hbest = half[label].best(goal, min_seeds) if label in half else None
        rows.append(
            {
                "setup": label,
                "grid": s.grid,
                "best_lr": best.lr if best else None,
                "chosen_lrs": dict(sorted(best.lr_by_seed.items())) if best and best.lr is None else None,
                "mean": best.mean if best else math.nan,
                "se": best.se if best else math.nan,
                "seeds": best.n if best else 0,
                "bracketed": s.bracketed(goal, min_seeds),
                "diverged": sum(c.diverged for c in s.cells.values()),
                "rank_full": order_full.index(label) + 1,
                "rank_half": order_half.index(label) + 1 if label in order_half else None,
                "half_best_lr": hbest.lr if hbest else None,
                "half_mean": hbest.mean if hbest else math.nan,
            }
        )
    return rows


def comparisons(
    full: dict[str, SetupResult], goal: str, relative: bool, floor: float, fixed_lr: float, min_seeds: int
) -> list[dict[str, Any]]:
    """The gaps issue 12 asks for (``a`` − ``b``; relative: % of ``b``)."""

    def best(label: str) -> Cell | None:
        return full[label].best(goal, min_seeds) if label in full else None

    def only(label: str) -> Cell | None:
        return next(iter(full[label].cells.values()), None) if label in full else None

    fixed = full[BASELINE].cells.get(fixed_lr) if BASELINE in full else None
    pairs = [
        ("untuned recommend vs PEFT default best-of-grid", only(UNTUNED), best(BASELINE), True),
        ("untuned recommend, probe v1, vs PEFT default best-of-grid", only(UNTUNED_V1), best(BASELINE), True),
        (f"untuned recommend vs PEFT default at {fixed_lr:g}", only(UNTUNED), fixed, False),
        ("untuned recommend vs LR finder", only(UNTUNED), only(FINDER), False),
        ("LR finder vs PEFT default best-of-grid", only(FINDER), best(BASELINE), False),
        ("tuned recommend vs tuned PEFT default", best(TUNED), best(BASELINE), False),
        ("untuned vs tuned recommend", only(UNTUNED), best(TUNED), False),
    ]
    out = []
    for name, a, b, is_target in pairs:
        gap = paired_gap(a, b, relative=relative)
        row = {
            "comparison": name,
            "gap": gap.mean,
            "se": gap.se,
            "seeds": gap.n,
            "relative": relative,
            "a": a.mean if a else math.nan,
            "b": b.mean if b else math.nan,
        }
        if is_target:
            row["within_target"] = within_target(gap, b, goal, floor)
        out.append(row)
    return out


def markdown(metric: str, rows: list[dict[str, Any]], comps: list[dict[str, Any]], scale: float) -> str:
    unit = "pts" if scale == 100 else ""
    header = (
        f"| setup | best lr | {metric} (seed mean ± s.e.) | seeds | bracketed | rank full / half | "
        "half budget: best lr, value |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = (
            f"{r['best_lr']:.3g}"
            if r["best_lr"]
            else ("probe: " + ", ".join(f"{v:.2g}" for v in (r["chosen_lrs"] or {}).values()))
        )
        val = (
            f"{scale * r['mean']:.1f} ± {scale * r['se']:.1f}"
            if math.isfinite(r["se"])
            else (f"{scale * r['mean']:.1f}")
        )
        half = (
            f"{r['half_best_lr']:.3g}, {scale * r['half_mean']:.1f}"
            if r["half_best_lr"]
            else (f"{scale * r['half_mean']:.1f}" if math.isfinite(r["half_mean"]) else "–")
        )
        lines.append(
            f"| {r['setup']} | {lr} | {val} | {r['seeds']} | {r['bracketed']} | "
            f"{r['rank_full']} / {r['rank_half'] or '–'} | {half} |"
        )
    lines += ["", "| comparison (a − b) | a | b | gap ± s.e. | seeds | target |", "|---|---|---|---|---|---|"]
    for c in comps:
        s = 1.0 if c["relative"] else scale
        u = "%" if c["relative"] else f" {unit}"
        gap = f"{s * c['gap']:+.1f} ± {s * c['se']:.1f}{u}" if math.isfinite(c["gap"]) else "n/a"
        target = {True: "met", False: "missed", None: "–"}[c.get("within_target")]
        lines.append(
            f"| {c['comparison']} | {scale * c['a']:.1f} | {scale * c['b']:.1f} | {gap} | {c['seeds']} | "
            f"{target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", help="sweep stores (.sqlite or their folders) or their JSON exports")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--figure", type=Path, help="write the metric-vs-lr figure here (PNG)")
    ap.add_argument("--fixed-lr", type=float, default=2e-4, help="the 'everyone uses it' learning rate")
    ap.add_argument("--export", type=Path, help="also write each store as <folder>/<sweep name>.json")
    ap.add_argument("--min-seeds", type=int, default=1, help="cells with fewer seeds cannot be a best")
    ap.add_argument(
        "--heldout",
        action="store_true",
        help=f"the same as --metric {HELDOUT_METRIC}",
    )
    ap.add_argument(
        "--metric",
        choices=sorted(METRIC_GOALS),
        help=f"judge on this final metric instead of the store's; {HELDOUT_METRIC}: validation ∪ test pooled "
        "(bench/heldout_eval.py must have run on the stores)",
    )
    args = ap.parse_args(argv)
    judged_on = HELDOUT_METRIC if args.heldout else args.metric
    if args.export:
        print("exported:", ", ".join(str(p) for p in export(args.stores, args.export)))
    metric, goal, full, half, info = load(args.stores, judged_on)
    relative = goal == "min"  # perplexity-like: gaps in % of the baseline
    scale = 100.0 if metric.endswith("accuracy") else 1.0
    floor = 2.0 if relative else 0.01  # issue 12: 1 accuracy point or 2 % of perplexity
    rows = setup_rows(full, half, goal, args.min_seeds)
    comps = comparisons(full, goal, relative, floor, args.fixed_lr, args.min_seeds)
    print(markdown(metric, rows, comps, scale))
    steps = max((int(c[-1][0]) for per in info["loss_curves"].values() for c in per.values()), default=0)
    speed = steps_to_target(full, info.pop("final_loss"), info["loss_curves"], goal, args.min_seeds, steps)
    if speed:
        print(
            "\n| setup | steps to PEFT default's final held-out loss (fraction of the run) | per seed "
            "| not reached |"
        )
        print("|---|---|---|---|")
        for r in speed:
            per = ", ".join(f"{v:.2f}" for _, v in sorted(r["fraction_by_seed"].items()))
            err = f" ± {r['se']:.2f}" if math.isfinite(r["se"]) else ""
            print(f"| {r['setup']} | {r['mean']:.2f}{err} | {per} | {r['not_reached']} |")
    if info.get("trials_with_cpu_s"):
        print(
            f"CPU time recorded by {info['trials_with_cpu_s']} trials: {info['cpu_s_recorded'] / 60:.1f} min"
        )
    print(
        f"\n{info['trials']} trials; sum of trial wall times {info['trial_wall_seconds'] / 60:.1f} min "
        "(wall clock of each trial, one thread each; on a loaded machine more than its CPU time)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "metric": metric,
                    "goal": goal,
                    "setups": rows,
                    "comparisons": comps,
                    "steps_to_target": speed,
                    **info,
                },
                indent=1,
                default=str,
            )
            + "\n"
        )
    if args.figure:
        ylabel = f"{metric}{' (%)' if scale == 100 else ''}"
        split = "validation ∪ test" if judged_on == HELDOUT_METRIC else "test split"
        panels = [(f"full budget ({split})", full)] + (
            [("half budget (validation split)", half)] if half else []
        )
        plot_setups(panels, ylabel, scale, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())

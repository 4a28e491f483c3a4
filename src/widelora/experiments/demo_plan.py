"""What `widelora demo` runs: the width study and two real-model questions as sweep specs, and their answers.

Why specs: each question is a sweep like any other (stored, resumable, reportable with `widelora report`), and
the real-model trials use exactly the base of the evaluation protocol
(examples/sweeps/eval_minilm_topics.yaml),
so the demo's numbers are a subset of what `docs/results/recommend_eval.md` reports with more seeds and a
larger grid. The budget (≤ 15 minutes on 2 cores) decides the sizes: 2 seeds and a short grid per setup.

The three questions, answered in plain words whatever their sign:

(a) does the optimal learning rate of the width study scale with width as the theory says (all 7 widths,
    4 seeds) — and is the fitted exponent precise enough to say so;
(b) the initialization paper's real-model claim: is Init[A] better than Init[B], each at its own best
    learning rate;
(c) does `widelora.recommend` untuned (its probe picks the learning rate) reach PEFT's default tuned on a
    grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from widelora.experiments.setup_comparison import SetupResult, paired_gap

#: The evaluation protocol's base (a test keeps it equal to examples/sweeps/eval_minilm_topics.yaml's).
EVAL_BASE: dict[str, Any] = {
    "model": "minilm-l6",
    "task": "classification",
    "dataset": "wikipedia",
    "targets": ["query", "value"],
    "rank": 8,
    "alpha": 8,
    "dropout": 0.0,
    "batch_size": 16,
    "seq_len": 32,
    "steps": 120,
    "warmup": 0.06,
    "decay": "linear",
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "eval_examples": 100000,
    "eval_batch_size": 128,
    "eval_every": 60,
    "progress": False,
}
PEFT_DEFAULT = {"label": "PEFT default (Kaiming A, AdamW)", "init": "kaiming", "method": "adamw"}
INIT_A = {"label": "Init[A] (AdamW)", "init": "init_a", "method": "adamw"}
INIT_B = {"label": "Init[B] (AdamW)", "init": "init_b", "method": "adamw"}
RECOMMEND_UNTUNED = {"label": "recommend (untuned)", "setup": "recommended"}
#: A confidence interval wider than this (exponent units) says nothing about n^-1 vs n^-1/2: never a result.
USEFUL_CI_WIDTH = 0.5


@dataclass
class DemoPlan:
    """Sizes of the demo. The grids are 4 points of the protocol's grid around the optima it measured
    (Init[B] 6.4e-3, PEFT default 1.28e-2): each demo trial is one of the protocol's trials."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    init_lrs: list[float] = field(default_factory=lambda: [3.2e-3, 6.4e-3, 1.28e-2, 2.56e-2])
    peft_lrs: list[float] = field(default_factory=lambda: [3.2e-3, 6.4e-3, 1.28e-2, 2.56e-2])
    width_seeds: int = 4

    def validate(self) -> None:
        from widelora.errors import UserError

        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise UserError(f"--seeds {self.seeds}: give distinct non-negative seeds, e.g. 0,1")
        for name in ("init_lrs", "peft_lrs"):
            lrs = getattr(self, name)
            if not lrs or any(not (math.isfinite(v) and v > 0) for v in lrs) or len(set(lrs)) != len(lrs):
                raise UserError(f"{name} {lrs}: give distinct positive learning rates")
        if self.width_seeds < 1:
            raise UserError(f"--width-seeds {self.width_seeds}: must be at least 1")


def _spec(name: str, description: str, axes: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "trial_fn": "finetune",
        "metric": "accuracy",
        "goal": "max",
        "base": dict(EVAL_BASE),
        "axes": axes,
    }


def init_spec(plan: DemoPlan) -> dict[str, Any]:
    """(b) Init[A] vs Init[B], both plain AdamW, on one grid."""
    return _spec(
        "demo-init",
        "Init[A] vs Init[B] on MiniLM topics (the evaluation protocol's budget).",
        {"seed": list(plan.seeds), "setup": [INIT_A, INIT_B], "lr": list(plan.init_lrs)},
    )


def peft_spec(plan: DemoPlan) -> dict[str, Any]:
    """(c) PEFT default tuned on a small grid."""
    return _spec(
        "demo-peft",
        "PEFT default on a small learning-rate grid (the evaluation protocol's budget).",
        {"seed": list(plan.seeds), "setup": [PEFT_DEFAULT], "lr": list(plan.peft_lrs)},
    )


def recommend_spec(plan: DemoPlan) -> dict[str, Any]:
    """(c) widelora.recommend untuned: its own probe picks the learning rate (no lr axis)."""
    return _spec(
        "demo-recommend",
        "widelora.recommend untuned (its probe picks the learning rate).",
        {"seed": list(plan.seeds), "setup": [RECOMMEND_UNTUNED]},
    )


# ------------------------------------------------------------------------------------------------ answers
def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _best_text(s: SetupResult) -> str:
    best = s.best("max")
    if best is None:
        return f"{s.label}: no finished trial"
    err = f" ± {_pts(best.se)}" if math.isfinite(best.se) else ""
    edge = "" if s.bracketed("max") else " (at the edge of its grid: the optimum may lie beyond it)"
    return f"{_pts(best.mean)}{err} % at lr {best.lr:.3g}{edge}"


def init_answer(setups: dict[str, SetupResult]) -> str:
    """(b) in plain words."""
    a, b = setups.get(INIT_A["label"]), setups.get(INIT_B["label"])
    if a is None or b is None or a.best("max") is None or b.best("max") is None:
        return "Init[A] vs Init[B]: not measured (trials missing or failed; see below)."
    gap = paired_gap(a.best("max"), b.best("max"))
    ba, bb = a.best("max"), b.best("max")
    verdict = (
        "Init[A] is better"
        if gap.mean - 2 * _se0(gap.se) > 0
        else "Init[B] is better"
        if gap.mean + 2 * _se0(gap.se) < 0
        else "no clear difference"
    )
    lr_word = "a larger" if ba.lr > bb.lr else "a smaller" if ba.lr < bb.lr else "the same"
    return (
        f"Init[A] vs Init[B] (each at its own best learning rate, {gap.n} seeds): {verdict} — Init[A] "
        f"{_best_text(a)}, Init[B] {_best_text(b)}; paired gap {gap.text(100, ' pts')}. Init[A]'s best "
        f"learning rate is {lr_word} one than Init[B]'s (the paper predicts larger)."
    )


def recommend_answer(setups: dict[str, SetupResult]) -> str:
    """(c) in plain words, with issue 12's target (within max(one s.e., 1 point) of PEFT's best)."""
    from widelora.experiments.setup_comparison import within_target

    peft, rec = setups.get(PEFT_DEFAULT["label"]), setups.get(RECOMMEND_UNTUNED["label"])
    if peft is None or rec is None or peft.best("max") is None or not rec.cells:
        return (
            "recommend (untuned) vs PEFT default (tuned): not measured (trials missing or failed; see below)."
        )
    cell = next(iter(rec.cells.values()))
    if not cell.clean:
        return (
            f"recommend (untuned) vs PEFT default (tuned): {cell.diverged} recommended run(s) diverged and "
            f"{cell.failed} failed — the recommendation did not work here."
        )
    base = peft.best("max")
    gap = paired_gap(cell, base)
    ok = within_target(gap, base, "max", 0.01)
    lrs = ", ".join(f"{v:.2g}" for v in cell.lr_by_seed.values()) or "?"
    err = f" ± {_pts(cell.se)}" if math.isfinite(cell.se) else ""
    verdict = "reaches" if ok else "does not reach"
    return (
        f"recommend, untuned, {verdict} PEFT's default tuned on a {len(peft.grid)}-point grid: "
        f"{_pts(cell.mean)}{err} % (its probe chose lr {lrs}) vs {_best_text(peft)}; paired gap "
        f"{gap.text(100, ' pts')} (target: no worse than max(one s.e., 1 point))."
    )


def width_answer(rows: list[dict[str, Any]], n_widths: int, n_seeds: int) -> str:
    """(a) in plain words; an interval too wide to decide anything is said to be so, not shown as a result."""
    parts = []
    for r in rows:
        lo, hi, slope = r.get("ci_low"), r.get("ci_high"), r.get("measured_slope")
        name = {"init_a": "Init[A]", "init_b": "Init[B]"}.get(r.get("init"), str(r.get("init")))
        if slope is None or lo is None or hi is None or not all(map(math.isfinite, (slope, lo, hi))):
            parts.append(f"{name}: no fit (too few optima)")
            continue
        if hi - lo > USEFUL_CI_WIDTH:
            parts.append(f"{name}: the fit's 95% interval is too wide to conclude ({hi - lo:.2f} wide)")
            continue
        pred = r.get("predicted_optimal_range") or (math.nan, math.nan)
        inside = r.get("consistent")
        word = "consistent with" if inside else "outside"
        parts.append(
            f"{name}: optimal lr ∝ n^{slope:.2f} [95% CI {lo:.2f}, {hi:.2f}], {word} the theory's "
            f"{_range(pred)}"
        )
    return (
        (
            f"Width study ({n_widths} widths, {n_seeds} seed{'s' if n_seeds != 1 else ''}): "
            + "; ".join(parts)
            + "."
        )
        if parts
        else ("Width study: not measured.")
    )


def _range(pred: Any) -> str:
    lo, hi = pred
    return f"n^{lo:g}" if lo == hi else f"n^{lo:g} … n^{hi:g}"


def _se0(se: float) -> float:
    return se if math.isfinite(se) else 0.0

"""Verdicts of the claims ledger: stated rules that turn measured numbers into holds / holds in part / does
not hold here, so that no verdict is typed by hand.

A claim is checked as *parts* (e.g. "Init[A]'s best learning rate is larger than Init[B]'s", "Init[A]'s best
accuracy is higher"), each with one outcome:

- ``holds``: the data support the part beyond noise;
- ``tie``: the difference is within noise (``z`` standard errors of the seed-paired difference);
- ``contradicted``: the data support the opposite beyond noise;
- ``missing``: not measured yet, or fewer seeds than the ledger asks for (numbers so far are shown as
  preliminary, never counted).

`combine` makes the claim's verdict from its parts: every measured part holds → *holds*; none holds → *does
not hold here*; otherwise *holds in part*; nothing measured → *not yet measured*. Parts still missing are
named beside the verdict. A rule (`RULES`) is a function of the compared groups and the ledger's settings,
registered by name so that a claims file is data."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from widelora.errors import UserError
from widelora.experiments.setup_comparison import Cell, SetupResult, paired_gap
from widelora.theory import INFORMATIVE_CI_WIDTH

OUTCOMES = ("holds", "tie", "contradicted", "missing")
MARK = {"holds": "✓", "tie": "≈", "contradicted": "✗", "missing": "…"}
HOLDS, IN_PART, NOT_HERE, NOT_YET = "holds", "holds in part", "does not hold here", "not yet measured"


@dataclass
class Settings:
    """The ledger-wide constants every rule uses (stated at the top of the ledger)."""

    z: float = 2.0  # a difference counts when it exceeds z standard errors of the seed-paired difference
    min_seeds: int = 3  # seeds a compared cell needs before a part counts
    goal: str = "max"
    scale: float = 1.0  # display scale of the metric (100 for accuracies)
    unit: str = ""


@dataclass
class Group:
    """One compared setup: its cells at full budget, and at half budget when logged (validation there)."""

    name: str
    full: SetupResult
    half: SetupResult | None = None
    half_step: int | None = None
    grid_size: int = 0  # learning rates the sweep has for the group, finished or not
    complete: bool = True  # every trial of the group finished: its best learning rate is final

    def best(self, settings: Settings) -> Cell | None:
        """The best cell among those with enough seeds (while none has: the best so far, preliminary)."""
        return self.full.best(settings.goal, settings.min_seeds) or self.full.best(settings.goal)

    def best_half(self, settings: Settings) -> Cell | None:
        if self.half is None:
            return None
        return self.half.best(settings.goal, settings.min_seeds) or self.half.best(settings.goal)


@dataclass
class Part:
    """One checked statement of a claim, with its outcome and the numbers behind it."""

    text: str
    outcome: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {OUTCOMES}")

    def line(self) -> str:
        return f"{MARK[self.outcome]} {self.text}" + (f": {self.detail}" if self.detail else "")


@dataclass
class Verdict:
    """A claim's verdict and the parts it was computed from."""

    verdict: str
    parts: list[Part] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(p.outcome == "missing" for p in self.parts)

    def text(self) -> str:
        if self.verdict == NOT_YET or not self.missing:
            return self.verdict
        return f"{self.verdict} ({self.missing} of {len(self.parts)} parts not yet measured)"


def combine(parts: Sequence[Part]) -> Verdict:
    """The claim's verdict from its parts (module docstring)."""
    measured = [p for p in parts if p.outcome != "missing"]
    held = sum(p.outcome == "holds" for p in measured)
    if not measured:
        verdict = NOT_YET
    elif held == len(measured):
        verdict = HOLDS
    elif held == 0:
        verdict = NOT_HERE
    else:
        verdict = IN_PART
    return Verdict(verdict, list(parts))


# -- comparisons ---------------------------------------------------------------------------------------------
def cell_text(cell: Cell | None, s: Settings) -> str:
    """``84.1 ± 0.6 (3 seeds) @ lr 6.4e-3``, or ``no result``."""
    if cell is None:
        return "no result"
    err = f" ± {cell.se * s.scale:.2g}" if math.isfinite(cell.se) else ""
    lr = "" if cell.lr is None else f" @ lr {cell.lr:.2g}"
    return f"{cell.mean * s.scale:.4g}{err}{s.unit} ({cell.n} seed{'s' if cell.n != 1 else ''}){lr}"


def compare_groups(
    a: Group, b: Group, s: Settings, at_least: bool = False, half: bool = False
) -> tuple[str, str]:
    """`compare` of the groups' best cells (a's at half budget with ``half``); while either group still has
    trials to run its best learning rate may change, so the part stays preliminary."""
    outcome, detail = compare(a.best_half(s) if half else a.best(s), b.best(s), s, at_least)
    if outcome != "missing" and not (a.complete and b.complete):
        return "missing", f"preliminary, the grid is not finished: {detail}"
    return outcome, detail


def compare(a: Cell | None, b: Cell | None, s: Settings, at_least: bool = False) -> tuple[str, str]:
    """(outcome, detail) of "a is better than b" (``at_least``: "a is at least as good as b", a tie holds).

    The difference is paired by seed (same seed: same data split, order and evaluation set), signed so that
    positive means a is better; it counts when it exceeds ``z`` standard errors.
    """
    if a is None or b is None:
        return "missing", "no finished trial yet" if a is None and b is None else "one side has no result yet"
    gap = paired_gap(a, b)
    sign = 1.0 if s.goal == "max" else -1.0
    diff = sign * gap.mean
    unit = " points" if s.unit == "%" else ""  # a difference of percentages is in percentage points
    err = f" ± {gap.se * s.scale:.2g}" if math.isfinite(gap.se) else ""
    detail = (
        f"difference {diff * s.scale:+.3g}{err}{unit} (paired over {gap.n} seed{'s' if gap.n != 1 else ''})"
    )
    if min(a.n, b.n, gap.n) < s.min_seeds:
        return "missing", f"preliminary, fewer than {s.min_seeds} seeds: {detail}"
    if diff > s.z * gap.se:
        return "holds", detail
    if diff < -s.z * gap.se:
        return "contradicted", detail
    return ("holds" if at_least else "tie"), f"{detail}, within {s.z:g} s.e."


def _pair(groups: Sequence[Group], n: int, rule: str) -> None:
    if len(groups) != n:
        raise UserError(f"rule {rule!r} compares exactly {n} groups; got {len(groups)}")


def rule_better(groups: Sequence[Group], s: Settings) -> list[Part]:
    """groups [a, b]: a's best metric beats b's, each at its own best learning rate."""
    _pair(groups, 2, "better")
    a, b = groups
    outcome, detail = compare_groups(a, b, s)
    return [Part(f"{a.name} beats {b.name}, each at its own best learning rate", outcome, detail)]


def rule_at_least(groups: Sequence[Group], s: Settings) -> list[Part]:
    """groups [a, others...]: a is at least as good as each other group (a tie within noise holds)."""
    if len(groups) < 2:
        raise UserError("rule 'at_least' needs a group and at least one to compare it with")
    a = groups[0]
    parts = []
    for b in groups[1:]:
        outcome, detail = compare_groups(a, b, s, at_least=True)
        parts.append(Part(f"{a.name} ≥ {b.name}, each at its own best learning rate", outcome, detail))
    return parts


def rule_ordering(groups: Sequence[Group], s: Settings) -> list[Part]:
    """groups in the claimed order, best first: each beats the next, each at its own best learning rate."""
    if len(groups) < 2:
        raise UserError("rule 'ordering' needs at least two groups, best first")
    parts = []
    for a, b in pairwise(groups):
        outcome, detail = compare_groups(a, b, s)
        parts.append(Part(f"{a.name} > {b.name}", outcome, detail))
    return parts


def larger_lr(a: Group, b: Group, s: Settings) -> Part:
    """a's best learning rate is larger than b's (grid resolution; an optimum at the grid's edge is noted)."""
    ca, cb = a.best(s), b.best(s)
    text = f"{a.name}'s best learning rate is larger than {b.name}'s"
    if ca is None or cb is None or ca.lr is None or cb.lr is None:
        return Part(text, "missing", "no best learning rate yet")
    edges = [g.name for g in (a, b) if g.full.bracketed(s.goal) is False]
    detail = f"{ca.lr:.2g} vs {cb.lr:.2g}" + (f"; at the grid's edge: {', '.join(edges)}" if edges else "")
    if min(ca.n, cb.n) < s.min_seeds:
        return Part(text, "missing", f"preliminary, fewer than {s.min_seeds} seeds: {detail}")
    if not (a.complete and b.complete):
        return Part(text, "missing", f"preliminary, the grid is not finished: {detail}")
    outcome = "holds" if ca.lr > cb.lr else "tie" if ca.lr == cb.lr else "contradicted"
    return Part(text, outcome, detail)


def rule_larger_lr_and_better(groups: Sequence[Group], s: Settings) -> list[Part]:
    """groups [a, b]: a's best learning rate is larger, and its best metric better (seed 001, Figs. 4-5)."""
    _pair(groups, 2, "larger_lr_and_better")
    return [larger_lr(*groups, s), *rule_better(groups, s)]


def rule_better_and_faster(groups: Sequence[Group], s: Settings) -> list[Part]:
    """groups [a, b]: a beats b at its own best learning rate, and a at half the budget reaches b's
    full-budget metric (a ≥ 2× speed-up). Half budget reads the validation evaluation logged there; full
    budget the final held-out number (both held-out samples of the same documents)."""
    _pair(groups, 2, "better_and_faster")
    a, b = groups
    parts = rule_better(groups, s)
    text = f"{a.name} at half the steps reaches {b.name} at full steps (≥ 2× faster)"
    outcome, detail = compare_groups(a, b, s, at_least=True, half=True)
    if a.half is None:
        outcome, detail = "missing", "no metric logged at half budget"
    parts.append(Part(text, outcome, detail))
    return parts


RuleFn = Callable[[Sequence[Group], Settings], list[Part]]
#: Verdict rules a claims file may name for sweep experiments.
RULES: dict[str, RuleFn] = {
    "better": rule_better,
    "at_least": rule_at_least,
    "ordering": rule_ordering,
    "larger_lr_and_better": rule_larger_lr_and_better,
    "better_and_faster": rule_better_and_faster,
}


def exponent_part(name: str, fit: dict, predicted: tuple[float, float]) -> Part:
    """A width study's fitted exponent (slope of log optimal LR on log width, with its interval) against the
    predicted exponent or range: the interval excluding it contradicts; an interval wider than
    ``INFORMATIVE_CI_WIDTH`` determines nothing (a tie); otherwise the point estimate inside the prediction
    (or the interval covering it) holds, and an overlap with the estimate outside is a tie (not resolved)."""
    lo_p, hi_p = sorted(predicted)
    pred = f"{lo_p:g}" if lo_p == hi_p else f"[{lo_p:g}, {hi_p:g}]"
    text = f"{name}: optimal-LR exponent matches the prediction {pred}"
    slope, lo, hi = fit.get("slope"), fit.get("ci_low"), fit.get("ci_high")
    if slope is None or lo is None or hi is None:
        return Part(text, "missing", "no fit (fewer than 3 widths)")
    conf = fit.get("confidence", 0.95)
    detail = (
        f"measured {slope:+.2f} [{lo:+.2f}, {hi:+.2f}] ({conf:.0%} CI, {fit.get('n_points', '?')} widths)"
    )
    if hi < lo_p or lo > hi_p:
        return Part(text, "contradicted", detail + "; the interval EXCLUDES the prediction")
    if hi - lo > INFORMATIVE_CI_WIDTH:  # the project's rule: such an interval does not determine the exponent
        return Part(
            text, "tie", detail + f"; the interval is wider than {INFORMATIVE_CI_WIDTH:g}: not determined"
        )
    if lo_p <= slope <= hi_p or (lo <= lo_p and hi >= hi_p):
        return Part(text, "holds", detail)
    return Part(text, "tie", detail + "; the interval overlaps the prediction, the estimate lies outside it")

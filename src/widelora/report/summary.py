"""Read a sweep's store and reduce it to what figures and tables show: per group and learning rate, the seed
mean and standard error of the headline metric, and each group's best learning rate.

A *group* is one configuration apart from ``lr`` and ``seed`` (e.g. init=init_a, or a setup label): trials are
averaged as seeds only when their whole configs match apart from the seed, so trials of an earlier version of
the spec (an edited ``base``) are never mixed in. By default only the trials of the spec last run into the
store are reported, and the report says how many older ones it left out. Diverged trials are counted, never
averaged in (a NaN would poison the mean). A sweep without an ``lr`` axis has one point per group (the trial's
own lr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widelora.errors import FileProblem, UserError
from widelora.sweep.grid import SEED_KEYS, config_key, expand
from widelora.sweep.store import ResultStore, TrialRecord

#: Preferred headline metrics when a spec does not name one, with their direction.
METRIC_PREFERENCE: tuple[tuple[str, str], ...] = (
    ("eval_accuracy", "max"),
    ("test_accuracy", "max"),
    ("accuracy", "max"),
    ("eval_perplexity", "min"),
    ("test_perplexity", "min"),
    ("perplexity", "min"),
    ("eval_ppl", "min"),
    ("ppl", "min"),
    ("eval_loss", "min"),
    ("test_loss", "min"),
    ("loss", "min"),
)
PRETTY = {
    "init_a": "Init[A]",
    "init_b": "Init[B]",
    "kaiming": "Kaiming (PEFT default)",
    "gaussian": "Gaussian",
    "lora_one": "LoRA-One",
    "lora_ga": "LoRA-GA",
    "pissa": "PiSSA",
    "adamw": "AdamW",
    "loraplus": "LoRA+",
    "scaled_gd": "scaled GD",
}
X_AXIS = "lr"


@dataclass
class Point:
    """The seeds of one (group, lr) cell; ``lr`` is None where the trials did not set one (their default)."""

    lr: float | None
    values: list[float]
    diverged: int = 0
    failed: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def lr_text(self) -> str:
        return "default" if self.lr is None else f"{self.lr:.3g}"

    @property
    def se(self) -> float:
        """Standard error of the mean over seeds (0 with a single seed)."""
        n = len(self.values)
        if n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1)) / math.sqrt(n)


@dataclass
class Group:
    """One curve of the metric-vs-LR figure."""

    key: str  # the trials' config apart from lr and seed
    label: str
    points: list[Point] = field(default_factory=list)
    trials: list[TrialRecord] = field(default_factory=list)

    @property
    def diverged(self) -> int:
        return sum(p.diverged for p in self.points)

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.points)

    def best(self, goal: str) -> Point | None:
        scored = [p for p in self.points if p.n > 0 and math.isfinite(p.mean)]
        if not scored:
            return None
        return max(scored, key=lambda p: p.mean if goal == "max" else -p.mean)


@dataclass
class SweepResults:
    """Everything a report needs, read once from the store."""

    name: str
    path: Path
    spec: dict[str, Any]
    metric: str
    goal: str
    trials: list[TrialRecord]
    curves: dict[str, dict[str, list[tuple[int, float]]]]
    invocations: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    @property
    def group_axes(self) -> list[str]:
        """Axes that name curves: all varied labels except the LR and the seed."""
        axes: list[str] = []
        for t in self.trials:
            for k in t.labels:
                if k not in axes and k != X_AXIS and k not in SEED_KEYS:
                    axes.append(k)
        return [a for a in axes if len({_hashable(t.labels.get(a)) for t in self.trials}) > 1]

    def trials_of(self, group: Group, lr: float | None = None) -> list[TrialRecord]:
        """The trials of ``group`` (at learning rate ``lr`` when given)."""
        return [t for t in group.trials if lr is None or _lr(t) == lr]

    def groups(self) -> list[Group]:
        """Groups in spec order, each with its points sorted by LR."""
        axes = self.group_axes
        groups: dict[str, Group] = {}
        cells: dict[str, dict[float | None, Point]] = {}
        for t in self.trials:
            key = config_key(t.config, (*SEED_KEYS, X_AXIS))
            if key not in groups:
                groups[key] = Group(key=key, label=group_label({a: t.labels.get(a) for a in axes}))
                cells[key] = {}
            groups[key].trials.append(t)
            lr = _lr(t)
            point = cells[key].setdefault(lr, Point(lr=lr, values=[]))
            value = t.final.get(self.metric)
            if t.status == "done" and value is not None and math.isfinite(value):
                point.values.append(float(value))
            elif t.status == "diverged" or (t.status == "done" and value is not None):
                point.diverged += 1
            elif t.status == "failed":
                point.failed += 1
        for key, g in groups.items():
            g.points = sorted(cells[key].values(), key=lambda p: (p.lr is not None, p.lr or 0.0))
        _distinguish(list(groups.values()))
        return list(groups.values())


def _lr(t: TrialRecord) -> float | None:
    lr = t.config.get(X_AXIS)
    return None if lr is None else float(lr)


def _distinguish(groups: list[Group]) -> None:
    """Groups sharing a label (configs that differ outside the varied axes) get the differing keys added."""
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        configs = [dict(g.trials[0].config) for g in same]
        keys = sorted(
            {
                k
                for c in configs
                for k in c
                if k not in (*SEED_KEYS, X_AXIS) and len({_hashable(x.get(k)) for x in configs}) > 1
            }
        )
        for g, c in zip(same, configs, strict=True):
            g.label = f"{g.label} [" + ", ".join(f"{k}={pretty(c.get(k))}" for k in keys) + "]"


def group_label(key: dict[str, Any]) -> str:
    """Readable curve name: ``Init[A]`` for one axis, ``Init[A] · LoRA+`` for several."""
    if not key:
        return "all trials"
    return " · ".join(pretty(v) for v in key.values())


def pretty(value: Any) -> str:
    """Paper names for registry names (init_a → Init[A]); numbers compactly."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return PRETTY.get(str(value), str(value))


def metric_label(metric: str) -> str:
    """Axis label with units: accuracies in percent; perplexity and losses as they are (their units vary)."""
    low = metric.lower()
    if low in ("loss", "train_loss"):
        return "training loss (per-step batch mean)"
    if "acc" in low:
        return f"{metric.replace('_', ' ')} (%)"
    if "ppl" in low or "perplexity" in low:
        return f"{metric.replace('_', ' ')} (lower is better)"
    return metric.replace("_", " ")


def display_scale(metric: str) -> float:
    """Accuracies are stored as fractions and shown as percent."""
    return 100.0 if "acc" in metric.lower() else 1.0


def load_results(
    path: str | Path, metric: str | None = None, goal: str | None = None, all_trials: bool = False
) -> SweepResults:
    """Open a store (a ``.sqlite`` file, or a folder holding exactly one) and summarise it.

    Only the trials of the spec last run into the store are kept unless ``all_trials``; a note says how many
    others the store holds (from an earlier version of the spec), since they are not seeds of the current
    ones.
    """
    store_path = find_store(path)
    with ResultStore(store_path) as store:
        spec = store.get_meta("spec", {}) or {}
        trials = store.trials()
        curves = store.metrics()
        invocations = store.get_meta("invocations", []) or []
    if not trials:
        raise UserError(f"RESULTS: the store {str(store_path)!r} holds no trials")
    notes: list[str] = []
    if not all_trials and spec.get("axes"):
        current = {t.id for t in expand(spec.get("base", {}), spec["axes"])}
        stale = [t for t in trials if t.id not in current]
        if stale:
            trials = [t for t in trials if t.id in current]
            notes.append(
                f"{len(stale)} trial(s) in the store belong to an earlier version of the spec (another "
                "base or grid) and are left out: they are not seeds of the current trials"
            )
        if not trials:
            raise UserError(f"RESULTS: none of the current spec's trials is in {str(store_path)!r} yet")
    chosen, inferred_goal = choose_metric(trials, metric or spec.get("metric"))
    if goal is not None and goal not in ("max", "min"):
        raise UserError(f"goal: {goal!r} must be 'max' or 'min'")
    final_goal = goal or (spec.get("goal") if spec.get("metric") == chosen else None) or inferred_goal
    diverged = sum(t.status == "diverged" for t in trials)
    if diverged:
        notes.append(f"{diverged} trial(s) diverged: they are counted per group and never averaged in")
    return SweepResults(
        name=spec.get("name") or store_path.stem,
        path=store_path,
        spec=spec,
        metric=chosen,
        goal=final_goal,
        trials=trials,
        curves=curves,
        invocations=invocations,
        notes=notes,
    )


def find_store(path: str | Path) -> Path:
    """The store file named by ``path``: the file itself, or the single ``*.sqlite`` in a folder."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        found = sorted(p.glob("*.sqlite")) or sorted(p.glob("*/*.sqlite"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise FileProblem(
                p, "holds no *.sqlite sweep store", "give a sweep's results.sqlite or its folder"
            )
        raise FileProblem(p, f"holds several stores: {[str(f) for f in found]}", "name one of them")
    raise FileProblem(p, "does not exist", "give a sweep's .sqlite store or its folder")


def choose_metric(trials: list[TrialRecord], wanted: str | None) -> tuple[str, str]:
    """The headline metric and its direction: ``wanted`` if a trial has it, else the preferred one present."""
    present: list[str] = []
    for t in trials:
        for k in t.final:
            if k not in present:
                present.append(k)
    directions = dict(METRIC_PREFERENCE)
    if wanted is not None:
        if present and wanted not in present:
            raise UserError(f"metric: {wanted!r} is not among the final metrics {present}")
        return wanted, directions.get(wanted, "min" if ("loss" in wanted or "ppl" in wanted) else "max")
    for name, goal in METRIC_PREFERENCE:
        if name in present:
            return name, goal
    if present:
        name = present[0]
        return name, "min" if "loss" in name or "ppl" in name else "max"
    return "metric", "max"


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v

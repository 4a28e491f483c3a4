"""Read a sweep's store and reduce it to what figures and tables show: per group and learning rate, the seed
mean and standard error of the headline metric, and each group's best learning rate.

A *group* is one combination of the axes other than ``lr`` and ``seed`` (e.g. init=init_a, or a setup label);
seeds are averaged; diverged trials are counted, never averaged in (a NaN would poison the mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widelora.sweep.store import ResultStore, TrialRecord

#: Preferred headline metrics when a spec does not name one, with their direction.
METRIC_PREFERENCE: tuple[tuple[str, str], ...] = (
    ("eval_accuracy", "max"), ("test_accuracy", "max"), ("accuracy", "max"), ("eval_perplexity", "min"),
    ("test_perplexity", "min"), ("perplexity", "min"), ("eval_ppl", "min"), ("ppl", "min"),
    ("eval_loss", "min"), ("test_loss", "min"), ("loss", "min"),
)
PRETTY = {
    "init_a": "Init[A]", "init_b": "Init[B]", "kaiming": "Kaiming (PEFT default)", "gaussian": "Gaussian",
    "lora_one": "LoRA-One", "lora_ga": "LoRA-GA", "pissa": "PiSSA", "adamw": "AdamW", "loraplus": "LoRA+",
    "scaled_gd": "scaled GD",
}
SEED_AXES = ("seed",)
X_AXIS = "lr"


@dataclass
class Point:
    """The seeds of one (group, lr) cell."""

    lr: float
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

    key: tuple[tuple[str, Any], ...]
    label: str
    points: list[Point] = field(default_factory=list)

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

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    @property
    def group_axes(self) -> list[str]:
        """Axes that distinguish curves: all varied labels except the LR and the seed."""
        axes: list[str] = []
        for t in self.trials:
            for k in t.labels:
                if k not in axes and k != X_AXIS and k not in SEED_AXES:
                    axes.append(k)
        return [a for a in axes if len({_hashable(t.labels.get(a)) for t in self.trials}) > 1]

    def trials_of(self, group: Group, lr: float | None = None) -> list[TrialRecord]:
        """The trials of ``group`` (at learning rate ``lr`` when given)."""
        out = []
        for t in self.trials:
            if any(_hashable(t.labels.get(a)) != v for a, v in group.key):
                continue
            t_lr = t.labels.get(X_AXIS, t.config.get(X_AXIS))
            if lr is not None and (t_lr is None or float(t_lr) != lr):
                continue
            out.append(t)
        return out

    def groups(self) -> list[Group]:
        """Groups in spec order, each with its points sorted by LR."""
        axes = self.group_axes
        groups: dict[tuple, Group] = {}
        cells: dict[tuple, dict[float, Point]] = {}
        for t in self.trials:
            key = tuple((a, _hashable(t.labels.get(a))) for a in axes)
            if key not in groups:
                groups[key] = Group(key=key, label=group_label(dict(key)))
                cells[key] = {}
            lr = t.labels.get(X_AXIS, t.config.get(X_AXIS))
            if lr is None:
                continue
            point = cells[key].setdefault(float(lr), Point(lr=float(lr), values=[]))
            value = t.final.get(self.metric)
            if t.status == "done" and value is not None and math.isfinite(value):
                point.values.append(float(value))
            elif t.status == "diverged" or (t.status == "done" and value is not None):
                point.diverged += 1
            elif t.status == "failed":
                point.failed += 1
        for key, g in groups.items():
            g.points = sorted(cells[key].values(), key=lambda p: p.lr)
        return list(groups.values())


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


def load_results(path: str | Path, metric: str | None = None, goal: str | None = None) -> SweepResults:
    """Open a store (a ``.sqlite`` file, or a folder holding exactly one) read-only in spirit and summarise it."""
    store_path = find_store(path)
    with ResultStore(store_path) as store:
        spec = store.get_meta("spec", {}) or {}
        trials = store.trials()
        curves = store.metrics()
        invocations = store.get_meta("invocations", []) or []
    if not trials:
        raise ValueError(f"RESULTS: the store {str(store_path)!r} holds no trials")
    chosen, inferred_goal = choose_metric(trials, metric or spec.get("metric"))
    if goal is not None and goal not in ("max", "min"):
        raise ValueError(f"goal: {goal!r} must be 'max' or 'min'")
    final_goal = goal or (spec.get("goal") if spec.get("metric") == chosen else None) or inferred_goal
    return SweepResults(
        name=spec.get("name") or store_path.stem, path=store_path, spec=spec, metric=chosen, goal=final_goal,
        trials=trials, curves=curves, invocations=invocations,
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
            raise ValueError(f"RESULTS: no *.sqlite store in folder {str(p)!r}")
        raise ValueError(f"RESULTS: several stores in {str(p)!r}: {[str(f) for f in found]}; name one")
    raise ValueError(f"RESULTS: {str(p)!r} does not exist (give a sweep's .sqlite store or its folder)")


def choose_metric(trials: list[TrialRecord], wanted: str | None) -> tuple[str, str]:
    """The headline metric and its direction: ``wanted`` if any trial has it, else the preferred one present."""
    present: list[str] = []
    for t in trials:
        for k in t.final:
            if k not in present:
                present.append(k)
    directions = dict(METRIC_PREFERENCE)
    if wanted is not None:
        if present and wanted not in present:
            raise ValueError(f"metric: {wanted!r} is not among the final metrics {present}")
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

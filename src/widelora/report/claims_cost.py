"""What the evidence of a claim cost in CPU time: the sweep store's per-trial ``cpu_s``, and for trials that
ran before it was recorded, an estimate from measured trials of the same protocol (never the wall clock of a
shared machine when a better number exists)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from widelora.sweep.store import TrialRecord


@dataclass
class Cost:
    """CPU seconds of the runs behind an experiment. Trials recorded before ``cpu_s`` existed are *estimated*
    at the median measured trial of the same protocol (model, task, steps, batch, sequence length) when one
    exists, else timed by wall clock × threads (an upper bound on a shared machine)."""

    seconds: float = 0.0
    runs: int = 0
    wall_only: int = 0
    unit: str = "trials"
    estimated: int = 0

    def text(self) -> str:
        if not self.runs:
            return "none yet"
        notes = []
        if self.estimated:
            notes.append(f"{self.estimated} estimated at their protocol's median measured trial")
        if self.wall_only:
            notes.append(f"{self.wall_only} timed by wall clock × threads (an upper bound)")
        extra = "; " + "; ".join(notes) if notes else ""
        approx = "≈ " if self.estimated else ""
        return f"{approx}{self.seconds / 60:.1f} CPU-min ({self.runs} {self.unit}{extra})"


PROTOCOL_KEYS = ("model", "task", "steps", "batch_size", "seq_len", "eval_examples")


def _protocol(t: TrialRecord) -> str:
    return json.dumps([t.config.get(k) for k in PROTOCOL_KEYS], default=str)


def typical_cpu(trials: list[TrialRecord]) -> dict[str, float]:
    """Median measured CPU seconds of a trial per protocol, for trials that ran before ``cpu_s`` existed."""
    by: dict[str, list[float]] = {}
    for t in trials:
        cpu = t.final.get("cpu_s")
        if t.status == "done" and cpu is not None and math.isfinite(cpu):
            by.setdefault(_protocol(t), []).append(cpu)
    return {k: sorted(v)[len(v) // 2] for k, v in by.items()}


def trial_cost(trials: list[TrialRecord], typical: dict[str, float] | None = None) -> Cost:
    cost = Cost()
    for t in {t.id: t for t in trials}.values():
        cpu = t.final.get("cpu_s")
        if cpu is not None and math.isfinite(cpu):
            cost.seconds += cpu
        elif typical and t.status != "failed" and _protocol(t) in typical:  # a failed attempt: its wall time
            cost.seconds += typical[_protocol(t)]
            cost.estimated += 1
        elif t.started is not None and t.finished is not None:
            cost.seconds += t.finished - t.started  # sweeps here ran one torch thread per trial
            cost.wall_only += 1
        cost.runs += 1
    return cost

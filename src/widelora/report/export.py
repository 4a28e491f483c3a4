"""A sweep's results as one small JSON file, so reports built from them regenerate from the repository.

A store (SQLite, WAL files, run folders with checkpoints) is too big and too live to commit. The export keeps
what reports read: the spec, and per trial its config, labels, status, final metrics, times and the metrics
logged a few times per run (periodic evaluations, not per-step losses). `open_results` reads either form into
the same `SweepResults`, so every report works on a live store and on a committed export alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from widelora.errors import FileProblem
from widelora.files import atomic_write_text
from widelora.report.summary import SweepResults, load_results
from widelora.sweep.store import TrialRecord

EXPORT_FORMAT = "widelora-sweep-export/1"
#: Logged metrics with at most this many points per trial (evaluations) are kept; per-step series are not.
CURVE_LIMIT = 20


def export_results(res: SweepResults, curve_limit: int = CURVE_LIMIT) -> dict[str, Any]:
    """The JSON-able export of ``res`` (only the current spec's trials, as `load_results` selected them)."""
    kept: set[str] = set()
    longest: dict[str, int] = {}
    for per in res.curves.values():
        for name, pts in per.items():
            longest[name] = max(longest.get(name, 0), len(pts))
    kept = {name for name, n in longest.items() if n <= curve_limit}
    trials = []
    for t in res.trials:
        curves = {
            n: [[s, _num(v)] for s, v in pts] for n, pts in res.curves.get(t.id, {}).items() if n in kept
        }
        trials.append(
            {
                "id": t.id,
                "index": t.index,
                "config": t.config,
                "labels": t.labels,
                "status": t.status,
                "error": None if t.error is None else t.error.strip().splitlines()[0][:300],
                "attempts": t.attempts,
                "started": t.started,
                "finished": t.finished,
                "final": {k: _num(v) for k, v in t.final.items()},
                "curves": curves,
            }
        )
    return {
        "format": EXPORT_FORMAT,
        "name": res.name,
        "metric": res.metric,
        "goal": res.goal,
        "spec": res.spec,
        "invocations": res.invocations,
        "notes": res.notes,
        "trials": trials,
    }


def write_export(store: str | Path, out: str | Path) -> Path:
    """Export the sweep store ``store`` to the JSON file ``out`` (written atomically)."""
    data = export_results(load_results(store))
    return atomic_write_text(Path(out), json.dumps(data, indent=1, sort_keys=False) + "\n")


def load_export(path: str | Path) -> SweepResults:
    """Read an export written by `write_export` back into `SweepResults`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileProblem(p, "does not exist", "export a store with `widelora claims --refresh`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileProblem(p, f"is not a readable JSON export ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise FileProblem(p, f"is not a sweep export (expected format {EXPORT_FORMAT!r})")
    trials, curves = [], {}
    for t in data["trials"]:
        trials.append(
            TrialRecord(
                id=t["id"],
                index=t["index"],
                config=t["config"],
                labels=t["labels"],
                status=t["status"],
                error=t.get("error"),
                attempts=t.get("attempts", 0),
                run_dir=None,
                checkpoint=None,
                started=t.get("started"),
                finished=t.get("finished"),
                final={k: _unnum(v) for k, v in t["final"].items()},
            )
        )
        curves[t["id"]] = {n: [(int(s), _unnum(v)) for s, v in pts] for n, pts in t.get("curves", {}).items()}
    return SweepResults(
        name=data["name"],
        path=p,
        spec=data.get("spec") or {},
        metric=data["metric"],
        goal=data["goal"],
        trials=trials,
        curves=curves,
        invocations=data.get("invocations") or [],
        notes=list(data.get("notes") or []),
    )


def open_results(path: str | Path) -> SweepResults:
    """A sweep's results from an export (``.json``) or a store (``.sqlite`` or its folder)."""
    return load_export(path) if Path(path).suffix == ".json" else load_results(path)


def _num(v: float) -> float | str:
    """JSON has no NaN or infinities: they are written as strings."""
    return v if math.isfinite(v) else str(v)


def _unnum(v: float | str | None) -> float:
    return math.nan if v is None else float(v)

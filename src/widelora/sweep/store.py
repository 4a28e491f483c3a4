"""SQLite result store: one file per sweep, safe against ``kill -9`` at any moment.

Every state change is one transaction in WAL mode with ``synchronous=FULL``, so a crash leaves the file exactly
as it was after the last committed change: a trial is either recorded done with all its final metrics, or not
done at all. Only the driver process writes (workers and Ray tasks send their results to it), so there is a single
writer and no lock contention. On restart, trials left ``running`` by a dead driver go back to ``pending``; they
resume from the checkpoint in their run directory. ``done`` / ``diverged`` trials are never run again.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from widelora.sweep.spec import Trial, canonical_json

STATUSES = ("pending", "running", "done", "diverged", "failed")
FINISHED = ("done", "diverged")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY,
    idx INTEGER NOT NULL,
    config TEXT NOT NULL,
    labels TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_dir TEXT,
    checkpoint TEXT,
    worker TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    trial_id TEXT NOT NULL REFERENCES trials(id),
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (trial_id, step, name)
);
CREATE TABLE IF NOT EXISTS finals (
    trial_id TEXT NOT NULL REFERENCES trials(id),
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (trial_id, name)
);
"""


@dataclass(frozen=True)
class TrialRecord:
    """A trial as stored: its config, labels, status and final metrics."""

    id: str
    index: int
    config: dict[str, Any]
    labels: dict[str, Any]
    status: str
    error: str | None
    attempts: int
    run_dir: str | None
    checkpoint: str | None
    started: float | None
    finished: float | None
    final: dict[str, float]

    @property
    def seconds(self) -> float | None:
        """Wall time of the last attempt, when finished."""
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


class ResultStore:
    """The results of one sweep in one SQLite file; see the module docstring for the guarantees."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"path: {str(self.path)!r} is a directory; give a file such as results.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._tx() as c:
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                c.execute(stmt)
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- plumbing ----------------------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all of it is committed, or (on error or crash) none of it."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (a checkpoint folds the WAL back into the main file)."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-able value under ``key`` (the spec, the sweep name, timings)."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # -- trials ------------------------------------------------------------------------------------------------
    def add_trials(self, trials: Iterable[Trial], runs_dir: str | Path | None = None) -> int:
        """Register trials as pending; ones already stored (same id) keep their status. Returns how many were new."""
        now = time.time()
        new = 0
        with self._tx() as c:
            for t in trials:
                run_dir = str(Path(runs_dir) / t.id) if runs_dir is not None else None
                cur = c.execute(
                    "INSERT OR IGNORE INTO trials (id, idx, config, labels, status, run_dir, created) "
                    "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                    (t.id, t.index, canonical_json(t.config), canonical_json(t.labels), run_dir, now),
                )
                new += cur.rowcount
        return new

    def recover(self, retry_failed: bool = False) -> list[str]:
        """After a crash: trials left ``running`` go back to ``pending`` (and ``failed`` too if asked)."""
        states = ("running", "failed") if retry_failed else ("running",)
        marks = ",".join("?" * len(states))
        with self._tx() as c:
            ids = [r[0] for r in c.execute(f"SELECT id FROM trials WHERE status IN ({marks})", states)]
            c.execute(f"UPDATE trials SET status = 'pending', worker = NULL WHERE status IN ({marks})", states)
        return ids

    def mark_running(self, trial_id: str, worker: str = "") -> None:
        """Record that a worker started the trial (counts an attempt)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE trials SET status = 'running', attempts = attempts + 1, started = ?, finished = NULL, "
                "worker = ?, error = NULL WHERE id = ? AND status IN ('pending', 'running')",
                (time.time(), worker, trial_id),
            )
            if cur.rowcount != 1:
                raise ValueError(f"trial_id: {trial_id!r} is not a pending trial of this store")

    def log_metrics(self, trial_id: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Append metrics at ``step``; a resumed trial re-logging a step overwrites it instead of duplicating."""
        rows = [(trial_id, int(step), str(k), _num(v)) for k, v in metrics.items() if _is_number(v)]
        if not rows:
            return
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", rows)

    def finish(
        self,
        trial_id: str,
        status: str,
        final: Mapping[str, Any] | None = None,
        error: str | None = None,
        checkpoint: str | None = None,
    ) -> None:
        """Record the outcome and the final metrics of a trial in one transaction."""
        if status not in ("done", "diverged", "failed"):
            raise ValueError(f"status: {status!r} is not a final status; valid: done, diverged, failed")
        rows = [(trial_id, str(k), _num(v)) for k, v in (final or {}).items() if _is_number(v)]
        with self._tx() as c:
            cur = c.execute(
                "UPDATE trials SET status = ?, error = ?, checkpoint = ?, finished = ? WHERE id = ?",
                (status, error, checkpoint, time.time(), trial_id),
            )
            if cur.rowcount != 1:
                raise ValueError(f"trial_id: {trial_id!r} is not a trial of this store")
            c.execute("DELETE FROM finals WHERE trial_id = ?", (trial_id,))
            c.executemany("INSERT INTO finals VALUES (?, ?, ?)", rows)

    def pending(self) -> list[TrialRecord]:
        """Trials still to run, in spec order."""
        return [t for t in self.trials() if t.status == "pending"]

    def trials(self, ids: Iterable[str] | None = None) -> list[TrialRecord]:
        """All trials (or those with the given ids) with their final metrics, in spec order."""
        finals: dict[str, dict[str, float]] = {}
        for tid, name, value in self._conn.execute("SELECT trial_id, name, value FROM finals"):
            finals.setdefault(tid, {})[name] = _unnum(value)
        rows = self._conn.execute(
            "SELECT id, idx, config, labels, status, error, attempts, run_dir, checkpoint, started, finished "
            "FROM trials ORDER BY idx, id"
        ).fetchall()
        wanted = set(ids) if ids is not None else None
        return [
            TrialRecord(
                id=r[0], index=r[1], config=json.loads(r[2]), labels=json.loads(r[3]), status=r[4], error=r[5],
                attempts=r[6], run_dir=r[7], checkpoint=r[8], started=r[9], finished=r[10],
                final=finals.get(r[0], {}),
            )
            for r in rows
            if wanted is None or r[0] in wanted
        ]

    def trial(self, trial_id: str) -> TrialRecord:
        """One trial by id."""
        found = self.trials([trial_id])
        if not found:
            raise ValueError(f"trial_id: no trial {trial_id!r} in {str(self.path)!r}")
        return found[0]

    def metrics(self, trial_id: str | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Metrics over time: ``{trial_id: {name: [(step, value), ...]}}`` sorted by step."""
        query = "SELECT trial_id, name, step, value FROM metrics"
        args: tuple[str, ...] = ()
        if trial_id is not None:
            query += " WHERE trial_id = ?"
            args = (trial_id,)
        out: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for tid, name, step, value in self._conn.execute(query + " ORDER BY trial_id, name, step", args):
            out.setdefault(tid, {}).setdefault(name, []).append((step, _unnum(value)))
        return out

    def counts(self) -> dict[str, int]:
        """Number of trials per status (every status present, zero when none)."""
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._conn.execute("SELECT status, COUNT(*) FROM trials GROUP BY status"):
            out[status] = n
        return out

    def integrity_ok(self) -> bool:
        """SQLite's own consistency check of the file."""
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, (int, float)):
        return True
    try:  # numpy / torch scalars
        float(v)
        return not isinstance(v, (str, bytes))
    except (TypeError, ValueError):
        return False


def _num(v: Any) -> float | None:
    """SQLite stores NaN as NULL (and reads it back as NaN via _unnum); infinities survive as they are."""
    x = float(v)
    if math.isnan(x):
        return None
    return x


def _unnum(v: float | None) -> float:
    return math.nan if v is None else float(v)

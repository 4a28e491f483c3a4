"""SQLite result store: one file per sweep, safe against ``kill -9`` and shared safely by several drivers.

Every state change is one IMMEDIATE transaction in WAL mode with ``synchronous=FULL``, so a crash leaves the
file as it was after the last committed change: a trial is either recorded finished with all its final
metrics, or not at all. A driver *claims* a pending trial (``status = 'pending'`` → ``'running'``, ``owner`` =
its id) in one transaction, so two drivers on one store share the work and never run a trial twice. Only the
owner may record a running trial's metrics and outcome, and a finished trial (done, diverged, failed) is never
overwritten. A running trial goes back to pending only when its driver is gone (`widelora.sweep.lease`); it
then resumes from the checkpoint in its run folder, which is stored relative to the store's own folder (or
absolute).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from widelora.errors import UserError
from widelora.sweep.grid import Trial, canonical_json
from widelora.sweep.lease import DriverInfo, DriverLease, driver_alive
from widelora.sweep.schema import SCHEMA_VERSION, connect, prepare

STATUSES = ("pending", "running", "done", "diverged", "failed")
FINISHED = ("done", "diverged", "failed")
_COLUMNS = "id, idx, config, labels, status, error, attempts, run_dir, checkpoint, started, finished, owner"

__all__ = ["FINISHED", "SCHEMA_VERSION", "STATUSES", "ResultStore", "TrialRecord"]


@dataclass(frozen=True)
class TrialRecord:
    """A trial as stored: its config, labels, status, final metrics and its run folder (an absolute path)."""

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
    owner: str | None = None

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
        self.folder = self.path.resolve().parent  # run folders are relative to this, whatever the cwd later
        self._conn = connect(self.path)
        prepare(self._conn, self.path, self.folder)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
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

    # -- metadata --------------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-able value under ``key`` (the spec, the sweep name, timings)."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def append_meta(self, key: str, item: Any) -> None:
        """Append ``item`` to the list under ``key`` in one transaction (drivers may append at once)."""
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            items = json.loads(row[0]) if row else []
            items.append(item)
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(items, default=str)))

    # -- run folders -----------------------------------------------------------------------------------------
    def _stored_dir(self, runs_dir: str | Path | None, tid: str) -> str:
        """Inside the store's folder: relative to it; elsewhere: absolute. Never relative to the cwd."""
        folder = (Path(runs_dir).resolve() if runs_dir is not None else self.folder / "runs") / tid
        return (
            folder.relative_to(self.folder).as_posix() if folder.is_relative_to(self.folder) else str(folder)
        )

    def _resolved_dir(self, stored: str | None) -> str | None:
        return None if stored is None else str(self.folder / stored)  # an absolute `stored` wins the join

    # -- trials ----------------------------------------------------------------------------------------------
    def add_trials(self, trials: Iterable[Trial], runs_dir: str | Path | None = None) -> int:
        """Register trials as pending; ones already stored (same id) are left as they are. Returns how many
        were new. Run folders default to ``runs/<id>`` beside the store."""
        now = time.time()
        new = 0
        with self._tx() as c:
            for t in trials:
                cur = c.execute(
                    "INSERT OR IGNORE INTO trials (id, idx, config, labels, status, run_dir, created) "
                    "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                    (
                        t.id,
                        t.index,
                        canonical_json(t.config),
                        canonical_json(t.labels),
                        self._stored_dir(runs_dir, t.id),
                        now,
                    ),
                )
                new += cur.rowcount
        return new

    def register_driver(self, lease: DriverLease) -> None:
        """Record a driver, so that others can tell whether its running trials are still in hand."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO drivers VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (lease.id, lease.host, lease.pid, lease.token, now, now),
            )

    def unregister_driver(self, driver: str) -> None:
        """Mark a driver stopped; its running trials (if any are left) go back to pending."""
        with self._tx() as c:
            c.execute(
                "UPDATE trials SET status = 'pending', owner = NULL WHERE status = 'running' AND owner = ?",
                (driver,),
            )
            c.execute("UPDATE drivers SET stopped = ? WHERE id = ?", (time.time(), driver))

    def drivers(self) -> dict[str, DriverInfo]:
        rows = self._conn.execute("SELECT id, host, pid, token, heartbeat, stopped FROM drivers").fetchall()
        return {r[0]: DriverInfo(*r) for r in rows}

    def reclaim_orphans(self, alive: Callable[[DriverInfo | None], bool] = driver_alive) -> list[str]:
        """Running trials whose driver is gone go back to pending (they resume from their checkpoints)."""
        with self._tx() as c:
            rows = c.execute("SELECT id, owner FROM trials WHERE status = 'running'").fetchall()
            drivers = self.drivers()
            gone = [(tid, owner) for tid, owner in rows if not alive(drivers.get(owner))]
            for tid, owner in gone:
                c.execute(
                    "UPDATE trials SET status = 'pending', owner = NULL WHERE id = ? AND status = 'running' "
                    "AND owner IS ?",
                    (tid, owner),
                )
        return [tid for tid, _ in gone]

    def retry_failed(self, ids: Iterable[str]) -> list[str]:
        """Failed trials among ``ids`` become pending again (on request: ``--retry-failed``)."""
        wanted = list(ids)
        retried = []
        with self._tx() as c:
            for tid in wanted:
                if c.execute(
                    "UPDATE trials SET status = 'pending', owner = NULL WHERE id = ? AND status = 'failed'",
                    (tid,),
                ).rowcount:
                    retried.append(tid)
        return retried

    def claim(self, order: Sequence[str], driver: str, worker: str = "") -> TrialRecord | None:
        """Atomically take the first pending trial in ``order`` for ``driver``; None when none is left."""
        with self._tx() as c:
            pending = {r[0] for r in c.execute("SELECT id FROM trials WHERE status = 'pending'")}
            tid = next((t for t in order if t in pending), None)
            if tid is None:
                return None
            c.execute(
                "UPDATE trials SET status = 'running', owner = ?, worker = ?, attempts = attempts + 1, "
                "started = ?, finished = NULL, error = NULL WHERE id = ? AND status = 'pending'",
                (driver, worker, time.time(), tid),
            )
        return self.trial(tid)

    def log_metrics(
        self, trial_id: str, step: int, metrics: Mapping[str, Any], driver: str | None = None
    ) -> None:
        """Record metrics at ``step`` of a running trial (of ``driver``, when given); a resumed trial
        re-logging a step overwrites it instead of duplicating."""
        rows = [(trial_id, int(step), str(k), _num(v)) for k, v in metrics.items() if _is_number(v)]
        if not rows:
            return
        with self._tx() as c:
            if not self._owns(c, trial_id, driver):
                return
            c.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", rows)

    def finish(
        self,
        trial_id: str,
        status: str,
        final: Mapping[str, Any] | None = None,
        error: str | None = None,
        checkpoint: str | None = None,
        driver: str | None = None,
    ) -> bool:
        """Record the outcome of a running trial (of ``driver``, when given) in one transaction.

        Returns False, and changes nothing, when the trial is not running (a finished trial is never
        overwritten) or belongs to another driver.
        """
        if status not in FINISHED:
            raise UserError(f"status: {status!r} is not a final status; valid: {', '.join(FINISHED)}")
        rows = [(trial_id, str(k), _num(v)) for k, v in (final or {}).items() if _is_number(v)]
        with self._tx() as c:
            if not self._owns(c, trial_id, driver):
                return False
            c.execute(
                "UPDATE trials SET status = ?, error = ?, checkpoint = ?, finished = ?, owner = NULL "
                "WHERE id = ?",
                (status, error, checkpoint, time.time(), trial_id),
            )
            c.execute("DELETE FROM finals WHERE trial_id = ?", (trial_id,))
            c.executemany("INSERT INTO finals VALUES (?, ?, ?)", rows)
        return True

    def _owns(self, c: Any, trial_id: str, driver: str | None) -> bool:
        row = c.execute("SELECT status, owner FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if row is None:
            raise UserError(f"trial_id: {trial_id!r} is not a trial of {str(self.path)!r}")
        return row[0] == "running" and (driver is None or row[1] == driver)

    # -- reading ---------------------------------------------------------------------------------------------
    def pending(self) -> list[TrialRecord]:
        """Trials still to run, in spec order."""
        return [t for t in self.trials() if t.status == "pending"]

    def trials(self, ids: Iterable[str] | None = None) -> list[TrialRecord]:
        """All trials (or those with the given ids) with their final metrics, in spec order."""
        finals: dict[str, dict[str, float]] = {}
        for tid, name, value in self._conn.execute("SELECT trial_id, name, value FROM finals"):
            finals.setdefault(tid, {})[name] = _unnum(value)
        rows = self._conn.execute(f"SELECT {_COLUMNS} FROM trials ORDER BY idx, id").fetchall()
        wanted = set(ids) if ids is not None else None
        return [
            TrialRecord(
                id=r[0],
                index=r[1],
                config=json.loads(r[2]),
                labels=json.loads(r[3]),
                status=r[4],
                error=r[5],
                attempts=r[6],
                run_dir=self._resolved_dir(r[7]),
                checkpoint=r[8],
                started=r[9],
                finished=r[10],
                final=finals.get(r[0], {}),
                owner=r[11],
            )
            for r in rows
            if wanted is None or r[0] in wanted
        ]

    def trial(self, trial_id: str) -> TrialRecord:
        """One trial by id."""
        found = self.trials([trial_id])
        if not found:
            raise UserError(f"trial_id: no trial {trial_id!r} in {str(self.path)!r}")
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
    if isinstance(v, (bool, int, float)):
        return True
    try:  # numpy / torch scalars
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, (str, bytes))


def _num(v: Any) -> float | None:
    """SQLite stores NaN as NULL (read back as NaN by _unnum); infinities survive as they are."""
    x = float(v)
    return None if math.isnan(x) else x


def _unnum(v: float | None) -> float:
    return math.nan if v is None else float(v)

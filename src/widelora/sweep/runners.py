"""Run a sweep: register its trials, then claim and run pending ones until none is left, on any backend.

One bookkeeping path serves every backend: the driver claims a trial in the store only when its executor has a
free slot, gives the executor the trial's run folder as the store resolved it, and records metrics and
outcomes as the executor reports them. Several drivers (on one machine or several) can run the same spec into
one store at once: they share the pending trials and never run one twice. A trial whose driver died
(``kill -9``) is taken back by the next driver and resumes from its checkpoint; finished trials never run
again.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from widelora.errors import UserError
from widelora.sweep.executors import Event, Executor, InlineExecutor, LocalExecutor, TrialFn
from widelora.sweep.lease import DriverLease
from widelora.sweep.progress import ProgressFn
from widelora.sweep.ray_backend import RayExecutor
from widelora.sweep.registry import LEGACY_NAMES, get_trial
from widelora.sweep.spec import SweepSpec
from widelora.sweep.store import FINISHED, ResultStore


@dataclass
class SweepOutcome:
    """What one invocation of a sweep did."""

    store: Path
    counts: dict[str, int]
    ran: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0


def _local(fn: TrialFn, workers: int, threads: int, address: str | None, gpus: float) -> Executor:
    return InlineExecutor(fn, threads) if workers == 0 else LocalExecutor(fn, workers, threads)


def _ray(fn: TrialFn, workers: int, threads: int, address: str | None, gpus: float) -> Executor:
    if workers == 0:
        raise UserError("workers: 0 (in-process) is only for the local backend")
    return RayExecutor(fn, workers, threads, address=address, gpus=gpus)


#: Backend name → executor factory ``(fn, workers, threads, address, gpus_per_trial)``.
BACKENDS: dict[str, Callable[[TrialFn, int, int, str | None, float], Executor]] = {
    "local": _local,
    "ray": _ray,
}


def run_sweep(
    spec: SweepSpec,
    store: ResultStore,
    *,
    backend: str = "local",
    workers: int = 1,
    threads: int | None = None,
    address: str | None = None,
    gpus_per_trial: float = 0.0,
    runs_dir: str | Path | None = None,
    retry_failed: bool = False,
    trial_fn: str | None = None,
    progress: ProgressFn | None = None,
    limit: int | None = None,
) -> SweepOutcome:
    """Register the spec's trials in ``store`` and run those not finished yet; safe to call again after a
    crash, and safe to call from several processes at once.

    ``workers`` processes (local) or concurrent Ray tasks each use ``threads`` torch threads (default: the
    machine's cores divided among the workers); ``workers=0`` runs the trials one by one in this process (for
    debugging; a hard crash of a trial then ends the sweep, which resumes when run again). ``runs_dir`` holds
    one folder per trial (default: ``runs`` beside the store). Pending trials run in the order of the spec as
    given now, so listing the most informative values first makes a sweep that is stopped early still useful.
    ``limit`` caps the trials this call starts (None: all), so that one worker can take turns between sweeps.
    """
    if backend not in BACKENDS:
        raise UserError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise UserError(f"workers: {workers!r} must be an integer >= 1 (or 0: run in this process)")
    if backend == "ray" and workers == 0:
        raise UserError("workers: 0 (in-process) is only for the local backend")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise UserError(f"threads: {threads!r} must be an integer >= 1")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise UserError(f"limit: {limit!r} must be an integer >= 1 (or None: no limit)")
    if gpus_per_trial < 0:
        raise UserError(f"gpus_per_trial: {gpus_per_trial!r} must be >= 0")
    trial = get_trial(trial_fn or spec.trial_fn)
    _check_store_matches(store, spec, trial.name)

    start = time.time()
    trials = spec.trials()
    order = [t.id for t in trials]
    store.set_meta("name", spec.name)
    store.set_meta("spec", {**spec.to_dict(), "trial_fn": trial.name})
    store.add_trials(trials, runs_dir)
    lease = DriverLease(store.path)
    store.register_driver(lease)
    lease.start()
    try:
        store.reclaim_orphans()
        if retry_failed:
            store.retry_failed(order)
        skipped = sum(r.status in FINISHED for r in store.trials(order))
        executor = BACKENDS[backend](trial.fn, workers, threads, address, gpus_per_trial)
        try:
            ran = drive(store, lease.id, order, executor, progress, limit)
        finally:
            executor.close()
    finally:
        lease.stop()
        store.unregister_driver(lease.id)  # trials still running here (Ctrl-C) go back to pending
    seconds = time.time() - start
    store.append_meta(
        "invocations",
        {
            "backend": backend,
            "workers": workers,
            "threads": threads,
            "started": start,
            "seconds": seconds,
            "ran": len(ran),
            "driver": lease.id,
        },
    )
    return SweepOutcome(store=store.path, counts=store.counts(), ran=ran, skipped=skipped, seconds=seconds)


def _check_store_matches(store: ResultStore, spec: SweepSpec, trial: str) -> None:
    """A store holds one sweep of one trial function: refuse to mix in another (their ids could collide)."""
    stored_name = store.get_meta("name")
    if stored_name is not None and stored_name != spec.name:
        raise UserError(
            f"store: {str(store.path)!r} holds sweep {stored_name!r}, not {spec.name!r}; "
            "give another --store path"
        )
    stored_fn = (store.get_meta("spec") or {}).get("trial_fn")
    if stored_fn is not None and LEGACY_NAMES.get(stored_fn, stored_fn) != trial:
        raise UserError(
            f"store: {str(store.path)!r} holds trials of trial function {stored_fn!r}, not "
            f"{trial!r}; give another --store path"
        )


def drive(
    store: ResultStore,
    driver: str,
    order: Sequence[str],
    executor: Executor,
    progress: ProgressFn | None = None,
    limit: int | None = None,
) -> list[str]:
    """Claim trials in ``order`` while ``executor`` has room (at most ``limit`` in all), record what it
    reports; return the ids run."""
    total = len(order)
    worker = f"{socket.gethostname()}:{executor.worker_name}"
    ran: list[str] = []

    def finished() -> int:
        return sum(r.status in FINISHED for r in store.trials(order))

    def emit(event: Event) -> None:
        if event[0] == "metrics":
            store.log_metrics(event[1], event[2], event[3], driver=driver)
            return
        tid, result = event[1], event[2]
        store.finish(
            tid, result["status"], result["final"], result["error"], result["checkpoint"], driver=driver
        )
        if progress is not None:
            progress(result["status"], store.trial(tid), finished(), total)

    while True:
        while (
            executor.free() > 0
            and (limit is None or len(ran) < limit)
            and (rec := store.claim(order, driver, worker)) is not None
        ):
            executor.submit(rec)
            ran.append(rec.id)
            if progress is not None:
                progress("running", rec, finished(), total)
        if not executor.busy():
            return ran
        executor.poll(emit, timeout=0.5)

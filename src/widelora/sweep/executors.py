"""Where trials run: in this process, or in spawned local worker processes (Ray:
`widelora.sweep.ray_backend`).

An executor only runs what it is given. Claiming trials, recording metrics and outcomes, and choosing run
folders is the driver's job (`widelora.sweep.runners.drive`), done the same way for every executor. The trial
function contract::

    fn(config: dict, run_dir: Path, on_metrics: Callable[[int, dict], None] | None = None) -> dict
    # returns {"status": "done" | "diverged" | "failed", "final": {...}, "error": str | None,
    #          "checkpoint": str | None}; resumes from the checkpoint in run_dir when one is there.

A trial that raises is reported ``failed`` with its error; so is a worker process that dies. Every result's
``final`` gets ``cpu_s``, the CPU seconds of the attempt (all threads of the process that ran it), because CPU
time, not wall time on a shared machine, is what an experiment costs.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Protocol

import torch

from widelora.sweep.store import TrialRecord

#: ("metrics", trial id, step, {name: value}) or ("done", trial id, result).
Event = tuple[Any, ...]
Emit = Callable[[Event], None]
TrialFn = Callable[..., Mapping[str, Any]]


class Executor(Protocol):
    """Runs the trials it is given, reporting their metrics and results through ``emit`` in ``poll``."""

    worker_name: str

    def free(self) -> int:
        """How many more trials it can take now."""

    def busy(self) -> int:
        """How many trials it is running."""

    def submit(self, rec: TrialRecord) -> None:
        """Start a claimed trial (in ``rec.run_dir``)."""

    def poll(self, emit: Emit, timeout: float) -> None:
        """Deliver events of running trials, waiting up to ``timeout`` seconds for one."""

    def close(self) -> None:
        """Stop the workers; trials still running are the driver's to release."""


def execute_trial(
    fn: TrialFn,
    config: Mapping[str, Any],
    run_dir: str | Path,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run one trial and return a well-formed result; exceptions become ``failed`` with their traceback."""
    run_dir = Path(run_dir)

    def metrics(step: int, values: Mapping[str, Any]) -> None:
        if on_metrics is not None:
            on_metrics(int(step), plain(values))

    cpu_start = time.process_time()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        result = normalize_result(fn(dict(config), run_dir, metrics))
    except Exception as exc:
        tb = traceback.format_exc(limit=-6)
        result = failed(f"{type(exc).__name__}: {exc}\n{tb}")
    result["final"]["cpu_s"] = time.process_time() - cpu_start
    return result


def normalize_result(result: Any) -> dict[str, Any]:
    """Check a trial function's return value against the contract; anything else is a ``failed`` trial."""
    if not isinstance(result, Mapping):
        return failed(
            f"trial function returned {type(result).__name__}, expected a dict with 'status' and 'final'"
        )
    status = result.get("status")
    if status not in ("done", "diverged", "failed"):
        return failed(f"trial function returned status {status!r}; valid: done, diverged, failed")
    final = result.get("final") or {}
    if not isinstance(final, Mapping):
        return failed(f"trial function returned final={final!r}, expected a dict of metrics")
    error = result.get("error")
    if status == "failed" and not error:
        error = "trial function reported failure without an error message"
    ckpt = result.get("checkpoint")
    return {
        "status": status,
        "final": plain(final),
        "error": None if error is None else str(error),
        "checkpoint": None if ckpt is None else str(ckpt),
    }


def failed(message: str) -> dict[str, Any]:
    """The result of a trial that could not report one itself."""
    return {"status": "failed", "final": {}, "error": message, "checkpoint": None}


def plain(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as plain floats (tensors and numpy scalars do not cross processes cheaply); text is dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, (str, bytes)):
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class InlineExecutor:
    """Runs one trial at a time in the driver (``workers=0``: for debugging; a hard crash ends the sweep)."""

    worker_name = "inline"

    def __init__(self, fn: TrialFn, threads: int) -> None:
        self._fn, self._threads = fn, threads
        self._queued: list[TrialRecord] = []

    def free(self) -> int:
        return 1 - len(self._queued)

    def busy(self) -> int:
        return len(self._queued)

    def submit(self, rec: TrialRecord) -> None:
        self._queued.append(rec)

    def poll(self, emit: Emit, timeout: float) -> None:
        rec = self._queued[0]
        old = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            result = execute_trial(
                self._fn, rec.config, rec.run_dir, lambda step, m: emit(("metrics", rec.id, step, m))
            )
        finally:
            torch.set_num_threads(old)
        self._queued.pop(0)
        emit(("done", rec.id, result))

    def close(self) -> None:
        self._queued.clear()


@contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Spawned children inherit the environment at start: set the BLAS/OpenMP thread counts for them."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, str(threads)))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_main(wid: int, fn: TrialFn, threads: int, tasks: Any, results: Any) -> None:
    """Worker process: run trials from ``tasks``, report on ``results``; exit at once if the driver dies."""
    parent = mp.parent_process()
    if parent is not None:

        def _watch() -> None:
            wait([parent.sentinel])
            os._exit(3)  # the driver is gone (e.g. kill -9): stop instead of training for nobody

        threading.Thread(target=_watch, daemon=True).start()
    torch.set_num_threads(threads)
    while (task := tasks.get()) is not None:
        tid, config, run_dir = task
        result = execute_trial(
            fn, config, run_dir, lambda step, m, _tid=tid: results.put(("metrics", wid, _tid, step, m))
        )
        results.put(("done", wid, tid, result))


class LocalExecutor:
    """``workers`` spawned processes of ``threads`` torch threads each; a dead worker fails only its trial."""

    def __init__(self, fn: TrialFn, workers: int, threads: int) -> None:
        self._fn, self._workers, self._threads = fn, workers, threads
        self._ctx = mp.get_context("spawn")
        self._results = self._ctx.Queue()
        self._procs: dict[int, Any] = {}
        self._queues: dict[int, Any] = {}
        self._busy: dict[int, TrialRecord] = {}
        self._next = 0
        self.worker_name = "local"

    def free(self) -> int:
        return self._workers - len(self._busy)

    def busy(self) -> int:
        return len(self._busy)

    def submit(self, rec: TrialRecord) -> None:
        idle = [w for w, p in self._procs.items() if w not in self._busy and p.is_alive()]
        wid = idle[0] if idle else self._start()
        self._busy[wid] = rec
        self._queues[wid].put((rec.id, rec.config, rec.run_dir))

    def _start(self) -> int:
        wid, self._next = self._next, self._next + 1
        q = self._ctx.Queue()
        with thread_env(self._threads):
            p = self._ctx.Process(
                target=_worker_main,
                args=(wid, self._fn, self._threads, q, self._results),
                daemon=True,
                name=f"widelora-sweep-{wid}",
            )
            p.start()
        self._queues[wid], self._procs[wid] = q, p
        return wid

    def poll(self, emit: Emit, timeout: float) -> None:
        try:
            msg = self._results.get(timeout=timeout)
        except queue_mod.Empty:
            msg = None
        if msg is not None:
            if msg[0] == "metrics":
                emit(("metrics", msg[2], msg[3], msg[4]))
            elif self._busy.get(msg[1]) is not None and self._busy[msg[1]].id == msg[2]:
                del self._busy[msg[1]]
                emit(("done", msg[2], msg[3]))
            return
        for wid, p in list(self._procs.items()):
            if not p.is_alive():
                rec = self._busy.pop(wid, None)
                del self._procs[wid], self._queues[wid]
                if rec is not None:
                    emit(
                        (
                            "done",
                            rec.id,
                            failed(
                                f"worker process died (exit code {p.exitcode}) while running "
                                f"the trial {rec.labels}"
                            ),
                        )
                    )

    def close(self) -> None:
        for q in self._queues.values():
            with contextlib.suppress(OSError, ValueError):
                q.put(None)
        for p in self._procs.values():
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._busy.clear()

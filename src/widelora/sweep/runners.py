"""Run a sweep's pending trials: local worker processes (default) or Ray, the driver alone writing the store.

The trial function contract (``widelora.train:run_trial`` by default; any ``"module:function"`` works, so it can be
imported in a spawned worker or a Ray task)::

    fn(config: dict, run_dir: Path, on_metrics: Callable[[int, dict], None] | None = None) -> dict
    # returns {"status": "done" | "diverged" | "failed", "final": {...}, "error": str | None,
    #          "checkpoint": str | None}; resumes from the checkpoint in run_dir when one is there.

A trial that raises is recorded ``failed`` with its error and the sweep goes on; so is a worker process that dies.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widelora.sweep.spec import SweepSpec
from widelora.sweep.store import FINISHED, ResultStore, TrialRecord

TrialFn = Callable[..., Mapping[str, Any]]
ProgressFn = Callable[[str, TrialRecord, int, int], None]
BACKENDS = ("local", "ray")


@dataclass
class SweepOutcome:
    """What one invocation of a sweep did."""

    store: Path
    counts: dict[str, int]
    ran: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0


def resolve_trial_fn(path: str) -> TrialFn:
    """Import ``"module:function"``; raise ValueError naming what is wrong, before any worker starts."""
    module_name, sep, func_name = path.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"trial_fn: {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"trial_fn: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        # a wrong name in a spec is a value error, like a missing module
        raise ValueError(f"trial_fn: module {module_name!r} has no function {func_name!r}")  # noqa: TRY004
    return fn


def execute_trial(
    fn_path: str,
    config: Mapping[str, Any],
    run_dir: str | Path,
    on_metrics: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one trial and return a well-formed result; exceptions become ``failed`` with their traceback."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fn = resolve_trial_fn(fn_path)
        result = fn(dict(config), run_dir, on_metrics)
    except Exception as exc:  # noqa: BLE001 - a trial's failure must not end the sweep
        tb = traceback.format_exc(limit=-6)
        return {"status": "failed", "final": {}, "error": f"{type(exc).__name__}: {exc}\n{tb}", "checkpoint": None}
    return normalize_result(result)


def normalize_result(result: Any) -> dict[str, Any]:
    """Check a trial function's return value against the contract; anything else is a ``failed`` trial."""
    if not isinstance(result, Mapping):
        return _bad(f"trial function returned {type(result).__name__}, expected a dict with 'status' and 'final'")
    status = result.get("status")
    if status not in ("done", "diverged", "failed"):
        return _bad(f"trial function returned status {status!r}; valid: done, diverged, failed")
    final = result.get("final") or {}
    if not isinstance(final, Mapping):
        return _bad(f"trial function returned final={final!r}, expected a dict of metrics")
    error = result.get("error")
    if status == "failed" and not error:
        error = "trial function reported failure without an error message"
    ckpt = result.get("checkpoint")
    return {"status": status, "final": dict(final), "error": None if error is None else str(error),
            "checkpoint": None if ckpt is None else str(ckpt)}


def _bad(message: str) -> dict[str, Any]:
    return {"status": "failed", "final": {}, "error": message, "checkpoint": None}


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
) -> SweepOutcome:
    """Register the spec's trials in ``store`` and run those not finished yet; safe to call again after a crash.

    ``workers`` processes (local) or concurrent Ray tasks each use ``threads`` torch threads (default: the
    machine's cores divided among the workers); ``workers=0`` runs the trials one by one in this process (for
    debugging; a hard crash of a trial then ends the sweep, which resumes when run again). ``runs_dir`` holds one
    folder per trial (checkpoints, logs). Pending trials run in the order of the spec as given now, so listing
    the most informative values first makes a sweep that is stopped early still useful.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"workers: {workers!r} must be an integer >= 1 (or 0: run in this process)")
    if backend == "ray" and workers == 0:
        raise ValueError("workers: 0 (in-process) is only for the local backend")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads: {threads!r} must be an integer >= 1")
    if gpus_per_trial < 0:
        raise ValueError(f"gpus_per_trial: {gpus_per_trial!r} must be >= 0")
    fn_path = trial_fn or spec.trial_fn
    resolve_trial_fn(fn_path)
    stored_name = store.get_meta("name")
    if stored_name is not None and stored_name != spec.name:
        raise ValueError(f"store: {str(store.path)!r} holds sweep {stored_name!r}, not {spec.name!r}; "
                         "give another --store path")
    runs_dir = Path(runs_dir) if runs_dir is not None else store.path.parent / "runs"
    start = time.time()
    trials = spec.trials()
    store.set_meta("name", spec.name)
    store.set_meta("spec", spec.to_dict())
    store.add_trials(trials, runs_dir)
    store.recover(retry_failed=retry_failed)
    wanted = {t.id for t in trials}
    order = {t.id: i for i, t in enumerate(trials)}
    records = sorted(store.trials(wanted), key=lambda r: order[r.id])
    todo = [r for r in records if r.status == "pending"]
    skipped = sum(r.status in FINISHED or r.status == "failed" for r in records)
    if todo:
        if backend == "local" and workers == 0:
            _run_inline(todo, store, fn_path, threads, progress, len(records), skipped)
        elif backend == "local":
            _run_local(todo, store, fn_path, workers, threads, progress, len(records), skipped)
        else:
            _run_ray(todo, store, fn_path, workers, threads, address, gpus_per_trial, progress, len(records),
                     skipped)
    seconds = time.time() - start
    runs = store.get_meta("invocations", [])
    runs.append({"backend": backend, "workers": workers, "threads": threads, "started": start,
                 "seconds": seconds, "ran": len(todo)})
    store.set_meta("invocations", runs)
    return SweepOutcome(store=store.path, counts=store.counts(), ran=[r.id for r in todo], skipped=skipped,
                        seconds=seconds)


# -- in-process (workers=0) ---------------------------------------------------------------------------------
def _run_inline(todo: list[TrialRecord], store: ResultStore, fn_path: str, threads: int,
                progress: ProgressFn | None, total: int, already: int) -> None:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    done_count = already
    try:
        for rec in todo:
            store.mark_running(rec.id, worker=f"{socket.gethostname()}:inline")
            if progress:
                progress("running", store.trial(rec.id), done_count, total)

            def on_metrics(step: int, metrics: dict[str, Any], _tid: str = rec.id) -> None:
                store.log_metrics(_tid, step, _plain(metrics))

            result = execute_trial(fn_path, rec.config, rec.run_dir or str(store.path.parent / "runs" / rec.id),
                                   on_metrics)
            store.finish(rec.id, result["status"], _plain(result["final"]), result["error"], result["checkpoint"])
            done_count += 1
            if progress:
                progress(result["status"], store.trial(rec.id), done_count, total)
    except BaseException:
        store.recover()
        raise
    finally:
        torch.set_num_threads(old)


# -- local backend -------------------------------------------------------------------------------------------
@contextmanager
def _thread_env(threads: int) -> Iterator[None]:
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


def _worker_main(wid: int, fn_path: str, threads: int, tasks: Any, results: Any) -> None:
    """Worker process: run trials sent on ``tasks`` and report metrics/results on ``results``; die with the parent."""
    import threading
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is not None:

        def _watch() -> None:
            wait([parent.sentinel])
            os._exit(3)  # the driver is gone (e.g. kill -9): stop at once instead of training for nobody

        threading.Thread(target=_watch, daemon=True).start()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    while True:
        task = tasks.get()
        if task is None:
            return
        tid, config, run_dir = task

        def on_metrics(step: int, metrics: dict[str, Any], _tid: str = tid) -> None:
            results.put(("metrics", wid, _tid, int(step), _plain(metrics)))

        result = execute_trial(fn_path, config, run_dir, on_metrics)
        result["final"] = _plain(result["final"])
        results.put(("done", wid, tid, result))


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as plain floats (tensors and numpy scalars do not cross processes cheaply)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k == "step":
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _run_local(todo: list[TrialRecord], store: ResultStore, fn_path: str, workers: int, threads: int,
               progress: ProgressFn | None, total: int, already: int) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    queue_of: dict[int, Any] = {}
    procs: dict[int, Any] = {}
    busy: dict[int, str] = {}
    pending = list(todo)
    by_id = {r.id: r for r in todo}
    done_count = already
    next_wid = 0

    def start_worker() -> int:
        nonlocal next_wid
        wid, next_wid = next_wid, next_wid + 1
        q = ctx.Queue()
        with _thread_env(threads):
            p = ctx.Process(target=_worker_main, args=(wid, fn_path, threads, q, results), daemon=True,
                            name=f"widelora-sweep-{wid}")
            p.start()
        queue_of[wid], procs[wid] = q, p
        return wid

    def finish(tid: str, result: dict[str, Any]) -> None:
        nonlocal done_count
        store.finish(tid, result["status"], result["final"], result["error"], result["checkpoint"])
        done_count += 1
        if progress:
            progress(result["status"], store.trial(tid), done_count, total)

    for _ in range(min(workers, len(pending))):
        start_worker()
    try:
        while pending or busy:
            for wid in list(procs):
                if wid not in busy and pending and procs[wid].is_alive():
                    rec = pending.pop(0)
                    store.mark_running(rec.id, worker=f"{socket.gethostname()}:local-{wid}")
                    busy[wid] = rec.id
                    if progress:
                        progress("running", store.trial(rec.id), done_count, total)
                    queue_of[wid].put((rec.id, rec.config, rec.run_dir or str(store.path.parent / rec.id)))
            try:
                msg = results.get(timeout=0.5)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                kind, wid, tid = msg[0], msg[1], msg[2]
                if kind == "metrics":
                    store.log_metrics(tid, msg[3], msg[4])
                elif kind == "done" and busy.get(wid) == tid:
                    del busy[wid]
                    finish(tid, msg[3])
                continue
            for wid, p in list(procs.items()):
                if not p.is_alive():
                    tid = busy.pop(wid, None)
                    del procs[wid]
                    if tid is not None:
                        finish(tid, _bad(f"worker process died (exit code {p.exitcode}) while running the trial "
                                         f"{by_id[tid].labels}"))
                    if pending and len(procs) < workers:
                        start_worker()
    except BaseException:
        # Ctrl-C or an error in the driver: trials in flight go back to pending; their checkpoints stay.
        store.recover()
        raise
    finally:
        for wid, q in queue_of.items():
            if wid in procs:
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        for p in procs.values():
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# -- Ray backend ---------------------------------------------------------------------------------------------
def _ray_trial(fn_path: str, tid: str, config: dict[str, Any], run_dir: str, threads: int, events: Any) -> dict:
    """Body of the Ray task: runs where Ray placed it; progress goes to the driver through ``events``."""
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass
    node = socket.gethostname()
    events.put(("start", tid, node))

    def on_metrics(step: int, metrics: dict[str, Any]) -> None:
        events.put(("metrics", tid, int(step), _plain(metrics)))

    result = execute_trial(fn_path, config, run_dir, on_metrics)
    result["final"] = _plain(result["final"])
    return result


def _run_ray(todo: list[TrialRecord], store: ResultStore, fn_path: str, workers: int, threads: int,
             address: str | None, gpus: float, progress: ProgressFn | None, total: int, already: int) -> None:
    try:
        import ray
        from ray.util.queue import Queue
    except ImportError as exc:
        raise ValueError("backend: 'ray' needs Ray installed: pip install 'widelora[ray]'") from exc
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers * threads, **kwargs)
        started_here = True
    events = Queue(actor_options={"num_cpus": 0})
    remote = ray.remote(_ray_trial).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
    refs: dict[Any, str] = {}
    done_count = already
    try:
        for rec in todo:
            run_dir = rec.run_dir or str(store.path.parent / "runs" / rec.id)
            refs[remote.remote(fn_path, rec.id, rec.config, run_dir, threads, events)] = rec.id
        marked: set[str] = set()

        def drain() -> None:
            for ev in events.get_nowait_batch(events.qsize()) if events.qsize() else []:
                if ev[0] == "start" and ev[1] not in marked:
                    store.mark_running(ev[1], worker=f"{ev[2]}:ray")
                    marked.add(ev[1])
                    if progress:
                        progress("running", store.trial(ev[1]), done_count, total)
                elif ev[0] == "metrics":
                    store.log_metrics(ev[1], ev[2], ev[3])

        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            drain()
            for ref in ready:
                tid = refs.pop(ref)
                try:
                    result = normalize_result(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - a crashed Ray worker fails only its trial
                    result = _bad(f"Ray task failed: {type(exc).__name__}: {exc}")
                drain()
                if tid not in marked:
                    store.mark_running(tid, worker="ray")
                    marked.add(tid)
                store.finish(tid, result["status"], result["final"], result["error"], result["checkpoint"])
                done_count += 1
                if progress:
                    progress(result["status"], store.trial(tid), done_count, total)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        store.recover()
        raise
    finally:
        if started_here:
            ray.shutdown()


def default_progress(stream: Any = None, metric: str | None = None) -> ProgressFn:
    """A progress printer: one line per started and finished trial (headline ``metric`` first), log-friendly."""
    out = stream or sys.stdout

    def show(event: str, rec: TrialRecord, done: int, total: int) -> None:
        labels = " ".join(f"{k}={v}" for k, v in rec.labels.items())
        if event == "running":
            print(f"[{done}/{total}] start    {rec.id}  {labels}", file=out, flush=True)
            return
        keys = sorted(rec.final, key=lambda k: k != metric)[:4]
        metrics = "  ".join(f"{k}={rec.final[k]:.4g}" for k in keys)
        secs = f"  ({rec.seconds:.1f} s)" if rec.seconds is not None else ""
        err = f"  error: {rec.error.splitlines()[0]}" if rec.error else ""
        print(f"[{done}/{total}] {event:<8} {rec.id}  {labels}  {metrics}{secs}{err}", file=out, flush=True)

    return show

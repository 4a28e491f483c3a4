"""The Ray executor: each claimed trial becomes a Ray task; its metrics reach the driver through a Ray queue.

Ray is an optional dependency (``pip install 'widelora[ray]'``). The driver claims a trial only when a task
slot is free, exactly as with local workers, so several drivers (or a local and a Ray driver) can share one
store.
"""

from __future__ import annotations

import socket
from typing import Any

import torch

from widelora.errors import UserError
from widelora.sweep.executors import Emit, TrialFn, execute_trial, failed, normalize_result
from widelora.sweep.store import TrialRecord


def _ray_trial(
    fn: TrialFn, tid: str, config: dict[str, Any], run_dir: str, threads: int, events: Any
) -> dict:
    """Body of the Ray task: runs where Ray placed it; metrics go to the driver through ``events``."""
    torch.set_num_threads(threads)
    result = execute_trial(fn, config, run_dir, lambda step, m: events.put(("metrics", tid, step, m)))
    result["node"] = socket.gethostname()
    return result


class RayExecutor:
    """Up to ``workers`` concurrent Ray tasks with ``threads`` CPUs (and ``gpus`` GPUs) each."""

    worker_name = "ray"

    def __init__(
        self, fn: TrialFn, workers: int, threads: int, address: str | None = None, gpus: float = 0.0
    ) -> None:
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError as exc:
            raise UserError("backend: 'ray' needs Ray installed: pip install 'widelora[ray]'") from exc
        self._ray = ray
        self._started_here = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers * threads, **kwargs)
            self._started_here = True
        self._fn, self._workers, self._threads = fn, workers, threads
        self._events = Queue(actor_options={"num_cpus": 0})
        self._remote = ray.remote(_ray_trial).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
        self._refs: dict[Any, str] = {}

    def free(self) -> int:
        return self._workers - len(self._refs)

    def busy(self) -> int:
        return len(self._refs)

    def submit(self, rec: TrialRecord) -> None:
        ref = self._remote.remote(self._fn, rec.id, rec.config, rec.run_dir, self._threads, self._events)
        self._refs[ref] = rec.id

    def _drain(self, emit: Emit) -> None:
        n = self._events.qsize()
        for ev in self._events.get_nowait_batch(n) if n else []:
            emit(ev)

    def poll(self, emit: Emit, timeout: float) -> None:
        ready, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        self._drain(emit)
        for ref in ready:
            tid = self._refs.pop(ref)
            try:
                result = normalize_result(self._ray.get(ref))
            except Exception as exc:
                result = failed(f"Ray task failed: {type(exc).__name__}: {exc}")
            self._drain(emit)  # metrics sent just before the task returned
            emit(("done", tid, result))

    def close(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started_here:
            self._ray.shutdown()

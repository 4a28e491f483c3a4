"""The width study of the initialization paper (seed 001, Section 3.7, Figures 2–3): the orchestration.

For each width n and init scheme, finetune the toy student (``widelora.experiments.toy``) on the teacher's
data for every seed × LoRA+ ratio × learning rate, read off the optimal learning rate, and fit how it scales
with n. This module decides what runs where: which (width, init) chunks are already done (resume), how whole
widths are shared among worker processes, and when results are written. The pieces live next to it:

- ``width_config``    every choice, validated (memory included) before anything runs;
- ``width_engine``    the batched engine that trains one (width, init) chunk in one pass;
- ``width_reference`` the plain autograd loop the engine is checked against;
- ``width_results``   chunks, optima, slope fits, the files and resuming from them.

Figures and the markdown report are drawn by ``widelora.report.width_figures``, called by the command: the
library computes, the command presents.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from widelora.experiments.toy import ToyData, make_data
from widelora.experiments.width_config import DTYPES, WidthStudyConfig, lr_grid
from widelora.experiments.width_engine import (
    WidthCache,
    batch_schedule,
    build_cache,
    features,
    initial_adapters,
    train_chunk,
)
from widelora.experiments.width_reference import SingleRun, run_single
from widelora.experiments.width_results import (
    ChunkResult,
    Optimum,
    WidthStudyResult,
    chunk_path,
    find_optimum,
    fit_optima,
    load_chunk,
    load_results,
    study_optima,
    write_results,
)
from widelora.files import atomic_write_text

__all__ = [
    "ChunkResult",
    "Optimum",
    "SingleRun",
    "WidthCache",
    "WidthStudyConfig",
    "WidthStudyResult",
    "batch_schedule",
    "build_cache",
    "find_optimum",
    "fit_optima",
    "initial_adapters",
    "load_results",
    "lr_grid",
    "run_single",
    "run_width_study",
    "train_chunk",
]


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("[bold]width study[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    prog.start()
    prog.add_task("", total=total)
    return prog


def _run_chunks(
    config: WidthStudyConfig,
    data: ToyData,
    todo: list[tuple[int, str]],
    out: Path | None,
    advance: Any = None,
) -> dict[tuple[int, str], ChunkResult]:
    """Train the listed (width, init) chunks, one width's cache at a time; write each chunk as it finishes.

    ``advance(k)`` receives progress in units of steps × width (roughly proportional to compute).
    """
    dtype = DTYPES[config.dtype]
    chunks: dict[tuple[int, str], ChunkResult] = {}
    for width in dict.fromkeys(w for w, _ in todo):
        cache = build_cache(config, data, width)
        for init in [i for w, i in todo if w == width]:
            A0s, B0s, u_tr, u_te = [], [], [], []
            moved = False
            for si, seed in enumerate(config.seeds):
                a0, b0, w_h = initial_adapters(config, data, cache.frozen[si], init, seed)
                A0s.append(a0), B0s.append(b0)
                if w_h is not None:  # the scheme moved W_h (PiSSA, LoRA-GA): u must be recomputed
                    moved = True
                    u_tr.append(features(data.x_train.to(dtype), cache.frozen[si], w_h)[1])
                    u_te.append(features(data.x_test.to(dtype), cache.frozen[si], w_h)[1])
                else:
                    u_tr.append(cache.u_train[si]), u_te.append(cache.u_test[si])
            step_cb = (lambda k, _w=width: advance(k * _w)) if advance is not None else None
            chunk = train_chunk(
                config,
                cache,
                data,
                torch.stack(A0s),
                torch.stack(B0s),
                init=init,
                u_train=torch.stack(u_tr) if moved else None,
                u_test=torch.stack(u_te) if moved else None,
                on_step=step_cb,
            )
            chunks[(width, init)] = chunk
            if out is not None:
                atomic_write_text(chunk_path(out, width, init), json.dumps(chunk.to_json()))
        del cache
    return chunks


def _study_data(config: WidthStudyConfig) -> ToyData:
    return make_data(
        config.d,
        config.teacher_width,
        config.teacher_rank,
        config.n_train,
        config.n_test,
        config.data_seed,
        DTYPES[config.dtype],
    )


def _worker(config_dict: dict, out: str, todo: list, counter: Any, errors: Any) -> None:
    """Subprocess entry: one thread, its share of the widths, chunks written to ``out``."""
    try:
        config = WidthStudyConfig.from_dict(config_dict)
        torch.set_num_threads(config.threads or 1)

        def advance(k: float) -> None:
            with counter.get_lock():
                counter.value += k

        _run_chunks(config, _study_data(config), [tuple(t) for t in todo], Path(out), advance)
    except BaseException:  # report to the parent, which raises
        import traceback

        errors.put(traceback.format_exc())
        raise


def _partition(todo: list[tuple[int, str]], workers: int) -> list[list[tuple[int, str]]]:
    """Whole widths to workers, largest first to the least loaded (a width's cache is built once)."""
    by_width: dict[int, list[tuple[int, str]]] = {}
    for w, i in todo:
        by_width.setdefault(w, []).append((w, i))
    loads = [0.0] * workers
    parts: list[list[tuple[int, str]]] = [[] for _ in range(workers)]
    for w in sorted(by_width, key=lambda w: -w * len(by_width[w])):
        k = loads.index(min(loads))
        parts[k].extend(by_width[w])
        loads[k] += w * len(by_width[w])
    return [p for p in parts if p]


def _run_parallel(
    config: WidthStudyConfig, todo: list[tuple[int, str]], out: Path | None, progress: bool
) -> dict[tuple[int, str], ChunkResult]:
    """Run the chunks in ``config.workers`` processes (1 torch thread each); chunks return through files."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="widelora-width-")
        out = Path(tmp.name)
    counter, errors = ctx.Value("d", 0.0), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(config.to_dict(), str(out), part, counter, errors), daemon=True)
        for part in _partition(todo, config.workers)
    ]
    prog = _progress(progress, sum(config.steps * w for w, _ in todo))
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            if prog is not None:
                prog.update(prog.task_ids[0], completed=counter.value)
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    finally:
        for p in procs:
            if p.is_alive() and any(q.exitcode not in (None, 0) for q in procs):
                p.terminate()
            p.join()
        if prog is not None:
            prog.stop()
    if any(p.exitcode != 0 for p in procs):
        msg = errors.get() if not errors.empty() else f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"a width-study worker failed:\n{msg}")
    chunks = {}
    for w, i in todo:
        chunk = load_chunk(chunk_path(out, w, i), config)
        if chunk is None:
            raise RuntimeError(f"worker finished but chunk w{w}_{i} is missing in {out}")
        chunks[(w, i)] = chunk
    if tmp is not None:
        tmp.cleanup()
    return chunks


def run_width_study(
    config: WidthStudyConfig,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = True,
) -> WidthStudyResult:
    """Run (or resume) the study; write chunks, results.csv, optima.csv and summary.json into ``out_dir``.

    With ``resume`` (the default) a chunk already in ``out_dir/chunks`` from the same configuration is loaded,
    not recomputed; a chunk from a different configuration is recomputed and overwritten. Figures and the
    report are ``widelora.report.width_figures.write_figures_and_report(result)``.
    """
    if not isinstance(config, WidthStudyConfig):
        raise TypeError(f"config: expected a WidthStudyConfig, got {type(config).__name__}")
    from widelora.methods.init import get_scheme

    for init in config.inits:  # before anything is written: the ValueError lists the registered schemes
        get_scheme(init)
    t_start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or 1)  # restored below: a library call must not change the caller's
    try:
        return _run_study(config, out, progress, resume, t_start)
    finally:
        torch.set_num_threads(prev_threads)


def _run_study(
    config: WidthStudyConfig, out: Path | None, progress: bool, resume: bool, t_start: float
) -> WidthStudyResult:
    chunks: dict[tuple[int, str], ChunkResult] = {}
    todo: list[tuple[int, str]] = []
    for width in config.widths:
        for init in config.inits:
            done = load_chunk(chunk_path(out, width, init), config) if (out is not None and resume) else None
            if done is not None:
                chunks[(width, init)] = done
            else:
                todo.append((width, init))
    if todo and config.workers > 1 and len({w for w, _ in todo}) > 1:
        chunks.update(_run_parallel(config, todo, out, progress))
    elif todo:
        prog = _progress(progress, sum(config.steps * w for w, _ in todo))
        advance = (lambda k: prog.advance(prog.task_ids[0], k)) if prog is not None else None
        try:
            chunks.update(_run_chunks(config, _study_data(config), todo, out, advance))
        finally:
            if prog is not None:
                prog.stop()

    optima = study_optima(config, chunks)
    result = WidthStudyResult(
        config,
        chunks,
        optima,
        fit_optima(optima),
        time.perf_counter() - t_start,
        out,
        loaded=len(chunks) - len(todo),
    )
    if out is not None:
        write_results(result, out)
    return result

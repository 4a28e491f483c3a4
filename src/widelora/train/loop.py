"""The training loop: one RunConfig → a finetuned adapter, metrics, checkpoints, and a result dict.

Why a hand-written loop (and not only HF Trainer, see `widelora.train.hf`): sweeps need exact resume, a
`diverged` status instead of a traceback, identical data order for a given seed whatever the interruption, and
hooks for the feature monitor. Under `torchrun` the same code runs DDP; each rank sees `batch_size` examples
per micro-step and only rank 0 writes files.

Divergence (`widelora.divergence`): a non-finite loss, or a smoothed loss above `diverge_factor` × the first
loss, ends the run as `diverged`. The loss logged at step s+1 measures the weights of checkpoint s, so a
checkpoint is known good once the next loss stayed within the limit; on divergence the run rewinds to the
newest known-good checkpoint and deletes the later ones (they hold blown-up weights)."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from widelora.divergence import DivergenceRule, DivergenceTracker
from widelora.features import FeatureMonitor
from widelora.lora.io import save_adapter
from widelora.train.cache import StartupCache
from widelora.train.checkpoint import (
    checkpoint_steps,
    prune_checkpoints,
    resume_latest,
    rewind_to,
    save_checkpoint,
)
from widelora.train.config import RunConfig
from widelora.train.distributed import Processes
from widelora.train.evaluation import evaluate
from widelora.train.metrics import MetricsLog, group_learning_rates, monitor_stats
from widelora.train.run import Run, build_run
from widelora.train.rundir import RunFolder, file_errors
from widelora.train.trackers import open_tracker

MetricsCallback = Callable[[int, dict], None]


@dataclass
class Progress:
    """Where the run stands; everything here is checkpointed, so a resumed run continues exactly."""

    tracker: DivergenceTracker
    step: int = 0  # optimizer steps taken
    micro: int = 0  # micro-batches consumed
    last_ok: int = 0  # the last step whose loss stayed within the divergence limit
    before: dict[str, float] = field(default_factory=dict)  # held-out numbers before training

    def within_limit(self, loss: float) -> bool:
        initial = self.tracker.initial
        return math.isfinite(loss) and (
            initial is None or initial <= 0 or loss <= self.tracker.rule.limit(initial)
        )

    def good_checkpoint(self, steps: list[int]) -> int:
        """The newest checkpoint whose weights produced a loss within the limit (step 0 at worst)."""
        return max([s for s in steps if s < max(self.last_ok, 1)], default=0)

    def state(self) -> dict[str, Any]:
        return {"before": self.before, "divergence": self.tracker.state_dict(), "last_ok": self.last_ok}

    def load(self, state: dict[str, Any]) -> None:
        self.step, self.micro, self.before = state["step"], state["micro"], state.get("before", {})
        self.tracker.load_state_dict(state.get("divergence") or {})
        self.last_ok = int(state.get("last_ok", self.step))


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike,
    on_metrics: MetricsCallback | None = None,
    resume: bool = True,
    cache: StartupCache | None = None,
) -> dict[str, Any]:
    """Run (or resume) one finetuning run in `run_dir`; returns the result dict (also written to result.json).
    `cache` keeps the loaded model and data for the next run in this process (`widelora.train.cache`)."""
    cfg.validate()
    procs = Processes.start(cfg.device)
    try:
        folder = RunFolder(run_dir, cfg, resume=resume, writer=procs.main)
        with folder:
            with file_errors(folder.path):
                finished = folder.finished_result()
            if finished is not None:
                return finished
            try:
                with file_errors(folder.path), contextlib.ExitStack() as closing:
                    return _train(cfg, folder, procs, on_metrics, closing, cache)
            except Exception as exc:
                folder.record_failure(exc)
                raise
    finally:
        procs.close()


def _train(
    cfg: RunConfig,
    folder: RunFolder,
    procs: Processes,
    on_metrics: MetricsCallback | None,
    closing: contextlib.ExitStack,
    cache: StartupCache | None,
) -> dict:
    t_start = time.time()
    folder.write_config()
    run = build_run(cfg, procs, cache=cache)
    progress = Progress(DivergenceRule(cfg.diverge_factor, cfg.diverge_smoothing).tracker())
    resumed = resume_latest(folder.path, run.model, run.optimizer, run.scheduler) if folder.resume else None
    if resumed is not None:
        progress.load(resumed[1])
        if resumed[1].get("scaler"):
            run.scaler.load_state_dict(resumed[1]["scaler"])
    log = MetricsLog(folder.path, procs.main, keep_until=progress.step if resumed else None)
    reporter = open_tracker(cfg.report_to, folder.path, progress.step, enabled=procs.main)
    closing.callback(reporter.close)

    def emit(row: dict) -> None:
        if procs.main:
            log.write(row)
            reporter.log(row)
            if on_metrics is not None:
                on_metrics(row["step"], row)

    def checkpoint() -> None:
        if procs.main:
            extra = {
                **progress.state(),
                "targets": run.targets,
                "total_steps": run.total,
                "setup": run.setup.as_dict(),
                "scaler": run.scaler.state_dict(),
            }
            save_checkpoint(
                folder.path, run.model, run.optimizer, run.scheduler, progress.step, progress.micro, extra
            )
            prune_checkpoints(
                folder.path, cfg.keep_checkpoints, good_upto=progress.last_ok - 1, current=progress.step
            )

    if resumed is None:
        with run.precision():
            progress.before = evaluate(run.model, run.eval_loader(cfg.eval_split), cfg.task, procs.device)
        emit({"step": 0, "kind": "eval", "split": cfg.eval_split, **progress.before})
        checkpoint()

    net = nn.parallel.DistributedDataParallel(run.model) if procs.world > 1 else run.model
    monitor = FeatureMonitor(run.model, every=cfg.monitor_every).attach() if cfg.monitor else None
    bar = _progress_bar(cfg, procs.main, run.total, progress.step)
    status, error, train_loss, tok_rate = "done", None, float("nan"), 0.0
    try:
        while progress.step < run.total:
            t0 = time.time()
            train_loss, tokens = _forward_backward(run, net, progress)
            step, lr = progress.step + 1, run.scheduler.get_last_lr()[0]
            group_lrs = group_learning_rates(run.optimizer)  # the rates this step uses
            reason = progress.tracker.update(train_loss)
            if progress.within_limit(train_loss):
                progress.last_ok = step
            if reason is None:
                run.scaler.unscale_(run.optimizer)  # float16: clip the true gradients (a no-op otherwise)
                grad_norm = _clip(run, cfg.max_grad_norm)
                run.scaler.step(run.optimizer)  # float16: skipped when a gradient overflowed
                run.scaler.update()
                _advance(run.scheduler)
                progress.step = step
                if not all(bool(torch.isfinite(p).all()) for p in run.trainable()):
                    reason = "the adapter weights became non-finite"
            if reason is not None:
                status = "diverged"
                error = _diverge(folder, progress, procs, reason, step, lr)
                emit({"step": step, "kind": "train", "loss": train_loss, "lr": lr})
                emit({"step": step, "kind": "status", "status": status, "reason": error})
                break
            tok_rate = tokens * procs.world / max(1e-9, time.time() - t0)
            if monitor is not None and (records := monitor.step(step)) and procs.main:
                log.write_monitor([r.as_row() for r in records])
                emit({"step": step, "kind": "monitor", **monitor_stats(monitor, records)})
            if step % cfg.log_every == 0 or step == run.total:
                emit({"step": step, "kind": "train", "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tok_rate, **group_lrs})  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_rate:.0f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total:
                with run.precision(), monitor.paused() if monitor is not None else contextlib.nullcontext():
                    val = evaluate(run.model, run.eval_loader("val"), cfg.task, procs.device)
                emit({"step": step, "kind": "eval", "split": "val", **val})
                checkpoint()
            elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.total:
                checkpoint()
    finally:
        bar.close()
        if monitor is not None:
            monitor.detach()

    final: dict[str, Any] = {"step": progress.step, "train_loss": train_loss, "tokens_per_s": tok_rate}
    final.update({f"before_{k}": v for k, v in progress.before.items()})
    if status == "done":
        with run.precision():
            after = evaluate(run.model, run.eval_loader(cfg.eval_split), cfg.task, procs.device)
        final.update(after)
        emit({"step": progress.step, "kind": "eval", "split": cfg.eval_split, **after})
        progress.last_ok = progress.step + 1  # a finished run's last weights are its result
        checkpoint()
        if procs.main:
            save_adapter(run.model, folder.path / "adapter")
    final["wall_s"] = time.time() - t_start
    steps = checkpoint_steps(folder.path)
    result = {
        "status": status,
        "final": final,
        "error": error,
        "checkpoint": str(folder.path / "checkpoints" / f"step-{steps[-1]:06d}")
        if procs.main and steps
        else None,
        "run_dir": str(folder.path),
        "targets": run.targets,
        "setup": run.setup.as_dict(),
    }
    if procs.main:
        log.write_csv()
        folder.write_result(result)
        if error:
            print(f"widelora: run diverged: {error}", flush=True)
    return result


def _forward_backward(run: Run, net: nn.Module, progress: Progress) -> tuple[float, int]:
    """One optimizer step's worth of micro-batches: gradients accumulated, the mean loss over ranks
    returned."""
    cfg = run.cfg
    run.optimizer.zero_grad(set_to_none=True)
    losses, tokens = [], 0
    for k in range(cfg.grad_accum):
        batch = run.micro_batch(progress.micro)
        progress.micro += 1
        last = k == cfg.grad_accum - 1
        with net.no_sync() if run.procs.world > 1 and not last else contextlib.nullcontext(), run.precision():
            loss = net(**batch).loss
            run.scaler.scale(loss / cfg.grad_accum).backward()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    return run.procs.mean(sum(losses) / len(losses)), tokens


def _advance(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Step the schedule, also after a step the float16 scaler skipped (the schedule counts steps taken or
    skipped, so a run's length and lr curve do not depend on overflows); torch's warning about a scheduler
    stepping before its optimizer does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def _clip(run: Run, max_norm: float | None) -> float | None:
    return torch.nn.utils.clip_grad_norm_(run.trainable(), max_norm).item() if max_norm else None


def _diverge(
    folder: RunFolder, progress: Progress, procs: Processes, reason: str, step: int, lr: float
) -> str:
    """Rewind the run folder to its newest known-good checkpoint; returns the message for the result."""
    kept = "its last good checkpoint"
    if procs.main:
        good = progress.good_checkpoint(checkpoint_steps(folder.path))
        kept = f"its last good checkpoint {rewind_to(folder.path, good)} (step {good})"
    return f"{reason} at step {step} (lr={lr:.3g}); the run stopped and kept {kept}. Lower the learning rate."


def _progress_bar(cfg: RunConfig, main: bool, total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not (cfg.progress and main), desc="finetune", unit="step",
                dynamic_ncols=True)  # fmt: skip

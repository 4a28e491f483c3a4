"""The training loop: one RunConfig → a finetuned adapter, metrics, checkpoints, and a result dict.

Why a hand-written loop (and not only HF Trainer, see `widelora.train.hf`): sweeps need exact resume, a
`diverged` status instead of a traceback, identical data order for a given seed whatever the interruption, and
hooks for the feature monitor — all in ~300 readable lines. Under `torchrun` the same code runs DDP (gloo on CPU,
nccl on GPU); each rank sees `batch_size` examples per micro-step and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from widelora.files import atomic_write_text
from widelora.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from widelora.train.config import RunConfig

MetricsCallback = Callable[[int, dict], None]
# Keys that may differ between a run and its resumption without changing the numbers.
_RESUME_FREE = {
    "progress",
    "out_dir",
    "device",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "monitor_every",
    "keep_checkpoints",
}
_HEADS = ("classifier", "score")


# ------------------------------------------------------------------------------------------------- distributed
def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 when not distributed)."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def _setup(cfg: RunConfig) -> tuple[torch.device, int, int]:
    rank, world, local = dist_env()
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local}" if want == "cuda" and world > 1 else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _OWN_GROUP.append(True)
    return device, rank, world


_OWN_GROUP: list[bool] = []  # non-empty when train() created the process group (and so must destroy it)


def _teardown(world: int) -> None:
    if world > 1 and _OWN_GROUP and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _OWN_GROUP.clear()


def _mean_across(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


# ------------------------------------------------------------------------------------------------- schedule
def warmup_steps(cfg: RunConfig, total: int) -> int:
    return round(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)


def make_schedule(cfg: RunConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `s`: linear warmup from 1/(w+1), then linear/cosine/constant."""
    warm = min(warmup_steps(cfg, total), total)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if cfg.decay == "constant":
            return 1.0
        progress = (s - warm) / max(1, total - warm)
        if cfg.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


# ------------------------------------------------------------------------------------------------- data order
class BatchOrder:
    """Micro-batch `m` → example indices for this rank. A pure function of (seed, m), so resume needs no state:
    epoch e uses the permutation seeded by (seed, e); the last incomplete global batch of an epoch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(
                f"the training set has {n} examples, fewer than batch_size*world_size = "
                f"{batch_size * world}; lower batch_size or add data"
            )
        self._epoch, self._perm = -1, None

    def indices(self, m: int) -> list[int]:
        epoch, pos = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        start = (pos * self.world + self.rank) * self.bs
        return self._perm[start : start + self.bs].tolist()


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, task: str, device: torch.device) -> dict[str, float]:
    """Held-out loss and perplexity (causal LM, token-weighted) or accuracy (classification)."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for batch in loader:
        batch = _move(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
        else:
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += labels.shape[0]
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set is empty")
    loss = total / count
    if task == "causal_lm":
        return {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
    return {"eval_loss": loss, "accuracy": correct / count}


# ------------------------------------------------------------------------------------------------- building
def _head_modules(model: nn.Module, cfg: RunConfig) -> list[str]:
    if cfg.trainable:
        return list(cfg.trainable)
    if cfg.task != "classification":
        return []
    children = dict(model.named_children())
    return [h for h in _HEADS if h in children]


def _resolve_targets(cfg: RunConfig, model: nn.Module, batches: list[dict]) -> list[str] | str:
    """`targets: auto` → PLoP placement (widelora.methods.placement.place) on a few training batches."""
    if cfg.targets != "auto":
        return cfg.targets
    try:
        from widelora.methods.placement import place
    except ImportError as exc:
        raise ValueError(
            "targets='auto' needs widelora.methods.placement (PLoP), which is not available"
        ) from exc
    result = place(model, batches, progress=False)
    return list(result.targets)


def build(cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1):
    """Tokenizer, data, model with adapters attached and initialized, optimizer, schedule, batch order."""
    import widelora as wl
    from widelora.data import prepare
    from widelora.methods.init import get_scheme
    from widelora.models import load_model, load_tokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(
        cfg.dataset,
        tokenizer,
        task=cfg.task,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        max_train=cfg.max_train_examples,
        max_eval=cfg.eval_examples,
        text_field=cfg.text_field,
        label_field=cfg.label_field,
    )
    dtype = getattr(torch, cfg.dtype)
    model, _ = load_model(cfg.model, task=cfg.task, num_labels=data.num_labels, dtype=dtype, seed=cfg.seed)
    model.to(device)
    order = BatchOrder(len(data.train), cfg.batch_size, cfg.seed, rank, world)
    probe = [
        _move(data.collate([data.train[i] for i in order.indices(m)]), device)
        for m in range(min(cfg.init_batches, order.per_epoch))
    ]
    targets = _resolve_targets(cfg, model, probe)
    needs_data = get_scheme(cfg.init).needs_data
    wl.attach(
        model,
        targets=targets,
        rank=cfg.rank,
        alpha=cfg.alpha,
        init="init_a" if needs_data else cfg.init,
        scaling=cfg.scaling,
        dropout=cfg.dropout,
        seed=cfg.seed,
        trainable=_head_modules(model, cfg),
    )
    if needs_data:
        wl.initialize(model, cfg.init, seed=cfg.seed, batches=probe, progress=bool(cfg.progress) and rank == 0)
    if dtype != torch.float32:  # keep the adapter (and the optimizer state) in fp32
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    optimizer = wl.create_optimizer(
        model,
        lr=cfg.lr,
        method=cfg.method,
        ratio=cfg.ratio,
        weight_decay=cfg.weight_decay,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    total = (
        cfg.steps
        if cfg.steps is not None
        else max(1, math.ceil(cfg.epochs * order.per_epoch / cfg.grad_accum))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(cfg, total))
    return tokenizer, data, model, optimizer, scheduler, order, total, targets


# ------------------------------------------------------------------------------------------------- the loop
class _Log:
    """metrics.jsonl (appended, flushed) + metrics.csv (rewritten at the end); rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, keep_until: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.rows: list[dict] = []
        if (
            enabled and self.path.is_file() and keep_until is not None
        ):  # resume: drop rows past the checkpoint
            self.rows = [
                r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= keep_until
            ]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
            mon = run_dir / "monitor.jsonl"
            if mon.is_file():
                kept = [r for r in mon.read_text().splitlines() if json.loads(r)["step"] <= keep_until]
                atomic_write_text(mon, "".join(r + "\n" for r in kept))
        elif enabled:
            atomic_write_text(self.path, "")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def write_csv(self) -> None:
        if not self.enabled or not self.rows:
            return
        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        lines = [",".join(keys)] + [
            ",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in self.rows
        ]
        atomic_write_text(self.path.with_suffix(".csv"), "\n".join(lines) + "\n")


def _check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in _RESUME_FREE and json.dumps(saved.get(k)) != json.dumps(now[k]))
    if diff:
        raise ValueError(
            f"run_dir {str(run_dir)!r} holds a run with a different config (keys {diff}); "
            "resume with the same config or use a new run_dir"
        )


def train(
    cfg: RunConfig, run_dir: str | os.PathLike, on_metrics: MetricsCallback | None = None, resume: bool = True
) -> dict[str, Any]:
    """Run (or resume) one finetuning run in `run_dir`; returns the result dict (also written to result.json)."""
    cfg.validate()
    run_dir = Path(run_dir)
    device, rank, world = _setup(cfg)
    main = rank == 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        _check_resume_config(run_dir, cfg)
        done = run_dir / "result.json"
        if done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("status") in ("done", "diverged"):
                _teardown(world)
                return previous
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
    t_start = time.time()
    _tokenizer, data, model, optimizer, scheduler, order, total, targets = build(cfg, device, rank, world)
    from widelora.data import make_loader

    eval_loader = {
        s: make_loader(getattr(data, s), cfg.eval_batch_size or cfg.batch_size, data.collate)
        for s in ("val", "test")
    }
    step, micro, before = 0, 0, {}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, micro, before = state["step"], state["micro"], state.get("before", {})
    log = _Log(run_dir, main, step if ckpt is not None else None)

    def emit(row: dict) -> None:
        if main:
            log.write(row)
            if on_metrics is not None:
                on_metrics(row["step"], row)

    if ckpt is None:
        before = evaluate(model, eval_loader[cfg.eval_split], cfg.task, device)
        emit({"step": 0, "kind": "eval", "split": cfg.eval_split, **before})
    extra = {"before": before, "targets": targets, "total_steps": total}

    def checkpoint() -> str | None:
        return (
            str(
                save_checkpoint(
                    run_dir, model, optimizer, scheduler, step, micro, extra, keep=cfg.keep_checkpoints
                )
            )
            if main
            else None
        )

    last_ckpt = str(ckpt) if ckpt is not None else checkpoint()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    monitor = _make_monitor(cfg, model)
    bar = _progress(cfg, main, total, step)
    status, error, train_loss, tok_rate = "done", None, float("nan"), 0.0
    try:
        while step < total:
            t0, tokens, losses = time.time(), 0, []
            optimizer.zero_grad(set_to_none=True)
            for k in range(cfg.grad_accum):
                batch = _move(data.collate([data.train[i] for i in order.indices(micro)]), device)
                micro += 1
                sync = world == 1 or k == cfg.grad_accum - 1
                ctx = net.no_sync() if not sync else _null()
                with ctx:
                    loss = net(**batch).loss
                    (loss / cfg.grad_accum).backward()
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum())
            train_loss = _mean_across(sum(losses) / len(losses), world, device)
            if not math.isfinite(train_loss):
                status = "diverged"
                error = (
                    f"loss became {train_loss} at step {step + 1} (lr={scheduler.get_last_lr()[0]:.3g}); "
                    f"the run stopped; last good checkpoint: {last_ckpt}. Lower the learning rate."
                )
                emit({"step": step + 1, "kind": "train", "loss": train_loss})
                break
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
                if cfg.max_grad_norm
                else None
            )
            lr_used = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            if not all(
                bool(torch.isfinite(p).all()) for p in params
            ):  # weights blew up: never checkpoint them
                status = "diverged"
                error = (
                    f"adapter weights became non-finite at step {step} (lr={lr_used:.3g}); the run stopped; "
                    f"last good checkpoint: {last_ckpt}. Lower the learning rate."
                )
                emit({"step": step, "kind": "train", "loss": train_loss, "lr": lr_used})
                break
            tok_rate = tokens * world / max(1e-9, time.time() - t0)
            if monitor is not None:
                records = monitor.step(step)
                if records and main:
                    with open(run_dir / "monitor.jsonl", "a", encoding="utf-8") as fh:
                        fh.writelines(json.dumps(r.as_row()) + "\n" for r in records)
                    emit({"step": step, "kind": "monitor", **monitor_row(records)})
            if step % cfg.log_every == 0 or step == total:
                emit(
                    {
                        "step": step,
                        "kind": "train",
                        "loss": train_loss,
                        "lr": lr_used,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tok_rate,
                    }
                )
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_rate:.0f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                with _paused(monitor):
                    val = evaluate(model, eval_loader["val"], cfg.task, device)
                emit({"step": step, "kind": "eval", "split": "val", **val})
                last_ckpt = checkpoint() or last_ckpt
            elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                last_ckpt = checkpoint() or last_ckpt
    finally:
        bar.close()
        if monitor is not None:
            monitor.detach()
    final: dict[str, Any] = {"step": step, "train_loss": train_loss, "tokens_per_s": tok_rate}
    final.update({f"before_{k}": v for k, v in before.items()})
    if status == "done":
        after = evaluate(model, eval_loader[cfg.eval_split], cfg.task, device)
        final.update(after)
        emit({"step": step, "kind": "eval", "split": cfg.eval_split, **after})
        last_ckpt = checkpoint() or last_ckpt
        if main:
            from widelora.lora.io import save_adapter

            save_adapter(model, run_dir / "adapter")
    final["wall_s"] = time.time() - t_start
    result = {
        "status": status,
        "final": final,
        "error": error,
        "checkpoint": last_ckpt,
        "run_dir": str(run_dir),
        "targets": targets,
    }
    if main:
        log.write_csv()
        atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1))
        if error:
            print(f"widelora: run diverged: {error}", flush=True)
    _teardown(world)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(cfg: RunConfig, main: bool, total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=start,
        disable=not (cfg.progress and main),
        desc="finetune",
        unit="step",
        dynamic_ncols=True,
    )


def _make_monitor(cfg: RunConfig, model: nn.Module):
    """The feature monitor (widelora.monitor.FeatureMonitor) when `cfg.monitor`; None otherwise."""
    if not cfg.monitor:
        return None
    from widelora.monitor import FeatureMonitor

    return FeatureMonitor(model, every=cfg.monitor_every).attach()


def _paused(monitor):
    return monitor.paused() if monitor is not None else _null()


def monitor_row(records: list) -> dict[str, float]:
    """Layer-averaged monitor statistics of one recorded step (per-layer rows go to monitor.jsonl)."""

    def mean(key: str) -> float | None:
        vals = [getattr(r, key) for r in records if getattr(r, key) is not None]
        return sum(vals) / len(vals) if vals else None

    row = {k: mean(k) for k in ("z_a", "z_b", "delta1", "delta2", "delta3")}
    row["z_a_ratio"] = sum(r.z_a_ratio for r in records) / len(records)
    if row["delta1"] is not None and row["delta2"] is not None and row["delta1"] + row["delta2"] > 0:
        row["delta2_share"] = row["delta2"] / (row["delta1"] + row["delta2"])
    return row

"""A cheap sweep trial function with the full contract (metrics, checkpoints, resume, divergence).

A frozen linear map ``W`` (width × width) gets a LoRA pair and learns a planted low-rank change from a fixed
data set; plain-tensor Adam (so the checkpoint is a few tensors). It runs in milliseconds, so sweep logic —
stores, crash recovery, backends — can be tested on it without a language model. Sweeps know it as ``trial_fn:
toy``. Divergence is judged by the library's one rule (`widelora.divergence.DivergenceRule`), as in real
training.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from widelora.divergence import DivergenceRule
from widelora.files import atomic_write

CONFIG_KEYS = frozenset(
    {
        "lr",
        "init",
        "method",
        "ratio",
        "rank",
        "width",
        "seed",
        "steps",
        "eval_every",
        "sleep",
        "fail",
        "n_train",
        "exit",
    }
)
INITS = ("init_a", "init_b", "kaiming")
METHODS = ("adamw", "loraplus")
CHECKPOINT = "toy_checkpoint.safetensors"


def run_toy_trial(config: dict[str, Any], run_dir: Path, on_metrics: Any = None) -> dict[str, Any]:
    """Train the toy LoRA pair, resuming from ``run_dir``'s checkpoint; each call adds a starts.log line."""
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}; valid: {sorted(CONFIG_KEYS)}")
    if config.get("fail"):
        raise RuntimeError(str(config["fail"]))
    if config.get("exit") is not None:  # simulates a hard crash of the worker (segfault, OOM kill)
        os._exit(int(config["exit"]))
    init = config.get("init", "init_a")
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not one of {', '.join(INITS)}")
    method = config.get("method", "adamw")
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    lr = float(config.get("lr", 1e-2))
    ratio = float(config.get("ratio", 16.0)) if method == "loraplus" else 1.0
    rank, width = int(config.get("rank", 4)), int(config.get("width", 32))
    steps, every = int(config.get("steps", 50)), int(config.get("eval_every", 10))
    seed, n = int(config.get("seed", 0)), int(config.get("n_train", 256))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "starts.log", "a") as fh:
        fh.write(f"{time.time()}\n")

    task = torch.Generator().manual_seed(1234)  # the task is fixed; the seed only changes init
    W = torch.randn(width, width, generator=task) / math.sqrt(width)
    delta = torch.randn(width, 2, generator=task) @ torch.randn(2, width, generator=task) / width
    x = torch.randn(n, width, generator=task)
    y = x @ (W + delta).T
    xt = torch.randn(n, width, generator=task)
    yt = xt @ (W + delta).T

    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(rank, width)
    B = torch.zeros(width, rank)
    if init == "init_a":
        A = torch.randn(rank, width, generator=g) / math.sqrt(width)
    elif init == "init_b":
        B = torch.randn(width, rank, generator=g) / math.sqrt(rank)
    else:
        A = (torch.rand(rank, width, generator=g) * 2 - 1) / math.sqrt(width)
    state = {
        "A": A,
        "B": B,
        "mA": torch.zeros_like(A),
        "vA": torch.zeros_like(A),
        "mB": torch.zeros_like(B),
        "vB": torch.zeros_like(B),
    }
    step = 0
    divergence = DivergenceRule().tracker()
    ckpt = run_dir / CHECKPOINT
    if ckpt.exists():
        state = load_file(str(ckpt))
        meta = _meta(ckpt)
        step = int(meta["step"])
        divergence.load_state_dict(json.loads(meta.get("divergence", "{}")))

    def loss_of(A: torch.Tensor, B: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return ((xs @ (W + B @ A).T - ys) ** 2).mean()

    b1, b2, eps = 0.9, 0.999, 1e-8
    sleep = float(config.get("sleep", 0.0))
    while step < steps:
        A = state["A"].clone().requires_grad_(True)
        B = state["B"].clone().requires_grad_(True)
        loss = loss_of(A, B, x, y)
        why = divergence.update(loss.item())
        if why is not None:
            return {
                "status": "diverged",
                "final": {"train_loss": float("inf"), "step": step},
                "error": f"diverged at step {step}: {why}",
                "checkpoint": str(ckpt) if ckpt.exists() else None,
            }
        gA, gB = torch.autograd.grad(loss, (A, B))
        step += 1
        for name, grad, mult in (("A", gA, 1.0), ("B", gB, ratio)):
            m = state["m" + name].mul_(b1).add_(grad, alpha=1 - b1)
            v = state["v" + name].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
            state[name] = state[name] - lr * mult * update
        if sleep:
            time.sleep(sleep)
        if step % every == 0 or step == steps:
            with torch.no_grad():
                test = loss_of(state["A"], state["B"], xt, yt).item()
            if on_metrics is not None:
                on_metrics(step, {"train_loss": loss.item(), "test_loss": test})
            _save(state, {"step": str(step), "divergence": json.dumps(divergence.state_dict())}, ckpt)
    with torch.no_grad():
        train, test = (
            loss_of(state["A"], state["B"], x, y).item(),
            loss_of(state["A"], state["B"], xt, yt).item(),
        )
    if not math.isfinite(test):
        return {
            "status": "diverged",
            "final": {"test_loss": test},
            "error": "non-finite test loss",
            "checkpoint": str(ckpt),
        }
    return {
        "status": "done",
        "final": {"train_loss": train, "test_loss": test, "step": step},
        "error": None,
        "checkpoint": str(ckpt),
    }


def _save(state: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    atomic_write(
        path, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    )


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}

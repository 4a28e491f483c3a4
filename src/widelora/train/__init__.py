"""widelora.train: finetune real models (loop, checkpoints, HF Trainer glue, DDP) behind one stable entry
point.

`run_trial(config, run_dir, on_metrics=None) -> dict` is the contract sweeps build on: it never raises for a
bad run; it returns `{"status": "done" | "diverged" | "failed", "final": {metric: value}, "error": str | None,
"checkpoint": str | None, ...}` and resumes from `run_dir`'s checkpoint when one is present.

Importing this package is light (the config and presets); the loop, and `widelora.train.hf` (HF Trainer glue,
which imports transformers' Trainer), load on first use.
"""

from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from widelora.errors import UserError
from widelora.train.checkpoint import latest_checkpoint
from widelora.train.config import NOT_GIVEN, RunConfig
from widelora.train.presets import PRESETS, build_config, load_config_file, preset

__all__ = [
    "NOT_GIVEN",
    "PRESETS",
    "RunConfig",
    "build_config",
    "load_config_file",
    "preset",
    "run_trial",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in ("hf", "loop"):
        return importlib.import_module(f"widelora.train.{name}")
    raise AttributeError(f"module 'widelora.train' has no attribute {name!r}")


def _as_config(config: dict | RunConfig) -> RunConfig:
    if isinstance(config, RunConfig):
        config.validate()
        return config
    if not isinstance(config, dict):
        raise UserError(f"config must be a dict or RunConfig; got {type(config).__name__}")
    data = dict(config)
    return build_config(preset_name=data.pop("preset", None), overrides=data)


def train(
    config: dict | RunConfig,
    run_dir: str | os.PathLike,
    on_metrics: Callable[[int, dict], None] | None = None,
    resume: bool = True,
    keep_loaded: bool = False,
) -> dict[str, Any]:
    """Like `run_trial` but lets exceptions propagate (for scripts and tests that want the traceback).
    `keep_loaded`: keep the loaded model and data in this process for the next run
    (`widelora.train.cache`)."""
    from widelora.train import loop
    from widelora.train.cache import shared_cache

    cache = shared_cache() if keep_loaded else None
    return loop.train(_as_config(config), run_dir, on_metrics=on_metrics, resume=resume, cache=cache)


def run_trial(
    config: dict | RunConfig, run_dir: str | Path, on_metrics: Callable[[int, dict], None] | None = None
) -> dict[str, Any]:
    """Run one trial to completion (or resume it); failures come back as `status="failed"`, never raised.

    The process keeps the loaded base model, tokenizer and data for the next trial that uses the same ones (a
    sweep worker's start-up is paid once; each trial still gets an exact copy: `widelora.train.cache`).

    `config`: a RunConfig, or a dict of RunConfig keys (missing keys take the defaults; a "preset" key picks
    the base; None is a value, e.g. `max_grad_norm: None` turns clipping off). `on_metrics(step, row)`
    receives every logged row (rows have a "kind": train / eval / monitor / status)."""
    try:
        return train(config, run_dir, on_metrics=on_metrics, resume=True, keep_loaded=True)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        result = {
            "status": "failed",
            "final": {},
            "error": f"{type(exc).__name__}: {exc}",
            "checkpoint": None,
            "run_dir": str(run_dir),
            "traceback": traceback.format_exc(),
        }
        try:
            ckpt = latest_checkpoint(run_dir)
            result["checkpoint"] = str(ckpt) if ckpt else None
        except OSError:
            pass
        return result

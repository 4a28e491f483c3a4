"""Checkpoints that resume bit-for-bit: trainable tensors, optimizer state, scheduler, RNG and counters.

Layout of `run_dir/checkpoints/step-000042/` (written to a temp folder, then renamed; `run_dir/checkpoints/latest`
names the newest complete one and is replaced atomically, so a crash never leaves a half-written checkpoint):
- `adapter/`             the PEFT-format adapter (`widelora.save_adapter`) — what users load elsewhere;
- `trainable.safetensors` the raw trainable parameters (exact, for resuming);
- `optimizer.safetensors` + `optimizer.json` the optimizer state tensors and its hyperparameters;
- `rng.safetensors`      torch CPU (and CUDA) RNG states;
- `state.json`           step, micro-batch counter, scheduler state, metrics so far.
No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from widelora.files import atomic_write_text

LATEST = "latest"
CKPT_DIR = "checkpoints"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "type": type(opt).__name__}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if meta.get("type") != type(opt).__name__:
        raise ValueError(f"checkpoint optimizer is {meta.get('type')}, this run uses {type(opt).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return None  # callables (lr lambdas) are rebuilt from the config, not stored


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    micro: int,
    extra: dict[str, Any] | None = None,
    keep: int = 1,
) -> Path:
    """Write a complete checkpoint for `step`; keep the newest `keep` of them. Returns its folder."""
    from widelora.lora.io import save_adapter

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_adapter(model, tmp / "adapter")
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(_json_safe(opt_meta)))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {
            "step": step,
            "micro": micro,
            "scheduler": _json_safe(scheduler.state_dict()),
            **(extra or {}),
        }
        (tmp / "state.json").write_text(json.dumps(_json_safe(state), indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(root / LATEST, final.name)
    olds = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != final.name)
    for old in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore tensors, optimizer, scheduler and RNG from `path`; returns its state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise ValueError(f"checkpoint {path} has parameters this model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device))
    _optimizer_from_files(
        optimizer,
        load_file(str(path / "optimizer.safetensors")),
        json.loads((path / "optimizer.json").read_text()),
    )
    sched = dict(state.get("scheduler") or {})
    sched.pop("lr_lambdas", None)
    scheduler.__dict__.update({k: v for k, v in sched.items()})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state

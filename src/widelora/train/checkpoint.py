"""Checkpoints that resume bit-for-bit: trainable tensors, optimizer state, scheduler, RNG and counters.

Layout of `run_dir/checkpoints/step-000042/` (written to a temp folder, then renamed;
`run_dir/checkpoints/latest` names the newest complete one and is replaced atomically, so a crash never leaves
a half-written checkpoint):
- `adapter/`             the PEFT-format adapter (`widelora.save_adapter`) — what users load elsewhere;
- `trainable.safetensors` the raw trainable parameters (exact, for resuming);
- `optimizer.safetensors` + `optimizer.json` the optimizer state tensors and its hyperparameters;
- `rng.safetensors`      torch CPU (and CUDA) RNG states;
- `state.json`           step, micro-batch counter, scheduler state, divergence tracker, metrics so far.
No pickle anywhere. Resuming never trusts one file blindly: a missing or dangling `latest`, or a corrupt
newest checkpoint, falls back to the newest checkpoint that reads completely (with a warning)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from widelora.errors import FileProblem
from widelora.files import atomic_write_text

LATEST = "latest"
CKPT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)


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


def _optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
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
    return {"state": state, "param_groups": groups}


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


# ------------------------------------------------------------------------------------------------- writing
def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    micro: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it. Returns its folder (pruning is the
    caller's choice: see `prune_checkpoints`)."""
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
    return final


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the checkpoint folders on disk, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    found = (_STEP_DIR.fullmatch(p.name) for p in root.iterdir()) if root.is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m)


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:06d}"


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, good_upto: int, current: int) -> None:
    """Keep the `keep` newest checkpoints at or before `good_upto` (known good) and every one after it up to
    `current` (not yet known good); checkpoints past `current` belong to an abandoned future and go."""
    steps = checkpoint_steps(run_dir)
    good = [s for s in steps if s <= good_upto]
    doomed = good[: max(0, len(good) - keep)] + [s for s in steps if s > current]
    for s in doomed:
        shutil.rmtree(step_dir(run_dir, s), ignore_errors=True)


def rewind_to(run_dir: str | os.PathLike, step: int) -> Path:
    """Make checkpoint `step` the latest and delete every later one (after a divergence: they hold blown-up
    weights)."""
    for s in checkpoint_steps(run_dir):
        if s > step:
            shutil.rmtree(step_dir(run_dir, s), ignore_errors=True)
    atomic_write_text(Path(run_dir) / CKPT_DIR / LATEST, step_dir(run_dir, step).name)
    return step_dir(run_dir, step)


# ------------------------------------------------------------------------------------------------- reading
def _candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders to try, best first: the one `latest` names, then the others newest first."""
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    named = []
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if target.is_dir() and _STEP_DIR.fullmatch(target.name):
            named = [target]
        else:
            print(
                f"widelora: warning: {pointer} names a missing checkpoint; using the newest one",
                file=sys.stderr,
            )
    others = [step_dir(run_dir, s) for s in reversed(checkpoint_steps(run_dir))]
    return named + [p for p in others if p not in named]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The best checkpoint folder to resume from (not yet checked for corruption), or None."""
    candidates = _candidates(run_dir)
    return candidates[0] if candidates else None


@dataclass
class _Staged:
    """A checkpoint read completely into memory and checked, before anything in the run changes."""

    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]


def _read(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> _Staged:
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("step"), int)
        or not isinstance(state.get("micro"), int)
    ):
        raise TypeError("state.json has no integer step / micro")
    trainable = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(trainable) - set(params))
    if missing:
        raise ValueError(f"it holds parameters this model lacks: {missing[:5]}")
    opt = _optimizer_state(
        optimizer,
        load_file(str(path / "optimizer.safetensors")),
        json.loads((path / "optimizer.json").read_text(encoding="utf-8")),
    )
    rng = load_file(str(path / "rng.safetensors"))
    if rng.get("cpu") is None or rng["cpu"].dtype != torch.uint8:
        raise ValueError("rng.safetensors holds no CPU RNG state")
    return _Staged(path, state, trainable, opt, rng)


def _apply(staged: _Staged, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in staged.trainable.items():
            params[name].copy_(tensor.to(params[name].device))
    optimizer.load_state_dict(staged.optimizer)
    sched = dict(staged.state.get("scheduler") or {})
    sched.pop("lr_lambdas", None)
    scheduler.__dict__.update(sched)
    torch.set_rng_state(staged.rng["cpu"])
    if "cuda" in staged.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(staged.rng["cuda"])


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore tensors, optimizer, scheduler and RNG from `path`; returns its state.json. A checkpoint that
    cannot be read completely is a FileProblem naming it, and leaves the run untouched."""
    path = Path(path)
    try:
        staged = _read(path, model, optimizer)
    except _UNREADABLE as exc:
        raise FileProblem(path, f"is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    _apply(staged, model, optimizer, scheduler)
    return staged.state


def resume_latest(
    run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest checkpoint that reads completely; None when the run has none.

    A corrupt newest checkpoint is skipped with a warning; when every checkpoint is corrupt, a FileProblem
    names them rather than silently starting again from step 0."""
    problems = []
    for path in _candidates(run_dir):
        try:
            staged = _read(path, model, optimizer)
        except _UNREADABLE as exc:
            problems.append(f"{path.name} ({type(exc).__name__}: {exc})")
            print(
                f"widelora: warning: checkpoint {path} cannot be read ({exc}); trying an older one",
                file=sys.stderr,
            )
            continue
        _apply(staged, model, optimizer, scheduler)
        return path, staged.state
    if problems:
        raise FileProblem(
            Path(run_dir) / CKPT_DIR,
            f"no checkpoint can be read: {'; '.join(problems)}",
            "delete the damaged run folder or resume from a copy",
        )
    return None

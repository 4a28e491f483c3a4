"""After training: a finished run folder → a merged model, a PEFT adapter, or the adapted model itself.

Why: a run folder holds widelora's own record of a run (config, checkpoints, metrics) and the adapter; people
deploy a plain transformers folder (every serving stack loads it, no widelora or PEFT needed) or a PEFT
adapter (to share, or to swap on one base). Both are exported from the same adapted model, loaded in float32
so the merge is exact: the merged model's logits equal the adapted model's to float32 rounding.

A run that has not finished has no `adapter/` yet; its newest checkpoint's adapter is used, and a line says
so. Output folders go through `widelora.files.claim_folder`: a user's non-empty folder is never written into.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import widelora as wl
from widelora import models
from widelora.errors import FileProblem, UserError
from widelora.files import claim_folder
from widelora.lora.adapter_file import read_adapter
from widelora.lora.layer import LoRALinear
from widelora.lora.modules import CLASSIFICATION_HEAD_NAMES

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainedRun:
    """A run's base model with its trained adapter attached (float32), its tokenizer and its config."""

    path: Path
    config: Any  # widelora.train.RunConfig
    model: nn.Module
    tokenizer: Any
    adapter: Path


def _run_config(run_dir: Path):
    from widelora.train.config import RunConfig
    from widelora.train.rundir import CONFIG, read_json

    if not run_dir.is_dir():
        raise FileProblem(run_dir, "is not a folder", "give the folder of a `widelora finetune` run")
    if not (run_dir / CONFIG).is_file():
        raise FileProblem(
            run_dir, f"has no {CONFIG}: it is not a widelora run folder", "give a finetune run's --out"
        )
    saved = read_json(run_dir / CONFIG)
    try:
        return RunConfig.from_dict(saved)
    except (UserError, TypeError) as exc:
        raise FileProblem(run_dir / CONFIG, f"is not a run config ({exc})") from None


def _adapter_folder(run_dir: Path) -> Path:
    from widelora.train.checkpoint import latest_checkpoint

    final = run_dir / "adapter"
    if (final / "adapter_config.json").is_file():
        return final
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not (checkpoint / "adapter" / "adapter_config.json").is_file():
        raise FileProblem(
            run_dir, "holds no trained adapter yet (no adapter/ and no checkpoint)", "train it first"
        )
    print(
        f"widelora: {run_dir} has not finished; using its newest checkpoint {checkpoint.name}",
        file=sys.stderr,
    )
    return checkpoint / "adapter"


def _num_labels(adapter: Path) -> int:
    """A classifier's label count, read from its trained head in the adapter (`modules_to_save`)."""
    extras = read_adapter(adapter).extras
    for head in CLASSIFICATION_HEAD_NAMES:
        for key in (f"{head}.weight", f"{head}.out_proj.weight"):
            if key in extras and extras[key].ndim == 2:
                return int(extras[key].shape[0])
    raise FileProblem(adapter, "holds no classification head, so its number of labels is unknown")


def load_run(run_dir: str | os.PathLike) -> TrainedRun:
    """Load a finetune run's base model (float32), attach its trained adapter, and return it in eval mode."""
    path = Path(run_dir)
    cfg = _run_config(path)
    adapter = _adapter_folder(path)
    num_labels = _num_labels(adapter) if cfg.task == "classification" else None
    model, tokenizer = models.load_model(
        cfg.model,
        task=cfg.task,
        num_labels=num_labels,
        dtype=torch.float32,
        seed=cfg.seed,
        head_replaced=cfg.task == "classification",
    )
    wl.load_adapter(model, adapter)
    model.eval()
    return TrainedRun(path, cfg, model, tokenizer, adapter)


def _untie_adapted_weights(model: nn.Module) -> None:
    """Give an adapted weight that another module shares (a tied LM head) its own copy before the merge, so
    the merge changes only the adapted layer; the saved config then no longer ties them."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
        weight = layer.base_layer.weight
        if counts.get(id(weight), 0) > 1:
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)


def _fix_tying(model: nn.Module) -> None:
    """Tell the saved config the truth: embeddings that are no longer one tensor are not tied."""
    config = model.config
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or inputs is None or outputs.weight is inputs.weight:
        return
    for cfg in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def merged_model(run: TrainedRun) -> nn.Module:
    """The run's model with every adapter folded into its base weight and widelora's layers removed."""
    _untie_adapted_weights(run.model)
    wl.unload(run.model)
    for p in run.model.parameters():
        p.requires_grad_(False)
    _fix_tying(run.model)
    return run.model


def export_merged(run_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a standalone transformers folder (merged weights, config, tokenizer) that loads with
    `from_pretrained` alone; `dtype` casts the merged float32 weights when saving."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"dtype={dtype!r} is not valid; valid: {list(EXPORT_DTYPES)}")
    run = load_run(run_dir)
    folder = claim_folder(out, "export", fresh=True)
    model = merged_model(run).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    return folder


def export_peft(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the run's adapter in PEFT's format (`widelora.save_adapter`) plus tokenizer, naming the base."""
    run = load_run(run_dir)
    folder = claim_folder(out, "export", fresh=True)
    wl.save_adapter(run.model, folder, base_model_name_or_path=models.resolve(run.config.model))
    run.tokenizer.save_pretrained(folder)
    return folder

"""`RunConfig`: every knob of one finetuning run, loadable from YAML / dicts with flag overrides, and presets.

Why one dataclass: the CLI, YAML files, sweeps and the HF Trainer glue all describe a run the same way, and a
single validation step gives every entry point the same clear errors (unknown key → the valid keys).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DECAYS = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal_lm", "classification")
EVAL_SPLITS = ("val", "test")


class _NotGiven:
    """The value of an override that was not given (None is a real value: `max_grad_norm: null` = no clipping)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


def given(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`overrides` without the NOT_GIVEN entries; explicit None values stay."""
    return {k: v for k, v in (overrides or {}).items() if v is not NOT_GIVEN}


@dataclass
class RunConfig:
    """One finetuning run. `steps` (optimizer steps) wins over `epochs` when both are set."""

    # what to train
    model: str = "smollm2-135m"
    task: str = "causal_lm"
    dataset: str = "wikipedia"
    text_field: str = "text"  # user files; "a,b" joins several fields with a newline
    label_field: str = "label"
    # the adapter
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # "auto" = PLoP placement
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank
    scaling: str = "standard"
    dropout: float = 0.0
    init: str = "init_a"
    init_batches: int = 8  # batches for data-driven inits (e.g. lora_one)
    trainable: list[str] = field(
        default_factory=list
    )  # extra trainable modules; classification adds the head
    # the optimizer and schedule
    method: str = "adamw"
    lr: float = 2e-4
    ratio: float = 16.0  # LoRA+: lr_B = ratio * lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int | None = 50
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    warmup: float = 0.03  # < 1: fraction of the steps; >= 1: a number of steps
    decay: str = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_examples: int | None = 64  # held-out examples (LM: blocks) per evaluation; None = all
    eval_split: str = "test"  # split of the final "after" number; periodic evals use "val"
    eval_batch_size: int | None = None
    max_train_examples: int | None = None
    log_every: int = 1
    checkpoint_every: int = 0  # 0: checkpoint at the end (and at every periodic eval)
    keep_checkpoints: int = 1  # newest checkpoints kept on disk
    monitor: bool = False  # log feature-learning statistics (widelora.monitor)
    monitor_every: int = 10
    progress: bool = True
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs/finetune"

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate; unknown keys raise a ValueError listing the valid ones."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a mapping of keys to values; got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {cls.keys()}")
        cfg = cls(**{k: _coerce(k, v) for k, v in data.items()})
        cfg.validate()
        return cfg

    def replace(self, **overrides: Any) -> RunConfig:
        """A validated copy with `overrides` applied (NOT_GIVEN values are skipped; None is a value)."""
        merged = self.to_dict()
        merged.update(given(overrides))
        return RunConfig.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value, and what would be valid."""
        _choice("task", self.task, TASKS)
        _choice("decay", self.decay, DECAYS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("eval_split", self.eval_split, EVAL_SPLITS)
        for name in (
            "rank",
            "batch_size",
            "grad_accum",
            "seq_len",
            "log_every",
            "init_batches",
            "monitor_every",
            "keep_checkpoints",
        ):
            _positive_int(name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r} must be an integer >= 0")
        for name in ("eval_examples", "max_train_examples", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None:
                _positive_int(name, v)
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps=<optimizer steps> or epochs=<passes over the training set>")
        if self.steps is not None:
            _positive_int("steps", self.steps)
        if self.epochs is not None and not (_is_num(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs={self.epochs!r} must be a positive number")
        for name in ("lr", "ratio", "eps"):
            v = getattr(self, name)
            if not (_is_num(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a positive finite number")
        if self.alpha is not None and not (_is_num(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} must be a positive number or null (alpha = rank)")
        if not (_is_num(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not (_is_num(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not (_is_num(self.warmup) and self.warmup >= 0):
            raise ValueError(f"warmup={self.warmup!r} must be >= 0 (a fraction < 1 or a number of steps)")
        if self.max_grad_norm is not None and not (_is_num(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be positive or null (no clipping)")
        if len(self.betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if isinstance(self.targets, list):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(
                    f"targets={self.targets!r} must be non-empty module names, a regex, "
                    "'all-linear' or 'auto'"
                )
        elif not (isinstance(self.targets, str) and self.targets):
            raise ValueError(f"targets={self.targets!r} must be a list of names or a string")
        if not self.device == "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; valid: {list(valid)}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def parse_targets(value: str | list[str]) -> list[str] | str:
    """ "q_proj,v_proj" → ["q_proj", "v_proj"]; "all-linear", "auto" and regexes (with any of `^$*+?[(|\\`)
    stay strings."""
    if isinstance(value, list):
        return value
    text = value.strip()
    if text in ("all-linear", "auto") or any(c in text for c in "^$*+?[(|\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


_FLOATS = {"lr", "ratio", "weight_decay", "eps", "warmup", "dropout", "alpha", "epochs", "max_grad_norm"}


def _coerce(key: str, value: Any) -> Any:
    """Gentle YAML/CLI coercions: "1e-4" → float, "q,v" → list, [0.9, 0.99] → tuple."""
    if key == "targets" and isinstance(value, str):
        return parse_targets(value)
    if key == "trainable" and isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if key == "betas" and isinstance(value, (list, tuple)):
        return tuple(float(b) for b in value)
    if key in _FLOATS and isinstance(value, str):
        try:
            return float(value)
        except ValueError as exc:
            raise ValueError(f"{key}={value!r} is not a number") from exc
    if key in _FLOATS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping of RunConfig keys; a `preset:` key is expanded first."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        raise ValueError(f"config file {str(path)!r} is empty")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")  # noqa: TRY004
    if "preset" in data:
        base = preset(data.pop("preset")).to_dict()
        base.update(data)
        data = base
    return data


def build_config(
    preset_name: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults ← preset ← config file ← overrides (flags); NOT_GIVEN overrides are skipped, None is a value."""
    data = preset(preset_name).to_dict() if preset_name else RunConfig().to_dict()
    if config_file is not None:
        data.update(load_config_file(config_file))
    data.update(given(overrides))
    return RunConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------------------
# Presets. "paper-*" mirror seed 001, Appendix B (GPU + network needed); "cpu-*" finish in minutes on 2 cores,
# with the learning rates that measured best here for Init[A] (docs/results/finetune.md).

_ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]

# Seed 001, Appendix B: RoBERTa-large on GLUE (the tasks differ only in dataset and text fields).
_ROBERTA_GLUE: dict[str, Any] = {
    "model": "FacebookAI/roberta-large",
    "task": "classification",
    "label_field": "label",
    "targets": ["query", "value"],
    "rank": 8,
    "alpha": 16,
    "dropout": 0.1,
    "lr": 8e-5,
    "batch_size": 4,
    "steps": None,
    "epochs": 10,
    "seq_len": 128,
    "warmup": 0.06,
    "dtype": "float16",
    "eval_examples": None,
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper-tinyllama-wikitext2": {
        "model": "TinyLlama/TinyLlama_v1.1",
        "task": "causal_lm",
        "dataset": "hf:Salesforce/wikitext:wikitext-2-raw-v1",
        "targets": _ALL_LLAMA,
        "rank": 64,
        "alpha": 16,
        "dropout": 0.0,
        "lr": 2e-4,
        "batch_size": 8,
        "steps": None,
        "epochs": 1,
        "seq_len": 1024,
        "warmup": 0.03,
        "eps": 1e-6,
        "dtype": "bfloat16",
        "eval_examples": None,
        "max_grad_norm": 1.0,
        "out_dir": "runs/paper-tinyllama-wikitext2",
    },
    "paper-roberta-large-sst2": {**_ROBERTA_GLUE, "dataset": "hf:nyu-mll/glue:sst2", "text_field": "sentence",
                                 "out_dir": "runs/paper-roberta-large-sst2"},
    "paper-roberta-large-mnli": {**_ROBERTA_GLUE, "dataset": "hf:nyu-mll/glue:mnli",
                                 "text_field": "premise,hypothesis", "out_dir": "runs/paper-roberta-large-mnli"},
    "paper-llama7b-gsm8k": {
        "model": "huggyllama/llama-7b",
        "task": "causal_lm",
        "dataset": "hf:openai/gsm8k:main",
        "text_field": "question,answer",
        "targets": _ALL_LLAMA,
        "rank": 64,
        "alpha": 16,
        "dropout": 0.0,
        "lr": 1e-4,
        "batch_size": 16,
        "steps": None,
        "epochs": 1,
        "seq_len": 1024,
        "warmup": 0.03,
        "eps": 1e-6,
        "dtype": "bfloat16",
        "eval_examples": None,
        "out_dir": "runs/paper-llama7b-gsm8k",
    },
    "cpu-smollm2-wiki": {
        "model": "smollm2-135m",
        "task": "causal_lm",
        "dataset": "wikipedia",
        "targets": ["q_proj", "v_proj"],
        "rank": 8,
        "alpha": 16,
        "lr": 5e-3,
        "batch_size": 4,
        "seq_len": 128,
        "steps": 20,
        "warmup": 0.1,
        "eval_examples": 16,
        "out_dir": "runs/cpu-smollm2-wiki",
    },
    "cpu-smollm2-shakespeare": {
        "model": "smollm2-135m",
        "task": "causal_lm",
        "dataset": "shakespeare",
        "targets": ["q_proj", "v_proj"],
        "rank": 8,
        "alpha": 16,
        "lr": 5e-3,
        "batch_size": 4,
        "seq_len": 128,
        "steps": 20,
        "warmup": 0.1,
        "eval_examples": 16,
        "out_dir": "runs/cpu-smollm2-shakespeare",
    },
    "cpu-minilm-topics": {
        "model": "minilm-l6",
        "task": "classification",
        "dataset": "wikipedia",
        "targets": ["query", "value"],
        "rank": 8,
        "alpha": 16,
        "lr": 5e-3,
        "batch_size": 16,
        "seq_len": 128,
        "steps": 60,
        "warmup": 0.06,
        "eval_examples": 256,
        "out_dir": "runs/cpu-minilm-topics",
    },
    "cpu-minilm-tweets": {
        "model": "minilm-l6",
        "task": "classification",
        "dataset": "tweets",
        "targets": ["query", "value"],
        "rank": 8,
        "alpha": 16,
        "lr": 5e-3,
        "batch_size": 16,
        "seq_len": 64,
        "steps": 60,
        "warmup": 0.06,
        "eval_examples": 256,
        "out_dir": "runs/cpu-minilm-tweets",
    },
}


def preset(name: str) -> RunConfig:
    """A named preset as a validated RunConfig."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; valid presets: {sorted(PRESETS)}")
    data = RunConfig().to_dict()
    data.update(PRESETS[name])
    return RunConfig.from_dict(data)

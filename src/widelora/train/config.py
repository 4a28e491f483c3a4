"""`RunConfig`: every knob of one finetuning run, written once.

Why one dataclass: the CLI, YAML files, presets, sweeps and the HF Trainer glue all describe a run the same
way. Each field carries its help text, its valid choices and its check in its metadata, so `widelora
finetune`'s flags are generated from it (`commands/finetune.py`), presets are plain data files
(`train/presets/*.yaml`), and one validation step gives every entry point the same clear errors (a `UserError`
naming the key and what is valid)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from widelora.errors import UserError

DECAYS = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal_lm", "classification")
EVAL_SPLITS = ("val", "test")
SETUPS = (
    "manual",
    "recommended",
    "recommended_tuned",
    "recommended_at_ratio",
    "lr_finder",
)  # = train.setups.SETUPS
REPORT_TO = ("none", "tensorboard")


class _NotGiven:
    """The value of an override that was not given (None is a real value: `max_grad_norm: null` = no
    clipping)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


def given(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`overrides` without the NOT_GIVEN entries; explicit None values stay."""
    return {k: v for k, v in (overrides or {}).items() if v is not NOT_GIVEN}


# ------------------------------------------------------------------------------------------------- checks
Check = Callable[[str, Any], None]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fail(name: str, value: Any, expected: str) -> UserError:
    return UserError(f"{name}={value!r} is not valid; {expected}")


def positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise _fail(name, v, "it must be a positive integer")


def count(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _fail(name, v, "it must be an integer >= 0")


def positive(name: str, v: Any) -> None:
    if not (_is_num(v) and math.isfinite(v) and v > 0):
        raise _fail(name, v, "it must be a positive finite number")


def non_negative(name: str, v: Any) -> None:
    if not (_is_num(v) and math.isfinite(v) and v >= 0):
        raise _fail(name, v, "it must be a finite number >= 0")


def fraction(name: str, v: Any) -> None:
    if not (_is_num(v) and 0 <= v < 1):
        raise _fail(name, v, "it must be a number in [0, 1)")


def above_one(name: str, v: Any) -> None:
    if not (_is_num(v) and math.isfinite(v) and v > 1):
        raise _fail(name, v, "it must be a finite number > 1 (e.g. 10)")


def text(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise _fail(name, v, "it must be a non-empty string")


def flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise _fail(name, v, "it must be true or false")


def optional(check: Check) -> Check:
    def check_or_none(name: str, v: Any) -> None:
        if v is not None:
            check(name, v)

    return check_or_none


def names(name: str, v: Any) -> None:
    if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
        raise _fail(name, v, "it must be a list of module names")


def targets_check(name: str, v: Any) -> None:
    if isinstance(v, list) and v and all(isinstance(t, str) and t for t in v):
        return
    if not (isinstance(v, str) and v):
        raise _fail(name, v, "give module names ('q_proj,v_proj'), a regex, 'all-linear' or 'auto'")


def betas_check(name: str, v: Any) -> None:
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)):
        raise _fail(name, v, "it must be two numbers in [0, 1), e.g. 0.9,0.999")


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_check(name: str, v: Any) -> None:
    if not (isinstance(v, str) and _DEVICE.fullmatch(v)):
        raise _fail(name, v, "valid: 'auto', 'cpu', 'cuda', 'cuda:N'")


def meta(
    help: str,
    check: Check | None = None,
    choices: tuple[str, ...] | None = None,
    resume_free: bool = False,
) -> dict[str, Any]:
    """A RunConfig field's metadata: help text, check, choices, and whether it may change when a run
    resumes."""
    return {"help": help, "check": check, "choices": choices, "resume_free": resume_free}


def option(default: Any, help: str, check: Check | None = None, **more: Any) -> Any:
    """A RunConfig field with an immutable default and its metadata (see `meta`)."""
    return field(default=default, metadata=meta(help, check, **more))


# ------------------------------------------------------------------------------------------------- the config
@dataclass
class RunConfig:
    """One finetuning run. `steps` (optimizer steps) wins over `epochs` when both are set."""

    # what to train
    model: str = option(
        "smollm2-135m", "Shipped name (smollm2-135m, minilm-l6), local folder or hub id.", text
    )
    task: str = option("causal_lm", "What the model learns.", choices=TASKS)
    dataset: str = option(
        "wikipedia", "wikipedia | shakespeare | tweets | a .txt/.jsonl/.csv file | hf:path[:config].", text
    )
    text_field: str = option("text", "Text column/field of a user file ('a,b' joins fields).", text)
    label_field: str = option("label", "Label column/field of a user file.", text)
    packing: bool = option(
        False,
        "Chat data (.jsonl with messages or prompt/completion): pack conversations into full blocks.",
        flag,
    )
    # the adapter
    targets: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=meta("'q_proj,v_proj', a regex, 'all-linear', or 'auto' (PLoP placement).", targets_check),
    )
    rank: int = option(8, "LoRA rank r.", positive_int)
    alpha: float | None = option(None, "LoRA alpha (scale alpha/r); null: alpha = r.", optional(positive))
    scaling: str = option("standard", "Adapter scaling: standard (alpha/r) or rslora (alpha/sqrt r).", text)
    dropout: float = option(0.0, "LoRA dropout.", fraction)
    init: str = option(
        "init_a", "init_a | init_b | kaiming | gaussian | pissa | lora_one | lora_ga ...", text
    )
    init_batches: int = option(
        8, "Training batches a data-driven init (e.g. lora_one) looks at.", positive_int
    )
    trainable: list[str] = field(
        default_factory=list,
        metadata=meta("Extra trainable modules ('a,b'); classification adds its head.", names),
    )
    setup: str = option(
        "manual", "manual: the flags decide; recommended: widelora chooses init, targets, lr, ratio.",
        choices=SETUPS,
    )  # fmt: skip
    # the optimizer and schedule
    method: str = option("adamw", "Optimizer: adamw | loraplus | lora_one | scaled_gd ...", text)
    lr: float = option(2e-4, "Learning rate (of A under LoRA+).", positive)
    ratio: float = option(16.0, "LoRA+ ratio lr_B / lr_A.", positive)
    weight_decay: float = option(0.0, "AdamW weight decay.", non_negative)
    betas: tuple[float, float] = option((0.9, 0.999), "Adam betas, e.g. 0.9,0.999.", betas_check)
    eps: float = option(1e-8, "Adam epsilon.", positive)
    steps: int | None = option(
        50, "Optimizer steps (wins over epochs; null: train by epochs).", optional(positive_int)
    )
    epochs: float | None = option(
        None, "Passes over the training set (when steps is null).", optional(positive)
    )
    batch_size: int = option(8, "Examples per micro-batch (per process under torchrun).", positive_int)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", positive_int)
    seq_len: int = option(128, "Tokens per block (LM) / truncation length (classification).", positive_int)
    warmup: float = option(
        0.03, "Warmup: a fraction of the steps if < 1, else a number of steps.", non_negative
    )
    decay: str = option("linear", "Learning-rate decay after warmup.", choices=DECAYS)
    max_grad_norm: float | None = option(
        1.0, "Gradient clipping norm; null: no clipping.", optional(positive)
    )
    seed: int = option(0, "Seed for data split, order, init and dropout.", count)
    diverge_factor: float = option(
        10.0, "The run has diverged when its smoothed loss exceeds this factor x its first loss.", above_one
    )
    diverge_smoothing: float = option(
        0.9,
        "Weight of the past in the smoothed loss of the divergence rule, in [0, 1); 0: raw losses.",
        fraction,
    )
    # evaluation, logging, checkpoints
    eval_every: int = option(0, "Evaluate on the validation split every N steps (0: only at the end).", count,
                             resume_free=True)  # fmt: skip
    eval_examples: int | None = option(
        64, "Held-out examples (LM: blocks) per evaluation; null: all.", optional(positive_int)
    )
    eval_split: str = option("test", "Split of the final 'after' number (periodic evals use val).",
                             choices=EVAL_SPLITS)  # fmt: skip
    eval_batch_size: int | None = option(
        None, "Evaluation batch size; null: batch_size.", optional(positive_int)
    )
    max_train_examples: int | None = option(
        None, "Cap on training examples (LM: blocks).", optional(positive_int)
    )
    log_every: int = option(1, "Log the training loss every N steps.", positive_int, resume_free=True)
    checkpoint_every: int = option(
        0, "Checkpoint every N steps (0: at the end and at evaluations).", count, resume_free=True
    )
    keep_checkpoints: int = option(1, "Newest checkpoints kept on disk.", positive_int, resume_free=True)
    monitor: bool = option(False, "Log feature-learning statistics (widelora.monitor).", flag)
    monitor_every: int = option(10, "Steps between monitor records.", positive_int, resume_free=True)
    progress: bool = option(True, "Show a progress bar.", flag, resume_free=True)
    report_to: str = option(
        "none", "Also log metrics, monitor statistics and group learning rates to: none | tensorboard "
        "(event files in the run folder's tensorboard/).", choices=REPORT_TO, resume_free=True,
    )  # fmt: skip
    dtype: str = option(
        "float32", "Dtype of the frozen base model (adapters stay float32; float16 uses loss scaling).",
        choices=DTYPES,
    )  # fmt: skip
    gradient_checkpointing: bool = option(
        False, "Recompute each block's activations in backward (less memory, more time; same numbers).", flag,
        resume_free=True,
    )  # fmt: skip
    device: str = option("auto", "auto | cpu | cuda | cuda:N.", device_check, resume_free=True)
    out_dir: str = option(
        "runs/finetune", "Run folder (metrics, checkpoints, adapter).", text, resume_free=True
    )

    # --------------------------------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def resume_free_keys(cls) -> set[str]:
        """Keys that may differ between a run and its resumption without changing its numbers."""
        return {f.name for f in dataclasses.fields(cls) if f.metadata["resume_free"]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate; unknown keys raise a UserError listing the valid ones."""
        if not isinstance(data, dict):
            raise UserError(f"a run config must be a mapping of keys to values; got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise UserError(f"unknown config key(s) {unknown}; valid keys: {cls.keys()}")
        cfg = cls(**{k: coerce(k, v) for k, v in data.items()})
        cfg.validate()
        return cfg

    def replace(self, **overrides: Any) -> RunConfig:
        """A validated copy with `overrides` applied (NOT_GIVEN values are skipped; None is a value)."""
        return RunConfig.from_dict({**self.to_dict(), **given(overrides)})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> None:
        """Raise a UserError naming the first bad field, its value, and what would be valid."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] is not None and value not in f.metadata["choices"]:
                raise _fail(f.name, value, f"valid: {list(f.metadata['choices'])}")
            if f.metadata["check"] is not None:
                f.metadata["check"](f.name, value)
        if self.steps is None and self.epochs is None:
            raise UserError("set steps=<optimizer steps> or epochs=<passes over the training set>")


def field_help(name: str) -> str:
    """The help text of a RunConfig field, with its choices."""
    meta = RunConfig.__dataclass_fields__[name].metadata
    return meta["help"] + (f" One of: {', '.join(meta['choices'])}." if meta["choices"] else "")


# ------------------------------------------------------------------------------------------------- coercion
def parse_targets(value: str | list[str]) -> list[str] | str:
    """ "q_proj,v_proj" → ["q_proj", "v_proj"]; "all-linear", "auto" and regexes (with any of `^$*+?[(|\\`)
    stay strings."""
    if not isinstance(value, str):
        return value
    stripped = value.strip()
    if stripped in ("all-linear", "auto") or any(c in stripped for c in "^$*+?[(|\\"):
        return stripped
    return [t.strip() for t in stripped.split(",") if t.strip()]


_FLOATS = {"lr", "ratio", "weight_decay", "eps", "warmup", "dropout", "alpha", "epochs", "max_grad_norm",
           "diverge_factor", "diverge_smoothing"}  # fmt: skip


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{key}={value!r} is not a number") from None


def coerce(key: str, value: Any) -> Any:
    """Gentle YAML/CLI coercions: "1e-4" → float, "q,v" → list, "0.9,0.99" / [0.9, 0.99] → tuple."""
    if key == "targets":
        return parse_targets(value)
    if key == "trainable" and isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if key == "betas" and isinstance(value, str):
        try:
            return tuple(float(b) for b in value.split(","))
        except ValueError:
            raise UserError(f"betas={value!r} is not a number pair, e.g. 0.9,0.999") from None
    if key == "betas" and isinstance(value, (list, tuple)):
        return tuple(float(b) if _is_num(b) else b for b in value)
    if key in _FLOATS and isinstance(value, str):
        return _number(key, value)
    if key in _FLOATS and _is_num(value):
        return float(value)
    return value

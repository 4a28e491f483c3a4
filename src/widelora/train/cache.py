"""What a run loaded, kept for the next run in the same process: tokenizer, tokenized data, the base model.

Why: a sweep worker runs trial after trial on the same model and data; loading the model and tokenizing the
data again for each one made start-up a large part of a short trial. `run_trial` (the sweep's trial function)
uses the process-wide `shared_cache()`, so a long-lived worker (`widelora.sweep`'s local workers, Ray's reused
workers) pays the loading once. `widelora finetune` and `train()` load fresh.

Exactness: the cache keeps the base model exactly as loaded (on the CPU) and never hands it out: each run gets
a deep copy, so adapters, heads, trainable modules and weights moved by an init (pissa, lora_ga) in one run
cannot reach the next, whose frozen weights equal a fresh load bit for bit (`fingerprint` checks it in the
tests). The cost is one extra copy of the base model in host memory per worker. Keys hold everything the
loaded object depends on: the classification head is initialized from the seed, so a classifier's key holds
the seed; the data split and order depend on the seed too; a data file's size and modification time are part
of its key."""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widelora import models
from widelora.data import TaskData, prepare


class _Recent:
    """The `size` most recently used values by key (size 0 keeps nothing)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]
        self.misses += 1
        value = build()
        if self.size > 0:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def _file_signature(dataset: str) -> tuple | None:
    """A local data file's size and modification time (None for named and hub datasets)."""
    path = Path(dataset)
    if not path.exists():
        return None
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


class StartupCache:
    """Tokenizers, tokenized data and base models of recent runs (`models` / `datasets`: how many of each)."""

    def __init__(self, models: int = 1, datasets: int = 4) -> None:
        self._tokenizers = _Recent(max(models, datasets))
        self._data = _Recent(datasets)
        self._models = _Recent(models)

    def tokenizer(self, model: str) -> Any:
        return self._tokenizers.get(model, lambda: models.load_tokenizer(model))

    def data(self, cfg: Any, tokenizer: Any) -> TaskData:
        """The run's tokenized data (treated as read-only by the loop)."""
        key = (
            cfg.model, cfg.dataset, _file_signature(cfg.dataset), cfg.task, cfg.seq_len, cfg.seed,
            cfg.max_train_examples, cfg.eval_examples, cfg.text_field, cfg.label_field, cfg.packing,
        )  # fmt: skip
        return self._data.get(key, lambda: prepare(
            cfg.dataset, tokenizer, task=cfg.task, seq_len=cfg.seq_len, seed=cfg.seed,
            max_train=cfg.max_train_examples, max_eval=cfg.eval_examples,
            text_field=cfg.text_field, label_field=cfg.label_field, packing=cfg.packing,
        ))  # fmt: skip

    def model(self, cfg: Any, num_labels: int | None) -> nn.Module:
        """A fresh copy of the base model, on the CPU, in eval mode, exactly as `models.load_model` returns
        it."""
        dtype = getattr(torch, cfg.dtype)
        seed = cfg.seed if cfg.task == "classification" else None  # a causal LM's weights do not depend on it
        key = (cfg.model, cfg.task, num_labels, cfg.dtype, seed)
        pristine = self._models.get(
            key,
            lambda: models.load_model(
                cfg.model, task=cfg.task, num_labels=num_labels, dtype=dtype, seed=cfg.seed
            )[0],
        )
        return copy.deepcopy(pristine) if self._models.size > 0 else pristine

    def stats(self) -> dict[str, dict[str, int]]:
        """Hits and misses per kind (for tests and benchmarks)."""
        return {
            name: {"hits": r.hits, "misses": r.misses}
            for name, r in (("tokenizers", self._tokenizers), ("data", self._data), ("models", self._models))
        }


#: Loads fresh every time (what `widelora finetune` and `train()` use).
FRESH = StartupCache(models=0, datasets=0)
_SHARED: StartupCache | None = None


def shared_cache() -> StartupCache:
    """The process-wide cache `run_trial` uses (one base model, four datasets)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = StartupCache()
    return _SHARED


def fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's name, dtype, shape and bytes: equal models, equal
    fingerprints."""
    digest = hashlib.blake2b(digest_size=16)
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

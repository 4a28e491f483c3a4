"""Sweeps that keep what they loaded (issue 15 item 3): a process reuses the base model, tokenizer and data of
an earlier run, and every run still starts from weights equal, bit for bit, to a fresh load."""

from __future__ import annotations

import os
import random

import pytest
import torch

import widelora as wl
from widelora import models
from widelora.lora.pairs import lora_pairs
from widelora.testing.models import save_tiny_folder
from widelora.train import build_config, run_trial, train
from widelora.train.cache import StartupCache, fingerprint
from widelora.train.cache import shared_cache as real_shared_cache

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home", "birds"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rng = random.Random(0)
    (root / "corpus.txt").write_text(
        "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(25)) for _ in range(120))
    )
    rows = ["text,label"]
    for _ in range(120):
        label = rng.randrange(2)
        rows.append(" ".join(rng.choice(WORDS[:7] if label else WORDS[7:]) for _ in range(8)) + f",{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    save_tiny_folder(root / "llama", "llama")
    save_tiny_folder(root / "bert", "bert", task="classification")
    return root


@pytest.fixture
def fresh_shared(monkeypatch):
    """A new process-wide cache for the test (what a new sweep worker starts with)."""
    cache = StartupCache()
    monkeypatch.setattr("widelora.train.cache._SHARED", cache)
    assert real_shared_cache() is cache
    return cache


def lm_cfg(files, **kw):
    base = {
        "model": str(files / "llama"), "dataset": str(files / "corpus.txt"), "targets": ["q_proj", "v_proj"],
        "rank": 4, "alpha": 8, "steps": 3, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "eval_examples": 8,
        "progress": False,
    }  # fmt: skip
    return {**base, **kw}


def cls_cfg(files, **kw):
    base = {
        "model": str(files / "bert"), "task": "classification", "dataset": str(files / "labels.csv"),
        "targets": ["query", "value"], "rank": 4, "steps": 3, "batch_size": 8, "seq_len": 16, "lr": 2e-2,
        "eval_examples": 16, "progress": False,
    }  # fmt: skip
    return {**base, **kw}


def test_a_used_model_never_reaches_the_next_run(files):
    """Adapters, a moved W (pissa), a trained head and scribbled weights of one run: the next copy equals a
    fresh load, and has no adapters."""
    cfg = build_config(overrides=cls_cfg(files))
    cache = StartupCache()
    first = cache.model(cfg, 2)
    wl.attach(first, targets=["query", "value"], rank=2, init="pissa", trainable=["classifier"])
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)
    second = cache.model(cfg, 2)
    fresh, _ = models.load_model(cfg.model, task=cfg.task, num_labels=2, seed=cfg.seed)
    assert fingerprint(second) == fingerprint(fresh) != fingerprint(first)
    assert lora_pairs(second) == [] and cache.stats()["models"] == {"hits": 1, "misses": 1}


def test_the_head_seed_is_part_of_the_key(files):
    cache = StartupCache()
    for seed in (0, 1):
        cfg = build_config(overrides=cls_cfg(files, seed=seed))
        fresh, _ = models.load_model(cfg.model, task=cfg.task, num_labels=2, seed=seed)
        assert fingerprint(cache.model(cfg, 2)) == fingerprint(fresh)
    assert cache.stats()["models"] == {"hits": 0, "misses": 2}
    lm = StartupCache()
    for seed in (0, 1):  # a causal LM's weights do not depend on the seed: one load serves both
        lm.model(build_config(overrides=lm_cfg(files, seed=seed)), None)
    assert lm.stats()["models"] == {"hits": 1, "misses": 1}


def test_changed_data_file_is_read_again(files, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text((files / "corpus.txt").read_text())
    cfg = build_config(overrides=lm_cfg(files, dataset=str(data)))
    cache = StartupCache()
    tok = cache.tokenizer(cfg.model)
    first = cache.data(cfg, tok)
    assert cache.data(cfg, tok) is first
    data.write_text(data.read_text() + "\n\nmore words about the cat and the dog")
    os.utime(data, ns=(1, 1))
    assert cache.data(cfg, tok) is not first
    assert cache.stats()["data"] == {"hits": 1, "misses": 2}


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_trials_in_one_process_equal_fresh_runs(files, tmp_path, fresh_shared, kind):
    """A pissa trial first (it moves W), then an init_a trial that reuses model and data: the second equals
    the same trial run fresh, to the last bit of its adapter and its numbers."""
    make = lm_cfg if kind == "lm" else cls_cfg
    first = run_trial(make(files, init="pissa"), tmp_path / "t1")
    second = run_trial(make(files, lr=5e-3), tmp_path / "t2")
    assert first["status"] == second["status"] == "done", (first["error"], second["error"])
    assert fresh_shared.stats()["models"] == {"hits": 1, "misses": 1}
    assert fresh_shared.stats()["data"] == {"hits": 1, "misses": 1}
    alone = train(make(files, lr=5e-3), tmp_path / "alone")
    timing = {"wall_s", "tokens_per_s"}
    assert {k: v for k, v in second["final"].items() if k not in timing} == {
        k: v for k, v in alone["final"].items() if k not in timing
    }
    a = (tmp_path / "t2" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "alone" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_plain_train_keeps_nothing(files, tmp_path, fresh_shared):
    train(lm_cfg(files, steps=1), tmp_path / "run")
    assert fresh_shared.stats()["models"] == {"hits": 0, "misses": 0}


@pytest.mark.parametrize(
    "field,value",
    [
        ("seq_len", 24),
        ("seed", 1),
        ("packing", True),
        ("max_train_examples", 10),
        ("eval_examples", 4),
        ("text_field", "body"),
    ],
)
def test_every_data_setting_is_part_of_the_data_key(files, field, value, monkeypatch):
    """A setting the data depends on that the key missed would hand a trial another trial's data."""
    monkeypatch.setattr("widelora.train.cache.prepare", lambda *a, **k: object())
    cache = StartupCache()
    for cfg in (lm_cfg(files), lm_cfg(files, **{field: value})):
        cache.data(build_config(overrides=cfg), tokenizer=None)
    assert cache.stats()["data"] == {"hits": 0, "misses": 2}

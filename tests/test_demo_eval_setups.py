"""The evaluation's extra setups: recommend tuned on a grid (one knob moves adapter and head rates together)
and the fastai-style LR finder (a suggestion from a range test; the model comes back exactly as it was)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from widelora.experiments import eval_setups
from widelora.testing.models import tiny_bert_classifier


def cfg(**kw):
    base = {
        "lr": 4e-3,
        "task": "classification",
        "targets": ["query", "value"],
        "rank": 4,
        "alpha": 4.0,
        "init": "kaiming",
        "scaling": "standard",
        "seed": 0,
        "trainable": [],
        "batch_size": 4,
        "method": "adamw",
        "ratio": 16.0,
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_recommended_tuned_moves_the_head_rate_with_the_base_rate(monkeypatch):
    from widelora.recommend import runconfig
    from widelora.train.setups import SetupChoice

    probe = SetupChoice(targets=["query"], init="init_a", method="loraplus", lr=1e-3, ratio=3.9, head_lr=0.2)
    monkeypatch.setattr(runconfig, "recommended_setup", lambda c, m, b, steps=None: probe)
    choice = eval_setups.recommended_tuned(cfg(lr=4e-3), None, [], 100)
    assert (choice.init, choice.method, choice.ratio, choice.targets) == (
        "init_a",
        "loraplus",
        3.9,
        ["query"],
    )
    assert choice.lr == 4e-3 and choice.head_lr == pytest.approx(0.8)
    no_head = SetupChoice(targets=["q"], init="init_a", method="loraplus", lr=1e-3, ratio=3.9, head_lr=None)
    monkeypatch.setattr(runconfig, "recommended_setup", lambda c, m, b, steps=None: no_head)
    assert eval_setups.recommended_tuned(cfg(), None, [], 100).head_lr is None


def test_lr_finder_suggests_a_rate_and_restores_the_model(monkeypatch):
    monkeypatch.setattr(eval_setups, "FINDER_STEPS", 12)  # fastai's 100 steps are the same code, only slower
    torch.manual_seed(0)
    model = tiny_bert_classifier(seed=0, num_labels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(5, 60, (4, 8), generator=gen),
            "attention_mask": torch.ones(4, 8, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=gen),
        }
        for _ in range(3)
    ]
    choice = eval_setups.lr_finder(cfg(), model, batches, 100)
    assert 1e-7 / 10 * 0.99 <= choice.lr <= 10 and (choice.init, choice.method) == ("kaiming", "adamw")
    assert set(model.state_dict()) == set(before)  # the temporary adapters are gone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_evaluation_setups_are_valid_run_config_setups():
    from widelora.train import config, setups

    assert set(config.SETUPS) == set(setups.SETUPS) >= {"recommended_tuned", "lr_finder"}


def test_recommended_at_ratio_probes_with_the_configs_ratio():
    """The ratio ablation: the config's ratio replaces the width rule's, and the probe measures the lr for
    it."""
    model = tiny_bert_classifier()
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, 60, (8, 10), generator=g),
            "attention_mask": torch.ones(8, 10, dtype=torch.long),
            "labels": torch.randint(0, 3, (8,), generator=g),
        }
        for _ in range(4)
    ]
    low = eval_setups.recommended_at_ratio(cfg(ratio=1.0, grad_accum=1, steps=100), model, batches, 100)
    high = eval_setups.recommended_at_ratio(cfg(ratio=16.0, grad_accum=1, steps=100), model, batches, 100)
    assert (low.ratio, high.ratio) == (1.0, 16.0) and low.method == high.method == "loraplus"
    assert high.lr < low.lr  # B at 16x reaches the feature edge at a smaller base lr

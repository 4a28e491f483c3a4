"""`head_lr` for non-adapter parameters, and `setup=` objects for attach / create_optimizer."""

from __future__ import annotations

import pytest
import torch

import widelora as wl
from widelora.errors import UserError
from widelora.testing.models import TinyMLP, tiny_bert_classifier


def _lr_by_param(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", ["adamw", "loraplus", "scaled_gd", "lora_one_precond"])
def test_head_lr_applies_to_every_non_adapter_parameter_for_every_method(method):
    model = tiny_bert_classifier()
    wl.attach(model, ["query", "value"], rank=4, seed=0, trainable=["classifier"])
    opt = wl.create_optimizer(model, lr=1e-3, method=method, ratio=4, head_lr=5e-2, weight_decay=0.1)
    lrs = _lr_by_param(opt)
    adapters = {id(t) for p in wl.lora_pairs(model) for t in (p.A, p.B)}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in adapters]
    assert heads and all(lrs[id(p)] == 5e-2 for p in heads)
    assert all(lrs[i] in (1e-3, 4e-3) for i in adapters)
    names = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert (
        names["head"] == 0.1 and names["head_no_decay"] == 0.0
    )  # classifier.weight decays, its bias does not


@pytest.mark.parametrize("method", ["adamw", "loraplus"])
def test_head_lr_none_keeps_todays_groups(method):
    model = tiny_bert_classifier()
    wl.attach(model, ["query"], rank=4, seed=0, trainable=["classifier"])
    plain = wl.create_optimizer(model, lr=1e-3, method=method)
    explicit = wl.create_optimizer(model, lr=1e-3, method=method, head_lr=None)
    assert [(g["name"], g["lr"], len(g["params"])) for g in plain.param_groups] == [
        (g["name"], g["lr"], len(g["params"])) for g in explicit.param_groups
    ]
    assert "head" not in {g["name"] for g in plain.param_groups}


def test_head_lr_is_checked():
    model = wl.attach(TinyMLP(), ["up"], rank=2)
    with pytest.raises(UserError, match="head_lr"):
        wl.create_optimizer(model, lr=1e-3, head_lr=-1.0)


class _Setup:
    def attach_kwargs(self) -> dict:
        return {"targets": ["up", "down"], "rank": 3, "alpha": 6.0, "init": "init_b", "trainable": ["norm"]}

    def optimizer_kwargs(self) -> dict:
        return {"lr": 2e-3, "method": "loraplus", "ratio": 8.0, "head_lr": 1e-2}


def test_setup_fills_arguments_and_explicit_arguments_win():
    model = wl.attach(TinyMLP(), setup=_Setup(), seed=0)
    pairs = wl.lora_pairs(model)
    assert [p.rank for p in pairs] == [3, 3] and pairs[0].scale == 2.0
    assert all(p.A.abs().max() == 0 for p in pairs)  # init_b from the setup
    assert model.norm.weight.requires_grad
    other = wl.attach(TinyMLP(), setup=_Setup(), rank=2, init="init_a", seed=0)
    assert [p.rank for p in wl.lora_pairs(other)] == [2, 2]
    assert all(p.B.abs().max() == 0 for p in wl.lora_pairs(other))

    opt = wl.create_optimizer(model, setup=_Setup())
    lrs = _lr_by_param(opt)
    assert lrs[id(pairs[0].A)] == 2e-3 and lrs[id(pairs[0].B)] == pytest.approx(16e-3)
    assert lrs[id(model.norm.weight)] == 1e-2
    # an explicit default value still wins over the setup (the sentinel tells "passed" from "not passed")
    opt = wl.create_optimizer(model, setup=_Setup(), method="adamw", head_lr=None, lr=1e-3)
    assert set(_lr_by_param(opt).values()) == {1e-3}


def test_bad_setup_objects_are_clear_errors():
    class Unknown:
        def attach_kwargs(self) -> dict:
            return {"targets": ["up"], "ranks": 4}

    with pytest.raises(UserError, match=r"unknown keys \['ranks'\]"):
        wl.attach(TinyMLP(), setup=Unknown())
    with pytest.raises(UserError, match="optimizer_kwargs"):
        wl.create_optimizer(wl.attach(TinyMLP(), ["up"], rank=2), setup=object())
    with pytest.raises(UserError, match="targets"):
        wl.attach(TinyMLP())
    with pytest.raises(UserError, match="lr"):
        wl.create_optimizer(wl.attach(TinyMLP(), ["up"], rank=2))


def test_optimizer_names_are_distinct_from_init_names_and_the_old_name_still_works():
    assert "lora_one_precond" in wl.available_methods() and "lora_one" not in wl.available_methods()
    assert "lora_one" in wl.available_schemes()
    model = wl.attach(TinyMLP(), ["up"], rank=2)
    with pytest.warns(DeprecationWarning, match="lora_one_precond"):
        opt = wl.create_optimizer(model, lr=1e-3, method="lora_one")
    assert type(opt).__name__ == "PreconditionedAdamW"

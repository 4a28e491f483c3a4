"""AdamW and LoRA+ parameter groups, checked against the spec and against PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

import widelora as wl
from widelora.testing.models import TinyMLP, tiny_bert_classifier


def _lr_wd_by_param(opt: torch.optim.Optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_loraplus_groups_follow_the_spec():
    model = TinyMLP()
    wl.attach(model, ["up", "down"], rank=4, seed=0, trainable=["norm"])
    opt = wl.create_optimizer(model, lr=1e-3, method="loraplus", ratio=16, weight_decay=0.1)
    by_param = _lr_wd_by_param(opt)
    for pair in wl.lora_pairs(model):
        assert by_param[id(pair.A)] == (1e-3, 0.1)
        assert by_param[id(pair.B)] == (pytest.approx(16e-3), 0.1)
    # 1-D trainable parameters (the norm) go with B, without decay because they are norm parameters
    assert by_param[id(model.norm.weight)] == (pytest.approx(16e-3), 0.0)
    assert by_param[id(model.norm.bias)] == (pytest.approx(16e-3), 0.0)
    assert {g["name"] for g in opt.param_groups} == {"A", "B", "B_no_decay"}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(id(p) not in by_param for p in frozen)


def test_plain_adamw_uses_one_lr_and_honours_weight_decay():
    model = TinyMLP()
    wl.attach(model, ["up"], rank=2, seed=0)
    opt = wl.create_optimizer(model, lr=5e-4, method="adamw", weight_decay=0.05, betas=(0.9, 0.99), eps=1e-6)
    assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == {(5e-4, 0.05)}
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-6


def test_loraplus_matches_peft_grouping_and_keeps_the_users_weight_decay():
    model = get_peft_model(
        tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    ours = _lr_wd_by_param(wl.create_optimizer(model, lr=2e-4, method="loraplus", ratio=8, weight_decay=0.01))
    peft = _lr_wd_by_param(
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8, weight_decay=0.01)
    )
    assert set(ours) == set(peft) and len(ours) > 0
    for pid in ours:
        assert ours[pid][0] == pytest.approx(peft[pid][0])  # identical learning rates, parameter by parameter
    # PEFT silently replaces the user's weight_decay by its own loraplus_weight_decay (0.0); widelora keeps it
    decayed = [pid for pid, (_, wd) in ours.items() if wd > 0]
    assert decayed and all(peft[pid][1] == 0.0 for pid in decayed)
    assert all(wd in (0.0, 0.01) for _, wd in ours.values())


def test_embedding_adapters_get_the_embedding_lr_on_peft_models():
    model = get_peft_model(
        tiny_bert_classifier(), LoraConfig(r=4, target_modules=["word_embeddings", "query"])
    )
    opt = wl.create_optimizer(model, lr=1e-3, method="loraplus", ratio=16, embedding_lr=3e-6)
    emb = next(g for g in opt.param_groups if g["name"] == "embedding")
    names = {n for n, p in model.named_parameters() if any(p is q for q in emb["params"])}
    assert emb["lr"] == 3e-6 and names and all("lora_embedding" in n for n in names)


def test_unknown_method_and_bad_numbers_are_clear_errors():
    model = wl.attach(TinyMLP(), ["up"], rank=2)
    with pytest.raises(ValueError, match=r"unknown.*adamw.*loraplus"):
        wl.create_optimizer(model, lr=1e-3, method="sgdd")
    for kwargs, word in [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 1e-3, "ratio": -1}, "ratio"),
        ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay"),
        ({"lr": 1e-3, "betas": (0.9, 1.5)}, "betas"),
    ]:
        with pytest.raises(ValueError, match=word):
            wl.create_optimizer(model, **kwargs)


def test_a_model_without_trainable_parameters_is_a_clear_error():
    model = TinyMLP()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        wl.create_optimizer(model, lr=1e-3)


def test_the_one_adam_update_matches_torch_adamw():
    from widelora.methods.adam import adamw_step_

    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 3, generator=g)
    q = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 6):
        grad = torch.randn(5, 3, generator=g)
        q.grad = grad.clone()
        opt.step()
        adamw_step_(p, grad, m, v, lr=1e-2, step=t, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)

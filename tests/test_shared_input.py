"""Shared-input adapters: siblings reading one tensor give the same outputs and gradients as separate
layers."""

from __future__ import annotations

import copy

import pytest
import torch

import widelora as wl
from widelora.lora import shared_input
from widelora.testing.models import tiny_bert_classifier, tiny_llama


def _llama_batch(seed: int = 0) -> dict:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _bert_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (2, 12), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 3, (2,), generator=g),
    }


def _adapted(build, dtype: torch.dtype) -> torch.nn.Module:
    model = wl.attach(build(), "all-linear", rank=4, alpha=8, seed=0)
    with torch.no_grad():  # non-zero B so every term of the update and its gradients is exercised
        for p in wl.lora_pairs(model):
            p.B.copy_(torch.randn(p.B.shape, generator=torch.Generator().manual_seed(len(p.name))) * 0.1)
    model.to(dtype)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return model.train()


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("build,batch", [(tiny_llama, _llama_batch), (tiny_bert_classifier, _bert_batch)])
def test_shared_input_path_equals_the_separate_path(build, batch, dtype, tol, monkeypatch):
    calls = []
    real = shared_input.shared_input_lora
    monkeypatch.setattr(
        shared_input, "shared_input_lora", lambda x, layers: calls.append(len(layers)) or real(x, layers)
    )
    shared = _adapted(build, dtype)
    separate = copy.deepcopy(shared)
    wl.set_shared_input(separate, False)
    for step in range(3):  # the first forward learns the groups, later ones use them
        b = batch(step)
        loss_s, grads_s = _loss_and_grads(shared, b)
        loss_p, grads_p = _loss_and_grads(separate, b)
        torch.testing.assert_close(loss_s, loss_p, rtol=tol, atol=tol)
        assert grads_s.keys() == grads_p.keys() and grads_s
        for name in grads_s:
            torch.testing.assert_close(grads_s[name], grads_p[name], rtol=tol, atol=tol, msg=name)
    # the stacked path did run, for q/k/v (3) and, on Llama, gate/up (2); never for o_proj alone
    assert calls and set(calls) <= {2, 3} and 3 in calls


def test_a_member_given_another_tensor_computes_on_its_own():
    """k and v fed a different tensor than q (cross-attention-like): the guess is refused, results exact."""
    model = _adapted(tiny_llama, torch.float32)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features)
    y = torch.randn(2, 5, attn.q_proj.in_features)
    for _ in range(2):  # learn q, k, v as one run
        outs_shared = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    other = [attn.q_proj(x), attn.k_proj(y), attn.v_proj(y)]
    wl.set_shared_input(model, False)
    torch.testing.assert_close(other[0], outs_shared[0])
    torch.testing.assert_close(other[1], attn.k_proj(y))
    torch.testing.assert_close(other[2], attn.v_proj(y))


def test_in_place_change_of_the_input_between_members_is_detected():
    model = _adapted(tiny_llama, torch.float32)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features)
    with torch.no_grad():
        for _ in range(2):
            attn.q_proj(x), attn.k_proj(x)
        attn.q_proj(x)
        x.mul_(2.0)  # bumps x's version: k must not take the output computed from the old values
        got = attn.k_proj(x)
        wl.set_shared_input(model, False)
        torch.testing.assert_close(got, attn.k_proj(x))


def test_deepcopy_and_state_dict_are_unaffected():
    model = _adapted(tiny_llama, torch.float32)
    model(**_llama_batch())
    model(**_llama_batch())  # a pending group output may be cached now
    clone = copy.deepcopy(model)
    assert clone.state_dict().keys() == model.state_dict().keys()
    q = clone.model.layers[0].self_attn.q_proj
    assert q.__dict__["_shared_input"].members[0] is q  # groups point at the copy's own layers
    torch.testing.assert_close(clone(**_llama_batch()).loss, model(**_llama_batch()).loss)


def test_gradient_checkpointing_recomputes_the_shared_path_exactly():
    from torch.utils.checkpoint import checkpoint

    model = _adapted(tiny_llama, torch.float32)
    batch = _llama_batch()
    _loss_and_grads(model, batch)  # learn the groups
    loss, grads = _loss_and_grads(model, batch)
    layers = model.model.layers
    originals = [layer.forward for layer in layers]
    for layer, fwd in zip(layers, originals, strict=True):
        layer.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    ckpt_loss, ckpt_grads = _loss_and_grads(model, batch)
    assert torch.equal(loss, ckpt_loss)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=0, atol=1e-7, msg=name)

"""LoRA layer, attachment, merge/unload and the zero-product initializations."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import widelora as wl
from widelora.testing.models import TinyMLP, tiny_gpt2, tiny_llama

ZERO_PRODUCT = ["init_a", "init_b", "kaiming", "gaussian"]


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(2, 24),
    d_out=st.integers(2, 24),
    rank_frac=st.floats(0.0, 1.0),
    scheme=st.sampled_from(ZERO_PRODUCT),
    scaling=st.sampled_from(["standard", "rslora"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_zero_product_inits_leave_outputs_unchanged(d_in, d_out, rank_frac, scheme, scaling, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 3))
    x = torch.randn(5, d_in)
    before = model(x)
    rank = 1 + int(rank_frac * (min(d_in, d_out) - 1))
    wl.attach(model, targets=["0"], rank=rank, alpha=2.0, init=scheme, scaling=scaling, seed=seed)
    pair = wl.lora_pairs(model)[0]
    assert (pair.B @ pair.A).abs().max() == 0  # the product really is zero
    assert pair.A.abs().sum() + pair.B.abs().sum() > 0  # and one factor really is random
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_init_distributions_match_the_paper_and_peft():
    wrapped = nn.Sequential(nn.Linear(4096, 64))
    for scheme, check in {
        "init_a": lambda p: (p.A.std().item(), 1 / 4096**0.5, p.B.abs().max().item()),
        "kaiming": lambda p: (p.A.abs().max().item(), 1 / 4096**0.5, p.B.abs().max().item()),
        "gaussian": lambda p: (p.A.std().item(), 1 / 8, p.B.abs().max().item()),
        "init_b": lambda p: (p.B.std().item(), 1 / 8**0.5, p.A.abs().max().item()),
    }.items():
        m = copy.deepcopy(wrapped)
        wl.attach(m, targets=["0"], rank=8, init=scheme, seed=0)
        measured, expected, zero = check(wl.lora_pairs(m)[0])
        assert measured == pytest.approx(expected, rel=0.05), scheme
        assert zero == 0, scheme


def test_same_seed_same_adapters_different_seed_different():
    a, b, c = (wl.attach(TinyMLP(), ["up", "down"], rank=4, seed=s) for s in (7, 7, 8))
    pa, pb, pc = (wl.lora_pairs(m)[0].A for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_pissa_leaves_outputs_unchanged_and_moves_w():
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 9))
    before = model(x).logits
    w_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    wl.attach(model, ["q_proj", "v_proj"], rank=4, alpha=8, init="pissa")
    torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-5)
    pair = wl.lora_pairs(model)[0]
    assert not torch.allclose(pair.weight, w_before)
    torch.testing.assert_close(pair.weight + pair.delta(), w_before, rtol=1e-5, atol=1e-6)
    # re-initializing restores the user's W before applying the new scheme
    wl.initialize(model, "init_a", seed=0)
    torch.testing.assert_close(wl.lora_pairs(model)[0].weight, w_before, rtol=1e-5, atol=1e-6)
    assert wl.lora_pairs(model)[0].base_offset is None


def test_forward_matches_formula_and_only_adapters_get_gradients():
    model = TinyMLP()
    wl.attach(model, ["up"], rank=3, alpha=6, init="init_b", seed=1)
    layer = model.up
    x = torch.randn(4, 12)
    expected = (
        x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    )
    torch.testing.assert_close(layer(x), expected)
    model(x).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"up.lora_A", "up.lora_B"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_plain_and_fused_paths_agree_inside_the_layer():
    model = tiny_llama()
    wl.attach(model, "all-linear", rank=4, seed=0)
    for p in wl.lora_pairs(model):
        nn.init.normal_(p.B, std=0.05)
    x = torch.randint(0, 64, (2, 9))
    fused = model(x).logits
    wl.set_fused(model, False)
    torch.testing.assert_close(model(x).logits, fused, rtol=1e-5, atol=1e-6)


def test_all_linear_excludes_the_output_head():
    model = tiny_llama()
    wl.attach(model, "all-linear", rank=2)
    names = {p.name for p in wl.lora_pairs(model)}
    assert "lm_head" not in names and len(names) == 2 * 7


def test_regex_and_suffix_targets():
    model = tiny_llama()
    names = wl.match_targets(model, r"model\.layers\.0\.self_attn\.(q|v)_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert len(wl.match_targets(model, ["q_proj"])) == 2


def test_merge_unmerge_restores_weights_and_unload_returns_plain_model():
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 9))
    wl.attach(model, ["q_proj", "down_proj"], rank=4, seed=0)
    for p in wl.lora_pairs(model):
        nn.init.normal_(p.B, std=0.1)
    w0 = {p.name: p.weight.clone() for p in wl.lora_pairs(model)}
    adapted = model(x).logits
    wl.merge(model)
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-5)
    wl.unmerge(model)
    for p in wl.lora_pairs(model):
        torch.testing.assert_close(p.weight, w0[p.name], rtol=0, atol=1e-6)
    plain = wl.unload(model)
    assert not any(isinstance(m, wl.LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, adapted, rtol=1e-4, atol=1e-5)


def test_conv1d_gpt2_weights_are_handled_transposed():
    model = tiny_gpt2()
    x = torch.randint(0, 64, (2, 7))
    before = model(x).logits
    wl.attach(model, ["c_attn", "c_fc"], rank=4, init="init_a", seed=0)
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    pair = wl.lora_pairs(model)[0]
    assert (
        pair.transposed
        and pair.weight.shape == (96, 32)
        and pair.A.shape == (4, 32)
        and pair.B.shape == (96, 4)
    )
    nn.init.normal_(pair.B, std=0.1)
    adapted = model(x).logits
    wl.merge(model)
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-5)


def test_dropout_is_seeded_and_eval_is_exact():
    model = TinyMLP()
    wl.attach(model, ["up"], rank=4, dropout=0.5, init="init_b", seed=0)
    x = torch.randn(8, 12)
    model.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = model(x)
    torch.testing.assert_close(a, b)
    model.eval()
    layer = model.up
    expected = layer.base_layer(x) + layer.scale * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)

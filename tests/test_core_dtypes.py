"""bfloat16 / float16 in LoRALinear and the fused path: forward and backward against a float32 reference.

Two layouts occur in practice: everything in the half dtype (a model cast with `.to(dtype)` before `attach`),
and a half-precision base with float32 adapters (what training does, so optimizer state stays float32).
Tolerances are relative to the output's size: bfloat16 keeps 8 mantissa bits (relative error ~4e-3 per
rounding), float16 keeps 11.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import widelora as wl
from widelora.lora.fused import can_fuse
from widelora.testing.models import tiny_gpt2

HALF = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _layer(conv1d: bool) -> nn.Module:
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(Conv1D(24, 16))
    return nn.Sequential(nn.Linear(16, 24))


def _adapted(conv1d: bool) -> nn.Module:
    model = wl.attach(_layer(conv1d), ["0"], rank=4, alpha=8, seed=0)
    with torch.no_grad():
        nn.init.normal_(wl.lora_pairs(model)[0].B, std=0.2)
    return model


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    pair = wl.lora_pairs(model)[0]
    return y, x.grad, pair.A.grad, pair.B.grad


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOL[dtype] * max(expected.abs().max().item(), 1e-3), err


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("adapters_float32", [False, True])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_forward_and_backward_match_float32(dtype, adapters_float32, fused, conv1d):
    reference = _adapted(conv1d)
    model = copy.deepcopy(reference).to(dtype)
    if adapters_float32:
        for p in wl.lora_pairs(model):
            p.A.data, p.B.data = p.A.data.float(), p.B.data.float()
    wl.set_fused(model, fused)
    x = torch.randn(3, 5, 16)
    assert can_fuse(x.to(dtype), 0.0, model[0].weight, model[0].lora_A, model[0].lora_B)
    y, gx, ga, gb = _run(model, x.to(dtype))
    y_ref, gx_ref, ga_ref, gb_ref = _run(reference, x)
    assert y.dtype == dtype and gx.dtype == dtype
    pair = wl.lora_pairs(model)[0]
    assert ga.dtype == pair.A.dtype and gb.dtype == pair.B.dtype
    for ours, ref in ((y, y_ref), (gx, gx_ref), (ga, ga_ref), (gb, gb_ref)):
        _close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_fused_and_plain_paths_agree_in_half_precision(dtype):
    model = _adapted(conv1d=False).to(dtype)
    x = torch.randn(4, 16).to(dtype)
    wl.set_fused(model, True)
    fused = _run(model, x)
    model.zero_grad()
    wl.set_fused(model, False)
    plain = _run(model, x)
    for a, b in zip(fused, plain, strict=True):
        _close(a, b, dtype)


def test_a_bfloat16_gpt2_with_float32_adapters_trains_a_step_without_autocast():
    model = tiny_gpt2().to(torch.bfloat16)
    wl.attach(model, ["c_attn", "c_fc"], rank=4, seed=0)
    for p in wl.lora_pairs(model):
        p.A.data, p.B.data = p.A.data.float(), p.B.data.float()
    opt = wl.create_optimizer(model, lr=1e-2)
    ids = torch.randint(0, 60, (2, 8))
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(p.B.abs().max() > 0 and p.B.dtype == torch.float32 for p in wl.lora_pairs(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and under autocast, as the training loop runs it
        assert torch.isfinite(model(ids, labels=ids).loss)

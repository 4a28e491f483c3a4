"""The fused LoRA linear equals the plain path (outputs and gradients), refuses what it cannot do exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from widelora.lora.fused import can_fuse, fused_lora_linear


def _plain(x, weight, bias, A, B, scale, weight_transposed=False, dropout=None):
    """The reference: what PEFT's LoraLayer.forward computes."""
    w = weight.t() if weight_transposed else weight
    base = F.linear(x, w, bias)
    xd = dropout(x) if dropout is not None else x
    return base + F.linear(F.linear(xd, A), B) * scale


def _make(shape, out_f, r, dtype, bias=True, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_f = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    if transposed:
        w = w.t().contiguous()
    w = w.to(dtype)
    b = (torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype)) if bias else None
    A = (torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5).to(dtype).requires_grad_()
    # B nonzero so that every gradient term is exercised (B = 0 at init would hide errors in grad_A).
    B = (torch.randn(out_f, r, generator=g, dtype=torch.float64) / r**0.5).to(dtype).requires_grad_()
    return x, w, b, A, B


def _grads(fn, x, w, b, A, B, scale, transposed, gy):
    for t in (x, A, B):
        t.grad = None
    y = fn(x, w, b, A, B, scale, transposed)
    y.backward(gy)
    return y.detach().clone(), x.grad.clone(), A.grad.clone(), B.grad.clone()


# (atol, rtol) per dtype; bf16 keeps 8 mantissa bits, and the fused path rounds the in-place sum once where
# the
# plain path rounds the LoRA term, its scaled copy and the sum separately, so results differ by a few bf16
# ulps.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,out_f,r",
    [((7, 12), 10, 1), ((2, 5, 16), 24, 4), ((3, 2, 4, 8), 8, 8), ((4, 32), 16, 16), ((9,), 5, 2)],
)
@pytest.mark.parametrize("bias,transposed", [(True, False), (False, False), (True, True)])
def test_fused_matches_plain(dtype, shape, out_f, r, bias, transposed):
    x, w, b, A, B = _make(shape, out_f, r, dtype, bias, transposed)
    scale = 2.0 / r
    gy = torch.randn(*shape[:-1], out_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = _grads(_plain, x, w, b, A, B, scale, transposed, gy)
    got = _grads(fused_lora_linear, x, w, b, A, B, scale, transposed, gy)
    atol, rtol = TOL[dtype]
    for name, a, e in zip(("y", "grad_x", "grad_A", "grad_B"), got, ref, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("save_xa", [True, False])
@pytest.mark.parametrize("bias,transposed", [(True, False), (True, True)])
def test_gradcheck_float64(save_xa, bias, transposed):
    x, w, b, A, B = _make((2, 3, 5), 4, 3, torch.float64, bias, transposed)
    w.requires_grad_()  # W is frozen in practice; its (optional) gradient must still be right
    if b is not None:
        b.requires_grad_()

    def fn(x, w, b, A, B):
        return fused_lora_linear(x, w, b, A, B, 0.7, weight_transposed=transposed, save_xa=save_xa)

    assert torch.autograd.gradcheck(fn, (x, w, b, A, B))


def test_frozen_weight_gets_no_grad_and_saves_no_copy():
    x, w, b, A, B = _make((4, 6, 8), 8, 2, torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused_lora_linear(x, w, b, A, B, 1.0)
    y.sum().backward()
    assert w.grad is None and b.grad is None
    # Saved: x itself (same storage), W, A, B (parameters) and the thin xa = (24, 2). Nothing (N, out)-sized.
    ptrs = {t.data_ptr() for t in saved}
    assert x.data_ptr() in ptrs
    new = [t for t in saved if t.data_ptr() not in {x.data_ptr(), w.data_ptr(), A.data_ptr(), B.data_ptr()}]
    assert [tuple(t.shape) for t in new] == [(24, 2)]


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    in_f=st.integers(1, 9),
    out_f=st.integers(1, 9),
    r=st.integers(1, 5),
    scale=st.floats(0.1, 4.0),
)
def test_fused_matches_plain_property(lead, in_f, out_f, r, scale):
    x, w, b, A, B = _make((*lead, in_f), out_f, r, torch.float64)
    gy = torch.randn(*lead, out_f, dtype=torch.float64)
    ref = _grads(_plain, x, w, b, A, B, scale, False, gy)
    got = _grads(fused_lora_linear, x, w, b, A, B, scale, False, gy)
    for a, e in zip(got, ref, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


def test_can_fuse_conditions():
    x = torch.randn(2, 3, 4)
    w, A, B = torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    assert can_fuse(x, 0.0, w, A, B)
    assert not can_fuse(x, 0.1, w, A, B)  # dropout: the A branch sees a different input
    assert not can_fuse(x.transpose(0, 1), 0.0, w, A, B)  # 3-D non-contiguous: flattening would copy
    assert can_fuse(torch.randn(4, 3).t(), 0.0, torch.randn(5, 3), torch.randn(2, 3), torch.randn(5, 2))
    assert not can_fuse(x, 0.0, w.double(), A, B)  # mixed dtypes
    assert not can_fuse(x.long(), 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_fuse(x, 0.0, w, A, B)


def _layer_forward(x, w, b, A, B, scale, dropout, use_fused=True):
    """How a layer dispatches (mirrors LoRALinear.forward): fused when possible, plain otherwise."""
    p = dropout.p if dropout.training else 0.0
    if use_fused and can_fuse(x, p, w, A, B):
        return fused_lora_linear(x, w, b, A, B, scale), True
    return _plain(x, w, b, A, B, scale, dropout=dropout), False


def test_fallbacks_are_used_and_exact():
    x, w, b, A, B = _make((3, 4, 6), 5, 2, torch.float32)
    # non-contiguous 3-D input: falls back, and equals the fused result on a contiguous copy
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not xt.is_contiguous()
    y_nc, used = _layer_forward(xt, w, b, A, B, 0.5, torch.nn.Dropout(0.0))
    assert not used
    y_c = fused_lora_linear(x, w, b, A, B, 0.5)
    torch.testing.assert_close(y_nc, y_c, atol=1e-6, rtol=1e-6)
    # dropout > 0 in training: falls back, and the same seed gives the plain path's exact numbers
    drop = torch.nn.Dropout(0.3).train()
    torch.manual_seed(3)
    y_d, used = _layer_forward(x, w, b, A, B, 0.5, drop)
    assert not used
    torch.manual_seed(3)
    torch.testing.assert_close(y_d, _plain(x, w, b, A, B, 0.5, dropout=drop), atol=0, rtol=0)
    # the same layer in eval mode has no dropout: fuses
    drop.eval()
    y_e, used = _layer_forward(x, w, b, A, B, 0.5, drop)
    assert used
    torch.testing.assert_close(y_e, _plain(x, w, b, A, B, 0.5), atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise_naming_the_argument():
    x, w, b, A, B = _make((2, 4), 3, 2, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        fused_lora_linear(x, w.t(), b, A, B, 1.0)
    with pytest.raises(ValueError, match="A has shape"):
        fused_lora_linear(x, w, b, A[:, :3], B, 1.0)
    with pytest.raises(ValueError, match="B has shape"):
        fused_lora_linear(x, w, b, A, B[:, :1], 1.0)
    with pytest.raises(ValueError, match="bias"):
        fused_lora_linear(x, w, b[:2], A, B, 1.0)


def test_no_grad_inference_and_zero_rows():
    x, w, b, A, B = _make((0, 4), 3, 2, torch.float32)
    y = fused_lora_linear(x, w, b, A, B, 1.0)
    assert y.shape == (0, 3)
    x, w, b, A, B = _make((5, 4), 3, 2, torch.float32)
    with torch.no_grad():
        y = fused_lora_linear(x, w, b, A, B, 1.5)
        torch.testing.assert_close(y, _plain(x, w, b, A, B, 1.5), atol=1e-6, rtol=1e-6)
    assert not y.requires_grad


def test_lora_linear_uses_fused_path_and_matches_plain():
    """The real layer: fused when dropout is inactive (grad_fn tells), plain otherwise; same numbers."""
    from widelora.lora.layer import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 6, requires_grad=True)
    results = {}
    for fused in (True, False):
        layer.use_fused = fused
        for p in (x, layer.lora_A, layer.lora_B):
            p.grad = None
        y = layer(x)
        assert ("_FusedLoRALinear" in type(y.grad_fn).__name__) is fused
        y.pow(2).sum().backward()
        results[fused] = [t.detach().clone() for t in (y, x.grad, layer.lora_A.grad, layer.lora_B.grad)]
    for a, e in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    drop = LoRALinear(torch.nn.Linear(6, 5), rank=3, alpha=6.0, dropout=0.5).train()
    assert "_FusedLoRALinear" not in type(drop(x).grad_fn).__name__  # dropout active: plain path
    assert "_FusedLoRALinear" in type(drop.eval()(x).grad_fn).__name__  # eval: dropout is the identity

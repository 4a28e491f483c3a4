"""Shared-input adapters: sibling LoRA layers that read the same tensor compute their A products in one GEMM.

q, k and v (and gate and up) read one hidden state. Separately, each adapter multiplies that (N × in) input by
its thin (r × in) ``A`` in the forward pass and again for ``grad_A`` and the ``A`` part of ``grad_x`` in the
backward pass: three reads of ``x`` per product, each a thin, memory-bound GEMM. Stacked, ``x [A_q; A_k;
A_v]ᵀ``, ``grad_A = (g B)_catᵀ x`` and ``grad_x += (g B)_cat A_cat`` are one GEMM each, and the whole group is
one autograd node, so the group's input gradient is accumulated in place (``addmm_``) into one buffer.

Why detect at run time rather than by name: which siblings share an input is a property of the model's
forward code (o_proj sits next to q/k/v with the same width but reads the attention output; cross-attention
feeds k and v another tensor). Siblings (same parent, same input width) form a candidate group at attach time;
during a forward the group records which members were called with the very same tensor object (identity and
version), and from the next forward on, the first member of such a run computes the outputs of all of them at
once. Every member still checks that it received that exact tensor before taking its precomputed output, so a
wrong guess only costs a separate (still exact) computation, never a wrong result.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["SharedInput", "link_siblings", "shared_input_lora"]


class _SharedInputLoRA(torch.autograd.Function):
    """``y_j = x W_jᵀ (+ b_j) + s_j (x A_jᵀ) B_jᵀ`` for every member j, with the A products stacked."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, meta: tuple, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        scales, transposed = meta
        k = len(scales)
        weights, biases, a_list, b_list = (tensors[i * k : (i + 1) * k] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat([a.to(x.dtype) for a in a_list])  # (R, in): r·in numbers per member, never N-sized
        xa = torch.mm(x2, a_cat.t())  # (N, R): one GEMM for the whole group
        outs, start = [], 0
        for w, bias, a, b, s, wt in zip(weights, biases, a_list, b_list, scales, transposed, strict=True):
            w_t = w if wt else w.t()
            y = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)
            y.addmm_(xa[:, start : start + a.shape[0]], b.to(x.dtype).t(), alpha=s)
            start += a.shape[0]
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.meta = meta
        ctx.has_bias = [bias is not None for bias in biases]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, xa, *weights, *a_list, *b_list)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        scales, transposed = ctx.meta
        k = len(scales)
        x, xa, *rest = ctx.saved_tensors
        weights, a_list, b_list = rest[:k], rest[k : 2 * k], rest[2 * k :]
        need = ctx.needs_input_grad
        need_x = need[0]
        need_w, need_bias, need_a, need_b = (need[2 + i * k : 2 + (i + 1) * k] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        gs = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        gb = x2.new_zeros(x2.shape[0], xa.shape[1])  # (N, R): s_j (g_j B_j) side by side
        start = 0
        slices = []
        for g, b, a, s in zip(gs, b_list, a_list, scales, strict=True):
            sl = slice(start, start + a.shape[0])
            slices.append(sl)
            start += a.shape[0]
            if g is not None:
                gb[:, sl] = torch.mm(g, b.to(x.dtype)).mul_(s)
        grad_x = None
        if need_x:
            for g, w, wt in zip(gs, weights, transposed, strict=True):
                if g is None:
                    continue
                w_io = w.t() if wt else w  # (out, in)
                grad_x = torch.mm(g, w_io) if grad_x is None else grad_x.addmm_(g, w_io)
            a_cat = torch.cat([a.to(x.dtype) for a in a_list])
            grad_x = torch.mm(gb, a_cat) if grad_x is None else grad_x.addmm_(gb, a_cat)
            grad_x = grad_x.view(x.shape)
        grad_a_cat = torch.mm(gb.t(), x2) if any(need_a) else None  # (R, in): one GEMM for the group
        grad_w, grad_bias, grad_a, grad_b = [None] * k, [None] * k, [None] * k, [None] * k
        for j, (g, sl) in enumerate(zip(gs, slices, strict=True)):
            if need_a[j]:
                grad_a[j] = grad_a_cat[sl].to(a_list[j].dtype)
            if g is None:
                continue
            if need_b[j]:
                grad_b[j] = torch.mm(g.t(), xa[:, sl]).mul_(scales[j]).to(b_list[j].dtype)
            if need_w[j]:
                grad_w[j] = torch.mm(x2.t(), g) if transposed[j] else torch.mm(g.t(), x2)
            if need_bias[j] and ctx.has_bias[j]:
                grad_bias[j] = g.sum(0)
        return (grad_x, None, *grad_w, *grad_bias, *grad_a, *grad_b)


def shared_input_lora(x: torch.Tensor, layers: list[nn.Module]) -> tuple[torch.Tensor, ...]:
    """The outputs of ``layers`` (widelora LoRALinear, all fusable on ``x``) on the one input ``x``."""
    meta = (tuple(float(m.scale) for m in layers), tuple(bool(m.weight_transposed) for m in layers))
    tensors = (
        [m.base_layer.weight for m in layers]
        + [m.bias for m in layers]
        + [m.lora_A for m in layers]
        + [m.lora_B for m in layers]
    )
    return _SharedInputLoRA.apply(x, meta, *tensors)


class _Pending:
    def __init__(self, x: torch.Tensor, outputs: dict[int, torch.Tensor]) -> None:
        self.x_ref = weakref.ref(x)
        self.version = x._version
        self.outputs = outputs

    def matches(self, x: torch.Tensor) -> bool:
        return self.x_ref() is x and self.version == x._version


class SharedInput:
    """A candidate group of sibling adapters; learns which of them read one tensor (see the module docs)."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = list(members)
        self.index = {id(m): i for i, m in enumerate(self.members)}
        self.runs: dict[int, tuple[int, ...]] = {}  # member -> members that read its input last time
        self._trace: list[int] = []
        self._trace_input: _Pending | None = None
        self._pending: _Pending | None = None

    def __deepcopy__(
        self, memo: dict
    ) -> SharedInput:  # never copy cached tensors (they carry autograd graphs)
        return SharedInput([copy.deepcopy(m, memo) for m in self.members])

    def __getstate__(self) -> dict:
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    def _observe(self, i: int, x: torch.Tensor) -> None:
        if self._trace_input is not None and self._trace_input.matches(x):
            self._trace.append(i)
            return
        if len(self._trace) > 0:
            run = tuple(self._trace)
            for j in run:
                self.runs[j] = run
        self._trace, self._trace_input = [i], _Pending(x, {})

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output from the group computation, or None: compute it on its own."""
        i = self.index.get(id(layer))
        if i is None:
            return None
        self._observe(i, x)
        pending = self._pending
        if pending is not None and pending.matches(x) and i in pending.outputs:
            y = pending.outputs.pop(i)
            if not pending.outputs:
                self._pending = None
            return y
        run = self.runs.get(i, ())
        if len(run) < 2 or run[0] != i:
            return None
        layers = [self.members[j] for j in run]
        if not all(m.fusable(x) for m in layers):
            return None
        outs = shared_input_lora(x, layers)
        self._pending = _Pending(x, dict(zip(run[1:], outs[1:], strict=True)))
        return outs[0]


def link_siblings(model: nn.Module, layer_type: type) -> None:
    """(Re)build the candidate groups: ``layer_type`` children of one parent with the same input width."""
    for parent in model.modules():
        by_width: dict[tuple, list[nn.Module]] = {}
        for child in parent.children():
            if isinstance(child, layer_type):
                key = (child.in_features, child.lora_A.device, child.base_layer.weight.dtype)
                by_width.setdefault(key, []).append(child)
        for members in by_width.values():
            group = SharedInput(members) if len(members) > 1 else None
            for m in members:
                m.__dict__["_shared_input"] = group

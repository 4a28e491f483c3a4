"""The teacher–student toy model of the initialization paper (seed 001, Section 3.7, eq. 4; Appendix B.1.1).

    Y_in  = W_in x
    Y_h   = Y_in + (W_h + s·B A) φ(Y_in)
    f(x)  = Y_out = W_out φ(Y_h)            φ = ReLU, s = alpha / r

This is the paper's eq. (4); Appendix B.1.1 writes the same thing in one line, ``f(x) = W_out φ(W_in x + (W_h
+ BA) φ(W_in x))``. The paper has no ``s``; we keep widelora's ``s = alpha/r`` and default ``alpha = r`` so
``s = 1`` reproduces the paper.

The hidden layer is a widelora ``LoRALinear`` wrapping ``nn.Linear(n, n)`` with weight ``W_h``, so every
widelora tool (initialization registry, optimizers, feature monitor, ``lora_pairs``) works on it unchanged.

Random weights come from generators seeded by ``derive_seed(seed, width, tag)``, so a (seed, width) pair
always gives the same student, independent of what else was generated before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from widelora.lora.layer import LoRALinear

_TAGS = {"teacher": 1, "student": 2, "init": 3, "data": 4, "batches": 5}


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and tags, stable across processes and platforms."""
    words = [_TAGS.get(p, sum(map(ord, p))) if isinstance(p, str) else int(p) for p in parts]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32


def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


@dataclass
class FrozenWeights:
    """The frozen part of a toy model: W_in (n, d), W_h (n, n), W_out (n,)."""

    w_in: torch.Tensor
    w_h: torch.Tensor
    w_out: torch.Tensor

    @property
    def width(self) -> int:
        return self.w_in.shape[0]


def student_weights(d: int, width: int, seed: int, dtype: torch.dtype = torch.float32) -> FrozenWeights:
    """Appendix B.1.1: W_in ~ N(0, 1/d), W_h ~ N(0, 1/n), W_out ~ N(0, 1/n), frozen (not the teacher's)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, width, "student"))
    return FrozenWeights(
        w_in=_randn((width, d), 1.0 / math.sqrt(d), gen, dtype),
        w_h=_randn((width, width), 1.0 / math.sqrt(width), gen, dtype),
        w_out=_randn((width,), 1.0 / math.sqrt(width), gen, dtype),
    )


class ToyModel(nn.Module):
    """``f(x) = W_out φ(W_in x + (W_h + s·B A) φ(W_in x))``, a widelora LoRALinear on W_h; x is (..., d)."""

    def __init__(self, frozen: FrozenWeights, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
        n, d = frozen.w_in.shape
        dtype = frozen.w_in.dtype
        self.w_in = nn.Linear(d, n, bias=False, dtype=dtype)
        hidden = nn.Linear(n, n, bias=False, dtype=dtype)
        self.w_out = nn.Linear(n, 1, bias=False, dtype=dtype)
        with torch.no_grad():
            self.w_in.weight.copy_(frozen.w_in)
            hidden.weight.copy_(frozen.w_h)
            self.w_out.weight.copy_(frozen.w_out.reshape(1, n))
        for p in (self.w_in.weight, hidden.weight, self.w_out.weight):
            p.requires_grad_(False)
        self.hidden = LoRALinear(hidden, rank=rank, alpha=float(rank if alpha is None else alpha))

    @property
    def width(self) -> int:
        return self.w_in.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_in = self.w_in(x)
        y_h = y_in + self.hidden(F.relu(y_in))
        return self.w_out(F.relu(y_h)).squeeze(-1)


def toy_formula(
    x: torch.Tensor, frozen: FrozenWeights, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """The same function written as one formula (the reference the tests compare ``ToyModel`` against)."""
    y_in = x @ frozen.w_in.T
    y_h = y_in + F.relu(y_in) @ (frozen.w_h + scale * B @ A).T
    return F.relu(y_h) @ frozen.w_out


def make_teacher(
    d: int = 5, width: int = 1000, rank: int = 20, seed: int = 0, dtype: torch.dtype = torch.float32
) -> ToyModel:
    """The teacher of Section 3.7: weights Gaussian with variance 1/fan-in, W_h = 0, LoRA (rank 20) injected.

    Footnote 11: the "pretrained" model is ``W_out φ(W_in x)``; the finetuning data come from adding the
    teacher's own low-rank update ``B A``.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, width, "teacher"))
    frozen = FrozenWeights(
        w_in=_randn((width, d), 1.0 / math.sqrt(d), gen, dtype),
        w_h=torch.zeros(width, width, dtype=dtype),
        w_out=_randn((width,), 1.0 / math.sqrt(width), gen, dtype),
    )
    teacher = ToyModel(frozen, rank=rank)
    with torch.no_grad():
        teacher.hidden.lora_A.copy_(_randn((rank, width), 1.0 / math.sqrt(width), gen, dtype))
        teacher.hidden.lora_B.copy_(_randn((width, rank), 1.0 / math.sqrt(rank), gen, dtype))
    teacher.requires_grad_(False)
    return teacher


@dataclass
class ToyData:
    """Train and test sets drawn from the teacher: x ~ N(0, I_d), y = teacher(x)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, dtype: torch.dtype) -> ToyData:
        return ToyData(*(t.to(dtype) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def make_data(
    d: int = 5,
    teacher_width: int = 1000,
    teacher_rank: int = 20,
    n_train: int = 1000,
    n_test: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> ToyData:
    """The synthetic data set of Appendix B.1.1 (teacher computed in float64, then cast)."""
    for name, value in (
        ("d", d),
        ("teacher_width", teacher_width),
        ("teacher_rank", teacher_rank),
        ("n_train", n_train),
        ("n_test", n_test),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    teacher = make_teacher(d, teacher_width, teacher_rank, seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(derive_seed(seed, "data"))
    x = torch.randn((n_train + n_test, d), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    return ToyData(x[:n_train], y[:n_train], x[n_train:], y[n_train:]).to(dtype)

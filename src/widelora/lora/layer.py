"""The LoRA linear layer: a frozen base projection plus a trainable low-rank update `s · B A`.

Kept deliberately small (forward is a handful of lines, as in loralib): everything that initializes,
optimizes, monitors or saves adapters goes through `widelora.lora.pairs.LoRAPair` instead of poking at this
class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from widelora.errors import UserError
from widelora.lora import fused as _fused
from widelora.lora.modules import is_conv1d, linear_shape

SCALINGS = ("standard", "rslora")


def lora_scale(alpha: float, rank: int, scaling: str) -> float:
    """`alpha / r` (standard) or `alpha / sqrt(r)` (rsLoRA)."""
    if scaling == "standard":
        return alpha / rank
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise UserError(f"scaling={scaling!r} is not valid; choose one of {list(SCALINGS)}")


class LoRALinear(nn.Module):
    """`y = base(x) + s · B (A dropout(x))` around a frozen nn.Linear or Conv1D.

    Parameter names follow PEFT (`lora_A`, `lora_B`, `base_layer`) so adapters map one-to-one onto PEFT's
    format.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        scaling: str = "standard",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_f, in_f = linear_shape(base_layer)
        self.base_layer = base_layer
        self.weight_transposed = is_conv1d(base_layer)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling_mode = scaling
        self.scale = lora_scale(alpha, rank, scaling)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, in_f, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=w.dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.use_fused = True
        self.use_shared_input = (
            True  # group A products with siblings reading the same input (shared_input.py)
        )

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as the base layer stores it (code that reads `.weight` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self) -> torch.Tensor:
        """`s · B A` in (out, in) orientation."""
        return self.scale * (self.lora_B @ self.lora_A)

    def fusable(self, x: torch.Tensor) -> bool:
        """True when the fused path computes exactly what the plain path does on ``x``."""
        if self.merged or self.disabled or not self.use_fused:
            return False
        # Dropout only acts in training mode; in eval the fused path is exact whatever p is.
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        return _fused.can_fuse(x, p, self.base_layer.weight, self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.fusable(x):
            shared = self.__dict__.get("_shared_input")
            if shared is not None and self.use_shared_input:
                y = shared.forward(self, x)
                if y is not None:
                    return y
            return _fused.fused_lora_linear(
                x,
                self.base_layer.weight,
                self.bias,
                self.lora_A,
                self.lora_B,
                self.scale,
                weight_transposed=self.weight_transposed,
            )
        y = self.base_layer(x)
        x_a = self.dropout(x)
        if x_a.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x_a = x_a.to(
                self.lora_A.dtype
            )  # float32 adapters on a half base: the branch runs in float32 (PEFT's rule)
        lora = self.scale * F.linear(F.linear(x_a, self.lora_A), self.lora_B)
        return y + lora.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold `s · B A` into the base weight (inference without adapter overhead)."""
        if self.merged:
            return
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight.add_(delta.T if self.weight_transposed else delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight.sub_(delta.T if self.weight_transposed else delta)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}, scaling={self.scaling_mode}, merged={self.merged}"
        )

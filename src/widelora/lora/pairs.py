"""The LoRA pair view: the one place that knows how widelora's layers and PEFT's layers store A, B, W and s.

Initialization schemes, optimizers, the feature monitor, placement and adapter I/O all take `LoRAPair`s, so
they work unchanged on a model adapted by `widelora.attach` and on a `peft.PeftModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from widelora.errors import UserError
from widelora.lora.layer import LoRALinear

PEFT_PREFIX = "base_model.model."


@dataclass(eq=False)
class LoRAPair:
    """A view of one adapted weight: `y = W x + scale · B (A x)`; A is (r, in), B is (out, r)."""

    name: str
    module: nn.Module
    A: nn.Parameter
    B: nn.Parameter
    scale: float
    base_layer: nn.Module
    kind: str  # "widelora" | "peft"
    transposed: bool  # base weight stored as (in, out), GPT-2 Conv1D style
    dropout: nn.Module

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def fan_in(self) -> int:
        return self.A.shape[1]

    @property
    def fan_out(self) -> int:
        return self.B.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in) — a view, transposed for Conv1D."""
        w = self.base_layer.weight
        return w.T if self.transposed else w

    @torch.no_grad()
    def set_weight(self, new: torch.Tensor) -> None:
        """Overwrite the frozen base weight; `new` is (out, in) whatever the layer's storage orientation."""
        w = self.base_layer.weight
        w.copy_((new.T if self.transposed else new).to(w.dtype))

    def delta(self) -> torch.Tensor:
        """`scale · B A`, (out, in)."""
        return self.scale * (self.B @ self.A)

    @property
    def base_offset(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B0, A0) when an init moved W to `W - scale·B0 A0` (PiSSA, LoRA-GA); None otherwise."""
        return getattr(self.module, "_widelora_base_offset", None)

    def set_base_offset(self, offset: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Record (B0, A0) so a portable adapter can fold the moved base weight back in (io.save_adapter)."""
        self.module._widelora_base_offset = offset


def _peft_lora_layer_cls():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency, but keep the core importable without it
        return None
    return LoraLayer


def _peft_pair(name: str, module: nn.Module) -> LoRAPair | None:
    active = module.active_adapters
    adapter = active[0] if active else "default"
    if adapter not in module.lora_A:
        return None
    if len(active) > 1:
        raise UserError(
            f"PEFT module {name!r} has several active adapters {list(active)}; widelora acts on one — "
            "call model.set_adapter(name) first"
        )
    dropout = module.lora_dropout[adapter] if adapter in module.lora_dropout else nn.Identity()
    return LoRAPair(
        name=name.removeprefix(PEFT_PREFIX),
        module=module,
        A=module.lora_A[adapter].weight,
        B=module.lora_B[adapter].weight,
        scale=float(module.scaling[adapter]),
        base_layer=module.get_base_layer(),
        kind="peft",
        transposed=bool(getattr(module, "fan_in_fan_out", False)),
        dropout=dropout,
    )


def lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Every adapted weight in `model`, in module order (widelora layers and PEFT's active adapter alike)."""
    peft_cls = _peft_lora_layer_cls()
    pairs: list[LoRAPair] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            pairs.append(
                LoRAPair(
                    name=name,
                    module=module,
                    A=module.lora_A,
                    B=module.lora_B,
                    scale=module.scale,
                    base_layer=module.base_layer,
                    kind="widelora",
                    transposed=module.weight_transposed,
                    dropout=module.dropout,
                )
            )
        elif peft_cls is not None and isinstance(module, peft_cls) and hasattr(module, "lora_A"):
            pair = _peft_pair(name, module)
            if pair is not None:
                pairs.append(pair)
    return pairs


def require_pairs(model: nn.Module) -> list[LoRAPair]:
    """`lora_pairs`, but a model with no adapters is an error that says what to do."""
    pairs = lora_pairs(model)
    if not pairs:
        raise UserError(
            f"model ({type(model).__name__}) has no LoRA adapters; call widelora.attach(model, targets=...) "
            "or wrap it with peft.get_peft_model first"
        )
    return pairs

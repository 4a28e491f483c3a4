"""LoRA+ (Hayou, Ghosh, Yu 2024): AdamW with the B factors at `ratio` times the learning rate of the A
factors.

Why: at large width, A and B need learning rates of different orders for the feature update to stay stable
and efficient; `ratio` (16 by default) sets lr_B / lr_A. Two bugs seen in peers are avoided on purpose: the
user's weight decay is always honoured (PEFT's `create_loraplus_optimizer` replaces it with its own), and
adapters on embeddings really get `embedding_lr`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from widelora.methods.optim import OptimizerSpec, ParamRole, param_groups, plain_rule, register_optimizer


def loraplus_rule(role: ParamRole, spec: OptimizerSpec) -> tuple[str, float, float]:
    """B matrices and 1-D parameters at `lr · ratio` (no decay for biases and norms), embedding adapters at
    `embedding_lr`, everything else (A matrices, 2-D heads) at `lr`."""
    if role.is_embedding_adapter:
        return "embedding", spec.embedding_lr, spec.weight_decay
    if role.is_b or role.ndim == 1:
        lr = spec.lr * spec.ratio
        return ("B_no_decay", lr, 0.0) if role.no_decay else ("B", lr, spec.weight_decay)
    return plain_rule(role, spec)


def loraplus_groups(model: nn.Module, spec: OptimizerSpec) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of `model` (with `spec.head_lr`, non-adapter parameters at head_lr)."""
    return param_groups(model, spec, loraplus_rule)


@register_optimizer("loraplus")
def _loraplus(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """LoRA+: AdamW with lr_B = ratio · lr_A."""
    return torch.optim.AdamW(loraplus_groups(model, spec), lr=spec.lr, betas=spec.betas, eps=spec.eps)

"""Held-out numbers: loss and perplexity (causal LM, token-weighted) or accuracy (classification)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from widelora.errors import UserError


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: str, device: torch.device) -> dict[str, float]:
    """Held-out loss and perplexity (causal LM, token-weighted) or accuracy (classification)."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for batch in loader:
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
        else:
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += labels.shape[0]
    model.train(was_training)
    if count == 0:
        raise UserError("the evaluation set is empty; add data or raise eval_examples")
    loss = total / count
    if task == "causal_lm":
        return {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
    return {"eval_loss": loss, "accuracy": correct / count}

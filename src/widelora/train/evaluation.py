"""Held-out numbers: loss and perplexity (causal LM, token-weighted) or accuracy (classification).

The pass keeps sums (loss, counted targets, correct predictions), not means, so that the numbers of two
held-out splits pool exactly (`EvalSums` adds): validation ∪ test is the sum of each split's sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from widelora.errors import UserError


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class EvalSums:
    """Summed loss, number of counted targets (tokens or examples) and correct predictions of one pass."""

    loss: float = 0.0
    count: int = 0
    correct: int = 0

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(self.loss + other.loss, self.count + other.count, self.correct + other.correct)

    def numbers(self, task: str) -> dict[str, float]:
        """Mean loss and perplexity (causal LM) or accuracy (classification)."""
        if self.count == 0:
            raise UserError("the evaluation set is empty; add data or raise eval_examples")
        loss = self.loss / self.count
        if task == "causal_lm":
            return {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
        return {"eval_loss": loss, "accuracy": self.correct / self.count}


@torch.no_grad()
def evaluation_sums(model: nn.Module, loader, task: str, device: torch.device) -> EvalSums:
    """One pass over `loader`: the sums behind the held-out numbers."""
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
    return EvalSums(total, count, correct)


def evaluate(model: nn.Module, loader, task: str, device: torch.device) -> dict[str, float]:
    """Held-out loss and perplexity (causal LM, token-weighted) or accuracy (classification)."""
    return evaluation_sums(model, loader, task, device).numbers(task)

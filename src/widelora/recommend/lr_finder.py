"""The baseline users have today: a fastai-style LR finder (Smith's range test, as `learn.lr_find()` runs it).

The learning rate grows geometrically from `start_lr` to `end_lr` over `num_it` steps of the user's optimizer
(plain AdamW over every trainable parameter unless another is given); the loss is smoothed with a
bias-corrected exponential moving average (β = 0.98) and the test stops once the smoothed loss exceeds 4 × its
minimum. As in fastai, the result offers several suggestions, and we say which one a comparison uses:

- ``minimum``: the lr at the smoothed loss's minimum ÷ 10 (fastai's ``SuggestionMethod.Minimum``);
- ``steep``: the lr where the smoothed loss falls fastest per unit of log-lr (fastai's ``Steep``, not
  divided);
- ``steep_div10``: the same ÷ 10 (the issue's wording: "steepest loss descent ÷ 10").

Unlike widelora's probe it reads only the loss, keeps fastai's 100 steps whatever the run length (its cost is
reported, not capped), and knows nothing about width. The model is restored exactly afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from widelora.recommend.probe import LossFn, batch_stream, hf_loss
from widelora.recommend.rules import geometric_lrs
from widelora.recommend.snapshot import preserved

SUGGESTIONS = ("minimum", "steep", "steep_div10")


@dataclass(frozen=True)
class FinderResult:
    """The finder's curve (one point per step taken), its suggestions and its cost in run steps."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestions: dict[str, float]
    examples: int

    def cost_steps(self, run_batch: int) -> float:
        return self.examples / run_batch


def lr_finder(
    model: nn.Module,
    batches: Iterable[dict],
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    beta: float = 0.98,
    stop_div: float = 4.0,
    batch_size: int | None = None,
    make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer] | None = None,
    loss_fn: LossFn = hf_loss,
) -> FinderResult:
    """Run the range test on `model` as it is (adapters attached), restore it, and return the curve."""
    if not (0 < start_lr < end_lr) or num_it < 2:
        raise ValueError("lr_finder needs 0 < start_lr < end_lr and num_it >= 2")
    batches = list(batches)
    size = batch_size or next(int(v.shape[0]) for v in batches[0].values() if torch.is_tensor(v))
    lrs = geometric_lrs(start_lr, end_lr, num_it)
    taken, losses, smoothed = [], [], []
    examples, avg, best = 0, 0.0, math.inf
    with preserved(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (make_optimizer or (lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0)))(
            params, lrs[0]
        )
        stream = batch_stream(batches, size)
        model.train()
        for k, lr in enumerate(lrs):
            batch = next(stream)
            examples += int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])
            for group in opt.param_groups:
                group["lr"] = lr
            loss = loss_fn(model, batch)
            value = float(loss.detach())
            taken.append(lr)
            losses.append(value)
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (k + 1))
            smoothed.append(smooth)
            if not math.isfinite(smooth) or smooth > stop_div * best:
                break
            best = min(best, smooth)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return FinderResult(taken, losses, smoothed, suggest(taken, smoothed), examples)


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """fastai's suggestions from a (lr, smoothed loss) curve; the diverging last point is left out."""
    points = [(lr, s) for lr, s in zip(lrs, smoothed, strict=True) if math.isfinite(s)]
    if len(points) > 2:
        points = points[:-1]
    if not points:
        raise ValueError("the LR finder recorded no finite loss")
    lr_min = min(points, key=lambda p: p[1])[0]
    slopes = [
        (
            (points[i + 1][1] - points[i][1]) / (math.log(points[i + 1][0]) - math.log(points[i][0])),
            points[i][0],
        )
        for i in range(len(points) - 1)
    ]
    lr_steep = min(slopes)[1] if slopes else lr_min
    return {"minimum": lr_min / 10, "steep": lr_steep, "steep_div10": lr_steep / 10}

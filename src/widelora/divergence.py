"""When a run has diverged: one rule for the training loop, the sweeps and the width study.

A run diverges when its loss is non-finite, or when its (exponentially smoothed) loss rises above ``factor``
times its starting value. Only the non-finite half is unambiguous; the second half is what users mean by "it
blew up" (a tiny BERT going from loss 0.69 to 1821 is not a finished run, whatever its numbers say). Smoothing
keeps one noisy batch from ending a healthy run; the width study, which compares single batches against 100 ×
the initial loss as the paper's protocol does, uses the same rule with ``smoothing=0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DEFAULT_FACTOR = 10.0
DEFAULT_SMOOTHING = 0.9


def _check(name: str, value: float, low: float, high: float, *, closed_high: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name}: {value!r} is not valid; expected a number in [{low}, {high}{bracket}")


@dataclass(frozen=True)
class DivergenceRule:
    """`factor`: a smoothed loss above factor × the starting loss is divergence (> 1).
    `smoothing`: weight of the past in the exponential moving average of the loss, in [0, 1); 0 = raw loss."""

    factor: float = DEFAULT_FACTOR
    smoothing: float = DEFAULT_SMOOTHING

    def __post_init__(self) -> None:
        _check("divergence factor", self.factor, 1.0, math.inf, closed_high=False)
        if self.factor == 1.0:
            raise ValueError("divergence factor: 1.0 is not valid; expected a number > 1 (e.g. 10)")
        _check("divergence smoothing", self.smoothing, 0.0, 1.0, closed_high=False)

    def tracker(self) -> DivergenceTracker:
        return DivergenceTracker(self)

    def limit(self, initial: float | torch.Tensor) -> float | torch.Tensor:
        """The loss above which a run that started at `initial` has diverged."""
        return initial * self.factor

    def exceeded(self, loss: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """Elementwise form for batched engines that step many runs at once (no smoothing state is kept:
        callers that want smoothing pass their smoothed losses)."""
        return ~torch.isfinite(loss) | (loss > self.limit(initial))


@dataclass
class DivergenceTracker:
    """Feeds one run's losses through a `DivergenceRule`; `update` returns why the run diverged, or None."""

    rule: DivergenceRule
    initial: float | None = None
    smoothed: float | None = None
    _count: int = field(default=0, repr=False)

    def update(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        self._count += 1
        a = self.rule.smoothing
        self.smoothed = loss if self.smoothed is None else a * self.smoothed + (1 - a) * loss
        if self.initial is None:
            self.initial = loss
            return None
        limit = self.rule.limit(self.initial)
        if self.initial > 0 and self.smoothed > limit:
            return (
                f"the smoothed loss {self.smoothed:.4g} rose above "
                f"{self.rule.factor:g} × its starting value {self.initial:.4g}"
            )
        return None

    def state_dict(self) -> dict[str, float | int | None]:
        """What a checkpoint stores, so a resumed run applies the rule exactly as an uninterrupted one."""
        return {"initial": self.initial, "smoothed": self.smoothed, "count": self._count}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.initial = state.get("initial")  # type: ignore[assignment]
        self.smoothed = state.get("smoothed")  # type: ignore[assignment]
        self._count = int(state.get("count") or 0)

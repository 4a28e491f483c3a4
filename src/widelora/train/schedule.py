"""What happens at step `s`: the learning-rate multiplier and the examples of micro-batch `m`.

Both are pure functions of the config and the step, so a resumed run needs no state to continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from widelora.errors import UserError


class ScheduleConfig(Protocol):
    warmup: float
    decay: str


def warmup_steps(cfg: ScheduleConfig, total: int) -> int:
    return round(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)


def make_schedule(cfg: ScheduleConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `s`: linear warmup from 1/(w+1), then
    linear/cosine/constant."""
    warm = min(warmup_steps(cfg, total), total)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if cfg.decay == "constant":
            return 1.0
        progress = (s - warm) / max(1, total - warm)
        if cfg.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


class BatchOrder:
    """Micro-batch `m` → example indices for this rank. A pure function of (seed, m), so resume needs no
    state: epoch e uses the permutation seeded by (seed, e); the last incomplete global batch of an epoch is
    dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise UserError(
                f"the training set has {n} examples, fewer than batch_size*world_size = "
                f"{batch_size * world}; lower batch_size or add data"
            )
        self._epoch, self._perm = -1, None

    def indices(self, m: int) -> list[int]:
        epoch, pos = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        start = (pos * self.world + self.rank) * self.bs
        return self._perm[start : start + self.bs].tolist()

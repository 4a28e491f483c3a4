"""The processes of one run: a single process, or one of `torchrun`'s (DDP: gloo on CPU, nccl on GPU).

Why an object: the device, the rank and whether this run created the process group (and so must destroy it)
travel together, instead of living in module globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 when not distributed)."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


@dataclass
class Processes:
    """This process's place in the run: its device, rank, the world size, and who owns the process group."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def start(cls, device: str) -> Processes:
        """Pick the device (`auto`: cuda when available) and join the process group under torchrun."""
        rank, world, local = dist_env()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        chosen = torch.device(f"cuda:{local}" if device == "cuda" and world > 1 else device)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        owns = world > 1 and not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
        return cls(chosen, rank, world, owns)

    @property
    def main(self) -> bool:
        """Only the main process writes files and reports."""
        return self.rank == 0

    def mean(self, value: float) -> float:
        """`value` averaged over all processes (the logged loss is the same on every rank)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

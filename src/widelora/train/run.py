"""A run's start-up: RunConfig → tokenized data, the model with its adapters, optimizer, schedule, batch
order.

Everything the loop needs travels in one `Run` object. The order is fixed so that a resumed run rebuilds
exactly the same state before its checkpoint is loaded: seed, data, model, setup (the one place a
recommendation may change the user's choices), adapters, optimizer, schedule."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import widelora as wl
from widelora import models
from widelora.data import TaskData, make_loader
from widelora.errors import UserError
from widelora.lora.modules import CLASSIFICATION_HEAD_NAMES
from widelora.methods import plop
from widelora.methods.init import get_scheme
from widelora.train.cache import FRESH, StartupCache
from widelora.train.config import RunConfig
from widelora.train.distributed import Processes
from widelora.train.evaluation import to_device
from widelora.train.precision import enable_gradient_checkpointing, make_scaler, precision
from widelora.train.schedule import BatchOrder, make_schedule
from widelora.train.setups import SetupChoice, choose_setup


@dataclass
class Run:
    """The built pieces of one run."""

    cfg: RunConfig
    procs: Processes
    data: TaskData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    order: BatchOrder
    total: int
    setup: SetupChoice
    targets: list[str] | str
    scaler: torch.amp.GradScaler

    def micro_batch(self, m: int) -> dict[str, torch.Tensor]:
        """The `m`-th micro-batch of this process, on its device."""
        return to_device(
            self.data.collate([self.data.train[i] for i in self.order.indices(m)]), self.procs.device
        )

    def eval_loader(self, split: str):
        return make_loader(
            getattr(self.data, split), self.cfg.eval_batch_size or self.cfg.batch_size, self.data.collate
        )

    def precision(self) -> contextlib.AbstractContextManager:
        return precision(self.cfg, self.procs.device)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def check_seq_len(cfg: RunConfig) -> None:
    """seq_len must fit the model's position embeddings (otherwise the first forward fails deep inside it)."""
    limit = models.max_sequence_length(cfg.model)
    if limit is not None and cfg.seq_len > limit:
        raise UserError(
            f"seq_len={cfg.seq_len} is not valid; model {cfg.model!r} takes at most {limit} tokens"
        )


def _trainable_modules(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Extra trainable modules: the config's, or a classification run's fresh head."""
    if cfg.trainable:
        return list(cfg.trainable)
    if cfg.task != "classification":
        return []
    children = dict(model.named_children())
    return [h for h in CLASSIFICATION_HEAD_NAMES if h in children]


def _resolve_targets(targets: list[str] | str, model: nn.Module, batches: list[dict]) -> list[str] | str:
    """`targets: auto` → PLoP placement on a few training batches."""
    return list(plop.place(model, batches, progress=False).targets) if targets == "auto" else targets


def _total_steps(cfg: RunConfig, order: BatchOrder) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * order.per_epoch / cfg.grad_accum))


def build_run(cfg: RunConfig, procs: Processes, cache: StartupCache | None = None) -> Run:
    """Build every piece of a run on `procs.device` (a fresh start; the loop loads a checkpoint over it).

    `cache` (see `widelora.train.cache`) may hand over the tokenizer, data and base model of an earlier run in
    this process; without one, everything is loaded fresh."""
    check_seq_len(cfg)
    torch.manual_seed(cfg.seed)
    cache = cache or FRESH
    data = cache.data(cfg, cache.tokenizer(cfg.model))
    model = cache.model(cfg, data.num_labels)
    model.to(procs.device)
    order = BatchOrder(len(data.train), cfg.batch_size, cfg.seed, procs.rank, procs.world)
    probe = [
        to_device(data.collate([data.train[i] for i in order.indices(m)]), procs.device)
        for m in range(min(cfg.init_batches, order.per_epoch))
    ]

    # ---- the setup: the one place a recommendation (setup: recommended) may replace the user's choices ----
    total = _total_steps(cfg, order)
    setup = choose_setup(cfg, model, probe, total)

    with precision(cfg, procs.device):
        targets = _resolve_targets(setup.targets, model, probe)
    needs_data = get_scheme(setup.init).needs_data
    wl.attach(
        model, targets=targets, rank=cfg.rank, alpha=cfg.alpha, init="init_a" if needs_data else setup.init,
        scaling=cfg.scaling, dropout=cfg.dropout, seed=cfg.seed, trainable=_trainable_modules(model, cfg),
    )  # fmt: skip
    # The adapters (and so the optimizer state) stay float32 under a bfloat16/float16 base.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if needs_data:
        with precision(cfg, procs.device):
            wl.initialize(
                model, setup.init, seed=cfg.seed, batches=probe, progress=cfg.progress and procs.main
            )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.model)
    model.train()
    extra: dict[str, Any] = {} if setup.head_lr is None else {"head_lr": setup.head_lr}
    optimizer = wl.create_optimizer(
        model, lr=setup.lr, method=setup.method, ratio=setup.ratio, weight_decay=cfg.weight_decay,
        betas=tuple(cfg.betas), eps=cfg.eps, **extra,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(cfg, total))
    scaler = make_scaler(cfg, procs.device)
    return Run(cfg, procs, data, model, optimizer, scheduler, order, total, setup, targets, scaler)

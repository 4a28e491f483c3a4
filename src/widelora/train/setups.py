"""Who decides a run's LoRA setup: the user's config (`setup: manual`) or widelora (`setup: recommended`).

This is the one place in a run's start-up where a recommendation may replace the user's targets, init, method,
learning rates and LoRA+ ratio. It runs after the model and the data are built (a recommendation may look at
the model's widths and at a few training batches) and before the adapters are attached and the optimizer is
made. A setup is a function registered under its name in `SETUPS`; `widelora.recommend` provides
"recommended"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from widelora.train.config import RunConfig


@dataclass(frozen=True)
class SetupChoice:
    """What a setup decides. `head_lr`: learning rate of trainable non-adapter modules (None: `lr`); `probe`:
    the version of the lr probe that decided (widelora.recommend.probe.PROBE_VERSION; None: no probe)."""

    targets: list[str] | str
    init: str
    method: str
    lr: float
    ratio: float
    head_lr: float | None = None
    probe: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


#: setup(cfg, model, batches, steps) -> SetupChoice; `batches` are the first training micro-batches, on the
#: device; `steps` is the run's total optimizer steps (epoch-based configs included), what a probe budgets by.
SetupFn = Callable[[RunConfig, nn.Module, list[dict], int], SetupChoice]


def manual(cfg: RunConfig, model: nn.Module, batches: list[dict], steps: int) -> SetupChoice:
    """The config's own choices, unchanged."""
    return SetupChoice(targets=cfg.targets, init=cfg.init, method=cfg.method, lr=cfg.lr, ratio=cfg.ratio)


def recommended(cfg: RunConfig, model: nn.Module, batches: list[dict], steps: int) -> SetupChoice:
    """widelora's choice: init, method, ratio and learning rates from `widelora.recommend` (a short probe)."""
    from widelora.recommend.runconfig import recommended_setup

    return recommended_setup(cfg, model, batches, steps=steps)


def _evaluation_setup(name: str) -> SetupFn:
    """A setup of the evaluation of `recommend` (widelora.experiments.eval_setups), imported when used."""

    def run(cfg: RunConfig, model: nn.Module, batches: list[dict], steps: int) -> SetupChoice:
        from widelora.experiments import eval_setups

        return getattr(eval_setups, name)(cfg, model, batches, steps)

    return run


SETUPS: dict[str, SetupFn] = {
    "manual": manual,
    "recommended": recommended,
    "recommended_tuned": _evaluation_setup("recommended_tuned"),
    "recommended_at_ratio": _evaluation_setup("recommended_at_ratio"),
    "lr_finder": _evaluation_setup("lr_finder"),
}


def choose_setup(cfg: RunConfig, model: nn.Module, batches: list[dict], steps: int) -> SetupChoice:
    """The setup `cfg.setup` names, applied to this model and these batches, for a run of `steps` steps."""
    return SETUPS[cfg.setup](cfg, model, batches, steps)

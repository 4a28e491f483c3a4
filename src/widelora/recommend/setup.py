"""The Recommendation: every choice of a LoRA setup together with the reason it was made.

One object travels through every entry point — `widelora.attach(model, setup=rec)`,
`widelora.create_optimizer(model, setup=rec)`, `widelora finetune --auto`, `setup: recommended` in sweep specs
— so the choices are made once (by `widelora.recommend`) and applied the same way everywhere. It is plain
data: it round-trips through `to_dict` / `from_dict` (JSON), and `table()` prints each choice next to its
reason, because a default nobody can question is a default nobody should trust.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from widelora.errors import UserError

#: The keys `attach_kwargs` hands to `widelora.attach`, and `optimizer_kwargs` to `widelora.create_optimizer`.
ATTACH_KEYS = ("targets", "rank", "alpha", "init", "scaling", "trainable")
OPTIMIZER_KEYS = ("lr", "method", "ratio", "head_lr")
#: Order of the rows of `table()`.
_TABLE_ORDER = (
    "init",
    "targets",
    "rank",
    "alpha",
    "scaling",
    "method",
    "ratio",
    "lr",
    "head_lr",
    "trainable",
)


@dataclass
class Recommendation:
    """A full LoRA setup (adapter + optimizer) with a reason per choice and the probe's record.

    `lr` is the base learning rate (of A); B runs at `ratio · lr` (LoRA+); `head_lr` is the learning rate of
    trainable parameters that are not adapters (a fresh classification head), None when there are none.
    `width` is the fan-in the width-aware rules used; `probe` is the learning-rate probe's summary (curve,
    edge, cost), None when no probe ran.
    """

    init: str = "init_a"
    targets: list[str] | str = "all-linear"
    rank: int = 8
    alpha: float = 8.0
    scaling: str = "standard"
    trainable: list[str] = field(default_factory=list)
    method: str = "loraplus"
    lr: float = 2e-4
    ratio: float = 16.0
    head_lr: float | None = None
    width: int | None = None
    steps: int | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    probe: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "ratio", "alpha"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise UserError(
                    f"Recommendation.{name}={value!r} is not valid; it must be a positive finite number"
                )
        if self.head_lr is not None and not (isinstance(self.head_lr, (int, float)) and self.head_lr > 0):
            raise UserError(
                f"Recommendation.head_lr={self.head_lr!r} is not valid; a positive number or None"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"Recommendation.rank={self.rank!r} is not valid; it must be a positive integer")

    # -- what the entry points consume
    def attach_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `widelora.attach` (targets, rank, alpha, init, scaling, trainable)."""
        kwargs = {k: getattr(self, k) for k in ATTACH_KEYS}
        kwargs["targets"] = list(self.targets) if isinstance(self.targets, list) else self.targets
        kwargs["trainable"] = list(self.trainable)
        return kwargs

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `widelora.create_optimizer` (lr, method, ratio, head_lr)."""
        return {k: getattr(self, k) for k in OPTIMIZER_KEYS}

    def run_config_overrides(self) -> dict[str, Any]:
        """The RunConfig keys this recommendation sets (what `finetune --auto` and sweeps apply)."""
        out = {k: v for k, v in self.attach_kwargs().items() if k != "trainable"}
        out.update({k: v for k, v in self.optimizer_kwargs().items() if k != "head_lr"})
        if self.trainable:
            out["trainable"] = list(self.trainable)
        return out

    # -- plain data
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recommendation:
        """Rebuild from `to_dict()` output; unknown keys are an error naming the valid ones."""
        if not isinstance(data, dict):
            raise UserError(f"a recommendation must be a mapping; got {type(data).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise UserError(f"unknown recommendation key(s) {unknown}; valid keys: {valid}")
        return cls(**data)

    # -- for people
    def table(self) -> str:
        """Each choice, its value and the reason for it, as aligned text (what `widelora recommend`
        prints)."""
        rows = [(key, _fmt(getattr(self, key)), self.reasons.get(key, "")) for key in _TABLE_ORDER]
        if self.head_lr is None and not self.trainable:
            rows = [r for r in rows if r[0] not in ("head_lr", "trainable")]
        w0 = max(len(r[0]) for r in rows)
        w1 = min(28, max(len(r[1]) for r in rows))
        lines = [f"{'choice':<{w0}}  {'value':<{w1}}  reason", f"{'-' * w0}  {'-' * w1}  ------"]
        lines += [f"{k:<{w0}}  {v:<{w1}}  {why}" for k, v, why in rows]
        if self.width is not None:
            lines.append(f"(width n = {self.width}: the fan-in the width-aware rules read)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "-"
    return "-" if value is None else str(value)

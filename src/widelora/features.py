"""Feature monitor: |Z_A|, |Z_B| and the δ1/δ2/δ3 split of the LoRA feature update, per layer and step.

Works on any model whose adapters `widelora.lora.pairs.lora_pairs` finds (widelora layers or PEFT). It hooks
each adapted module's forward, so it sees the adapter input ``x`` of the forward the training loop already
runs — no second forward. On a recorded step it computes, per layer, with the weights that forward used:

    Z_A = A x                       |Z_A| = mean over tokens of ||A x||          (no scale)
    Z_B = s · B A x                 |Z_B| = mean over tokens of ||s B A x||      (the adapter's actual output)
    δ1 = s · B_prev (A - A_prev) x, δ2 = s · (B - B_prev) A_prev x, δ3 = s · (B - B_prev)(A - A_prev) x

so ``δ1 + δ2 + δ3 = Z_B - Z_B^prev`` exactly, where "prev" are the weights of the previous recorded step.
The δ's are evaluated on the *current* batch with both weight snapshots, not on a fixed probe batch: that
needs no extra forward and no stored data (only a copy of A and B per layer, r·(in+out) numbers), and it
isolates the adapter's own weight change even when the adapter's input moves because earlier layers are
trained too. ``x`` is the module input before adapter dropout (the monitor measures the deterministic
features).

Cost per recorded layer: three (tokens × in × r) products and r×r Gram matrices — ``||B z||`` is computed as
``sqrt(zᵀ (BᵀB) z)``, never materializing a (tokens × out) tensor. Values stay on the device until ``step()``.

Usage::

    with widelora.monitor(model, every=10) as mon:
        for step, batch in enumerate(loader):
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
            mon.step(step)                      # closes the record of this step's forward(s)
    print(mon.summary())

or, in a training loop, ``mon = FeatureMonitor(model, every=10).attach()``; call ``mon.step(step)`` after each
optimizer step; wrap evaluation forwards in ``with mon.paused():``; ``mon.detach()`` at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Self

import torch
from torch import nn

from widelora.errors import UserError
from widelora.lora.pairs import LoRAPair, require_pairs

# ------------------------------------------------------------------------------------------- the arithmetic


def gram_norms(z: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``||scale · B z_i||`` for each row z_i of z (..., T, r), with B (..., out, r), via the r×r Gram BᵀB."""
    gram = B.transpose(-1, -2) @ B
    sq = ((z @ gram) * z).sum(-1).clamp_min(0.0)
    return abs(scale) * sq.sqrt()


def feature_norms(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over tokens of ||A x|| and ||s B A x||; x (..., T, in), A (..., r, in), B (..., out, r) broadcast.

    The width study calls this batched over (seed, learning rate); the hook monitor calls it per layer.
    """
    z_a = x @ A.transpose(-1, -2)
    return z_a.norm(dim=-1).mean(-1), gram_norms(z_a, B, scale).mean(-1)


def delta_norms(
    x: torch.Tensor,
    A_prev: torch.Tensor,
    B_prev: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over tokens of ||δ1||, ||δ2||, ||δ3|| (definitions in the module docstring)."""
    dz_a = x @ (A - A_prev).transpose(-1, -2)
    z_a_prev = x @ A_prev.transpose(-1, -2)
    d_b = B - B_prev
    d1 = gram_norms(dz_a, B_prev, scale).mean(-1)
    d2 = gram_norms(z_a_prev, d_b, scale).mean(-1)
    d3 = gram_norms(dz_a, d_b, scale).mean(-1)
    return d1, d2, d3


# ------------------------------------------------------------------------------------------------- records


@dataclass
class LayerRecord:
    """One layer at one recorded step. Norms are means over the tokens of the recorded forward(s)."""

    step: int
    layer: str
    tokens: int
    x: float  # |x|, the adapter input
    z_a: float  # |A x|
    z_b: float  # |s B A x|
    delta1: float | None  # None on the first record (no previous weights)
    delta2: float | None
    delta3: float | None
    fan_in: int
    fan_out: int
    rank: int

    @property
    def z_a_ratio(self) -> float:
        """Per-coordinate size of Z_A relative to the input's, (|Z_A|/√r)/(|x|/√in): Θ(1) when stable."""
        return _ratio(self.z_a / math.sqrt(self.rank), self.x / math.sqrt(self.fan_in))

    @property
    def z_b_ratio(self) -> float:
        """Per-coordinate size of the adapter output relative to the input's: (|Z_B|/√out)/(|x|/√in)."""
        return _ratio(self.z_b / math.sqrt(self.fan_out), self.x / math.sqrt(self.fan_in))

    def as_row(self) -> dict:
        row = asdict(self)
        row["z_a_ratio"] = self.z_a_ratio
        row["z_b_ratio"] = self.z_b_ratio
        return row


def _ratio(a: float, b: float) -> float:
    if b == 0.0:
        return math.inf if a > 0 else 0.0
    return a / b


class _Accumulator:
    """Token-weighted sums for one layer over the forwards of one recorded step (kept as tensors)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sums: torch.Tensor | None = None  # x, z_a, z_b, d1, d2, d3

    def add(self, tokens: int, values: torch.Tensor) -> None:
        v = values * tokens
        self.sums = v if self.sums is None else self.sums + v
        self.tokens += tokens


# ------------------------------------------------------------------------------------------------- monitor


class FeatureMonitor:
    """Records Z_A / Z_B / δ statistics of every LoRA pair on every ``every``-th step (see module docstring).

    ``za_threshold`` / ``zb_threshold`` are the per-coordinate ratios (``LayerRecord.z_a_ratio``,
    ``z_b_ratio``) above which a layer is flagged: internal instability = Z_A large while Z_B stays bounded
    and finite; output instability = Z_B large or non-finite.
    """

    def __init__(
        self, model: nn.Module, every: int = 1, za_threshold: float = 10.0, zb_threshold: float = 10.0
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"every: expected an int >= 1, got {every!r}")
        for name, value in (("za_threshold", za_threshold), ("zb_threshold", zb_threshold)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{name}: expected a positive number, got {value!r}")
        self.model = model
        self.every = every
        self.za_threshold = float(za_threshold)
        self.zb_threshold = float(zb_threshold)
        self.records: list[LayerRecord] = []
        self._pairs: list[LoRAPair] = []
        self._handles: list = []
        self._acc: dict[str, _Accumulator] = {}
        self._prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._calls = 0
        self._paused = False

    # -- lifecycle
    def attach(self) -> FeatureMonitor:
        """Register forward hooks on every adapted module (raises ValueError if the model has no adapters)."""
        if self._handles:
            return self
        self._pairs = require_pairs(self.model)
        for pair in self._pairs:
            self._handles.append(pair.module.register_forward_hook(self._make_hook(pair)))
        return self

    def detach(self) -> None:
        """Remove the hooks; records are kept."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def armed(self) -> bool:
        """Whether forwards run now are recorded (a recorded step, not paused)."""
        return not self._paused and self._calls % self.every == 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside this block (evaluation, generation) are not recorded."""
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    # -- recording
    def _make_hook(self, pair: LoRAPair):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not self.armed or not inputs or not torch.is_tensor(inputs[0]):
                return
            with torch.no_grad():
                self._observe(pair, inputs[0])

        return hook

    def _observe(self, pair: LoRAPair, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return
        dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32  # half types: stats in float32
        x2 = x2.to(dtype)
        if (
            pair.name not in self._current
        ):  # weights this step's forward uses (same for every forward of a step)
            self._current[pair.name] = (pair.A.detach().to(dtype).clone(), pair.B.detach().to(dtype).clone())
        A, B = self._current[pair.name]
        x_norm = x2.norm(dim=-1).mean()
        z_a, z_b = feature_norms(x2, A, B, pair.scale)
        if pair.name in self._prev:
            A0, B0 = self._prev[pair.name]
            d1, d2, d3 = delta_norms(x2, A0, B0, A, B, pair.scale)
        else:
            d1 = d2 = d3 = torch.full((), math.nan, device=x2.device)
        values = torch.stack([x_norm, z_a, z_b, d1, d2, d3])
        self._acc.setdefault(pair.name, _Accumulator()).add(x2.shape[0], values)

    def step(self, step: int | None = None) -> list[LayerRecord]:
        """Close the current step: turn what the hooks saw into records; returns this step's records."""
        step = self._calls if step is None else int(step)
        new: list[LayerRecord] = []
        if self._acc:
            for pair in self._pairs:
                acc = self._acc.get(pair.name)
                if acc is None or acc.sums is None:
                    continue
                vals = (acc.sums / acc.tokens).tolist()  # the one device sync per recorded step
                d = [None if math.isnan(v) else v for v in vals[3:]]
                new.append(
                    LayerRecord(
                        step,
                        pair.name,
                        acc.tokens,
                        vals[0],
                        vals[1],
                        vals[2],
                        d[0],
                        d[1],
                        d[2],
                        pair.fan_in,
                        pair.fan_out,
                        pair.rank,
                    )
                )
            self._prev.update(self._current)
        self._acc.clear()
        self._current.clear()
        self.records.extend(new)
        self._calls += 1
        return new

    # -- views
    def to_rows(self) -> list[dict]:
        """Records as plain dicts (one per layer and recorded step), ready for CSV/JSON."""
        return [r.as_row() for r in self.records]

    def layers(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            seen.setdefault(r.layer, None)
        return list(seen)

    def summary(self) -> dict[str, dict]:
        """Per layer: first/last |Z_A|, |Z_B|, their per-coordinate ratios, mean δ's, δ2 share, and flags."""
        out: dict[str, dict] = {}
        for layer in self.layers():
            recs = [r for r in self.records if r.layer == layer]
            first, last = recs[0], recs[-1]
            d1 = [r.delta1 for r in recs if r.delta1 is not None]
            d2 = [r.delta2 for r in recs if r.delta2 is not None]
            mean_d1 = sum(d1) / len(d1) if d1 else None
            mean_d2 = sum(d2) / len(d2) if d2 else None
            za_max = max(r.z_a_ratio for r in recs)
            zb_vals = [r.z_b_ratio for r in recs]
            zb_finite = all(math.isfinite(v) for v in zb_vals) and all(math.isfinite(r.z_a) for r in recs)
            output_unstable = (not zb_finite) or max(zb_vals) > self.zb_threshold
            internal = (
                (not output_unstable) and last.z_a_ratio > self.za_threshold and za_max > first.z_a_ratio
            )
            share = None
            if mean_d1 is not None and mean_d2 is not None and (mean_d1 + mean_d2) > 0:
                share = mean_d2 / (mean_d1 + mean_d2)
            out[layer] = {
                "records": len(recs),
                "z_a_first": first.z_a,
                "z_a_last": last.z_a,
                "z_b_first": first.z_b,
                "z_b_last": last.z_b,
                "z_a_ratio_last": last.z_a_ratio,
                "z_a_ratio_max": za_max,
                "z_b_ratio_max": max(zb_vals),
                "delta1_mean": mean_d1,
                "delta2_mean": mean_d2,
                "delta2_share": share,  # Init[B] at large width: -> 0 (B undertrained, Theorem 2)
                "internal_instability": internal,
                "output_instability": output_unstable,
            }
        return out


@contextmanager
def monitor(
    model: nn.Module, every: int = 1, za_threshold: float = 10.0, zb_threshold: float = 10.0
) -> Iterator[FeatureMonitor]:
    """``with monitor(model, every=k) as mon:`` — a FeatureMonitor attached for the block, detached after."""
    mon = FeatureMonitor(model, every=every, za_threshold=za_threshold, zb_threshold=zb_threshold)
    mon.attach()
    try:
        yield mon
    finally:
        mon.detach()

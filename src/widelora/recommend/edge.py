"""The stopping rule of the learning-rate probe: where does a range test cross the stability edge?

A pure function of the probe's readings (learning rate, loss, and the feature monitor's Z_A / Z_B), so it is
tested on synthetic curves without any model. Reading `k` describes the model after the updates made with the
learning rates of readings 0..k-1; the *edge* is the largest learning rate whose update still left a good
state.

A state is bad when any of these holds (the first one found names the reason):

- **non-finite**: the loss or a monitored feature is NaN/inf;
- **output instability** (seed 001, Definition 3: Z_B must stay O(1)): some adapter's output |Z_B| exceeds
  `output_ratio` × the norm of the pretrained layer's own output |W x| at the probe's start. At ratio 1 the
  adapter no longer perturbs the layer, it replaces it — the finite-width form of Z_B blowing up;
- **reference-loss rise** (the function edge): the loss on the probe's fixed reference batch (read only when
  the loss is the model's own objective, widelora.recommend.probe) exceeds (1 + `ref_rise`) × its running
  minimum. Its curve has no batch noise: it falls while each update helps and turns up once a step overshoots
  — for a quadratic with curvature λ, past a step of 2/λ, where the best constant step is 1/λ
  (hence lr = edge / 2);
- **loss rise**: the exponentially smoothed loss exceeds (1 + `rise`) × its running minimum, after
  `warmup_readings` readings (so a noisy first batch cannot stop the probe); not read when the reference loss
  is, which measures the same thing without the batch noise.

Where the stop says *whether* the ramp went too far, the **linear response** says where the output edge is
(`response_edge`, probe v3). While A has not moved (|Z_A| within `linear_za_growth` of its start), Adam's
sign-like steps move B by an amount set by the learning rate alone, so |Z_B| / |W x| = lr / E with one
constant E for the whole early ramp: a power law of slope 1 in log-log. Every reading in that regime is an
estimate of E; their median is the fit, and `output_ratio` × E is the lr at which the law makes the adapter's
output reach the layer's — the theory's output edge (η_B · Z_A = Θ(|W x|), widelora.recommend.rules). The
last readings before the stop, where |Z_A| grows and the growth turns superlinear, depend on the few batches
the ramp happened to see there (the crossing they mark spread ×2.26 over 12 seeds of the MiniLM protocol; the
fit ×1.16, docs/results/recommend.md); the median leaves them out without a second threshold. Over layers
the fit reads the upper quartile of |Z_B| / |W x| (a quarter of the adapters), not the maximum: single
layers whose random A responds fast are finite-size fluctuations of the per-layer theory (on one tweet-task
seed two of 24 adapters responded 1.6× faster than the rest); the stop still reads the maximum.

Internal instability (Z_A growing while Z_B stays bounded) is *not* a stop: under Init[A] it is the price of
efficient feature learning (Theorem 1). Its onset (|Z_A| grown by `internal_growth`×) is reported.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import asdict, dataclass

#: Readings in the linear regime the response fit needs (two give a median; one would be a single batch).
MIN_RESPONSE_READINGS = 2


@dataclass(frozen=True)
class Reading:
    """One probe step: the lr of the update that *follows* it, the loss of its forward, and monitor values.

    `out_ratio`: max over layers of |Z_B| / |W x|₀ (None when no monitor); `za_growth`: mean over layers of
    |Z_A| / |Z_A|₀ (None when no monitor); `ref_loss`: the reference batch's loss (None when not read);
    `out_q`: the upper quartile over layers of |Z_B| / |W x|₀, what the linear-response fit reads (None: it
    reads `out_ratio`).
    """

    step: int
    lr: float
    loss: float
    out_ratio: float | None = None
    za_growth: float | None = None
    ref_loss: float | None = None
    out_q: float | None = None


@dataclass(frozen=True)
class Verdict:
    """What the rule found: the edge, why the probe stopped, and the curve's landmarks.

    `edge_lr`: where the stop happened (the crossing, the last good update, or the ramp's end);
    `response_lr`: the linear-response edge fitted on the readings before the stop (None when fewer than
    `MIN_RESPONSE_READINGS` readings are in the linear regime, or there is no monitor).
    """

    edge_lr: float
    reason: (
        str  # non-finite | output instability | reference-loss rise | loss rise | not reached | below range
    )
    stop_step: int | None
    min_loss_lr: float
    internal_lr: float | None
    smoothed: list[float]
    response_lr: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StopRule:
    """Thresholds of the stopping rule (module docstring). Defaults are justified in
    docs/results/recommend.md."""

    rise: float = 0.5
    smoothing: float = 0.5
    warmup_readings: int = 3
    output_ratio: float = 1.0
    internal_growth: float = 2.0
    ref_rise: float = 0.01
    linear_za_growth: float = 1.1

    def __post_init__(self) -> None:
        if not (self.rise > 0 and math.isfinite(self.rise)):
            raise ValueError(f"rise={self.rise!r} must be a positive number")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing={self.smoothing!r} must be in [0, 1)")
        if not (isinstance(self.warmup_readings, int) and self.warmup_readings >= 1):
            raise ValueError(f"warmup_readings={self.warmup_readings!r} must be an int >= 1")
        if not self.output_ratio > 0 or not self.internal_growth > 1:
            raise ValueError("output_ratio must be > 0 and internal_growth > 1")
        if not (self.ref_rise > 0 and math.isfinite(self.ref_rise)):
            raise ValueError(f"ref_rise={self.ref_rise!r} must be a positive number")
        if not (self.linear_za_growth >= 1 and math.isfinite(self.linear_za_growth)):
            raise ValueError(f"linear_za_growth={self.linear_za_growth!r} must be a number >= 1")

    def bad(
        self, reading: Reading, smoothed: float, running_min: float, index: int, ref_min: float = math.inf
    ) -> str | None:
        """Why the state of `reading` is past the edge, or None when it is fine."""
        values = [reading.loss, reading.out_ratio, reading.za_growth, reading.ref_loss]
        if any(v is not None and not math.isfinite(v) for v in values):
            return "non-finite"
        if reading.out_ratio is not None and reading.out_ratio > self.output_ratio:
            return "output instability"
        if reading.ref_loss is not None:  # the noise-free curve replaces the training loss's noisy one
            return "reference-loss rise" if reading.ref_loss > (1.0 + self.ref_rise) * ref_min else None
        if index >= self.warmup_readings and smoothed > (1.0 + self.rise) * running_min:
            return "loss rise"
        return None

    def scan(self, readings: list[Reading]) -> Verdict:
        """Walk the readings in order and stop at the first bad state."""
        if not readings:
            raise ValueError("the probe produced no readings")
        smoothed: list[float] = []
        running_min = ref_min = math.inf
        min_lr = readings[0].lr
        internal_lr = None
        for i, r in enumerate(readings):
            prev = smoothed[-1] if smoothed else r.loss
            s = self.smoothing * prev + (1.0 - self.smoothing) * r.loss if math.isfinite(r.loss) else r.loss
            smoothed.append(s)
            why = self.bad(r, s, running_min, i, ref_min)
            if why is not None:
                response = self.response_edge(readings[:i])
                if i <= 1:  # the start (or the first, smallest update) is already bad: below the range
                    why = f"below range ({why})"
                    return Verdict(readings[0].lr, why, r.step, min_lr, internal_lr, smoothed, response)
                edge = readings[i - 2].lr
                if why == "output instability":
                    edge = self._crossing(
                        readings[i - 2].lr, readings[i - 1].lr, readings[i - 1].out_ratio, r.out_ratio, edge
                    )
                return Verdict(edge, why, r.step, min_lr, internal_lr, smoothed, response)
            if s < running_min:
                running_min, min_lr = s, (readings[i - 1].lr if i else r.lr)
            if r.ref_loss is not None:
                ref_min = min(ref_min, r.ref_loss)
            if internal_lr is None and i and r.za_growth is not None and r.za_growth > self.internal_growth:
                internal_lr = readings[i - 1].lr
        return Verdict(
            readings[-2].lr if len(readings) > 1 else readings[0].lr,
            "not reached",
            None,
            min_lr,
            internal_lr,
            smoothed,
            self.response_edge(readings),
        )

    def response_edge(self, readings: list[Reading]) -> float | None:
        """The lr at which the linear response |Z_B| / |W x| = lr / E reaches `output_ratio` (module
        docstring), fitted on `readings` (those before the stop); None without enough linear-regime readings.

        Reading k describes the state after the update at readings[k-1].lr, so each pair (lr_{k-1}, r_k)
        with r_k > 0 finite and |Z_A| grown by at most `linear_za_growth` gives log E = log lr - log r;
        the fit is their median (slope fixed at 1, robust to the superlinear tail). r_k is the upper quartile
        over layers (`Reading.out_q`) when recorded: the edge where a quarter of the adapters would reach
        their layer's output, robust to a few layers whose random A happens to respond fast.
        """
        pairs = [
            (prev.lr, cur.out_ratio if cur.out_q is None else cur.out_q, cur.za_growth)
            for prev, cur in itertools.pairwise(readings)
        ]
        logs = [
            math.log(lr) - math.log(out)
            for lr, out, growth in pairs
            if out is not None
            and math.isfinite(out)
            and out > 0
            and (growth is None or growth <= self.linear_za_growth)
        ]
        if len(logs) < MIN_RESPONSE_READINGS:
            return None
        return self.output_ratio * math.exp(statistics.median(logs))

    def _crossing(
        self, lr_good: float, lr_bad: float, out_good: float | None, out_bad: float, default: float
    ) -> float:
        """The lr at which |Z_B| / |W x|₀ crosses `output_ratio`, interpolated in log-log between the last
        good and the first bad reading (|Z_B| grows smoothly, about ∝ lr, so this beats the probe's grid
        resolution)."""
        if out_good is None or not out_good > 0 or not math.isfinite(out_bad) or out_bad <= out_good:
            return default
        t = math.log(self.output_ratio / out_good) / math.log(out_bad / out_good)
        t = min(max(t, 0.0), 1.0)
        return math.exp(math.log(lr_good) + t * (math.log(lr_bad) - math.log(lr_good)))

"""The width-aware rules: LoRA+ ratio, the probe's safety factor, the head's factor, rank / alpha / scaling.

Each rule is a small pure function of the width `n` (the fan-in of the adapted layers) and returns its value
with a one-line reason. The constants below are the only numbers in the recommendation; each names what
calibrated it (docs/results/recommend.md has the measurements).

The theory (seed 001 §3, LoRA+). With Adam the processed gradient has Θ(1) entries, so one step moves every
entry of A by ~η_A and of B by ~η_B. Under Init[A] (B = 0, A ~ N(0, 1/n)) the LoRA features obey
`Z_A ~ max(1, η_A·n)` (an aligned update of A sums n input coordinates) and the output step
`δ2 = ΔB·Z_A ~ η_B·Z_A`. If the base learning rate sits at `η_A = n^-a`, A's features grow like `n^(1-a)`
(internal instability, allowed for a < 1) and B is at its own output-stability edge when `η_B·Z_A = Θ(1)`,
i.e. `η_B = n^(a-1)`. Hence

    ratio = η_B / η_A = n^(2a - 1).

a = 1 (no internal instability, LoRA+'s asymptotic regime) gives ratio ∝ n; a = 1/2 (vanilla LoRA at its edge)
gives ratio = 1. Seed 001 argues, and the width study measures, that the optimum of Init[A] sits in between:
a = 0.80 [0.65, 0.94] (docs/results/width_study.md), so the ratio grows like n^0.6. The constant is pinned
where the papers' experience is: ratio 2^4 at n = 4096 (Llama-7B, LoRA+'s recommended setting). The toy's
ratio sweep (widths 128-8192, ratios 1-256) has a noisy best ratio growing like n^0.39 — same sign. The same
argument would put the output-stability edge (η ~ n^-1/2) a factor n^(a - 1/2) above the optimum, but the
width study measures that factor flat in width (see `edge_factor`), so the probe's safety factor is a
constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from widelora.recommend.edge import Verdict

# ---------------------------------------------------------------------------------------------- the constants
#: Exponent of the optimal base learning rate of Init[A], η* ∝ n^-a: measured by the width study (500 steps,
#: 7 widths, Init[A] optimum exponent -0.80, CI [-0.94, -0.65]); theory brackets it in [1/2, 1].
OPTIMAL_LR_EXPONENT = 0.80
#: The papers' LoRA+ ratio (2^4) and the width it was used at (Llama-7B hidden size).
RATIO_ANCHOR = 16.0
WIDTH_ANCHOR = 4096
#: Bounds: below 1 LoRA+ would slow B below A (never what the theory asks); above 64 nobody has measured.
RATIO_BOUNDS = (1.0, 64.0)
#: lr = linear-response edge / this (probe v3; widelora.recommend.edge.StopRule.response_edge). On the
#: MiniLM topics protocol (120 steps) the response edge was 0.111 / 0.100 / 0.105 on seeds 0-2 and the tuned
#: grids' optimum (parabola through the best three points in log lr) 1.80e-3 / 2.57e-3 / 1.69e-3:
#: edge / optimum = 62 / 39 / 62 (geometric mean 53). Accuracy is flat below the optimum and collapses a
#: factor 4-8 above it, so the factor is chosen for an unseen task, whose edge / optimum may differ: 77
#: minimizes the worst loss of expected accuracy against the best factor over a log-normal uncertainty of
#: the lr from none to ×e (0.23 points at worst; 53 would lose up to 1.8). `bench/lr_probe.py factor`.
RESPONSE_FACTOR = 77.0
#: When the probe stopped at a break (the crossing, a non-finite value or a loss rise), the lr stays at least
#: this factor below it: v1's factor, whose one bad choice (seed 1, 7.1e-3) cost 3.7 points but collapsed no
#: run. A cap for tasks whose blow-up comes early, not an estimate: it never binds on 12 MiniLM seeds.
BREAK_CAP_FACTOR = 4.0
#: lr = stop edge / this when the linear response could not be fitted (fewer than two readings in the linear
#: regime): probe v2's factor (edge / grid optimum 7.8 / 8.9 / 12.3 on the MiniLM protocol's seeds 0-2).
EDGE_FACTOR = 8.0
#: lr = reference-loss edge / this: the loss on a fixed batch turns up once a step overshoots, at about 2/λ
#: for curvature λ, and the best constant step is 1/λ — a classical factor, not a fitted one.
LOSS_EDGE_FACTOR = 2.0
#: The width of the calibration task (MiniLM-L6 hidden size).
CALIBRATION_WIDTH = 384
#: head lr = this × η₁, η₁ = the loss-minimizing size of the head's first (sign-like) Adam step on cached
#: features (widelora.recommend.head); calibrated by head-only training over the run's schedule on MiniLM
#: topics (best head lr / η₁ = 1.9 and 7.9 on two seeds, flat top between: 2 is its conservative end;
#: +18.9 points over the head at lr_A in the full run).
HEAD_STEP_MULTIPLIER = 2.0
#: Used only when no probe can run: the base lr at the calibration width (MiniLM topics, grid-best Init[A] lr
#: 1.16e-2 with one lr for A and B, halved as LoRA+ advises), scaled with the measured exponent.
FALLBACK_LR_ANCHOR = 5.8e-3
DEFAULT_RANK = 8


def ratio_exponent(a: float = OPTIMAL_LR_EXPONENT) -> float:
    """The exponent of the ratio's growth with width, 2a − 1 (module docstring)."""
    return 2.0 * a - 1.0


def loraplus_ratio(width: int) -> tuple[float, str]:
    """lr_B / lr_A = 16 · (n / 4096)^(2a−1), clipped to [1, 64]; monotone non-decreasing in the width."""
    _check_width(width)
    e = ratio_exponent()
    raw = RATIO_ANCHOR * (width / WIDTH_ANCHOR) ** e
    value = min(max(raw, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
    reason = (
        f"LoRA+ with the ratio the theory scales with width: {RATIO_ANCHOR:g}·(n/{WIDTH_ANCHOR})^{e:.2f} at "
        f"n = {width} (B's output edge given A's internal growth; 2^4 at n = 4096 as in the papers)"
    )
    return round(value, 2), reason


def edge_factor(width: int, reason: str = "output instability") -> tuple[float, str]:
    """How far below the probed edge the learning rate goes: a constant, the same at every width.

    The function edge (`reason` "reference-loss rise": the model's own loss on a fixed batch turned up) sits a
    classical factor 2 above the best step (LOSS_EDGE_FACTOR). Every other edge is the feature edge, for
    which:

    The theory's edge (η ~ n^-1/2) and optimum (η ~ n^-a) would put them a factor n^(a-1/2) apart, but that is
    a statement about fixed t as n → ∞; the width study measures edge/optimum flat in width over 500 steps
    (log-log slope 0.01 / -0.04 / 0.10 at ratios 1 / 4 / 16, widths 128-8192): the edge a finite run meets
    moves with the optimum. So the factor is a constant, calibrated on the real task (MiniLM) against a
    learning-rate grid.
    """
    _check_width(width)
    if reason == "reference-loss rise":
        return LOSS_EDGE_FACTOR, (
            f"edge / {LOSS_EDGE_FACTOR:g}: the model's own loss on a fixed batch turned up there, the mark "
            "of a step that overshoots (~2/curvature); the best constant step is half of it"
        )
    why = (
        f"edge / {EDGE_FACTOR:g} (no linear response to fit): the optimum sits a width-independent factor "
        "below the edge (width study: edge/optimum flat in n), calibrated on MiniLM topics against a grid"
    )
    return EDGE_FACTOR, why


@dataclass(frozen=True)
class ProbeLR:
    """The base learning rate a probe verdict gives: `edge` / `factor`, and which edge that was."""

    lr: float
    edge: float
    factor: float
    source: str  # linear response | reference loss | stop edge
    why: str


def probe_lr(width: int, verdict: Verdict) -> ProbeLR:
    """The base learning rate from the probe's verdict (probe v3).

    - The reference loss turned up (no fresh head): its edge / 2 (`edge_factor`).
    - Otherwise, when the linear response could be fitted: response edge / RESPONSE_FACTOR, and never above
      a break the probe met (stop edge / BREAK_CAP_FACTOR).
    - Otherwise: the stop edge / EDGE_FACTOR (probe v2's rule).
    """
    _check_width(width)
    if verdict.reason == "reference-loss rise":
        factor, why = edge_factor(width, verdict.reason)
        return ProbeLR(verdict.edge_lr / factor, verdict.edge_lr, factor, "reference loss", why)
    if verdict.response_lr is not None:
        lr, edge, factor = verdict.response_lr / RESPONSE_FACTOR, verdict.response_lr, RESPONSE_FACTOR
        why = (
            f"linear-response edge {edge:.3g} / {factor:g}: the lr at which the adapters' sign-step response "
            "|Z_B| ∝ lr, fitted on the ramp before A moves, would equal the layer's own output |W x|; the "
            "factor is the MiniLM grids' edge/optimum (53) leaning low, since above the optimum runs collapse"
        )
        if verdict.reason != "not reached" and verdict.edge_lr / BREAK_CAP_FACTOR < lr:
            lr, edge, factor = verdict.edge_lr / BREAK_CAP_FACTOR, verdict.edge_lr, BREAK_CAP_FACTOR
            why += f"; capped at the probe's stop edge / {BREAK_CAP_FACTOR:g} ({verdict.reason})"
            return ProbeLR(lr, edge, factor, "stop edge", why)
        return ProbeLR(lr, edge, factor, "linear response", why)
    factor, why = edge_factor(width, verdict.reason)
    return ProbeLR(verdict.edge_lr / factor, verdict.edge_lr, factor, "stop edge", why)


def fallback_lr(width: int) -> tuple[float, str]:
    """The base learning rate when no probe can run: anchor · (n / 384)^-a."""
    _check_width(width)
    value = FALLBACK_LR_ANCHOR * (width / CALIBRATION_WIDTH) ** (-OPTIMAL_LR_EXPONENT)
    reason = (
        f"no probe (no batches or no budget): theory's n^-{OPTIMAL_LR_EXPONENT:g} scaling from the MiniLM "
        f"calibration ({FALLBACK_LR_ANCHOR:g} at n = {CALIBRATION_WIDTH}); run the probe for a measured value"
    )
    return value, reason


def rank_alpha_scaling(rank: int | None, alpha: float | None) -> tuple[int, float, str, dict[str, str]]:
    """Rank (the user's, else 8), alpha = rank and standard scaling (s = 1), with reasons."""
    r = DEFAULT_RANK if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"rank={rank!r} is not valid; rank must be a positive integer")
    a = float(r) if alpha is None else float(alpha)
    reasons = {
        "rank": (
            "as given"
            if rank is not None
            else f"{DEFAULT_RANK}: the papers' and PEFT's default; the theory "
            "holds r fixed as n grows, so rank is a capacity choice, not a stability one"
        ),
        "alpha": (
            "as given"
            if alpha is not None
            else "alpha = rank (scale s = 1): the probe measures the "
            "learning rate, so s would only rescale it"
        ),
        "scaling": (
            "standard s = alpha/r: with Adam's sign-like steps δ2 = s·ΔB·Z_A sums r aligned terms, so "
            "alpha/r keeps the per-step output change, and the stability edge, independent of rank"
        ),
    }
    return r, a, "standard", reasons


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(f"width={width!r} is not valid; the width (fan-in) must be a positive integer")


def geometric_lrs(low: float, high: float, count: int) -> list[float]:
    """`count` learning rates from `low` to `high`, evenly spaced in log."""
    if count == 1:
        return [low]
    step = (math.log(high) - math.log(low)) / (count - 1)
    return [math.exp(math.log(low) + i * step) for i in range(count)]

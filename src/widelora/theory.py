"""γ-calculus of the initialization paper (seed 001, Lemma 1, Theorems 1–2) and log–log slope fits.

Why this module exists: the width study measures how the optimal learning rate scales with width; the theory
predicts exponents. Keeping both here lets the report print "predicted vs measured" side by side.

Conventions. Width ``n``; a quantity ``v = Θ(n^γ[v])``; zero is ``γ = -inf``. The learning rate is
``η = Θ(n^c)``. ``Z_A = A z`` (the adapter's internal feature), ``Z_B = B Z_A`` (its output),
``δ1 = B_{t-1} ΔZ_A``, ``δ2 = ΔB Z_A^{t-1}``. Assumption 1 of the paper (Adam-like processed gradients with
``g_A z = Θ(n)``) gives Lemma 1::

    γ[Z_A^t] = max(γ[Z_A^{t-1}], c + 1)      γ[B_t] = max(γ[B_{t-1}], c)

Everything below is derived from that recursion and the initial exponents of a scheme, not hard-coded, so the
tests can check that the theorems' numbers come out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

NEG_INF = -math.inf

# Initial exponents (γ[Z_A^0], γ[B_0]) of the zero-product schemes of ALGORITHMS.md.
#   init_a   A ~ N(0, 1/n): A z is a sum of n terms of size n^-1/2 with random signs -> Θ(1); B = 0.
#   kaiming  A ~ U(±1/sqrt(n)): same order as init_a.
#   gaussian A ~ N(0, 1/r^2): entries Θ(1), so A z = Θ(n^1/2); B = 0.
#   init_b   A = 0; B ~ N(0, 1/r) = Θ(1).
INIT_EXPONENTS: dict[str, tuple[float, float]] = {
    "init_a": (0.0, NEG_INF),
    "kaiming": (0.0, NEG_INF),
    "gaussian": (0.5, NEG_INF),
    "init_b": (NEG_INF, 0.0),
}


def _initial(init: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(init, tuple):
        if len(init) != 2:
            raise ValueError(f"init: expected (gamma_ZA0, gamma_B0), got {init!r}")
        return float(init[0]), float(init[1])
    if not isinstance(init, str):
        raise TypeError(
            f"init: expected a scheme name or a (gamma_ZA0, gamma_B0) tuple, got {type(init).__name__}"
        )
    if init not in INIT_EXPONENTS:
        raise ValueError(f"init: unknown scheme {init!r}; valid: {sorted(INIT_EXPONENTS)} or a tuple")
    return INIT_EXPONENTS[init]


def _check_c(c: float) -> float:
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
        raise ValueError(f"c: the learning-rate exponent must be a finite number, got {c!r}")
    return float(c)


@dataclass(frozen=True)
class GammaState:
    """Exponents at one step t of the recursion."""

    t: int
    z_a: float  # γ[Z_A^t]
    b: float  # γ[B_t]

    @property
    def z_b(self) -> float:
        """γ[Z_B^t] = γ[B_t] + γ[Z_A^t] (a sum of r terms, r fixed)."""
        return _add(self.b, self.z_a)


def _add(x: float, y: float) -> float:
    """γ of a product: exponents add; -inf (an exact zero) absorbs."""
    if x == NEG_INF or y == NEG_INF:
        return NEG_INF
    return x + y


def gamma_recursion(init: str | tuple[float, float], c: float, steps: int = 3) -> list[GammaState]:
    """Lemma 1 iterated from the scheme's initial exponents: states for t = 0..steps."""
    c = _check_c(c)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    z_a, b = _initial(init)
    states = [GammaState(0, z_a, b)]
    for t in range(1, steps + 1):
        z_a, b = max(z_a, c + 1.0), max(b, c)
        states.append(GammaState(t, z_a, b))
    return states


@dataclass(frozen=True)
class FeatureExponents:
    """Exponents of the LoRA features at a fixed step t >= 2 (where the recursion has settled)."""

    init: str
    c: float
    z_a: float
    b: float
    z_b: float
    delta1: float  # γ[B_{t-1} ΔZ_A]
    delta2: float  # γ[ΔB Z_A^{t-1}]
    delta_zb: float  # γ[ΔZ_B] = max(δ1, δ2, δ3)
    stable: bool  # Z_B = O(1)
    feature_learning: bool  # ΔZ_B = Θ(1)
    efficient: bool  # stable and δ1 = δ2 = Θ(1) (Definition 5)
    internal_instability: bool  # stable but Z_A = Ω(n^ε), ε > 0

    def as_dict(self) -> dict:
        return asdict(self)


def feature_exponents(init: str | tuple[float, float], c: float, t: int = 2) -> FeatureExponents:
    """Exponents of Z_A, B, Z_B, δ1, δ2 at step t under η = Θ(n^c) (Theorems 1–2 are read off these)."""
    if not isinstance(t, int) or t < 2:
        raise ValueError(f"t: features are defined for steps t >= 2, got {t!r}")
    states = gamma_recursion(init, c, steps=t)
    prev, cur = states[t - 1], states[t]
    d_za = c + 1.0  # γ[ΔZ_A] = γ[η g_A z] under Assumption 1
    d_b = c  # γ[ΔB] = γ[η g_B]
    delta1 = _add(prev.b, d_za)
    delta2 = _add(d_b, prev.z_a)
    delta3 = _add(d_b, d_za)
    delta_zb = max(delta1, delta2, delta3)
    tol = 1e-12
    stable = cur.z_b <= tol
    name = init if isinstance(init, str) else f"custom{tuple(init)}"
    return FeatureExponents(
        init=name,
        c=float(c),
        z_a=cur.z_a,
        b=cur.b,
        z_b=cur.z_b,
        delta1=delta1,
        delta2=delta2,
        delta_zb=delta_zb,
        stable=stable,
        feature_learning=stable and abs(delta_zb) <= tol,
        efficient=stable and abs(delta1) <= tol and abs(delta2) <= tol,
        internal_instability=stable and cur.z_a > tol,
    )


def max_stable_lr_exponent(init: str | tuple[float, float], lo: float = -4.0, hi: float = 2.0) -> float:
    """Largest c with Z_B = O(1) (Theorems 1–2: -1/2 for Init[A], -1 for Init[B]), found by bisection.

    Stability is monotone in c (all exponents are non-decreasing in c), so bisection on [lo, hi] is exact up
    to float tolerance; the result is rounded to 1e-9.
    """
    if not feature_exponents(init, lo).stable:
        raise ValueError(f"lo: c={lo} is already unstable for init={init!r}; pass a smaller lo")
    if feature_exponents(init, hi).stable:
        return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if feature_exponents(init, mid).stable:
            lo = mid
        else:
            hi = mid
    return round(lo, 9)


@dataclass(frozen=True)
class TheoryPrediction:
    """What the paper predicts for one scheme, for the report."""

    init: str
    max_stable_lr_exponent: float
    za_exponent_at_max: float  # γ[Z_A] at the maximal stable c (Init[A]: 1/2 — internal instability)
    b_exponent_at_max: float
    efficient_at_max: bool
    optimal_lr_range: tuple[float, float]  # where the paper expects the *optimal* exponent to lie

    def as_dict(self) -> dict:
        return asdict(self)


def predict(init: str | tuple[float, float]) -> TheoryPrediction:
    """Predicted exponents for a scheme.

    The optimal-LR range: at c_max the features are efficient only if Z_A stays Θ(1); otherwise the paper
    argues the optimum trades internal instability (γ[Z_A] = c + 1 > 0) against feature learning and lies
    between the exponent at which Z_A stays Θ(1) (c = -1) and c_max.
    """
    c_max = max_stable_lr_exponent(init)
    fe = feature_exponents(init, c_max)
    rng = (-1.0, c_max) if fe.internal_instability else (c_max, c_max)
    name = init if isinstance(init, str) else f"custom{tuple(init)}"
    return TheoryPrediction(name, c_max, fe.z_a, fe.b, fe.efficient, rng)


def za_growth_exponent(init: str | tuple[float, float], c: float) -> float:
    """γ[Z_A^t], t >= 1: n^(c+1) growth under Init[A] if c > -1 (Theorem 1); n^(c+1) from 0 under Init[B]."""
    return gamma_recursion(init, c, steps=2)[-1].z_a


# ----------------------------------------------------------------------------------------------- slope fits


@dataclass(frozen=True)
class SlopeFit:
    """OLS fit of log(y) = intercept + slope · log(x) with a confidence interval on the slope."""

    slope: float
    intercept: float  # natural-log intercept
    ci_low: float
    ci_high: float
    stderr: float
    r2: float
    n_points: int
    confidence: float
    method: str

    def contains(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return np.exp(self.intercept) * np.asarray(x, dtype=float) ** self.slope

    def as_dict(self) -> dict:
        return asdict(self)


def _ols(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float, float, float]:
    xm, ym = lx.mean(), ly.mean()
    sxx = float(((lx - xm) ** 2).sum())
    slope = float(((lx - xm) * (ly - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = ly - (intercept + slope * lx)
    sse = float((resid**2).sum())
    sst = float(((ly - ym) ** 2).sum())
    dof = len(lx) - 2
    stderr = math.sqrt(sse / dof / sxx) if dof > 0 else math.nan
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    return slope, intercept, stderr, r2


def fit_loglog_slope(
    x: Sequence[float],
    y: Sequence[float],
    confidence: float = 0.95,
    method: str = "t",
    n_boot: int = 2000,
    seed: int = 0,
) -> SlopeFit:
    """Fit the exponent of y ∝ x^slope (e.g. optimal LR vs width) with a confidence interval.

    method="t": the classical OLS interval, slope ± t_{(1+conf)/2, k-2} · stderr (assumes Gaussian residuals
    in log space). method="bootstrap": percentile interval over ``n_boot`` resamples of the points (seeded).
    """
    lx = np.log(np.asarray(x, dtype=float))
    ly = np.log(np.asarray(y, dtype=float))
    if lx.shape != ly.shape or lx.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D sequences of equal length, got {lx.shape} and {ly.shape}")
    if not (np.isfinite(lx).all() and np.isfinite(ly).all()):
        raise ValueError("x, y: all values must be positive and finite (they are fitted in log space)")
    if len(np.unique(lx)) < 2 or len(lx) < 3:
        raise ValueError(f"x: need at least 3 points and 2 distinct x values, got {len(lx)} points")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method: unknown {method!r}; valid: 't', 'bootstrap'")
    slope, intercept, stderr, r2 = _ols(lx, ly)
    if method == "t":
        from scipy import stats

        q = float(stats.t.ppf(0.5 + confidence / 2.0, df=len(lx) - 2))
        lo, hi = slope - q * stderr, slope + q * stderr
    else:
        rng = np.random.default_rng(seed)
        slopes = []
        k = len(lx)
        for _ in range(n_boot):
            idx = rng.integers(0, k, size=k)
            if len(np.unique(lx[idx])) < 2:
                continue
            slopes.append(_ols(lx[idx], ly[idx])[0])
        a = (1.0 - confidence) / 2.0
        lo, hi = (float(v) for v in np.quantile(np.asarray(slopes), [a, 1.0 - a]))
    return SlopeFit(slope, intercept, float(lo), float(hi), stderr, r2, len(lx), confidence, method)


# The candidate exponents (-1 and -1/2) are 1/2 apart: a 95 % interval wider than that cannot tell them apart,
# so reports show such a fit as "not determined", never as a result.
INFORMATIVE_CI_WIDTH = 0.5


def exponent_table(fits: dict[str, SlopeFit]) -> list[dict]:
    """Rows of predicted vs measured optimal-LR exponents, one per scheme, for the study's report."""
    rows = []
    for init, fit in fits.items():
        try:
            pred = predict(init)
        except ValueError:
            pred = None
        row = {
            "init": init,
            "predicted_max_stable": pred.max_stable_lr_exponent if pred else math.nan,
            "predicted_optimal_range": pred.optimal_lr_range if pred else (math.nan, math.nan),
            "measured_slope": fit.slope,
            "ci_low": fit.ci_low,
            "ci_high": fit.ci_high,
            "confidence": fit.confidence,
            "n_points": fit.n_points,
            "r2": fit.r2,
            "informative": bool(fit.ci_high - fit.ci_low <= INFORMATIVE_CI_WIDTH),
        }
        if pred:
            lo, hi = pred.optimal_lr_range
            # Consistent if the CI overlaps the predicted range (a single value when lo == hi).
            row["consistent"] = bool(fit.ci_high >= lo - 1e-12 and fit.ci_low <= hi + 1e-12)
        else:
            row["consistent"] = None
        rows.append(row)
    return rows

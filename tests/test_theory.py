"""The γ-calculus gives the exponents of Lemma 1 and Theorems 1–2; the slope fit recovers known ones."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from widelora import theory

c_values = st.floats(min_value=-3.0, max_value=1.0, allow_nan=False)


def test_max_stable_exponents_match_theorems():
    assert theory.max_stable_lr_exponent("init_a") == pytest.approx(-0.5, abs=1e-9)  # Theorem 1
    assert theory.max_stable_lr_exponent("init_b") == pytest.approx(-1.0, abs=1e-9)  # Theorem 2
    assert theory.max_stable_lr_exponent("kaiming") == pytest.approx(-0.5, abs=1e-9)  # same order as Init[A]


def test_init_a_at_max_lr_is_efficient_with_internal_instability():
    fe = theory.feature_exponents("init_a", -0.5)
    assert fe.stable and fe.feature_learning and fe.efficient
    assert fe.internal_instability
    assert fe.z_a == pytest.approx(0.5)  # Z_A = Θ(n^1/2)
    assert fe.b == pytest.approx(-0.5)  # compensated by B = Θ(n^-1/2)
    assert fe.delta1 == pytest.approx(0.0) and fe.delta2 == pytest.approx(0.0)


def test_init_a_beyond_max_lr_is_unstable():
    assert not theory.feature_exponents("init_a", -0.49).stable


def test_init_b_at_max_lr_undertrains_b():
    fe = theory.feature_exponents("init_b", -1.0)
    assert fe.stable and fe.feature_learning
    assert not fe.efficient
    assert fe.delta2 == pytest.approx(-1.0)  # δ2 -> 0: B is untrained in the limit
    assert not fe.internal_instability
    assert not theory.feature_exponents("init_b", -0.9).stable


@given(c=st.floats(min_value=-0.999, max_value=-0.5))
def test_internal_instability_range_init_a(c):
    # Theorem 1: Z_A grows like n^(c+1) for c in (-1, -1/2]
    assert theory.za_growth_exponent("init_a", c) == pytest.approx(c + 1)
    assert theory.feature_exponents("init_a", c).internal_instability


@given(c=c_values, init=st.sampled_from(sorted(theory.INIT_EXPONENTS)))
@settings(max_examples=60)
def test_lemma1_recursion_properties(c, init):
    states = theory.gamma_recursion(init, c, steps=4)
    for prev, cur in itertools.pairwise(states):
        assert cur.z_a == max(prev.z_a, c + 1)  # Lemma 1, literally
        assert cur.b == max(prev.b, c)
        assert cur.z_a >= prev.z_a and cur.b >= prev.b
    # stability is monotone in c: stable at c implies stable at any smaller c
    if theory.feature_exponents(init, c).stable:
        assert theory.feature_exponents(init, c - 0.25).stable


def test_predict_ranges():
    a, b = theory.predict("init_a"), theory.predict("init_b")
    assert a.optimal_lr_range == (-1.0, pytest.approx(-0.5))
    assert b.optimal_lr_range == (pytest.approx(-1.0), pytest.approx(-1.0))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="init"):
        theory.feature_exponents("nope", -1.0)
    with pytest.raises(ValueError, match="c"):
        theory.feature_exponents("init_a", math.nan)
    with pytest.raises(ValueError, match="t"):
        theory.feature_exponents("init_a", -1.0, t=1)
    with pytest.raises(ValueError, match="x, y"):
        theory.fit_loglog_slope([1, 2, 4], [1, -1, 2])
    with pytest.raises(ValueError, match="method"):
        theory.fit_loglog_slope([1, 2, 4], [1, 2, 3], method="jackknife")


def test_fit_recovers_exact_power_law():
    x = 2.0 ** np.arange(7, 14)
    fit = theory.fit_loglog_slope(x, 3.0 * x**-0.75)
    assert fit.slope == pytest.approx(-0.75, abs=1e-12)
    assert fit.ci_high - fit.ci_low < 1e-9
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(1024.0) == pytest.approx(3.0 * 1024.0**-0.75)


def test_t_interval_matches_scipy_linregress():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = 2.0 ** np.arange(7, 14)
    y = x**-0.8 * np.exp(rng.normal(0, 0.3, size=x.size))
    fit = theory.fit_loglog_slope(x, y, confidence=0.9)
    ref = stats.linregress(np.log(x), np.log(y))
    q = stats.t.ppf(0.95, df=x.size - 2)
    assert fit.slope == pytest.approx(ref.slope)
    assert fit.stderr == pytest.approx(ref.stderr)
    assert (fit.ci_low, fit.ci_high) == pytest.approx(
        (ref.slope - q * ref.stderr, ref.slope + q * ref.stderr)
    )


def test_bootstrap_interval_covers_truth_on_noisy_data():
    rng = np.random.default_rng(1)
    x = np.repeat(2.0 ** np.arange(7, 14), 3)
    y = x**-1.0 * np.exp(rng.normal(0, 0.1, size=x.size))
    fit = theory.fit_loglog_slope(x, y, method="bootstrap", n_boot=500, seed=3)
    assert fit.contains(-1.0)
    assert fit.ci_low < fit.slope < fit.ci_high
    assert fit == theory.fit_loglog_slope(x, y, method="bootstrap", n_boot=500, seed=3)  # seeded


def test_exponent_table_flags_consistency():
    x = 2.0 ** np.arange(7, 14)
    rows = theory.exponent_table(
        {
            "init_a": theory.fit_loglog_slope(x, x**-0.7),
            "init_b": theory.fit_loglog_slope(x, x**-0.5),
        }
    )
    by = {r["init"]: r for r in rows}
    assert by["init_a"]["consistent"] is True  # -0.7 lies in [-1, -1/2]
    assert by["init_b"]["consistent"] is False  # -0.5 is not -1
    assert by["init_b"]["predicted_max_stable"] == pytest.approx(-1.0)


def test_exponent_table_flags_intervals_too_wide_to_say_anything():
    """A 3-width fit with an interval like [-2.8, 1.4] must not be reported as a measured exponent."""
    rng = np.random.default_rng(0)
    widths = [128, 1024, 8192]
    noisy = theory.fit_loglog_slope(widths, [w**-0.7 * math.exp(rng.normal(0, 1.5)) for w in widths])
    clean = theory.fit_loglog_slope([2**k for k in range(7, 14)], [2 ** (-0.75 * k) for k in range(7, 14)])
    rows = {r["init"]: r for r in theory.exponent_table({"init_a": noisy, "init_b": clean})}
    assert noisy.ci_high - noisy.ci_low > theory.INFORMATIVE_CI_WIDTH and not rows["init_a"]["informative"]
    assert rows["init_b"]["informative"]

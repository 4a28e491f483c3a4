"""Probe v3: the linear-response edge (edge.StopRule.response_edge) and the lr rule that reads it
(rules.probe_lr), on synthetic curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from widelora.recommend import rules
from widelora.recommend.edge import Reading, StopRule, Verdict
from widelora.recommend.probe import upper_quartile

edges = st.floats(min_value=1e-4, max_value=1.0)
#: A ramp as (steps from its start to the edge, factor per step): at least 3, so >= 2 readings are linear.
ramps = st.tuples(st.floats(min_value=3.0, max_value=20.0), st.floats(min_value=1.2, max_value=3.0))


def _ramp(edge: float, ramp: tuple[float, float]) -> list[Reading]:
    below, q = ramp
    return _power_law(edge, edge * q**-below, q, math.floor(below) + 3)


def _power_law(edge: float, lr0: float, q: float, count: int, slope: float = 1.0) -> list[Reading]:
    """Readings of a ramp lr0 · q^k whose |Z_B|/|Wx| after the update at lr is (lr / edge)^slope; A unmoved.
    Reading k holds the state after the update at reading k-1's lr (reading 0: B = 0)."""
    lrs = [lr0 * q**k for k in range(count)]
    outs = [0.0] + [(lr / edge) ** slope for lr in lrs[:-1]]
    return [Reading(k, lr, 2.0, out, 1.0) for k, (lr, out) in enumerate(zip(lrs, outs, strict=True))]


@settings(max_examples=80, deadline=None)
@given(edges, ramps)
def test_an_exact_linear_law_gives_back_its_crossing(edge: float, ramp: tuple[float, float]) -> None:
    v = StopRule().scan(_ramp(edge, ramp))  # the ramp passes the crossing
    assert v.reason == "output instability"
    assert v.response_lr == pytest.approx(edge, rel=1e-9)
    # the crossing the stop interpolates is the same edge on an exact law
    assert v.edge_lr == pytest.approx(edge, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(edges, ramps, ramps)
def test_the_ramp_quantization_does_not_move_the_estimate(
    edge: float, ramp_a: tuple[float, float], ramp_b: tuple[float, float]
) -> None:
    """Two ramps with different starts and step factors read the same noise-free law: same edge."""
    estimates = [StopRule().scan(_ramp(edge, ramp)).response_lr for ramp in (ramp_a, ramp_b)]
    assert estimates[0] == pytest.approx(estimates[1], rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(edges, st.lists(st.floats(min_value=1.0, max_value=50.0), min_size=1, max_size=6))
def test_a_superlinear_tail_before_the_stop_does_not_move_the_fit(edge: float, bursts: list[float]) -> None:
    """The last readings grow faster than lr (A moving, batch luck): fewer than half of them cannot move the
    median, where they move the two-point crossing."""
    readings = _power_law(edge, 1e-6, 1.85, 40)
    stop = next(i for i, r in enumerate(readings) if r.out_ratio > 1.0)
    clean = stop - 1  # readings 1 .. stop-1 are in the linear regime, reading 0 has B = 0
    tail = bursts[: max(0, (clean - 1) // 2)]
    for j, burst in enumerate(tail):  # inflate the last len(tail) readings before the stop
        k = stop - len(tail) + j
        readings[k] = Reading(k, readings[k].lr, 2.0, min(readings[k].out_ratio * burst, 0.99), 1.0)
    assert StopRule().response_edge(readings[:stop]) == pytest.approx(edge, rel=1e-9)


def test_the_fit_reads_the_layers_upper_quartile_not_one_fast_layer() -> None:
    """One adapter responding 3× faster than the rest moves the maximum (and the stop), not the fit."""
    readings = _power_law(1e-2, 1e-5, 2.0, 9)
    fast = [Reading(r.step, r.lr, r.loss, 3 * r.out_ratio, 1.0, out_q=r.out_ratio) for r in readings]
    rule = StopRule()
    assert rule.response_edge(fast) == pytest.approx(1e-2)
    assert rule.scan(fast).edge_lr < 0.5e-2  # the maximum crossed |W x| a factor 3 earlier


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=1, max_size=40))
def test_upper_quartile_is_numpys_75th_percentile(values: list[float]) -> None:
    assert upper_quartile(values) == pytest.approx(float(np.quantile(values, 0.75)), rel=1e-12, abs=1e-300)
    assert upper_quartile([*values, math.inf]) == math.inf


def test_readings_after_a_moves_are_left_out_of_the_fit() -> None:
    """|Z_A| grown past `linear_za_growth`: the sign-step law no longer holds there, whatever |Z_B| does."""
    readings = _power_law(1e-2, 1e-5, 2.0, 8)
    moved = [Reading(r.step, r.lr, r.loss, r.out_ratio * 10, 1.5) if r.step >= 3 else r for r in readings]
    assert StopRule().response_edge(moved) == pytest.approx(1e-2)
    assert StopRule(linear_za_growth=2.0).response_edge(moved) != pytest.approx(1e-2)


def test_too_few_linear_readings_or_no_monitor_give_no_response() -> None:
    rule = StopRule()
    assert rule.response_edge(_power_law(1e-2, 1e-5, 2.0, 2)) is None  # one usable reading
    plain = [Reading(k, 1e-5 * 2**k, 2.0) for k in range(6)]
    assert rule.response_edge(plain) is None and rule.scan(plain).response_lr is None
    with pytest.raises(ValueError, match="linear_za_growth"):
        StopRule(linear_za_growth=0.5)


def test_the_threshold_scales_the_response_edge() -> None:
    readings = _power_law(1e-2, 1e-5, 2.0, 6)  # never reaches 1
    assert StopRule(output_ratio=0.5).response_edge(readings) == pytest.approx(0.5e-2)


# ------------------------------------------------------------------------------------------ the lr rule
def _verdict(reason: str, edge: float, response: float | None) -> Verdict:
    return Verdict(edge, reason, 5, 1e-5, None, [], response)


def test_probe_lr_divides_the_response_edge_by_the_calibrated_factor() -> None:
    got = rules.probe_lr(384, _verdict("output instability", 2e-2, 8e-2))
    assert got.source == "linear response" and got.lr == pytest.approx(8e-2 / rules.RESPONSE_FACTOR)
    assert (got.edge, got.factor) == (8e-2, rules.RESPONSE_FACTOR)


def test_probe_lr_never_goes_above_a_break_over_the_cap() -> None:
    """A task whose blow-up comes early: the crossing / 4 is below response / 77, so it decides."""
    for reason in ("output instability", "non-finite", "loss rise"):
        got = rules.probe_lr(384, _verdict(reason, 1e-2, 1.0))
        assert got.source == "stop edge" and got.lr == pytest.approx(1e-2 / rules.BREAK_CAP_FACTOR)
    # ... but the end of the ramp is not a break
    assert rules.probe_lr(384, _verdict("not reached", 1e-2, 1.0)).lr == pytest.approx(
        1.0 / rules.RESPONSE_FACTOR
    )


def test_probe_lr_keeps_the_reference_loss_rule_and_the_v2_fallback() -> None:
    ref = rules.probe_lr(576, _verdict("reference-loss rise", 4.6e-3, 1e-1))
    assert (ref.source, ref.lr) == ("reference loss", pytest.approx(2.3e-3))
    old = rules.probe_lr(384, _verdict("output instability", 2e-2, None))
    assert (old.source, old.lr) == ("stop edge", pytest.approx(2e-2 / rules.EDGE_FACTOR))

"""widelora.recommend: the width-aware rules, the stopping rule on synthetic curves, and the Recommendation
object."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from widelora.errors import UserError
from widelora.recommend import Recommendation, rules
from widelora.recommend.edge import Reading, StopRule

widths = st.integers(min_value=1, max_value=1 << 16)


# ------------------------------------------------------------------------------------------------- the rules
@given(widths, widths)
def test_ratio_grows_with_width_and_stays_in_bounds(n1: int, n2: int) -> None:
    lo, hi = sorted((n1, n2))
    r_lo, r_hi = rules.loraplus_ratio(lo)[0], rules.loraplus_ratio(hi)[0]
    assert r_lo <= r_hi
    assert rules.RATIO_BOUNDS[0] <= r_lo <= rules.RATIO_BOUNDS[1]


def test_ratio_is_the_papers_value_at_the_anchor_width_and_smaller_at_minilm() -> None:
    assert rules.loraplus_ratio(rules.WIDTH_ANCHOR)[0] == pytest.approx(rules.RATIO_ANCHOR)
    ratio, reason = rules.loraplus_ratio(384)
    assert 1.0 < ratio < 16.0  # ratio 16 collapsed B at width 384 (README, make demo)
    assert "n = 384" in reason


@given(st.floats(min_value=0.5, max_value=1.0))
def test_ratio_exponent_spans_vanilla_to_loraplus(a: float) -> None:
    """a = 1/2 (vanilla LoRA at its edge) -> ratio constant; a = 1 (LoRA+'s regime) -> ratio ∝ n."""
    assert 0.0 <= rules.ratio_exponent(a) <= 1.0
    assert rules.ratio_exponent(0.5) == 0.0 and rules.ratio_exponent(1.0) == 1.0


@given(widths, widths)
def test_edge_factor_is_width_independent_and_fallback_lr_shrinks(n1: int, n2: int) -> None:
    """The width study measures edge/optimum flat in n, so the factor is one constant (rules.edge_factor)."""
    lo, hi = sorted((n1, n2))
    assert rules.edge_factor(lo)[0] == rules.edge_factor(hi)[0] == rules.EDGE_FACTOR > 1
    assert rules.fallback_lr(lo)[0] >= rules.fallback_lr(hi)[0]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "384"])
def test_rules_reject_a_bad_width(bad) -> None:
    with pytest.raises(ValueError, match="width"):
        rules.loraplus_ratio(bad)


def test_rank_alpha_scaling_defaults_and_user_values() -> None:
    r, a, scaling, reasons = rules.rank_alpha_scaling(None, None)
    assert (r, a, scaling) == (rules.DEFAULT_RANK, float(rules.DEFAULT_RANK), "standard")
    assert set(reasons) == {"rank", "alpha", "scaling"}
    assert rules.rank_alpha_scaling(16, 32)[:2] == (16, 32.0)
    with pytest.raises(ValueError, match="rank"):
        rules.rank_alpha_scaling(0, None)


# ------------------------------------------------------------------------------------------ the stopping rule
def _curve(losses, out=None, za=None, lr0=1e-5, q=2.0):
    out = out or [None] * len(losses)
    za = za or [None] * len(losses)
    return [
        Reading(k, lr0 * q**k, loss, o, z) for k, (loss, o, z) in enumerate(zip(losses, out, za, strict=True))
    ]


def test_loss_rise_stops_and_the_edge_is_the_last_update_that_left_a_good_state() -> None:
    readings = _curve([2.4, 2.3, 2.0, 1.6, 1.2, 1.0, 1.1, 3.0, 9.0])
    v = StopRule().scan(readings)
    assert v.reason == "loss rise" and v.stop_step == 7
    assert v.edge_lr == readings[5].lr  # reading 7 was made by the update at lr[6]; reading 6 by lr[5]


def test_non_finite_loss_stops_at_once() -> None:
    readings = _curve([2.4, 2.3, 2.2, 2.1, math.nan, 1.0])
    v = StopRule().scan(readings)
    assert (v.reason, v.stop_step, v.edge_lr) == ("non-finite", 4, readings[2].lr)


def test_output_instability_stops_before_the_loss_moves() -> None:
    """The adapter's output passing the pretrained layer's output is a stop even if the loss still falls."""
    readings = _curve([2.4, 2.3, 2.2, 2.1, 2.0, 1.9], out=[0.0, 0.01, 0.1, 0.5, 1.5, 3.0])
    v = StopRule().scan(readings)
    assert (v.reason, v.stop_step) == ("output instability", 4)
    # |Z_B|/|Wx| went 0.5 -> 1.5 between the updates at lr[2] and lr[3] (a factor 2 apart): crossing at
    # 2^(ln2/ln3)
    assert v.edge_lr == pytest.approx(readings[2].lr * 2 ** (math.log(2) / math.log(3)))


def test_internal_instability_is_reported_not_a_stop() -> None:
    readings = _curve([2.4, 2.3, 2.2, 2.1, 2.0, 1.9], out=[0.0] * 6, za=[1.0, 1.0, 1.5, 2.5, 4.0, 8.0])
    v = StopRule().scan(readings)
    assert v.reason == "not reached" and v.edge_lr == readings[-2].lr
    assert v.internal_lr == readings[2].lr


def test_a_noisy_start_does_not_stop_the_probe() -> None:
    readings = _curve([2.4, 1.0, 2.4, 2.0, 1.9, 1.8])  # a lucky second batch, inside the warm-up readings
    assert StopRule().scan(readings).reason == "not reached"


def test_a_bad_first_update_is_below_the_range() -> None:
    v = StopRule().scan(_curve([2.4, math.inf, 2.0]))
    assert v.reason.startswith("below range") and v.edge_lr == 1e-5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=2, max_size=30))
def test_the_edge_is_always_a_probed_lr_before_the_stop(losses: list[float]) -> None:
    readings = _curve(losses)
    v = StopRule().scan(readings)
    lrs = [r.lr for r in readings]
    assert v.edge_lr in lrs
    if v.stop_step is not None:
        assert v.edge_lr <= lrs[max(0, v.stop_step - 1)]


def test_stop_rule_rejects_bad_thresholds() -> None:
    with pytest.raises(ValueError):
        StopRule(rise=0)
    with pytest.raises(ValueError):
        StopRule(smoothing=1.0)


# ------------------------------------------------------------------------------------------- the object
def _rec(**kw) -> Recommendation:
    base = {
        "targets": ["q_proj", "v_proj"],
        "rank": 8,
        "alpha": 8.0,
        "trainable": ["classifier"],
        "lr": 1e-3,
        "ratio": 4.0,
        "head_lr": 5e-2,
        "width": 384,
        "steps": 60,
        "reasons": {"lr": "probe edge 4e-3 / 4", "ratio": "width rule"},
    }
    base.update(kw)
    return Recommendation(**base)


def test_recommendation_round_trips_through_json() -> None:
    rec = _rec(probe={"edge_lr": 4e-3, "curve": [{"lr": 1e-5, "loss": 2.4}]})
    again = Recommendation.from_dict(json.loads(rec.to_json()))
    assert again == rec


def test_recommendation_hands_out_attach_and_optimizer_kwargs() -> None:
    rec = _rec()
    assert rec.attach_kwargs() == {
        "targets": ["q_proj", "v_proj"],
        "rank": 8,
        "alpha": 8.0,
        "init": "init_a",
        "scaling": "standard",
        "trainable": ["classifier"],
    }
    assert rec.optimizer_kwargs() == {"lr": 1e-3, "method": "loraplus", "ratio": 4.0, "head_lr": 5e-2}
    assert rec.run_config_overrides()["lr"] == 1e-3 and "head_lr" not in rec.run_config_overrides()


def test_table_prints_every_choice_with_its_reason() -> None:
    text = _rec().table()
    for key in ("init", "targets", "rank", "ratio", "lr", "head_lr"):
        assert any(line.startswith(key) for line in text.splitlines())
    assert "probe edge 4e-3 / 4" in text and "width n = 384" in text


@pytest.mark.parametrize(
    ("key", "value"), [("lr", 0.0), ("lr", math.nan), ("ratio", -1.0), ("rank", 0), ("head_lr", -1.0)]
)
def test_recommendation_rejects_invalid_values(key, value) -> None:
    with pytest.raises(UserError, match=key):
        _rec(**{key: value})


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(UserError, match="unknown recommendation key"):
        Recommendation.from_dict({"lr": 1e-3, "learning_rate": 1e-3})


# --------------------------------------------------------------------------------- the fastai-style baseline
def test_fastai_suggestions_on_a_synthetic_curve() -> None:
    from widelora.recommend.lr_finder import suggest

    lrs = [1e-6 * 10**k for k in range(7)]  # 1e-6 ... 1
    smoothed = [2.0, 1.9, 1.5, 0.8, 0.6, 1.0, 50.0]  # steepest fall 1e-4 -> 1e-3, minimum at 1e-2
    s = suggest(lrs, smoothed)
    assert s["minimum"] == pytest.approx(1e-3) and s["steep"] == pytest.approx(1e-4)
    assert s["steep_div10"] == pytest.approx(1e-5)


# ------------------------------------------------------------------------------- the reference-loss
# (function) edge
def _ref_curve(losses, refs, lr0=1e-5, q=2.0):
    return [
        Reading(k, lr0 * q**k, loss, None, None, ref)
        for k, (loss, ref) in enumerate(zip(losses, refs, strict=True))
    ]


def test_reference_loss_rise_stops_where_a_step_first_made_the_fixed_batch_worse() -> None:
    """A noisy training loss says nothing here; the reference curve falls, then turns up by more than 1 %."""
    losses = [3.6, 2.8, 4.1, 3.2, 3.9, 2.7, 3.5, 3.3, 3.4]
    refs = [3.44, 3.43, 3.40, 3.33, 3.21, 3.16, 3.39, 3.84, 11.4]
    v = StopRule().scan(_ref_curve(losses, refs))
    assert (v.reason, v.stop_step) == ("reference-loss rise", 6)
    assert v.edge_lr == pytest.approx(
        1e-5 * 2**4
    )  # reading 6 came from the update at lr[5]: lr[4] was the last good
    assert rules.edge_factor(64, v.reason)[0] == rules.LOSS_EDGE_FACTOR == 2.0
    assert rules.edge_factor(64, "output instability")[0] == rules.EDGE_FACTOR


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 0.5), min_size=3, max_size=15), st.floats(1.0, 10.0))
def test_a_falling_reference_curve_never_stops_the_probe(drops: list[float], start: float) -> None:
    refs = [start]
    for d in drops:
        refs.append(refs[-1] * (1.0 - 0.1 * d))  # never rises
    v = StopRule().scan(_ref_curve([2.0] * len(refs), refs))
    assert v.reason == "not reached"


def test_a_rise_within_the_tolerance_is_not_an_edge() -> None:
    v = StopRule().scan(_ref_curve([2.0] * 5, [3.0, 2.9, 2.8, 2.82, 2.7]))  # +0.7 % < 1 %
    assert v.reason == "not reached"


def test_with_a_reference_curve_the_noisy_training_loss_cannot_stop_the_probe() -> None:
    """The training loss jumps ×3 (a 1-row batch can), the reference curve keeps falling: no stop."""
    v = StopRule().scan(_ref_curve([2.0, 1.0, 6.0, 1.0, 7.0], [3.0, 2.9, 2.8, 2.7, 2.6]))
    assert v.reason == "not reached"

"""widelora.experiments.setup_comparison: best-of-grid, paired gaps, half-budget values, issue 12's target."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from widelora.experiments.setup_comparison import (
    Cell,
    collect,
    mean_se,
    paired_gap,
    ranking,
    within_target,
)


def trial(tid, setup, seed, value, lr=None, status="done", chosen=None):
    labels = {"seed": seed, "setup": setup}
    config = {"seed": seed}
    if lr is not None:
        labels["lr"] = lr
        config["lr"] = lr
    final = {} if value is None else {"accuracy": value}
    if chosen is not None:
        final["chosen_lr"] = chosen
    return SimpleNamespace(id=tid, labels=labels, config=config, status=status, final=final)


def grid_trials():
    out = []
    for seed in (0, 1, 2):
        for lr, acc in ((1e-3, 0.50), (2e-3, 0.70), (4e-3, 0.60)):
            out.append(trial(f"a{seed}{lr}", "A", seed, acc + 0.01 * seed, lr))
        for lr, acc in ((1e-3, 0.40), (2e-3, 0.55), (4e-3, 0.65)):
            out.append(trial(f"b{seed}{lr}", "B", seed, acc, lr))
        out.append(trial(f"r{seed}", "rec", seed, 0.69 + 0.01 * seed, chosen=1.5e-3 * (seed + 1)))
    return out


def test_best_cell_and_bracketing():
    setups = collect(grid_trials(), "accuracy")
    a, b = setups["A"], setups["B"]
    assert a.best("max").lr == 2e-3 and a.bracketed("max") is True
    assert b.best("max").lr == 4e-3 and b.bracketed("max") is False  # best at the grid's edge
    assert a.best("max").mean == pytest.approx(0.71)
    assert setups["rec"].bracketed("max") is None  # no grid
    assert ranking(setups, "max") == ["A", "rec", "B"]


def test_untuned_setup_keeps_its_per_seed_learning_rates():
    rec = collect(grid_trials(), "accuracy")["rec"]
    (cell,) = rec.cells.values()
    assert cell.lr is None and cell.lr_by_seed == pytest.approx({0: 1.5e-3, 1: 3e-3, 2: 4.5e-3})


def test_chosen_lr_is_read_from_the_run_folder_when_not_in_the_final_metrics(tmp_path):
    (tmp_path / "result.json").write_text('{"status": "done", "setup": {"lr": 0.0007, "ratio": 3.9}}')
    t = trial("r", "rec", 0, 0.8)
    t.run_dir = str(tmp_path)
    (cell,) = collect([t], "accuracy")["rec"].cells.values()
    assert cell.lr_by_seed == {0: 0.0007}
    t.run_dir = str(tmp_path / "missing")
    (cell,) = collect([t], "accuracy")["rec"].cells.values()
    assert cell.lr_by_seed == {}


def test_paired_gap_uses_common_seeds_only():
    setups = collect(grid_trials(), "accuracy")
    gap = paired_gap(setups["rec"].cells[None], setups["A"].best("max"))
    assert gap.n == 3 and gap.mean == pytest.approx(-0.01) and gap.se == pytest.approx(0.0, abs=1e-12)
    partial = Cell(None, by_seed={1: 0.5})
    assert paired_gap(partial, setups["A"].best("max")).n == 1


def test_diverged_cell_is_never_best_and_is_counted():
    trials = [
        trial("x0", "A", 0, 0.9, 1e-2),
        trial("x1", "A", 1, None, 1e-2, status="diverged"),
        trial("y0", "A", 0, 0.5, 1e-3),
        trial("y1", "A", 1, 0.6, 1e-3),
    ]
    setup = collect(trials, "accuracy")["A"]
    assert setup.cells[1e-2].diverged == 1
    assert setup.best("max").lr == 1e-3


def test_unfinished_trials_are_not_results():
    trials = [
        trial("p", "A", 0, None, 1e-3, status="pending"),
        trial("r", "B", 0, None, 1e-3, status="running"),
    ]
    assert collect(trials, "accuracy") == {}


def test_value_at_half_budget_comes_from_the_curves():
    trials = [trial("t0", "A", 0, 0.9, 1e-3), trial("t1", "A", 1, 0.8, 1e-3)]
    curves = {
        "t0": {"accuracy": [(0, 0.1), (60, 0.55), (120, 0.9)]},
        "t1": {"accuracy": [(0, 0.1), (120, 0.8)]},
    }
    cell = collect(trials, "accuracy", curves=curves, at_step=60)["A"].cells[1e-3]
    assert cell.by_seed == {0: 0.55}  # seed 1 has no evaluation at step 60


def test_relative_gap_for_perplexity():
    base = Cell(1e-3, by_seed={0: 10.0, 1: 10.1})  # s.e. 0.05, i.e. 0.5 % of the mean
    gap = paired_gap(Cell(None, by_seed={0: 10.19, 1: 10.2919}), base, relative=True)  # 1.9 % higher
    assert gap.relative and gap.mean == pytest.approx(1.9)
    assert within_target(gap, base, "min", floor=2.0) is True
    worse = paired_gap(Cell(None, by_seed={0: 10.5, 1: 10.605}), base, relative=True)  # 5 % higher
    assert within_target(worse, base, "min", floor=2.0) is False
    better = paired_gap(Cell(None, by_seed={0: 9.0, 1: 9.0}), base, relative=True)
    assert better.mean < 0 and within_target(better, base, "min", floor=2.0) is True


def test_target_uses_the_larger_of_floor_and_baseline_se():
    base = Cell(1e-3, by_seed={0: 0.70, 1: 0.74, 2: 0.66})  # s.e. about 2.3 points
    close = Cell(None, by_seed={0: 0.68, 1: 0.72, 2: 0.64})  # 2 points worse
    assert within_target(paired_gap(close, base), base, "max", floor=0.01) is True
    tight = Cell(1e-3, by_seed={0: 0.70, 1: 0.70, 2: 0.70})
    assert within_target(paired_gap(close, tight), tight, "max", floor=0.01) is False
    assert within_target(paired_gap(None, base), base, "max", 0.01) is None


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=8))
def test_mean_se_matches_definition_and_gap_with_itself_is_zero(values):
    m, se = mean_se(values)
    assert m == pytest.approx(sum(values) / len(values), abs=1e-9)
    assert se >= 0
    cell = Cell(None, by_seed=dict(enumerate(values)))
    gap = paired_gap(cell, cell)
    assert gap.mean == 0 and gap.n == len(values)


def test_single_value_has_no_standard_error():
    assert math.isnan(mean_se([1.0])[1])

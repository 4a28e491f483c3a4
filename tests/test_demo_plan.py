"""The demo's plan and answers: specs equal to the evaluation protocol, plain-words answers of either sign, a
useless width fit never shown as a result, and the page leading with the answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from widelora.errors import UserError
from widelora.experiments.demo_page import DemoOutcome, write_demo_page
from widelora.experiments.demo_plan import (
    EVAL_BASE,
    INIT_A,
    INIT_B,
    PEFT_DEFAULT,
    RECOMMEND_UNTUNED,
    DemoPlan,
    init_answer,
    init_spec,
    peft_spec,
    recommend_answer,
    recommend_spec,
    width_answer,
)
from widelora.experiments.setup_comparison import Cell, SetupResult

ROOT = Path(__file__).resolve().parents[1]


def setup(label: str, cells: dict) -> SetupResult:
    return SetupResult(label, {lr: Cell(lr, by_seed=dict(v)) for lr, v in cells.items()})


def test_demo_trials_use_the_evaluation_protocols_base():
    spec = yaml.safe_load((ROOT / "examples/sweeps/eval_minilm_topics.yaml").read_text())
    assert spec["base"] == EVAL_BASE
    plan = DemoPlan()
    for s in (init_spec(plan), peft_spec(plan), recommend_spec(plan)):
        assert s["base"] == EVAL_BASE and s["axes"]["seed"] == [0, 1]
    assert "lr" not in recommend_spec(plan)["axes"]  # untuned: the probe picks it


def test_plan_rejects_bad_sizes_before_anything_runs():
    with pytest.raises(UserError, match="seeds"):
        DemoPlan(seeds=[0, 0]).validate()
    with pytest.raises(UserError, match="init_lrs"):
        DemoPlan(init_lrs=[1e-3, -1.0]).validate()
    with pytest.raises(UserError, match="width-seeds"):
        DemoPlan(width_seeds=0).validate()


def test_init_answer_says_which_is_better_whatever_the_sign():
    a = setup(INIT_A["label"], {1e-3: {0: 0.60, 1: 0.62}, 4e-3: {0: 0.80, 1: 0.82}, 1.6e-2: {0: 0.5, 1: 0.5}})
    b = setup(INIT_B["label"], {1e-3: {0: 0.70, 1: 0.71}, 4e-3: {0: 0.60, 1: 0.60}, 1.6e-2: {0: 0.2, 1: 0.2}})
    text = init_answer({a.label: a, b.label: b})
    assert "Init[A] is better" in text and "larger" in text and "+10.5" in text
    text = init_answer({a.label: b, b.label: a})  # swapped: Init[B] wins
    assert "Init[B] is better" in text and "smaller" in text


def test_recommend_answer_reports_a_miss_as_a_miss():
    peft = setup(PEFT_DEFAULT["label"], {4e-3: {0: 0.85, 1: 0.86}, 8e-3: {0: 0.80, 1: 0.80}})
    rec = SetupResult(RECOMMEND_UNTUNED["label"], {None: Cell(None, {0: 0.80, 1: 0.81}, {0: 2e-3, 1: 3e-3})})
    text = recommend_answer({peft.label: peft, rec.label: rec})
    assert "does not reach" in text and "-5.0" in text and "0.002" in text
    rec.cells[None].by_seed = {0: 0.855, 1: 0.86}
    assert " reaches" in recommend_answer({peft.label: peft, rec.label: rec})
    rec.cells[None].diverged = 1
    assert "diverged" in recommend_answer({peft.label: peft, rec.label: rec})


def test_a_useless_width_fit_is_not_a_result():
    rows = [
        {
            "init": "init_a",
            "measured_slope": -0.7,
            "ci_low": -2.8,
            "ci_high": 1.4,
            "predicted_optimal_range": (-1.0, -0.5),
            "consistent": True,
        },
        {
            "init": "init_b",
            "measured_slope": -0.95,
            "ci_low": -1.1,
            "ci_high": -0.8,
            "predicted_optimal_range": (-1.0, -1.0),
            "consistent": True,
        },
    ]
    text = width_answer(rows, 7, 4)
    assert "too wide to conclude" in text and "-0.7" not in text
    assert "n^-0.95" in text and "consistent with" in text and "7 widths, 4 seeds" in text


def test_page_leads_with_the_three_answers(tmp_path):
    o = DemoOutcome(
        out=tmp_path,
        answers={"width": "W-answer", "init": "I-answer", "recommend": "R-answer"},
        seconds={"width study": 60.0},
    )
    o.setups["init"] = {"x": setup("x", {1e-3: {0: 0.5, 1: 0.6}})}
    page = write_demo_page(o).read_text()
    first = page.index("W-answer")
    assert first < page.index("I-answer") < page.index("R-answer")
    assert page.index("R-answer") < page.index("How the real-model numbers were made")
    assert "55.0 ± 5.0" in page

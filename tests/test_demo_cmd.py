"""`widelora demo` end to end with a stand-in trial function (no model): the sweeps run, resume, and the page
and the terminal lead with the answers; bad flags are one clear error line."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from widelora.cli import app
from widelora.sweep import registry

CALLS: list[dict] = []


def fake_finetune(config, run_dir, on_metrics=None):
    """Accuracy peaks at lr 6.4e-3 for Init[B], 1.28e-2 otherwise; `setup: recommended` picks lr 1.2e-2."""
    CALLS.append(dict(config))
    if config.get("setup") == "recommended":
        lr, peak = 1.2e-2, 1.28e-2
    else:
        lr, peak = config["lr"], 6.4e-3 if config["init"] == "init_b" else 1.28e-2
    acc = 0.85 - 0.1 * math.log2(lr / peak) ** 2 - (0.08 if config.get("init") == "init_b" else 0.0)
    acc += 0.002 * config["seed"]
    return {"status": "done", "final": {"accuracy": acc, "chosen_lr": lr}}


@pytest.fixture
def fake_trials(monkeypatch):
    CALLS.clear()
    monkeypatch.setitem(registry._TRIALS, "finetune", registry.TrialFunction("finetune", fake_finetune))


def test_demo_answers_from_its_sweeps_and_resumes(tmp_path, fake_trials):
    out = tmp_path / "report"
    args = ["demo", "--out", str(out), "--parts", "init,recommend", "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        len(CALLS) == 2 * 2 * 4 + 2 * 4 + 2
    )  # (b) 2 inits x 4 lrs x 2 seeds; (c) 4 lrs x 2 seeds + 2 untuned
    assert "Init[A] is better" in result.output and "larger" in result.output
    assert "reaches PEFT's default" in result.output
    page = (out / "index.html").read_text()
    assert page.index("Init[A] is better") < page.index("How the real-model numbers were made")
    assert (out / "figures" / "init.png").stat().st_size > 1000
    again = CliRunner().invoke(app, args)  # resume: every trial is in the stores already
    assert again.exit_code == 0 and len(CALLS) == 26, again.output


def test_bad_flags_are_one_error_line(tmp_path):
    for flags, word in (
        (["--parts", "width,bogus"], "bogus"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "seeds"),
    ):
        result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "o"), *flags])
        assert result.exit_code == 2, result.output
        assert word in result.output
    assert not (tmp_path / "o").exists()  # checked before anything was written

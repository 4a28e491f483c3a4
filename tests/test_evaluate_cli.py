"""`widelora evaluate`: a finished run's numbers on any held-out split, equal to what the run recorded."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from widelora.cli import app
from widelora.testing.models import save_tiny_folder
from widelora.train.reevaluate import evaluate_run

runner = CliRunner()


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    from widelora.train import train

    root = tmp_path_factory.mktemp("evaluate")
    rows = ["text,label"] + [
        f"note {i} talks about {'rain' if i % 3 else 'sun'},{int(i % 3 == 0)}" for i in range(60)
    ]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    folder = save_tiny_folder(root / "model", task="causal_lm")
    config = {
        "model": str(folder), "task": "classification", "dataset": str(root / "labels.csv"),
        "targets": ["q_proj", "v_proj"], "rank": 2, "seq_len": 16, "batch_size": 4, "steps": 6, "lr": 3e-2,
        "eval_examples": 100, "eval_batch_size": 5, "progress": False,
    }  # fmt: skip
    result = train(config, root / "run")
    assert result["status"] == "done", result
    return root / "run", result


def test_the_runs_own_split_gives_back_exactly_the_number_it_recorded(classifier_run) -> None:
    run, result = classifier_run
    again = evaluate_run(run, "test")
    final = result.get("final", result)
    assert again["accuracy"] == final["accuracy"] and again["eval_loss"] == pytest.approx(
        final["eval_loss"], abs=1e-7
    )


def test_pooled_splits_are_the_example_weighted_mean_of_both(classifier_run) -> None:
    run, _ = classifier_run
    test, val, both = (evaluate_run(run, s) for s in ("test", "val", "val+test"))
    assert both["examples"] == test["examples"] + val["examples"] > test["examples"]
    weighted = (test["accuracy"] * test["examples"] + val["accuracy"] * val["examples"]) / both["examples"]
    assert both["accuracy"] == pytest.approx(weighted)


def test_cli_prints_json_and_refuses_bad_input(classifier_run, tmp_path) -> None:
    run, _ = classifier_run
    ok = runner.invoke(app, ["evaluate", str(run), "--split", "val", "--json"])
    assert ok.exit_code == 0, ok.output
    line = re.search(r'\{"run".*\}', ok.output).group(0)  # progress bars and stderr lines are mixed in
    assert json.loads(line)["split"] == "val"
    bad = runner.invoke(app, ["evaluate", str(run), "--split", "train"])
    assert bad.exit_code == 2 and "split='train' is not valid" in bad.output and "val+test" in bad.output
    missing = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert missing.exit_code == 2 and "has no config.json" in missing.output


def test_reloading_a_finished_classifier_does_not_call_its_trained_head_new(classifier_run, capfd) -> None:
    run, _ = classifier_run
    capfd.readouterr()
    evaluate_run(run, "test")
    assert "is new" not in capfd.readouterr().err

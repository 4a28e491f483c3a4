"""`widelora evaluate`: a finished run's numbers on any held-out split, equal to what the run recorded."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from widelora.cli import app
from widelora.testing.models import save_tiny_folder
from widelora.train.evaluation import EvalSums
from widelora.train.reevaluate import evaluate_run, evaluate_run_splits

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


def test_out_writes_the_printed_numbers_to_a_file(classifier_run, tmp_path) -> None:
    run, result = classifier_run
    target = tmp_path / "nested" / "numbers.json"
    ok = runner.invoke(app, ["evaluate", str(run), "--out", str(target)])
    assert ok.exit_code == 0, ok.output
    saved = json.loads(target.read_text())
    assert saved["split"] == "test" and saved["accuracy"] == result.get("final", result)["accuracy"]
    assert f"accuracy {saved['accuracy']:.4g}" in ok.output


def test_an_unfinished_run_is_refused_not_evaluated_on_a_checkpoint(classifier_run, tmp_path) -> None:
    import shutil

    run, _ = classifier_run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("adapter"))
    assert (unfinished / "checkpoints").is_dir()  # a checkpoint is there, but it is not the final model
    out = runner.invoke(app, ["evaluate", str(unfinished)])
    assert out.exit_code == 2 and "has not finished" in out.output and "adapter/" in out.output


def test_several_splits_at_once_equal_each_split_alone(classifier_run) -> None:
    run, _ = classifier_run
    together = evaluate_run_splits(run, ("test", "val", "val+test"))
    for split, numbers in together.items():
        alone = evaluate_run(run, split)
        assert numbers["accuracy"] == alone["accuracy"] and numbers["examples"] == alone["examples"]
        assert numbers["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-7)
    with pytest.raises(ValueError, match="split='train' is not valid"):
        evaluate_run_splits(run, ("test", "train"))


@given(st.lists(st.tuples(st.floats(0, 1e3), st.integers(1, 50)), min_size=1, max_size=6))
def test_pooled_sums_give_the_mean_over_every_example(parts) -> None:
    """Pooling splits from their sums equals one pass over all their examples (loss and accuracy)."""
    pooled = EvalSums()
    for loss, n in parts:
        pooled = pooled + EvalSums(loss * n, n, n // 2)
    count = sum(n for _, n in parts)
    numbers = pooled.numbers("classification")
    assert numbers["eval_loss"] == pytest.approx(sum(loss * n for loss, n in parts) / count)
    assert numbers["accuracy"] == sum(n // 2 for _, n in parts) / count


def test_an_empty_evaluation_is_a_user_error() -> None:
    with pytest.raises(ValueError, match="evaluation set is empty"):
        EvalSums().numbers("causal_lm")


def test_a_language_models_test_perplexity_is_the_one_it_recorded(tmp_path) -> None:
    from widelora.train import train

    topic = ["river", "hill", "town"]
    lines = [json.dumps({"text": f"line {i} says the {topic[i % 3]} is near"}) for i in range(60)]
    (tmp_path / "text.jsonl").write_text("\n".join(lines) + "\n")
    folder = save_tiny_folder(tmp_path / "model", task="causal_lm")
    config = {
        "model": str(folder), "task": "causal_lm", "dataset": str(tmp_path / "text.jsonl"),
        "targets": ["q_proj", "v_proj"], "rank": 2, "seq_len": 16, "batch_size": 4, "steps": 4, "lr": 3e-2,
        "eval_examples": 100, "progress": False,
    }  # fmt: skip
    result = train(config, tmp_path / "run")
    assert result["status"] == "done", result
    final = result.get("final", result)
    again = evaluate_run(tmp_path / "run", "test")
    assert again["perplexity"] == pytest.approx(final["perplexity"], rel=1e-6)
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)
    both = evaluate_run(tmp_path / "run", "val+test")
    assert both["examples"] > again["examples"] and "accuracy" not in both


def _bench_module(name: str):
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_heldout_eval_checks_the_recorded_test_numbers_and_resumes(classifier_run, tmp_path, capsys) -> None:
    import shutil

    from widelora.sweep import ResultStore
    from widelora.sweep.grid import Trial

    heldout_eval = _bench_module("heldout_eval")
    run, result = classifier_run
    final = result.get("final", result)
    recorded = {"good": final, "bad": {**final, "accuracy": final["accuracy"] + 0.01}}  # a rebuild gone wrong
    store = tmp_path / "results.sqlite"
    with ResultStore(store) as st:
        st.add_trials([Trial(name, {}, {"seed": 0, "setup": name}, i) for i, name in enumerate(recorded)])
        for name, numbers in recorded.items():
            shutil.copytree(run, tmp_path / "runs" / name)
            st.claim([name], "driver")
            st.finish(name, "done", numbers)

    assert heldout_eval.main([str(store)]) == 1  # the "bad" trial's recorded accuracy is not what it scores
    out = capsys.readouterr().out
    assert "2 evaluated" in out and "MISMATCH bad" in out and "MISMATCH good" not in out
    saved = json.loads((tmp_path / "runs" / "good" / "heldout.json").read_text())
    assert saved["test_vs_recorded"]["matches"] and saved["by_split"]["test"]["accuracy"] == final["accuracy"]
    assert saved["examples"] == saved["by_split"]["test"]["examples"] + saved["by_split"]["val"]["examples"]

    heldout_eval.main([str(store)])  # resumes: nothing is evaluated again, the mismatch is still reported
    out = capsys.readouterr().out
    assert "0 evaluated, 2 already had" in out and "MISMATCH bad" in out

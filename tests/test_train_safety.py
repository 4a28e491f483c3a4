"""A training run never loses a user's work: checked inputs, safe run folders, robust resume, named file
errors."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from widelora.cli import app
from widelora.errors import FileProblem, UserError
from widelora.testing.corpora import write_documents
from widelora.testing.faults import failing_writes
from widelora.testing.models import save_tiny_folder
from widelora.train import RunConfig, run_trial, train
from widelora.train.config import SETUPS

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    write_documents(root / "corpus.txt", random.Random(0), docs=80, words_per_doc=25)
    save_tiny_folder(root / "llama", "llama")
    return root


def cfg(files, **kw) -> dict:
    base = {
        "model": str(files / "llama"),
        "dataset": str(files / "corpus.txt"),
        "targets": ["q_proj", "v_proj"],
        "rank": 2,
        "steps": 5,
        "batch_size": 2,
        "seq_len": 16,
        "lr": 1e-2,
        "eval_examples": 4,
        "progress": False,
        "checkpoint_every": 1,
        "keep_checkpoints": 3,
        "dropout": 0.1,
    }
    return {**base, **kw}


def train_rows(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


class Stop(Exception):
    pass


def interrupted(files, run_dir: Path, at: int = 4) -> None:
    """A run stopped at step `at`'s train row (checkpoints 0 .. at-1 are on disk)."""

    def stop(step, row):
        if row["kind"] == "train" and step == at:
            raise Stop

    with pytest.raises(Stop):
        train(cfg(files), run_dir, on_metrics=stop)


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "bad,words",
    [
        ({"weight_decay": math.nan}, "weight_decay=nan"),
        ({"weight_decay": math.inf}, "weight_decay=inf"),
        ({"epochs": math.inf, "steps": None}, "epochs=inf"),
        ({"warmup": math.inf}, "warmup=inf"),
        ({"device": 5}, "device=5 is not valid; valid: 'auto', 'cpu'"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"betas": 5}, "betas=5 is not valid; it must be two numbers"),
        ({"betas": [0.9]}, "betas=(0.9,)"),
        ({"betas": "0.9,x"}, "betas='0.9,x' is not a number"),
        ({"setup": "magic"}, f"setup='magic' is not valid; valid: {list(SETUPS)}"),
        ({"diverge_smoothing": 1.0}, "diverge_smoothing=1.0"),
        ({"monitor": "yes"}, "monitor='yes'"),
    ],
)
def test_bad_values_are_user_errors_naming_key_and_valid_values(bad, words):
    with pytest.raises(UserError) as info:
        RunConfig.from_dict(bad)
    assert words in str(info.value)


def test_seq_len_is_checked_against_the_model(files, tmp_path):
    result = run_trial(cfg(files, seq_len=4096), tmp_path / "run")
    assert result["status"] == "failed"
    assert "seq_len=4096 is not valid" in result["error"] and "at most 512 tokens" in result["error"]


# ------------------------------------------------------------------------------------------------- folders
def test_a_users_folder_is_never_written_over(files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"learning_rate": 3}')
    (out / "metrics.csv").write_text("my,data\n")
    for resume in (False, True):
        with pytest.raises(FileProblem, match="holds no widelora run"):
            train(cfg(files), out, resume=resume)
    res = runner.invoke(
        app, ["finetune", "--model", str(files / "llama"), "--out", str(out), "--no-progress"]
    )
    assert res.exit_code == 2 and "holds no widelora run" in res.output
    assert (out / "config.json").read_text() == '{"learning_rate": 3}'
    assert (out / "metrics.csv").read_text() == "my,data\n" and sorted(os.listdir(out)) == [
        "config.json",
        "metrics.csv",
    ]


def test_a_file_as_run_folder_is_a_file_problem(files, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    result = run_trial(cfg(files), taken)
    assert result["status"] == "failed" and "is a file, not a folder" in result["error"]
    assert taken.read_text() == "mine"


def test_two_runs_cannot_share_a_folder(files, tmp_path):
    run_dir = tmp_path / "run"
    started, release = threading.Event(), threading.Event()
    results = {}

    def first_run():
        def hold(step, row):
            if row["kind"] == "train" and step == 1:
                started.set()
                release.wait(60)

        results["first"] = run_trial(cfg(files), run_dir, on_metrics=hold)

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert started.wait(60)
        second = run_trial(cfg(files), run_dir)
        assert second["status"] == "failed" and "in use by another widelora run" in second["error"]
        res = runner.invoke(app, ["finetune", "--resume", str(run_dir), "--no-progress"])
        assert res.exit_code == 2 and "in use by another widelora run" in res.output
    finally:
        release.set()
        thread.join()
    assert results["first"]["status"] == "done"
    assert [s for s, _ in train_rows(run_dir)] == [1, 2, 3, 4, 5]  # not interleaved with a second run's rows
    assert not (run_dir / "run.lock").exists()


def test_a_stale_lock_is_taken_over(files, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import socket

    (run_dir / "run.lock").write_text(f"{socket.gethostname()}:{int(dead.stdout)}")
    assert run_trial(cfg(files, steps=2), run_dir)["status"] == "done"


# ------------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return run_dir, run_trial(cfg(files), run_dir)


@pytest.mark.parametrize("pointer", ["missing", "dangling"])
def test_resume_without_a_valid_latest_continues_from_the_newest_checkpoint(
    files, tmp_path, full_run, pointer
):
    run_dir = tmp_path / "run"
    interrupted(files, run_dir)
    latest = run_dir / "checkpoints" / "latest"
    latest.unlink() if pointer == "missing" else latest.write_text("step-000099")
    seen = []
    resumed = run_trial(cfg(files), run_dir, on_metrics=lambda step, row: seen.append((step, row["kind"])))
    assert resumed["status"] == "done"
    assert [s for s, kind in seen if kind == "train"] == [
        4,
        5,
    ]  # continued from checkpoint 3, not from step 0
    assert train_rows(run_dir) == train_rows(full_run[0])  # rows 1..3 kept
    assert resumed["final"]["perplexity"] == full_run[1]["final"]["perplexity"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(files, tmp_path, full_run, capsys):
    run_dir = tmp_path / "run"
    interrupted(files, run_dir)
    (run_dir / "checkpoints" / "step-000003" / "trainable.safetensors").write_bytes(b"\x00garbage")
    resumed = run_trial(cfg(files), run_dir)
    assert resumed["status"] == "done", resumed["error"]
    assert "step-000003" in capsys.readouterr().err  # the warning names the skipped checkpoint
    assert resumed["final"]["perplexity"] == full_run[1]["final"]["perplexity"]
    assert train_rows(run_dir) == train_rows(full_run[0])


def test_no_readable_checkpoint_is_a_file_problem_not_a_fresh_start(files, tmp_path):
    run_dir = tmp_path / "run"
    interrupted(files, run_dir)
    for state in (run_dir / "checkpoints").glob("step-*/state.json"):
        state.write_text("{not json")
    before = (run_dir / "metrics.jsonl").read_text()
    kept = sorted((run_dir / "checkpoints").glob("step-*"))
    with pytest.raises(FileProblem, match=r"checkpoints: no checkpoint can be read: step-000003"):
        train(cfg(files), run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing truncated
    assert sorted((run_dir / "checkpoints").glob("step-*")) == kept  # nothing deleted


def test_a_torn_last_metrics_line_does_not_block_resume(files, tmp_path, full_run):
    run_dir = tmp_path / "run"
    interrupted(files, run_dir)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "kind": "tra')  # the disk filled up mid-line
    resumed = run_trial(cfg(files), run_dir)
    assert resumed["status"] == "done", resumed["error"]
    assert train_rows(run_dir) == train_rows(full_run[0])


def test_a_damaged_middle_metrics_line_is_named(files, tmp_path):
    run_dir = tmp_path / "run"
    interrupted(files, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FileProblem, match=r"metrics.jsonl: line 2 is not a metrics row"):
        train(cfg(files), run_dir)


# ----------------------------------------------------------------------------------------------- file errors
@pytest.mark.parametrize("error,words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_file_errors_during_a_run_name_the_path(files, tmp_path, error, words):
    run_dir = tmp_path / "run"
    with failing_writes(run_dir / "checkpoints", error), pytest.raises(FileProblem) as info:
        train(cfg(files), run_dir)
    assert str(run_dir / "checkpoints") in str(info.value) and words in str(info.value)
    assert not (run_dir / "run.lock").exists()
    failed = json.loads((run_dir / "result.json").read_text())
    assert failed["status"] == "failed" and words in failed["error"]

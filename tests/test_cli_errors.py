"""Every expected CLI failure is one clear `error:` line and exit code 2, never a traceback (issue 10).

The matrix drives the real app in-process with typer's CliRunner; file-system faults (a read-only folder, a
full disk) are simulated with widelora.testing.faults, since chmod does not stop root.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from widelora.cli import app
from widelora.commands import failures
from widelora.errors import FileProblem, UserError
from widelora.testing.faults import failing_writes
from widelora.testing.models import save_tiny_folder

runner = CliRunner()


def error_line(result, *names: str) -> str:
    """Assert `result` is one clear expected failure naming each of `names`; return its error line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama folder and a small text corpus, shared by the commands below."""
    root = tmp_path_factory.mktemp("cli-errors")
    save_tiny_folder(root / "llama", "llama")
    (root / "docs.txt").write_text("\n\n".join(f"document {i} talks about topic {i % 3}." for i in range(30)))
    return root


def place_args(files, *extra: str) -> list[str]:
    return [
        "place",
        "--model",
        str(files / "llama"),
        "--dataset",
        str(files / "docs.txt"),
        "--samples",
        "3",
        "--batch",
        "3",
        "--seq-len",
        "16",
        "--k",
        "1",
        *extra,
    ]


# ------------------------------------------------------------------------------------------------ the handler
@pytest.mark.parametrize(
    "exc,expected",
    [
        (UserError("lr=-1 must be positive"), "lr=-1 must be positive"),
        (FileProblem("/x/spec.yaml", "is not a mapping", "write key: value lines"), "/x/spec.yaml: is not"),
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl"),
            "/runs/a/metrics.jsonl: the disk is full",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "/ro/out: the file system is read-only"),
        (OSError(errno.EACCES, "Permission denied", "/ro/out"), "/ro/out: permission denied"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "/f/x: a file stands where a folder"),
        (json.JSONDecodeError("Expecting value", "{\n x", 3), "malformed JSON at line 2, column 2"),
        (
            sqlite3.DatabaseError("file is not a database"),
            "file is not a database: the file is not a widelora",
        ),
        (ValueError("rank=0 must be >= 1"), "rank=0 must be >= 1"),
        (TypeError("betas=5 must be a pair"), "betas=5 must be a pair"),
    ],
)
def test_describe_gives_one_line_naming_the_problem(exc, expected):
    assert failures.is_expected(exc)
    message = failures.describe(exc)
    assert expected in message and "\n" not in message


def test_describe_yaml_error_gives_line_and_column():
    try:
        yaml.safe_load("a: [1, 2\nb: 3\n")
    except yaml.YAMLError as exc:
        message = failures.describe(exc)
    assert message.startswith("malformed YAML at line 2, column 2") and "\n" not in message


@pytest.mark.parametrize("exc", [RuntimeError("bug"), KeyError("x"), OSError(errno.EPIPE, "Broken pipe")])
def test_bugs_and_broken_pipes_are_not_expected(exc):
    assert not failures.is_expected(exc)


def test_expected_failure_is_one_line_and_exit_2(files):
    result = runner.invoke(app, place_args(files, "--dataset", "no-such-dataset"))
    error_line(result, "no-such-dataset", "wikipedia", "shakespeare", "tweets")


def test_debug_shows_the_traceback(files):
    result = runner.invoke(app, ["--debug", *place_args(files, "--dataset", "no-such-dataset")])
    assert isinstance(result.exception, UserError) and result.exit_code == 1


def test_a_bug_keeps_its_traceback(files, monkeypatch):
    import widelora.data

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(widelora.data, "load_corpus", broken)
    result = runner.invoke(app, place_args(files))
    assert isinstance(result.exception, RuntimeError) and result.exit_code == 1


def test_usage_errors_still_look_like_click(files):
    result = runner.invoke(app, place_args(files, "--samples", "many"))
    assert result.exit_code == 2 and "Invalid value" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["fine-tune"])
    assert result.exit_code == 2 and "No such command" in result.output


# ------------------------------------------------------------------------------------------------- the matrix
def finetune_args(files, out, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        str(files / "llama"),
        "--dataset",
        str(files / "docs.txt"),
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--eval-examples",
        "2",
        "--steps",
        "2",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("command", ["place", "finetune"])
def test_hub_id_while_offline(files, tmp_path, monkeypatch, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = place_args if command == "place" else lambda f, *e: finetune_args(f, tmp_path / "run", *e)
    result = runner.invoke(app, args(files, "--model", "widelora-test-org/not-here"))
    line = error_line(result, "widelora-test-org/not-here", "could not be found locally", "offline")
    assert "smollm2-135m" in line and "minilm-l6" in line


@pytest.mark.parametrize("error,words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_read_only_or_full_out_folder_for_finetune(files, tmp_path, error, words):
    out = tmp_path / "out"
    out.mkdir()
    with failing_writes(out, error):
        result = runner.invoke(app, finetune_args(files, out / "run"))
    error_line(result, str(out / "run"), words)


@pytest.mark.parametrize("error,words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_read_only_or_full_out_folder_for_place(files, tmp_path, error, words):
    with failing_writes(tmp_path, error):
        result = runner.invoke(app, place_args(files, "--out", str(tmp_path / "plop.json")))
    error_line(result, str(tmp_path), words)
    assert not (tmp_path / "plop.json").exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "result.json"])
def test_disk_fills_up_during_a_run(files, tmp_path, name):
    """The run has started writing when the disk fills up: the write of `name` fails with ENOSPC."""
    with failing_writes(tmp_path / "run" / name, errno.ENOSPC):
        result = runner.invoke(app, finetune_args(files, tmp_path / "run"))
    error_line(result, name, "disk is full")


def test_file_given_as_out_folder(files, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes")
    result = runner.invoke(app, finetune_args(files, taken))
    error_line(result, str(taken), "is a file")
    assert taken.read_text() == "my notes"


def test_folder_given_as_out_file(files, tmp_path):
    result = runner.invoke(app, place_args(files, "--out", str(tmp_path)))
    error_line(result, str(tmp_path), "is a folder")


def test_malformed_config_yaml_names_the_file_and_line(files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rank: 4\nlr: [1e-3\nsteps: 2\n")
    result = runner.invoke(app, ["finetune", "--config", str(config), "--dry-run"])
    error_line(result, str(config), "line 3")


def test_malformed_config_json_names_the_file(files, tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"rank": 4,, }')
    result = runner.invoke(app, ["finetune", "--config", str(config), "--dry-run"])
    error_line(result, str(config))


def test_malformed_sweep_spec_names_the_file(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\naxes: {lr: [1e-3, 2e-3\n")
    result = runner.invoke(app, ["sweep", str(spec), "--dry-run"])
    error_line(result, str(spec))


@pytest.mark.parametrize("notes", ["these are my notes, not a database\n" * 20, "x"])
@pytest.mark.parametrize("command", ["report", "sweep"])
def test_store_that_is_not_a_database(tmp_path, command, notes):
    """SQLite takes a file shorter than its header for an empty database: a 1-byte file must survive too."""
    store = tmp_path / "results.sqlite"
    store.write_text(notes)
    if command == "report":
        args = ["report", str(store)]
    else:
        spec = tmp_path / "spec.yaml"
        spec.write_text("name: t\ntrial_fn: toy\nbase: {steps: 1}\naxes: {lr: [0.1]}\n")
        args = ["sweep", str(spec), "--store", str(store), "--workers", "0", "--no-report"]
    result = runner.invoke(app, args)
    error_line(result, str(store), "not a database")
    assert store.read_text() == notes


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "state.json"])
def test_corrupt_checkpoint_on_resume(files, tmp_path, damaged):
    out = tmp_path / "run"
    assert runner.invoke(app, finetune_args(files, out)).exit_code == 0
    (out / "result.json").unlink()  # an interrupted run: resume will read the checkpoint
    for checkpoint in (out / "checkpoints").glob("step-*"):
        (checkpoint / damaged).write_bytes(b"\x00garbage")
    result = runner.invoke(app, ["finetune", "--resume", str(out), "--no-progress"])
    error_line(result, str(out))


def test_unknown_preset():
    result = runner.invoke(app, ["finetune", "--preset", "no-such-preset", "--dry-run"])
    error_line(result, "no-such-preset", "cpu-")


@pytest.mark.parametrize("command", ["place", "finetune"])
@pytest.mark.parametrize(
    "flag,value,names",
    [
        ("--model", "no-such-model", ["no-such-model", "smollm2-135m", "minilm-l6"]),
        ("--dataset", "no-such-dataset", ["no-such-dataset", "wikipedia", "tweets"]),
    ],
)
def test_unknown_model_or_dataset(files, tmp_path, command, flag, value, names):
    args = place_args if command == "place" else lambda f, *e: finetune_args(f, tmp_path / "run", *e)
    result = runner.invoke(app, args(files, flag, value))
    error_line(result, *names)


def test_malformed_data_file_names_file_and_line(files, tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    result = runner.invoke(app, place_args(files, "--dataset", str(bad)))
    error_line(result, str(bad), "line 2")


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes through file permissions; covered by the simulation"
)
def test_really_read_only_out_folder(files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = runner.invoke(app, place_args(files, "--out", str(locked / "plop.json")))
    finally:
        locked.chmod(0o755)
    error_line(result, str(locked), "permission denied")


@pytest.mark.parametrize("debug", [False, True])
def test_console_run_prints_one_line_or_the_traceback(tmp_path, debug):
    """The real entry point in a fresh interpreter: stderr is one line unless WIDELORA_DEBUG asks for more."""
    env = {**os.environ, "WIDELORA_DEBUG": "1" if debug else "0"}
    args = [sys.executable, "-m", "widelora.cli", "place", "--dataset", str(tmp_path / "missing.jsonl")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    if debug:
        assert done.returncode == 1 and "Traceback" in done.stderr and "UserError" in done.stderr
    else:
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "missing.jsonl" in done.stderr
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr

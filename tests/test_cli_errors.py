"""Every expected CLI failure is one clear `error:` line and exit code 2, never a traceback (issue 10).

The matrix drives the real app in-process with typer's CliRunner; file-system faults (a read-only folder, a
full disk) are simulated with widelora.testing.faults, since chmod does not stop root.
"""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest
import yaml
from typer.testing import CliRunner

from widelora.cli import app
from widelora.commands import failures
from widelora.errors import FileProblem, UserError
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


# ------------------------------------------------------------------------------------------------- the handler
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
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


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

"""The `widelora` app exposes every documented command."""

from __future__ import annotations

from typer.testing import CliRunner

from widelora import __version__
from widelora.cli import app


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("width-study", "finetune", "sweep", "place", "report", "demo", "version"):
        assert command in result.output, command


def test_version():
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.strip() == __version__


def test_unknown_command_is_a_clear_error():
    result = CliRunner().invoke(app, ["fine-tune"])
    assert result.exit_code != 0 and "No such command" in result.output

"""The `widelora` app has every documented command; `demo` never deletes or fills a folder it didn't make."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from widelora import __version__
from widelora.cli import app
from widelora.errors import FileProblem
from widelora.files import OWNER_MARKER, claim_folder

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("width-study", "finetune", "sweep", "place", "report", "demo", "version"):
        assert command in result.output, command
    assert "--debug" in result.output


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.strip() == __version__


def test_unknown_command_is_a_clear_error():
    result = runner.invoke(app, ["fine-tune"])
    assert result.exit_code != 0 and "No such command" in result.output


# ----------------------------------------------------------------------------------------------- demo folders
def demo(out, *extra: str):
    return runner.invoke(app, ["demo", "--out", str(out), "--skip-width", "--skip-real", *extra])


def test_demo_fresh_refuses_a_folder_it_did_not_create(tmp_path):
    mine = tmp_path / "my-thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    for extra in (["--fresh"], []):
        result = demo(mine, *extra)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert str(mine) in result.output and "not created by `widelora demo`" in result.output
        assert sorted(p.name for p in mine.iterdir()) == ["chapter1.tex"]
        assert (mine / "chapter1.tex").read_text() == "months of work"


def test_demo_fresh_clears_only_its_own_folder(tmp_path):
    out = tmp_path / "demo-report"
    result = demo(out)
    assert result.exit_code == 0, result.output
    assert (out / OWNER_MARKER).is_file() and (out / "index.html").is_file()
    (out / "real-model").mkdir()
    (out / "real-model" / "results.sqlite").write_text("old results")
    assert demo(out).exit_code == 0 and (out / "real-model" / "results.sqlite").exists()  # resume keeps it
    result = demo(out, "--fresh")
    assert result.exit_code == 0, result.output
    assert not (out / "real-model").exists() and (out / OWNER_MARKER).is_file()


def test_demo_refuses_a_file_as_out(tmp_path):
    taken = tmp_path / "report.html"
    taken.write_text("mine")
    result = demo(taken, "--fresh")
    assert result.exit_code == 2 and "is a file" in result.output and taken.read_text() == "mine"


def test_claim_folder_refuses_another_commands_folder(tmp_path):
    run = claim_folder(tmp_path / "run", "finetune")
    (run / "adapter.safetensors").write_bytes(b"weights")
    with pytest.raises(FileProblem, match="it is widelora finetune's"):
        claim_folder(run, "demo", fresh=True)
    assert (run / "adapter.safetensors").read_bytes() == b"weights"
    assert claim_folder(tmp_path / "empty", "demo") == tmp_path / "empty"  # a new folder is claimed
    (tmp_path / "bare").mkdir()
    bare = claim_folder(tmp_path / "bare", "demo", fresh=True)  # so is an empty one
    assert (bare / OWNER_MARKER).is_file()


def test_claim_folder_fresh_keeps_a_linked_folder_and_what_links_point_to(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    real = claim_folder(tmp_path / "real", "demo")
    (real / "link").symlink_to(target)
    (tmp_path / "alias").symlink_to(real)
    claim_folder(tmp_path / "alias", "demo", fresh=True)
    assert (tmp_path / "alias").is_symlink() and (target / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in real.iterdir()) == [OWNER_MARKER]

"""`widelora finetune` through the real typer app: flags, YAML + overrides, presets, resume, errors."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from widelora.cli import app
from widelora.testing import models as tiny
from widelora.testing.corpora import HAMLET, write_documents

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_documents(root / "c.txt", random.Random(1), docs=60, words_per_doc=30, words=HAMLET)
    tiny.save_tiny_folder(root / "llama", "llama")
    return root


def _args(root, out, *extra):
    return [
        "finetune",
        "--model",
        str(root / "llama"),
        "--dataset",
        str(root / "c.txt"),
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-examples",
        "4",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_finetune_runs_and_reports(setup, tmp_path):
    res = runner.invoke(app, _args(setup, tmp_path / "run", "--steps", "3", "--lr", "5e-3"))
    assert res.exit_code == 0, res.output
    assert "status: done" in res.output and "perplexity:" in res.output
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["final"]["step"] == 3
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    # The same folder again without --resume is refused, with the fix in the message.
    res = runner.invoke(app, _args(setup, tmp_path / "run", "--steps", "3"))
    assert res.exit_code == 2 and "--resume" in res.output


def test_yaml_config_with_flag_overrides(setup, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"preset: cpu-smollm2-wiki\nmodel: {setup / 'llama'}\nrank: 3\nlr: 1e-4\n")
    res = runner.invoke(
        app, ["finetune", "--config", str(cfg), "--lr", "2e-3", "--set", "max_grad_norm=0.5", "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    resolved = json.loads(res.output)
    assert resolved["rank"] == 3 and resolved["lr"] == 2e-3 and resolved["max_grad_norm"] == 0.5
    assert resolved["dataset"] == "wikipedia"  # from the preset
    res = runner.invoke(app, ["finetune", "--preset", "cpu-minilm-topics", "--epochs", "2", "--dry-run"])
    assert json.loads(res.output)["steps"] is None and json.loads(res.output)["epochs"] == 2.0


def test_resume_continues_an_interrupted_run(setup, tmp_path):
    out = tmp_path / "run"
    assert (
        runner.invoke(
            app, _args(setup, out, "--steps", "4", "--checkpoint-every", "2", "--set", "keep_checkpoints=3")
        ).exit_code
        == 0
    )
    # Simulate an interruption after step 2: drop the later checkpoint and the result.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000004", ignore_errors=True)
    (out / "result.json").unlink()
    (out / "checkpoints" / "latest").write_text("step-000002")
    res = runner.invoke(app, ["finetune", "--resume", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "result.json").read_text())["final"]["step"] == 4


def test_cli_errors_are_clear(setup, tmp_path):
    res = runner.invoke(app, ["finetune", "--preset", "nope", "--dry-run"])
    assert res.exit_code == 2 and "valid presets" in res.output
    res = runner.invoke(app, ["finetune", "--set", "lr_b=3", "--dry-run"])
    assert res.exit_code == 2 and "unknown config key" in res.output
    res = runner.invoke(app, ["finetune", "--model", "gpt-17", "--out", str(tmp_path / "x"), "--no-progress"])
    assert res.exit_code == 2 and "shipped models" in res.output
    res = runner.invoke(app, ["finetune", "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "no config.json" in res.output
    res = runner.invoke(app, ["finetune", "--list-presets"])
    assert (
        res.exit_code == 0 and "paper-tinyllama-wikitext2" in res.output and "cpu-minilm-topics" in res.output
    )


def test_set_null_is_honoured():
    res = runner.invoke(app, ["finetune", "--set", "max_grad_norm=null", "--set", "alpha=null", "--dry-run"])
    assert res.exit_code == 0, res.output
    resolved = json.loads(res.output)
    assert resolved["max_grad_norm"] is None and resolved["alpha"] is None


def test_every_run_config_field_is_a_flag():
    """The flags are generated from RunConfig's fields: a new field needs no edit in the command."""
    import inspect

    from widelora.commands.finetune import finetune
    from widelora.train import RunConfig

    assert set(RunConfig.keys()) <= set(inspect.signature(finetune).parameters)


@settings(max_examples=15, deadline=None)
@given(
    lr=st.floats(1e-6, 1.0),
    rank=st.integers(1, 64),
    beta=st.floats(0.0, 0.99),
    decay=st.sampled_from(["linear", "cosine", "constant"]),
    monitor=st.booleans(),
    targets=st.lists(
        st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj"]), min_size=1, max_size=3, unique=True
    ),
)
def test_flags_reach_the_config(lr, rank, beta, decay, monitor, targets):
    args = ["finetune", "--lr", repr(lr), "--rank", str(rank), "--betas", f"{beta!r},0.999",
            "--decay", decay, "--monitor" if monitor else "--no-monitor", "--targets", ",".join(targets),
            "--dry-run"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    resolved = json.loads(res.output)
    assert (resolved["lr"], resolved["rank"], resolved["betas"], resolved["decay"]) == (
        lr,
        rank,
        [beta, 0.999],
        decay,
    )
    assert resolved["monitor"] is monitor and resolved["targets"] == targets

"""`widelora recommend` through the real typer app, and the Recommendation fed to attach / the optimizer."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

import widelora as wl
from widelora.cli import app
from widelora.lora.pairs import lora_pairs
from widelora.recommend import Recommendation
from widelora.recommend.probe import PROBE_VERSION
from widelora.testing import models as tiny
from widelora.testing.corpora import HAMLET, write_documents

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    write_documents(root / "c.txt", random.Random(1), docs=60, words_per_doc=30, words=HAMLET)
    tiny.save_tiny_folder(root / "llama", "llama")
    return root


def _args(root, *extra):
    return [
        "recommend",
        "--model",
        str(root / "llama"),
        "--dataset",
        str(root / "c.txt"),
        "--task",
        "causal_lm",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "200",
        "--rank",
        "2",
        *extra,
    ]


def test_cli_prints_every_choice_with_its_reason_and_the_probe(files) -> None:
    result = runner.invoke(app, _args(files))
    assert result.exit_code == 0, result.output
    out = result.output
    for key in ("init", "targets", "rank", "ratio", "lr"):
        assert any(line.startswith(key + " ") for line in out.splitlines()), key
    assert "Init[A]" in out and "LoRA+" in out and "all-linear" in out
    assert "probe cost:" in out and "% of the run" in out and "edge" in out


def test_cli_json_round_trips_and_out_writes_it(files, tmp_path) -> None:
    target = tmp_path / "rec.json"
    result = runner.invoke(app, _args(files, "--targets", "q_proj,v_proj", "--json", "--out", str(target)))
    assert result.exit_code == 0, result.output
    rec = Recommendation.from_dict(json.loads(result.stdout))
    assert rec.targets == ["q_proj", "v_proj"] and rec.rank == 2 and rec.probe["cost_fraction"] <= 0.1
    assert Recommendation.from_dict(json.loads(target.read_text())) == rec


def test_cli_names_a_folder_given_as_out(files, tmp_path) -> None:
    result = runner.invoke(app, _args(files, "--out", str(tmp_path)))
    assert result.exit_code == 2 and "is a folder" in result.output


def test_attach_kwargs_and_optimizer_kwargs_build_the_recommended_run() -> None:
    model = tiny.tiny_bert_classifier()
    rec = Recommendation(
        targets=["query", "value"],
        rank=4,
        alpha=4.0,
        trainable=["classifier"],
        lr=1e-3,
        ratio=3.0,
        head_lr=0.2,
        width=32,
        steps=10,
    )
    wl.attach(model, **rec.attach_kwargs(), seed=0)
    assert {p.name.rsplit(".", 1)[-1] for p in lora_pairs(model)} == {"query", "value"}
    assert all(p.requires_grad for p in model.classifier.parameters())
    kwargs = rec.optimizer_kwargs()
    try:
        opt = wl.create_optimizer(model, **kwargs)
    except TypeError:  # create_optimizer without head_lr (before widelora.methods gains it)
        kwargs.pop("head_lr")
        opt = wl.create_optimizer(model, **kwargs)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    pairs = lora_pairs(model)
    assert all(lrs[id(p.A)] == pytest.approx(1e-3) and lrs[id(p.B)] == pytest.approx(3e-3) for p in pairs)
    if "head_lr" in kwargs:
        assert lrs[id(model.classifier.weight)] == pytest.approx(0.2)


def test_attach_and_create_optimizer_accept_the_object_itself() -> None:
    """`wl.attach(model, setup=rec)` / `wl.create_optimizer(model, setup=rec)` (widelora.methods' side)."""
    import inspect

    if "setup" not in inspect.signature(wl.attach).parameters:
        pytest.skip("widelora.attach does not take setup= yet")
    model = tiny.tiny_bert_classifier()
    rec = Recommendation(
        targets=["query"],
        rank=2,
        alpha=2.0,
        trainable=["classifier"],
        lr=1e-3,
        ratio=2.0,
        head_lr=0.1,
        width=32,
        steps=10,
    )
    wl.attach(model, setup=rec, seed=0)
    opt = wl.create_optimizer(model, setup=rec)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    pair = lora_pairs(model)[0]
    assert lrs[id(pair.B)] == pytest.approx(2e-3) and lrs[id(model.classifier.weight)] == pytest.approx(0.1)
    torch.testing.assert_close(pair.B, torch.zeros_like(pair.B))  # Init[A]: B = 0


def test_finetune_auto_runs_with_the_probed_setup(files, tmp_path) -> None:
    """`widelora finetune --auto` (= setup: recommended) fills the run's setup seam from the probe."""
    out = tmp_path / "run"
    args = [
        "finetune",
        "--model",
        str(files / "llama"),
        "--dataset",
        str(files / "c.txt"),
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
        "--steps",
        "80",
        "--lr",
        "1e-4",
        "--out",
        str(out),
        "--auto",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    setup = json.loads((out / "result.json").read_text())["setup"]
    assert setup["method"] == "loraplus" and setup["init"] == "init_a" and setup["lr"] != 1e-4
    assert setup["targets"] == ["q_proj", "v_proj"]
    assert setup["probe"] == PROBE_VERSION  # the run says which probe chose its lr


def test_an_epoch_based_auto_run_budgets_its_probe_by_its_real_length(files, tmp_path, monkeypatch) -> None:
    """With steps=null the run's length comes from its epochs; the probe must be budgeted by that length, not
    by an assumed one (the setup seam receives the run's total optimizer steps)."""
    from widelora.recommend import runconfig

    seen: list[int | None] = []

    class Stop(Exception):
        pass

    def spy(cfg, model, batches, steps=None, targets_given=True):
        seen.append(steps)
        raise Stop

    monkeypatch.setattr(runconfig, "recommend_for_config", spy)
    args = [
        "finetune",
        "--model",
        str(files / "llama"),
        "--dataset",
        str(files / "c.txt"),
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
        "--set",
        "steps=null",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--auto",
    ]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Stop), result.output
    assert len(seen) == 1 and seen[0] is not None and 1 <= seen[0] < runconfig.ASSUMED_STEPS

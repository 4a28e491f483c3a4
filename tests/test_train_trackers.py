"""Experiment trackers (issue 14 item 3): widelora's loop and HF Trainer write real TensorBoard event files
with the loss, every parameter group's learning rate and the monitor's numbers; read back with
EventAccumulator."""

from __future__ import annotations

import json
import random

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainingArguments
from typer.testing import CliRunner

import widelora as wl
from widelora.data import Corpus, make_collate, pack_tokens
from widelora.testing import models
from widelora.testing.models import save_tiny_folder
from widelora.train import hf, train
from widelora.train.trackers import TENSORBOARD_DIR, scalars

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    rng = random.Random(0)
    (root / "corpus.txt").write_text(
        "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(25)) for _ in range(120))
    )
    save_tiny_folder(root / "llama", "llama")
    return root


def lm_cfg(files, **kw):
    base = {
        "model": str(files / "llama"), "dataset": str(files / "corpus.txt"), "targets": ["q_proj", "v_proj"],
        "rank": 4, "alpha": 8, "steps": 4, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "eval_examples": 8,
        "progress": False, "method": "loraplus", "ratio": 4.0, "monitor": True, "monitor_every": 2,
    }  # fmt: skip
    return {**base, **kw}


def read_events(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the one folder of event files under `folder`."""
    (found,) = {p.parent for p in folder.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(found))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_loop_writes_tensorboard_events_equal_to_its_metrics(files, tmp_path):
    run_dir = tmp_path / "run"
    train(lm_cfg(files, report_to="tensorboard"), run_dir)
    events = read_events(run_dir / TENSORBOARD_DIR)
    rows = _rows(run_dir)
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    assert events["train/loss"] == pytest.approx(losses)
    assert events["lr/B"] == pytest.approx({s: 4 * v for s, v in events["lr/A"].items()})
    monitor = {r["step"]: r for r in rows if r["kind"] == "monitor"}
    assert sorted(events["monitor/z_a"]) == sorted(monitor) == [1, 3]
    assert events["monitor/z_a"][3] == pytest.approx(monitor[3]["z_a"])
    for tag in ("monitor/z_b", "monitor/delta2_share", "monitor/internal_instability_layers",
                "monitor/output_instability_layers", "eval/test/perplexity"):  # fmt: skip
        assert tag in events, sorted(events)


def test_without_report_to_no_event_files(files, tmp_path):
    train(lm_cfg(files, steps=1, monitor=False), tmp_path / "run")
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()


def test_rows_carry_group_learning_rates_and_flag_counts(files, tmp_path):
    train(lm_cfg(files), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(r["lr/B"] == pytest.approx(4 * r["lr/A"]) and r["lr/A"] == r["lr"] for r in train_rows)
    mon = [r for r in rows if r["kind"] == "monitor"]
    assert all(r["internal_instability_layers"] in range(5) and r["z_a_max"] >= r["z_a"] for r in mon)


def test_finetune_cli_report_to_tensorboard(files, tmp_path):
    from widelora.cli import app

    out = tmp_path / "cli"
    args = ["finetune", "--model", str(files / "llama"), "--dataset", str(files / "corpus.txt"),
            "--steps", "2", "--rank", "2", "--seq-len", "32", "--batch-size", "4", "--eval-examples", "4",
            "--no-progress",
            "--report-to", "tensorboard", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(read_events(out / TENSORBOARD_DIR)["train/loss"]) == [1, 2]


def test_a_bad_report_to_names_the_choices(files, tmp_path):
    with pytest.raises(ValueError, match="tensorboard"):
        train(lm_cfg(files, report_to="wandb-ish"), tmp_path / "run")


def test_scalars_skip_text_and_name_by_kind():
    row = {"step": 3, "kind": "eval", "split": "val", "loss": 1.5, "note": "x", "flag": True, "lr/A": 0.1}
    assert scalars(row) == {"eval/val/loss": 1.5, "lr/A": 0.1}


def test_hf_trainer_reports_monitor_and_group_lrs_to_tensorboard(tmp_path):
    tok = models.tiny_tokenizer()
    ds = pack_tokens(Corpus("c", ["the cat sat on the mat " * 40] * 4).texts, tok, seq_len=32)
    model = models.tiny_model("llama")
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, alpha=8, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=["tensorboard"], logging_steps=1, use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = hf.Trainer(
        model=model, args=args, train_dataset=ds, data_collator=make_collate(tok.pad_token_id),
        method="loraplus", optimizer_options={"ratio": 8.0}, callbacks=[hf.MonitorCallback(every=2)],
    )  # fmt: skip
    trainer.train()
    events = read_events(tmp_path / "out")
    assert sorted(events["train/monitor/z_a"]) == [1, 3]
    assert "train/monitor/delta2_share" in events and "train/monitor/internal_instability_layers" in events
    assert events["train/lr/B"] == pytest.approx({s: 8 * v for s, v in events["train/lr/A"].items()})
    assert events["train/lr/A"] == pytest.approx(
        events["train/learning_rate"]
    )  # the rates of the logged step
    assert any("monitor/z_a" in r for r in trainer.state.log_history)

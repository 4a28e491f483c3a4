"""widelora's loop: float16 loss scaling and gradient checkpointing (exact against the fused LoRA path)."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch

import widelora as wl
from widelora.errors import UserError
from widelora.lora import fused
from widelora.testing import models
from widelora.testing.corpora import write_documents
from widelora.testing.models import save_tiny_folder
from widelora.train import loop, train
from widelora.train.precision import enable_gradient_checkpointing


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_documents(root / "corpus.txt", random.Random(0), docs=120, words_per_doc=25)
    save_tiny_folder(root / "llama", "llama")
    return root


def lm_cfg(files, **kw):
    base = {
        "model": str(files / "llama"), "dataset": str(files / "corpus.txt"), "targets": ["q_proj", "v_proj"],
        "rank": 4, "alpha": 8, "steps": 4, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "eval_examples": 8,
        "progress": False, "warmup": 0.2,
    }  # fmt: skip
    return {**base, **kw}


def _overflow_first_backward(monkeypatch):
    """The first backward of the run puts an inf into one adapter gradient (an fp16 overflow, made
    certain)."""
    real = loop.build_run

    def build(cfg, procs, **kw):
        run = real(cfg, procs, **kw)
        param = run.trainable()[0]
        fired = []

        def hook(grad):
            if not fired:
                fired.append(True)
                return grad * float("inf")
            return grad

        param.register_hook(hook)
        return run

    monkeypatch.setattr(loop, "build_run", build)


def test_float16_overflowing_step_is_skipped_and_the_scale_halved(files, tmp_path, monkeypatch):
    _overflow_first_backward(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", UserWarning
        )  # a skipped step must not make torch warn about the schedule
        result = train(lm_cfg(files, dtype="float16"), tmp_path / "run")
    assert result["status"] == "done", result["error"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["scaler"]["scale"] == 2.0**16 / 2  # one overflow: the initial scale halved once
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if r["kind"] == "train"]
    assert not math.isfinite(norms[0]) and all(0 < n < float("inf") for n in norms[1:])


def test_float32_has_no_scaler_and_the_same_overflow_diverges(files, tmp_path, monkeypatch):
    """The injected inf is real: without loss scaling's skip, the update poisons the adapters."""
    _overflow_first_backward(monkeypatch)
    result = train(lm_cfg(files), tmp_path / "run")
    assert result["status"] == "diverged"


def test_float16_gradients_are_unscaled_before_clipping(files, tmp_path):
    """Clipping and the optimizer see the true gradients: the first step's norm in float16 is within float16
    rounding of float32's, not 65536 times larger (the scaled loss)."""
    first = {}
    for dtype in ("float32", "float16"):
        train(lm_cfg(files, dtype=dtype, steps=1), tmp_path / dtype)
        rows = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        first[dtype] = next(r["grad_norm"] for r in rows if r["kind"] == "train")
    assert first["float16"] == pytest.approx(first["float32"], rel=5e-2)


# ------------------------------------------------------------------------------------------ checkpointing
def _loss_and_grads(model, batch):
    torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays them in its recompute)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradient_checkpointing_equals_the_fused_path(arch, monkeypatch):
    torch.manual_seed(0)
    task = "causal_lm" if arch == "llama" else "classification"
    model = models.tiny_model(arch, task=task)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["query", "value"]
    wl.attach(model, targets=targets, rank=4, alpha=8, init="gaussian", seed=0)
    wl.set_shared_input(
        model, False
    )  # counts per-layer fused calls; test_shared_input covers the stacked path
    model.train()
    ids = torch.randint(4, 200, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids if task == "causal_lm" else torch.tensor([0, 1])
    calls = []
    real = fused.fused_lora_linear
    monkeypatch.setattr(fused, "fused_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))

    plain_loss, plain_grads = _loss_and_grads(model, batch)
    plain_calls = len(calls)
    enable_gradient_checkpointing(model, arch)
    ckpt_loss, ckpt_grads = _loss_and_grads(model, batch)

    assert (
        plain_calls == 2 * len(targets) and len(calls) - plain_calls == 2 * plain_calls
    )  # fused, recomputed
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-7, msg=name)


def test_loop_with_gradient_checkpointing_gives_the_same_run(files, tmp_path):
    plain = train(lm_cfg(files), tmp_path / "plain")
    ckpt = train(lm_cfg(files, gradient_checkpointing=True), tmp_path / "ckpt")
    assert ckpt["status"] == "done"
    assert ckpt["final"]["train_loss"] == pytest.approx(plain["final"]["train_loss"], rel=1e-6)
    assert ckpt["final"]["perplexity"] == pytest.approx(plain["final"]["perplexity"], rel=1e-6)


def test_gradient_checkpointing_on_a_model_without_it_is_a_user_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UserError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(model, "my-net")

"""A real HF `Trainer` driven by widelora's optimizer, schedule and monitor callback on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import widelora as wl
from widelora.data import Corpus, make_collate, pack_tokens
from widelora.lora.pairs import lora_pairs
from widelora.testing import models
from widelora.train import hf


def test_trainer_uses_widelora_optimizer_schedule_and_monitor(tmp_path):
    tok = models.tiny_tokenizer()
    train_ds = pack_tokens(Corpus("c", ["the cat sat on the mat " * 40] * 4).texts, tok, seq_len=32)
    model = models.tiny_model("llama")
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, alpha=8, seed=0)
    opt, sched = hf.optimizers(model, lr=1e-3, num_training_steps=4, method="loraplus", ratio=8.0, warmup=1)
    group_lrs = sorted({g["lr"] for g in opt.param_groups if g["params"]})
    callback = hf.MonitorCallback(every=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=make_collate(tok.pad_token_id),
        optimizers=(opt, sched),
        callbacks=[callback],
    )
    before = [p.B.detach().clone() for p in lora_pairs(model)]
    trainer.train()
    # accelerate wraps them; the wrapped objects are ours
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    assert getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler) is sched
    # LoRA+: the B groups run at ratio x the A groups' learning rate (warmup factor 1/2 at step 0).
    assert group_lrs == pytest.approx([1e-3 / 2, 8e-3 / 2])
    lrs = [r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r]
    assert lrs[1] > lrs[-1]  # linear decay after one warmup step
    assert any(not torch.equal(b0, p.B) for b0, p in zip(before, lora_pairs(model), strict=True))
    assert [h["step"] for h in callback.history] == [1, 3]
    assert all(h["monitor/z_a"] > 0 for h in callback.history)
    assert any("monitor/z_a" in r for r in trainer.state.log_history)


def test_optimizers_validate_arguments():
    model = models.tiny_model("llama")
    wl.attach(model, targets=["q_proj"], rank=2)
    with pytest.raises(ValueError, match="num_training_steps"):
        hf.optimizers(model, lr=1e-3, num_training_steps=0)
    with pytest.raises(ValueError, match="decay='step'"):
        hf.optimizers(model, lr=1e-3, num_training_steps=5, decay="step")

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


def _train_with_trainer(tmp_path, init: str):
    tok = models.tiny_tokenizer()
    train_ds = pack_tokens(Corpus("c", ["the cat sat on the mat " * 40] * 4).texts, tok, seq_len=32)
    model = models.tiny_model("llama")
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, alpha=8, init=init, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
        seed=0,
    )
    trainer = hf.Trainer(
        model=model, args=args, train_dataset=train_ds, data_collator=make_collate(tok.pad_token_id)
    )
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("init", ["pissa", "init_a"])
def test_trainer_saves_exactly_what_save_adapter_writes(tmp_path, init):
    """After an init that moved W (pissa), Trainer's files reload to the trained model; checkpoints hold the
    adapter, not the full model."""
    trainer, model = _train_with_trainer(tmp_path, init)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (
        checkpoint / "adapter_config.json"
    ).is_file()
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "pytorch_model.bin").exists()
    trainer.save_model(str(tmp_path / "trainer"))
    wl.save_adapter(model, tmp_path / "direct")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "trainer" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    x = torch.randint(0, 200, (2, 16))
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
        for folder in (tmp_path / "trainer", checkpoint):
            fresh = models.tiny_model("llama")
            wl.load_adapter(fresh, folder)
            assert (fresh.eval()(input_ids=x).logits - trained).abs().max() <= 1e-5


def test_trainer_resumes_from_its_adapter_checkpoint(tmp_path):
    trainer, model = _train_with_trainer(tmp_path, "init_a")
    checkpoint = tmp_path / "out" / "checkpoint-2"
    fresh = models.tiny_model("llama")
    wl.attach(fresh, targets=["q_proj", "v_proj"], rank=4, alpha=8, seed=1)
    again = hf.Trainer(model=fresh, args=trainer.args)
    again._load_from_checkpoint(str(checkpoint))
    x = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(input_ids=x).logits, model.eval()(input_ids=x).logits, atol=1e-6)


def test_widelora_train_hf_is_reachable_after_import_widelora():
    import subprocess
    import sys

    code = (
        "import widelora, sys; assert 'widelora.train' not in sys.modules; "
        "print(widelora.train.hf.optimizers)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "function optimizers" in out.stdout, out.stderr[-2000:]

"""widelora + TRL's SFTTrainer + peft_config (issue 14 item 1): init after the wrap, optimizer from args."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset  # trl brings datasets
from peft import LoraConfig
from trl import SFTConfig

import widelora as wl
from widelora.errors import UserError
from widelora.testing.models import TINY_CHAT_TEMPLATE, tiny_model, tiny_tokenizer
from widelora.train.hf import MonitorCallback
from widelora.train.trl import SFTTrainer

LR, DECAY, RATIO = 2e-3, 0.01, 4.0


def chat_dataset(n: int = 16) -> Dataset:
    words = ["red", "green", "blue", "white"]
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"Colour number {i}?"},
                    {"role": "assistant", "content": words[i % 4]},
                ]
            }
            for i in range(n)
        ]
    )


def sft_args(tmp_path, **extra) -> SFTConfig:
    options = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": LR,
        "weight_decay": DECAY,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "max_length": 64,
        "seed": 0,
        "disable_tqdm": True,
        "bf16": False,  # TRL defaults to bf16 where it can; float32 keeps the comparisons exact
    }
    return SFTConfig(**(options | extra))


def make_trainer(tmp_path, args: dict | None = None, **widelora_options) -> SFTTrainer:
    return SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, **(args or {})),
        train_dataset=chat_dataset(),
        processing_class=tiny_tokenizer(TINY_CHAT_TEMPLATE),
        peft_config=LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
        **widelora_options,
    )


def test_init_acts_on_the_adapters_peft_added(tmp_path):
    """PEFT's default has B = 0; widelora's init_b (A = 0, B random) shows only if it ran after the wrap."""
    trainer = make_trainer(tmp_path, init="init_b")
    pairs = wl.lora_pairs(trainer.model)
    assert len(pairs) == 4 and all(p.kind == "peft" for p in pairs)
    assert all(torch.count_nonzero(p.A) == 0 and torch.count_nonzero(p.B) > 0 for p in pairs)


def test_loraplus_from_the_training_arguments(tmp_path):
    trainer = make_trainer(tmp_path, init="init_a", method="loraplus", optimizer_options={"ratio": RATIO})
    before = {p.name: p.B.detach().clone() for p in wl.lora_pairs(trainer.model)}
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["A"]["lr"] == pytest.approx(LR) and groups["B"]["lr"] == pytest.approx(RATIO * LR)
    assert groups["A"]["weight_decay"] == DECAY and groups["B"]["weight_decay"] == DECAY
    assert groups["A"]["betas"] == (trainer.args.adam_beta1, trainer.args.adam_beta2)
    trained = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == optimized and len(trained) == 8
    assert all(not torch.equal(before[p.name], p.B) for p in wl.lora_pairs(trainer.model))


def test_the_schedule_keeps_the_loraplus_ratio(tmp_path):
    from transformers import TrainerCallback

    seen: list[tuple[float, float]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
            seen.append((groups["A"], groups["B"]))

    trainer = make_trainer(
        tmp_path, args={"lr_scheduler_type": "linear", "max_steps": 4}, method="loraplus",
        optimizer_options={"ratio": RATIO}, callbacks=[Record()],
    )  # fmt: skip
    trainer.train()
    assert [a for a, _ in seen] == pytest.approx([LR * f for f in (0.75, 0.5, 0.25, 0.0)])  # the decay acted
    assert [b for _, b in seen] == pytest.approx([RATIO * a for a, _ in seen])  # ... on both groups alike


@pytest.mark.parametrize("method", ["scaled_gd", "lora_one_precond"])
def test_preconditioned_optimizers_train(tmp_path, method):
    trainer = make_trainer(tmp_path, init="init_a", method=method)
    trainer.train()
    assert trainer.optimizer is not None and type(trainer.optimizer).__name__ != "AdamW"
    assert all(torch.isfinite(p.B).all() for p in wl.lora_pairs(trainer.model))
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_data_driven_init_reads_the_trainers_batches(tmp_path):
    trainer = make_trainer(tmp_path, init="lora_one", init_batches=2)
    pairs = wl.lora_pairs(trainer.model)
    assert all(torch.count_nonzero(p.B) > 0 for p in pairs)  # PEFT's zero B was replaced from the gradients


def test_monitor_rides_along(tmp_path):
    monitor = MonitorCallback(every=1)
    trainer = SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path),
        train_dataset=chat_dataset(),
        processing_class=tiny_tokenizer(TINY_CHAT_TEMPLATE),
        peft_config=LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
        method="loraplus",
        callbacks=[monitor],
    )
    trainer.train()
    assert len(monitor.history) == 3 and any(k.startswith("monitor/") for k in monitor.history[0])


@pytest.mark.parametrize(
    "options,words",
    [
        ({"method": "sgd"}, "method='sgd' is unknown; valid methods"),
        ({"init": "zeros"}, "init scheme 'zeros' is unknown"),
        ({"optimizer_options": {"lr": 1.0}}, "set them there (lr -> TrainingArguments.learning_rate)"),
        ({"init_batches": 0}, "init_batches=0 must be a positive int"),
        ({"optimizer_cls_and_kwargs": (torch.optim.SGD, {})}, "drop optimizers=/optimizer_cls_and_kwargs="),
    ],
)
def test_mistakes_are_caught_before_the_model_is_wrapped(tmp_path, options, words):
    model = tiny_model()
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SFTTrainer(
            model=model,
            args=sft_args(tmp_path),
            train_dataset=chat_dataset(),
            processing_class=tiny_tokenizer(TINY_CHAT_TEMPLATE),
            peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
            **options,
        )
    assert not any("lora_" in n for n, _ in model.named_parameters())  # refused before PEFT wrapped it


def test_a_w_moving_init_saves_an_adapter_for_the_original_weights(tmp_path):
    """pissa moves W inside the PEFT model; the saved adapter must still reproduce the trained model on the
    untouched base (PEFT's own save would not know about the move)."""
    from peft import PeftModel

    trainer = make_trainer(tmp_path, init="pissa")
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    ids = torch.tensor([[5, 80, 81, 82, 40, 41]])
    with torch.no_grad():
        trained = trainer.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "saved").eval()(input_ids=ids).logits
    assert torch.allclose(trained, reloaded, atol=1e-4)

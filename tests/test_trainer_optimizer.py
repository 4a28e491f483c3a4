"""widelora's optimizer inside HF Trainer's own hooks (issue 14 item 2): built from the model Trainer trains,
with TrainingArguments' learning rate and weight decay honoured (a factory that ignores them is the bug)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

import widelora as wl
from widelora.data import Corpus, make_collate, pack_tokens
from widelora.errors import UserError
from widelora.lora.pairs import lora_pairs
from widelora.testing import models
from widelora.train import hf


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "max_steps": 2, "per_device_train_batch_size": 4, "report_to": [],
            "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0}  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def _lm():
    model = models.tiny_model("llama")
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, alpha=8, seed=0)
    return model


def _data():
    tok = models.tiny_tokenizer()
    return pack_tokens(
        Corpus("c", ["the cat sat on the mat " * 40] * 4).texts, tok, seq_len=32
    ), make_collate(tok.pad_token_id)


def _groups(opt) -> dict[str, tuple[float, float]]:
    return {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups if g["params"]}


@pytest.mark.parametrize("lr,decay", [(1e-3, 0.0), (5e-4, 0.1)])
def test_hf_trainer_builds_the_groups_from_the_training_arguments(tmp_path, lr, decay):
    trainer = hf.Trainer(
        model=_lm(), args=_args(tmp_path, learning_rate=lr, weight_decay=decay),
        method="loraplus", optimizer_options={"ratio": 4.0},
    )  # fmt: skip
    assert _groups(trainer.create_optimizer()) == {"A": (lr, decay), "B": (4 * lr, decay)}


def test_factory_reads_the_arguments_when_training_starts(tmp_path):
    """`optimizer_cls_and_kwargs` on a plain Trainer: changing args afterwards (as a hyperparameter search or
    a command-line override does) changes the groups."""
    args = _args(tmp_path, learning_rate=1e-3, weight_decay=0.0)
    ds, collate = _data()
    model = _lm()
    trainer = Trainer(
        model=model, args=args, train_dataset=ds, data_collator=collate,
        optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(args, method="loraplus", ratio=8.0),
    )  # fmt: skip
    args.learning_rate, args.weight_decay = 2e-3, 0.05
    before = [p.B.detach().clone() for p in lora_pairs(model)]
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert {g["name"]: (g["initial_lr"], g["weight_decay"]) for g in opt.param_groups} == {
        "A": (2e-3, 0.05), "B": (16e-3, 0.05)
    }  # fmt: skip
    assert any(not torch.equal(b0, p.B) for b0, p in zip(before, lora_pairs(model), strict=True))


def test_the_optimizer_covers_the_model_trainer_hands_it(tmp_path):
    """Under FSDP / DeepSpeed Trainer builds the optimizer after wrapping the model: the groups must hold the
    wrapped model's parameters, not those of the model the user built."""

    class Wrapped(nn.Module):  # stands in for FSDP(model): the same modules under a prefix
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    trainer = hf.Trainer(model=_lm(), args=_args(tmp_path), method="loraplus")
    wrapped = Wrapped(trainer.model)
    opt = trainer.create_optimizer(wrapped)
    trainable = {id(p) for p in wrapped.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


def test_head_lr_reaches_the_head_group(tmp_path):
    model = models.tiny_model("bert", task="classification")
    wl.attach(model, targets=["query", "value"], rank=2, trainable=["classifier"])
    trainer = hf.Trainer(
        model=model, args=_args(tmp_path, learning_rate=1e-3), optimizer_options={"head_lr": 3e-2}
    )
    groups = _groups(trainer.create_optimizer())
    assert groups["head"][0] == 3e-2 and groups["A"][0] == 1e-3


def test_given_optimizers_still_win(tmp_path):
    model = _lm()
    opt, sched = hf.optimizers(model, lr=7e-4, num_training_steps=2)
    trainer = hf.Trainer(model=model, args=_args(tmp_path, learning_rate=1e-3), optimizers=(opt, sched))
    assert trainer.create_optimizer() is opt


@pytest.mark.parametrize(
    "options,words", [({"lr": 1.0}, "learning_rate"), ({"weight_decay": 0.1, "eps": 1e-6}, "adam_epsilon")]
)
def test_settings_of_the_arguments_are_refused_as_options(tmp_path, options, words):
    with pytest.raises(UserError, match=words):
        hf.Trainer(model=_lm(), args=_args(tmp_path), optimizer_options=options)
    with pytest.raises(UserError, match=words):
        hf.optimizer_cls_and_kwargs(_args(tmp_path), **options)


def test_unknown_method_is_refused_before_training(tmp_path):
    with pytest.raises(UserError, match="valid methods"):
        hf.Trainer(model=_lm(), args=_args(tmp_path), method="sgd-ish")

"""Tiny random transformers models and a byte-level tokenizer: real architectures at ~100k parameters.

Why: tests and examples need a model that loads through the same code paths as a real one (a transformers
folder with config and tokenizer files) but builds in milliseconds and needs no download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from widelora.models import TASKS

#: A small chat template in the style of Zephyr / ChatML: each turn is `<|role|>\n` + content + EOS (`</s>`),
#: so an assistant turn ends with the token that stops generation.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = None):
    """A byte-level tokenizer (256 byte symbols + 4 specials, no merges): encodes any text, needs no files.

    It has no chat template unless one is given (e.g. `TINY_CHAT_TEMPLATE`), like many base models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_model(
    arch: str = "llama",
    task: str = "causal_lm",
    num_labels: int = 2,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialized Llama or BERT with the shapes of the real thing but ~100k parameters."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    if arch not in ("llama", "bert"):
        raise ValueError(f"arch={arch!r} is not valid; valid: ['llama', 'bert']")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; valid: {list(TASKS)}")
    common = {
        "vocab_size": 260,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 2 * hidden,
        "pad_token_id": 0,
    }
    if arch == "bert" and task != "classification":
        raise ValueError("tiny BERT supports task='classification' only")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "llama":
            cfg = LlamaConfig(
                **common,
                num_key_value_heads=2,
                max_position_embeddings=512,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=True,
                num_labels=num_labels,
            )
            model = LlamaForCausalLM(cfg) if task == "causal_lm" else LlamaForSequenceClassification(cfg)
        else:
            cfg = BertConfig(**common, max_position_embeddings=512, num_labels=num_labels)
            model = BertForSequenceClassification(cfg)
    return model.eval()


def save_tiny_folder(
    path: str | os.PathLike,
    arch: str = "llama",
    task: str = "causal_lm",
    num_labels: int = 2,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Write a tiny model + byte tokenizer as a transformers folder, so tests use the local-folder path."""
    path = Path(path)
    model = tiny_model(arch, task=task, num_labels=num_labels, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer(chat_template).save_pretrained(path)
    return path


# Hand-sized models for the core layer tests: shapes small enough to reason about, one per model family.


class TinyMLP(nn.Module):
    """Two linear layers and a norm: enough structure for targets, groups and merges."""

    def __init__(self, d_in: int = 12, d_hidden: int = 16, d_out: int = 5) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama (vocab 64, width 32, grouped-query attention) with untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3) -> nn.Module:
    """A 2-layer BERT sequence classifier (vocab 60, width 32)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=num_labels,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 (Conv1D layers, tied head; vocab 64, width 32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()

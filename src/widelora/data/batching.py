"""Documents → tokenized datasets → DataLoaders: packed blocks for causal LM, truncated examples for labels.

Why: every experiment tokenizes the same way (causal LM: documents joined with EOS and cut into full blocks;
classification: one truncated example per document) and iterates in an order fixed by one seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from widelora.data.chat import chat_collate, chat_splits, is_chat_file
from widelora.data.corpus import Corpus, split_corpus
from widelora.data.sources import load_corpus
from widelora.errors import UserError


class BlockDataset(Dataset):
    """Packed causal-LM blocks: row i is `seq_len` consecutive tokens; labels equal inputs (model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids}


class LabeledDataset(Dataset):
    """Tokenized examples (variable length, truncated to seq_len) with an integer label each."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.tensor(self.input_ids[i]), "labels": torch.tensor(self.labels[i])}


def _check_positive(name: str, value: object, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive int" + (" or None" if optional else ""))


def pack_tokens(
    texts: Sequence[str], tokenizer, seq_len: int, max_blocks: int | None = None, chunk: int = 256
) -> BlockDataset:
    """Tokenize documents, join them with EOS, cut into full blocks of `seq_len` (the remainder is dropped).

    Stops tokenizing once `max_blocks` blocks are available, so small runs on big corpora start fast.
    """
    _check_positive("seq_len", seq_len)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for start in range(0, len(texts), chunk):
        batch = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False)["input_ids"]
        for ids in batch:
            stream.extend(ids)
            stream.extend(sep)
        if need is not None and len(stream) >= need:
            break
    n_blocks = len(stream) // seq_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise UserError(f"only {len(stream)} tokens: not enough text for one block of seq_len={seq_len}")
    blocks = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return BlockDataset(blocks)


def encode_labeled(
    corpus: Corpus, tokenizer, seq_len: int, max_examples: int | None = None
) -> LabeledDataset:
    """Tokenize labelled documents, truncating each to `seq_len` tokens (special tokens included)."""
    _check_positive("seq_len", seq_len)
    if corpus.labels is None:
        raise UserError(f"corpus {corpus.name!r} has no labels; load it with task='classification'")
    n = len(corpus) if max_examples is None else min(len(corpus), max_examples)
    ids = tokenizer(corpus.texts[:n], truncation=True, max_length=seq_len)["input_ids"]
    return LabeledDataset(ids, corpus.labels[:n])


def make_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad `input_ids` to the batch maximum and build the attention mask."""

    def collate(batch: list[dict]) -> dict:
        longest = max(int(b["input_ids"].shape[0]) for b in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, b in enumerate(batch):
            n = b["input_ids"].shape[0]
            ids[i, :n] = b["input_ids"]
            mask[i, :n] = 1
        labels = torch.stack([b["labels"] for b in batch])
        if labels.dim() == 2:  # causal LM: never learn to predict padding
            labels = labels.masked_fill(mask == 0, -100) if labels.shape == mask.shape else labels
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@dataclass
class TaskData:
    """Tokenized train / val / test sets for one task, plus what the model needs to know about labels."""

    task: str
    train: Dataset
    val: Dataset
    test: Dataset
    collate: Callable[[list[dict]], dict]
    num_labels: int | None = None
    label_names: list[str] | None = None


def prepare(
    dataset: str | os.PathLike,
    tokenizer,
    task: str = "causal_lm",
    seq_len: int = 128,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    max_train: int | None = None,
    max_eval: int | None = None,
    text_field: str = "text",
    label_field: str = "label",
    packing: bool = False,
) -> TaskData:
    """Load, split by document with `seed`, and tokenize. `max_train` / `max_eval` cap examples (LM: blocks).

    A causal-LM `.jsonl`/`.json` file of conversations (`messages`, or `prompt` and `completion`) is chat data
    (`widelora.data.chat`): rendered with the tokenizer's chat template, labels on the assistant's tokens
    only, one example per conversation, or full `seq_len` blocks with `packing`. Plain text is always packed.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("max_train", max_train, optional=True)
    _check_positive("max_eval", max_eval, optional=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cap = {"train": max_train, "val": max_eval, "test": max_eval}
    if task == "causal_lm" and is_chat_file(Path(str(dataset)).expanduser(), text_field):
        sets = chat_splits(
            Path(str(dataset)).expanduser(), tokenizer, seq_len, seed, val_frac, test_frac, cap, packing
        )
        return TaskData(task, sets["train"], sets["val"], sets["test"], chat_collate(pad))
    corpus = load_corpus(dataset, task, text_field=text_field, label_field=label_field)
    parts = split_corpus(corpus, seed=seed, val_frac=val_frac, test_frac=test_frac)
    if task == "causal_lm":
        sets = {k: pack_tokens(v.texts, tokenizer, seq_len, cap[k]) for k, v in parts.items()}
        return TaskData(task, sets["train"], sets["val"], sets["test"], make_collate(pad))
    sets = {k: encode_labeled(v, tokenizer, seq_len, cap[k]) for k, v in parts.items()}
    return TaskData(
        task,
        sets["train"],
        sets["val"],
        sets["test"],
        make_collate(pad),
        num_labels=len(corpus.label_names or []),
        label_names=corpus.label_names,
    )


def make_loader(
    ds: Dataset,
    batch_size: int,
    collate: Callable,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on `seed`."""
    _check_positive("batch_size", batch_size)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate, drop_last=drop_last
    )

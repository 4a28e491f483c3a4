"""Corpora (shipped, user files, the hub) → deterministic splits → tokenized datasets → DataLoaders.

Why: every experiment needs the same three steps, and splits must be by *document* (never leaking a document
across train/test) and fixed by one seed. `corpus` holds the Corpus and its split, `shipped` / `user_files` /
`hub` the sources, `sources.load_corpus` picks one, and `batching` tokenizes and batches. `chat` handles
conversations (chat-template rendering, loss on the assistant's tokens only), which `prepare` detects.
"""

from widelora.data.batching import (
    BlockDataset,
    LabeledDataset,
    TaskData,
    encode_labeled,
    make_collate,
    make_loader,
    pack_tokens,
    prepare,
)
from widelora.data.chat import ChatDataset, chat_collate, is_chat_file, read_conversations
from widelora.data.corpus import TASKS, Corpus, split_corpus
from widelora.data.shipped import DATASETS, ShippedData
from widelora.data.sources import load_corpus
from widelora.data.user_files import READERS

__all__ = [
    "DATASETS",
    "READERS",
    "TASKS",
    "BlockDataset",
    "ChatDataset",
    "Corpus",
    "LabeledDataset",
    "ShippedData",
    "TaskData",
    "chat_collate",
    "encode_labeled",
    "is_chat_file",
    "load_corpus",
    "make_collate",
    "make_loader",
    "pack_tokens",
    "prepare",
    "read_conversations",
    "split_corpus",
]

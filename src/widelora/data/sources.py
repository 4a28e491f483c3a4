"""`load_corpus`: one call for every source of documents — a shipped corpus, a user file, or the hub."""

from __future__ import annotations

import os
from pathlib import Path

from widelora.data.corpus import TASKS, Corpus
from widelora.data.hub import hub_corpus
from widelora.data.shipped import DATASETS, LOADERS
from widelora.data.user_files import READERS, read_user_file
from widelora.errors import UserError


def load_corpus(
    name_or_path: str | os.PathLike,
    task: str = "causal_lm",
    text_field: str = "text",
    label_field: str = "label",
) -> Corpus:
    """A shipped corpus by name (see `DATASETS`), a user file (.txt, .jsonl, .json, .csv) or `hf:<path>`."""
    if task not in TASKS:
        raise UserError(f"task={task!r} is not valid; valid: {list(TASKS)}")
    key = str(name_or_path)
    if key.startswith("hf:"):
        return hub_corpus(key, task, text_field, label_field)
    if key in DATASETS:
        if task not in DATASETS[key].tasks:
            raise UserError(f"dataset {key!r} supports task(s) {list(DATASETS[key].tasks)}, not {task!r}")
        return LOADERS[key](task)
    path = Path(key).expanduser()
    if not path.is_file():
        raise UserError(
            f"dataset={key!r} is neither a shipped dataset nor an existing file; "
            f"shipped: {sorted(DATASETS)}; files: {list(READERS)}"
        )
    return read_user_file(path, task, text_field, label_field)

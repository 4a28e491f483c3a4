"""`hf:<path>[:<config>]`: a corpus from the Hugging Face hub through the optional `datasets` library.

All of a hub dataset's splits are pooled and re-split by widelora's seed, so every source is treated alike.
"""

from __future__ import annotations

from widelora.data.corpus import Corpus, corpus_from_rows, needed_fields
from widelora.errors import UserError


def hub_corpus(key: str, task: str, text_field: str, label_field: str) -> Corpus:
    try:  # optional: `pip install widelora[hub]`
        import datasets
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"dataset {key!r} needs the `datasets` library: `pip install datasets`"
        ) from exc
    parts = key[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise UserError(f"dataset={key!r}: expected hf:<path> or hf:<path>:<config>")
    loaded = datasets.load_dataset(parts[0], parts[1] if len(parts) == 2 else None)
    rows: list[dict] = []
    for split in sorted(loaded):
        columns = loaded[split].column_names
        for col in needed_fields(task, text_field, label_field):
            if col not in columns:
                raise UserError(f"dataset {key!r} split {split!r} has no column {col!r}; columns: {columns}")
        rows.extend(r for r in loaded[split] if task == "causal_lm" or int(r[label_field]) >= 0)
    return corpus_from_rows(key, rows, task, text_field, label_field, key)

"""A corpus of documents (with integer labels for classification) and its deterministic split by document.

Why: every source (shipped corpora, user files, the hub) ends as the same `Corpus`, and splits are made by
*document* with one seed, so no document leaks across train / val / test and every run can be reproduced.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from widelora.errors import UserError

TASKS = ("causal_lm", "classification")


@dataclass
class Corpus:
    """Raw documents, with integer labels for classification."""

    name: str
    texts: list[str]
    labels: list[int] | None = None
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Corpus:
        labels = [self.labels[i] for i in idx] if self.labels is not None else None
        return Corpus(self.name, [self.texts[i] for i in idx], labels, self.label_names)


def text_fields(text_field: str) -> list[str]:
    """`"a,b"` names several text fields, joined with a newline (e.g. a premise and its hypothesis)."""
    return [f.strip() for f in text_field.split(",") if f.strip()]


def needed_fields(task: str, text_field: str, label_field: str) -> list[str]:
    """The fields every record must have for `task`."""
    return text_fields(text_field) + ([label_field] if task == "classification" else [])


def row_text(row: dict, text_field: str) -> str:
    return "\n".join(str(row[f]).strip() for f in text_fields(text_field) if row.get(f) is not None).strip()


def labelled_corpus(name: str, texts: list[str], raw_labels: list[str], where: str | None = None) -> Corpus:
    """Map string labels to ints in sorted order (numeric order when all labels are integers)."""
    uniq = set(raw_labels)
    try:
        names = [str(v) for v in sorted(int(u) for u in uniq)]
        index = {u: names.index(str(int(u))) for u in uniq}
    except ValueError:
        names = sorted(uniq)
        index = {u: names.index(u) for u in uniq}
    if len(names) < 2:
        raise UserError(f"{where or name}: classification needs at least 2 distinct labels, found {names}")
    return Corpus(name, texts, [index[v] for v in raw_labels], names)


def corpus_from_rows(
    name: str, rows: list[dict], task: str, text_field: str, label_field: str, where: str
) -> Corpus:
    """Records (dicts) → Corpus; records without text are dropped, labels must exist (checked upstream)."""
    rows = [r for r in rows if row_text(r, text_field)]
    if not rows:
        raise UserError(f"{where}: is empty (no non-blank {text_field!r} values)")
    texts = [row_text(r, text_field) for r in rows]
    if task == "causal_lm":
        return Corpus(name, texts)
    labels = [str(r[label_field]).strip() for r in rows]
    if any(not lab for lab in labels):
        raise UserError(f"{where}: has rows with an empty {label_field!r} value")
    return labelled_corpus(name, texts, labels, where)


def split_indices(
    n: int, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1, name: str = "corpus"
) -> dict[str, list[int]]:
    """Shuffle `range(n)` with `seed` and cut train / val / test index lists; each split gets at least one."""
    for arg, val in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 < val < 1.0:
            raise UserError(f"{arg}={val!r} must be in (0, 1)")
    if val_frac + test_frac >= 1.0:
        raise UserError(f"val_frac + test_frac = {val_frac + test_frac} must be < 1")
    if n < 3:
        raise UserError(f"corpus {name!r} has {n} document(s); need at least 3 to split")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n * val_frac))
    n_test = max(1, round(n * test_frac))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise UserError(f"corpus {name!r} is too small ({n} docs) for the requested fractions")
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def split_corpus(
    corpus: Corpus, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1
) -> dict[str, Corpus]:
    """Shuffle documents with `seed` and cut train / val / test; each split gets at least one document."""
    parts = split_indices(len(corpus), seed, val_frac, test_frac, corpus.name)
    return {k: corpus.subset(idx) for k, idx in parts.items()}

"""Tiny text corpora for tests: random documents over a small vocabulary, written where a test wants them.

Why a helper: several test modules build the same throw-away corpus (a few dozen documents of random words,
sometimes a two-class CSV whose classes use disjoint words) next to a tiny model folder. The random stream is
passed in, so a module that draws its corpus and its labels from one `random.Random` keeps exactly its data.
"""

from __future__ import annotations

import random
from pathlib import Path

#: A vocabulary small enough for the tiny models' tokenizers to learn something in a few steps.
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "far",
    "away",
    "from",
    "home",
    "while",
    "birds",
    "sang",
    "songs",
    "of",
    "old",
]
#: Another small vocabulary (Hamlet's question), for tests that want different text.
HAMLET = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]


def write_documents(
    path: Path, rng: random.Random, docs: int, words_per_doc: int, words: list[str] = WORDS
) -> Path:
    """`docs` documents of `words_per_doc` random words, separated by blank lines."""
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(words_per_doc)) for _ in range(docs))
    Path(path).write_text(text)
    return Path(path)


def write_two_class_csv(path: Path, rng: random.Random, rows: int, words_per_row: int = 8) -> Path:
    """A `text,label` CSV: label 1 rows use the first 9 words of WORDS, label 0 rows the others."""
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.randrange(2)
        pool = WORDS[:9] if label else WORDS[9:]
        lines.append(" ".join(rng.choice(pool) for _ in range(words_per_row)) + f",{label}")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)

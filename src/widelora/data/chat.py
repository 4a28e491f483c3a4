"""Instruction and chat data: conversations rendered with the tokenizer's chat template, loss on answers.

Why: an instruction-tuned model learns to answer, not to predict its users' questions, so only the assistant's
tokens carry a label (every other position is -100), and the text must look exactly as it will at inference,
which is what the model's own chat template produces. The formats are TRL's, one JSON object a line (`.jsonl`)
or one array of them (`.json`):

- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`
- `{"prompt": "...", "completion": "..."}`: a user turn and the assistant's answer
- `{"prompt": [messages], "completion": [messages]}`: TRL's conversational prompt-completion

A file is chat data when its first record has `messages`, or `prompt` and `completion`, and no text field.
Conversations are split by conversation with the corpus seed; each becomes one example truncated to `seq_len`,
or, with packing, all are joined into full `seq_len` blocks. A tokenizer without a chat template can still
learn prompt/completion pairs (prompt, then completion and EOS), but not `messages`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from torch.utils.data import Dataset

from widelora.data.corpus import split_indices
from widelora.data.user_files import load_json, read_text
from widelora.errors import FileProblem, UserError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
CHAT_SUFFIXES = (".jsonl", ".json")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Conversation:
    """One record: its messages, its file and place there (for errors), and whether it was a plain pair."""

    messages: Messages
    path: str
    where: str
    plain_pair: bool = False


# ------------------------------------------------------------------------------------------------- reading
def _records(path: Path) -> list[tuple[str, object]]:
    """`(where, record)` for every record of a .jsonl file or a .json array; bad JSON names the line."""
    text = read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return [(f"item {i}", obj) for i, obj in enumerate(load_json(path))]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise FileProblem(
                path, f"line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})"
            ) from None
    return records


def _first_record(path: Path) -> object:
    text = read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        items = load_json(path)
        return items[0] if isinstance(items, list) and items else None
    for line in text.splitlines():
        if line.strip():
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def is_chat_file(path: str | Path, text_field: str = "text") -> bool:
    """True when `path` is a .jsonl/.json file whose first record is a conversation (see the module doc)."""
    path = Path(path)
    if path.suffix.lower() not in CHAT_SUFFIXES or not path.is_file():
        return False
    first = _first_record(path)
    if not isinstance(first, dict) or any(f.strip() in first for f in text_field.split(",")):
        return False
    return "messages" in first or {"prompt", "completion"} <= set(first)


def _messages(path: Path, where: str, value: object, field: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise FileProblem(
            path, f"{where}: {field!r} must be a non-empty list of {{'role', 'content'}} objects"
        )
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise FileProblem(
                path,
                f"{where}: {field}[{i}] must be an object with a "
                f"string 'role' and a string 'content'; got {m!r:.80}",
            )
        if m["role"] not in ROLES:
            raise FileProblem(
                path, f"{where}: {field}[{i}] has role {m['role']!r}; valid roles: {list(ROLES)}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _conversation(path: Path, where: str, record: object) -> Conversation:
    if not isinstance(record, dict):
        raise FileProblem(path, f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages, plain = _messages(path, where, record["messages"], "messages"), False
    elif {"prompt", "completion"} <= set(record):
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise FileProblem(path, f"{where}: 'completion' is empty; there is nothing to learn")
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            plain = True
        elif isinstance(prompt, str) or isinstance(completion, str):
            raise FileProblem(
                path,
                f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages; got "
                f"{type(prompt).__name__} and {type(completion).__name__}",
            )
        else:
            messages = _messages(path, where, prompt, "prompt") + _messages(
                path, where, completion, "completion"
            )
            plain = False
    else:
        raise FileProblem(
            path,
            f"{where} has neither 'messages' nor 'prompt' and 'completion'; fields: {sorted(record)}",
            "every record of a chat file needs one of the two forms",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise FileProblem(path, f"{where}: has no assistant message; there is nothing to learn")
    return Conversation(messages, str(path), where, plain)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a chat file, checked; a bad record is a FileProblem naming the file and line."""
    path = Path(path)
    conversations = [_conversation(path, where, record) for where, record in _records(path)]
    if not conversations:
        raise FileProblem(path, "is empty")
    return conversations


# ------------------------------------------------------------------------------------------------- rendering
def _template_text(tokenizer, messages: Messages, prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def _assistant_spans(tokenizer, conv: Conversation, full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full`: between the text up to each turn's generation prompt
    and the text through the turn. The template must render a conversation's beginning the same way whatever
    follows (true of ChatML templates such as SmolLM2's)."""
    spans = []
    for i, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        start = _template_text(tokenizer, conv.messages[:i], prompt=True) if i else ""
        end = _template_text(tokenizer, conv.messages[: i + 1], prompt=False)
        if not (end.startswith(start) and full.startswith(end)):
            raise UserError(
                f"{conv.path}: {conv.where}: the tokenizer's chat template renders the start of a "
                "conversation differently once later turns follow, so the assistant's tokens "
                "cannot be found; use a template that renders turns in order (e.g. ChatML)"
            )
        spans.append((len(start), len(end)))
    return spans


def _label_by_offsets(tokenizer, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    inside = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return ids, [t if keep else IGNORE for t, keep in zip(ids, inside, strict=True)]


def _label_by_segments(tokenizer, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: tokenize the text between span edges piece by piece."""
    edges = sorted({0, len(full), *(e for span in spans for e in span)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in pairwise(edges):
        piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
        keep = any(s <= a and b <= e for s, e in spans)
        ids.extend(piece)
        labels.extend(piece if keep else [IGNORE] * len(piece))
    return ids, labels


def render(conv: Conversation, tokenizer) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` of one conversation: its chat-template text, labels on assistant turns only."""
    if getattr(tokenizer, "chat_template", None):
        full = _template_text(tokenizer, conv.messages, prompt=False)
        spans = _assistant_spans(tokenizer, conv, full)
        label = _label_by_offsets if getattr(tokenizer, "is_fast", False) else _label_by_segments
        return label(tokenizer, full, spans)
    if not conv.plain_pair:
        raise UserError(
            f"{conv.path}: {conv.where}: 'messages' need a chat template and this "
            "tokenizer has none; use a model that ships one (e.g. smollm2-135m), "
            "set tokenizer.chat_template, or write prompt/completion strings"
        )
    prompt = tokenizer(conv.messages[0]["content"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(conv.messages[1]["content"], add_special_tokens=False)["input_ids"]
    answer = answer + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return prompt + answer, [IGNORE] * len(prompt) + answer


# ------------------------------------------------------------------------------------------------- datasets
class ChatDataset(Dataset):
    """Tokenized conversations (or packed blocks of them) with -100 wherever the assistant is not speaking."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]):
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.tensor(self.input_ids[i]), "labels": torch.tensor(self.labels[i])}


def _learns(labels: list[int]) -> bool:
    return any(t != IGNORE for t in labels)


def encode_conversations(
    conversations: list[Conversation],
    tokenizer,
    seq_len: int,
    packing: bool = False,
    limit: int | None = None,
) -> ChatDataset:
    """One example per conversation (truncated to `seq_len`), or with `packing` full `seq_len` blocks.

    Examples or blocks left without an assistant token (truncation cut every answer away) are dropped: a batch
    of them has no loss. `limit` caps the examples (blocks when packing).
    """
    rendered = (render(c, tokenizer) for c in conversations)
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    if not packing:
        for ids, labels in rendered:
            if _learns(labels[:seq_len]):
                ids_out.append(ids[:seq_len])
                labels_out.append(labels[:seq_len])
            if limit is not None and len(ids_out) >= limit:
                break
    else:
        ids_stream: list[int] = []
        label_stream: list[int] = []
        for ids, labels in rendered:
            ids_stream.extend(ids)
            label_stream.extend(labels)
            while len(ids_stream) >= seq_len and (limit is None or len(ids_out) < limit):
                block, block_labels = ids_stream[:seq_len], label_stream[:seq_len]
                del ids_stream[:seq_len], label_stream[:seq_len]
                if _learns(block_labels):
                    ids_out.append(block)
                    labels_out.append(block_labels)
            if limit is not None and len(ids_out) >= limit:
                break
    if not ids_out:
        how = "no full block of" if packing else "no conversation whose first"
        raise UserError(
            f"{conversations[0].path}: {how} seq_len={seq_len} tokens holds an assistant "
            "token; raise seq_len" + ("" if packing else " or shorten the prompts")
        )
    return ChatDataset(ids_out, labels_out)


def chat_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad `input_ids` with `pad_id` and `labels` with -100 to the batch max; add the attention mask."""

    def collate(batch: list[dict]) -> dict:
        longest = max(int(b["input_ids"].shape[0]) for b in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, b in enumerate(batch):
            n = b["input_ids"].shape[0]
            ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def chat_splits(
    path: str | Path,
    tokenizer,
    seq_len: int,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    caps: dict[str, int | None] | None = None,
    packing: bool = False,
) -> dict[str, ChatDataset]:
    """A chat file split by conversation with `seed` into train / val / test, each tokenized (module doc)."""
    conversations = read_conversations(path)
    parts = split_indices(len(conversations), seed, val_frac, test_frac, Path(path).name)
    caps = caps or {}
    return {
        split: encode_conversations(
            [conversations[i] for i in idx], tokenizer, seq_len, packing=packing, limit=caps.get(split)
        )
        for split, idx in parts.items()
    }

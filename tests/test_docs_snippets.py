"""Every ```python block of README.md and docs/integrations.md runs, on tiny local models (issue 14).

Why: snippets drift silently (the README's `widelora.train.hf.optimizers(...)` once failed after a plain
`import widelora`). Each block runs in a fresh namespace, in a folder that holds what the docs name: a tiny
Llama with a chat template standing in for "path/or/hub-id", `chat.jsonl`, `notes.txt` and a finished run
`runs/chat`. A document's blocks run in order in one namespace, as a reader reads them; names the prose
supplies (`base_model`, `loader`) come from `prelude`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from widelora.testing.models import TINY_CHAT_TEMPLATE, save_tiny_folder

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/integrations.md")
PLACEHOLDER = "path/or/hub-id"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(doc: str) -> list[tuple[int, str]]:
    """`(line, code)` of every ```python block in `doc`."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = [(doc, line, code) for doc in DOCS for line, code in python_blocks(doc)]


def test_the_docs_have_python_blocks():
    counts = {doc: sum(1 for d, _, _ in BLOCKS if d == doc) for doc in DOCS}
    assert counts["README.md"] >= 4 and counts["docs/integrations.md"] >= 6, counts


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with the files the snippets name, and a finished chat run."""
    from widelora.train import train

    root = tmp_path_factory.mktemp("docs")
    model = save_tiny_folder(root / "tiny-model", chat_template=TINY_CHAT_TEMPLATE)
    words = ["red", "green", "blue", "white", "black"]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Colour {i}?"},
                {"role": "assistant", "content": words[i % 5]},
            ]
        }
        for i in range(200)
    ]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "notes.txt").write_text(
        "\n\n".join(
            f"note {i}: the {words[i % 5]} fox jumps over the lazy dog {i % 7} times." for i in range(120)
        )
    )
    config = {
        "model": str(model), "dataset": str(root / "chat.jsonl"), "targets": ["q_proj", "v_proj"], "rank": 2,
        "seq_len": 64, "batch_size": 4, "steps": 2, "eval_examples": 4, "progress": False,
    }  # fmt: skip
    assert train(config, root / "runs" / "chat")["status"] == "done"
    return root


def prelude() -> dict:
    """Names README blocks take from the prose around them: `base_model` (no adapters), `loader` (batches)."""
    from widelora.testing.models import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = [f"sample {i} of some text for the model to read" for i in range(8)]
    loader = [dict(tokenizer(texts[i : i + 4], return_tensors="pt", padding=True)) for i in range(0, 8, 4)]
    for batch in loader:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {"base_model": tiny_model(), "loader": loader, "__name__": "__docs__"}


@pytest.fixture(scope="module")
def namespaces() -> dict[str, dict]:
    """One namespace per document: its blocks run in order, each seeing what the earlier ones defined."""
    return {doc: prelude() for doc in DOCS}


@pytest.mark.parametrize("doc,line,code", BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_snippet_runs(workspace, namespaces, monkeypatch, doc, line, code):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    torch.manual_seed(0)
    source = code.replace(PLACEHOLDER, str(workspace / "tiny-model"))
    exec(compile(source, f"{doc}:{line}", "exec"), namespaces[doc])

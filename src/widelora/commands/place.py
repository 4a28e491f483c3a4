"""`widelora place`: rank a model's module types by PLoP's normalized feature norm and pick where LoRA goes.

Samples are whole training documents (split by `--seed`), tokenized with right padding to at most `--seq-len`;
padding tokens are excluded from the scores. Defaults follow the PLoP reference (100 samples, batch 8,
sequence 256, k = 3).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer

from widelora.errors import FileProblem, UserError


def sample_batches(
    tokenizer, texts: list[str], samples: int, batch: int, seq_len: int, seed: int
) -> list[dict]:
    """`samples` documents drawn with `seed`, tokenized in padded batches with an attention mask."""
    for name, value in (("samples", samples), ("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name}={value!r} must be a positive integer")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("the dataset has no non-empty text")
    chosen = random.Random(seed).sample(texts, min(samples, len(texts)))
    batches = []
    for i in range(0, len(chosen), batch):
        enc = tokenizer(
            chosen[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=seq_len
        )
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def place_command(
    model: Annotated[
        str, typer.Option(help="Shipped name (smollm2-135m, minilm-l6), local folder or hub id.")
    ] = "smollm2-135m",
    dataset: Annotated[
        str, typer.Option(help="wikipedia | shakespeare | tweets | a .txt/.jsonl/.csv file.")
    ] = "wikipedia",
    text_field: Annotated[str, typer.Option(help="Text column/field of a user file.")] = "text",
    samples: Annotated[int, typer.Option(help="Documents scored (the reference uses 100).")] = 100,
    batch: Annotated[int, typer.Option(help="Documents per forward pass.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Truncation length in tokens.")] = 256,
    k: Annotated[int, typer.Option(help="How many module types to choose (the lowest NFN).")] = 3,
    types: Annotated[
        str | None, typer.Option(help="Comma-separated candidate types (default: every linear type).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for the document sample and the random reference vectors.")
    ] = 0,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (default: torch's choice).")] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="JSON file for the ranking and all scores.")
    ] = Path("plop.json"),
) -> None:
    """PLoP: score every module type by normalized feature norm and print where adapters should go."""
    import torch
    from rich.console import Console

    from widelora.data import load_corpus, split_corpus
    from widelora.methods.plop import place
    from widelora.models import load_model

    if out.is_dir():
        raise FileProblem(out, "is a folder", "--out takes the path of a JSON file, e.g. plop.json")
    if threads is not None:
        torch.set_num_threads(threads)
    candidates = [t.strip() for t in types.split(",") if t.strip()] if types else None
    corpus = load_corpus(dataset, "causal_lm", text_field=text_field)  # before the (slower) model load
    train_texts = split_corpus(corpus, seed=seed)["train"].texts
    net, tokenizer = load_model(model)
    batches = sample_batches(tokenizer, train_texts, samples, batch, seq_len, seed)
    result = place(net, batches, k=k, types=candidates, seed=seed)
    console = Console()
    console.print(result.table(title=f"PLoP ranking: {model} on {dataset} ({result.num_tokens} tokens)"))
    path = result.save_json(out)
    targets = ",".join(result.targets)
    console.print(f"targets: {targets}   (use: widelora finetune --targets {targets})")
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Attach `widelora place` to the main app."""
    app.command("place")(place_command)

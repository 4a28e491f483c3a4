"""`widelora place`: rank a model's module types by PLoP's normalized feature norm and pick where LoRA goes.

Samples are whole training documents (split by `--seed`), tokenized with right padding to at most `--seq-len`;
padding tokens are excluded from the scores. Defaults follow the PLoP reference (100 samples, batch 8,
sequence 256, k = 3).
"""

from __future__ import annotations

import random

import typer

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError, OSError)


def sample_batches(tokenizer, texts: list[str], samples: int, batch: int, seq_len: int, seed: int) -> list[dict]:
    """`samples` documents drawn with `seed`, tokenized in padded batches with an attention mask."""
    for name, value in (("samples", samples), ("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("the dataset has no non-empty text")
    chosen = random.Random(seed).sample(texts, min(samples, len(texts)))
    batches = []
    for i in range(0, len(chosen), batch):
        enc = tokenizer(chosen[i:i + batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=seq_len)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def place_command(
    model: str = typer.Option("smollm2-135m", help="Shipped name (smollm2-135m, minilm-l6), local folder or hub id."),
    dataset: str = typer.Option("wikipedia", help="wikipedia | shakespeare | tweets | a .txt/.jsonl/.csv file."),
    text_field: str = typer.Option("text", help="Text column/field of a user file."),
    samples: int = typer.Option(100, help="Documents scored (the reference uses 100)."),
    batch: int = typer.Option(8, help="Documents per forward pass."),
    seq_len: int = typer.Option(256, help="Truncation length in tokens."),
    k: int = typer.Option(3, help="How many module types to choose (the lowest NFN)."),
    types: str = typer.Option(None, help="Comma-separated candidate types (default: every linear type)."),
    seed: int = typer.Option(0, help="Seed for the document sample and the random reference vectors."),
    threads: int = typer.Option(None, help="Torch CPU threads (default: torch's choice)."),
    out: str = typer.Option("plop.json", "--out", "-o", help="JSON file for the ranking and all scores."),
) -> None:
    """PLoP: score every module type by normalized feature norm and print where adapters should go."""
    import torch
    from rich.console import Console

    from widelora.data import load_corpus, split_corpus
    from widelora.methods.placement import place
    from widelora.models import load_model

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        candidates = [t.strip() for t in types.split(",") if t.strip()] if types else None
        net, tokenizer = load_model(model)
        corpus = load_corpus(dataset, "causal_lm", text_field=text_field)
        train_texts = split_corpus(corpus, seed=seed)["train"].texts
        batches = sample_batches(tokenizer, train_texts, samples, batch, seq_len, seed)
        result = place(net, batches, k=k, types=candidates, seed=seed)
    except _USER_ERRORS as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    console = Console()
    console.print(result.table(title=f"PLoP ranking: {model} on {dataset} ({result.num_tokens} tokens)"))
    path = result.save_json(out)
    console.print(f"targets: {','.join(result.targets)}   (use: widelora finetune --targets "
                  f"{','.join(result.targets)})")
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Attach `widelora place` to the main app."""
    app.command("place")(place_command)

"""`widelora generate RUN --prompt TEXT`: sample from a finetuned run (base + adapter), chat-aware."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Attach `widelora generate` to the main app."""

    @app.command("generate")
    def generate(
        run: Annotated[Path, typer.Argument(help="A `widelora finetune` run folder (causal LM).")],
        prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to say to the model.")],
        max_new_tokens: Annotated[int, typer.Option(help="Most tokens to write.")] = 64,
        temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 decodes greedily.")] = 0.7,
        top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
        seed: Annotated[int, typer.Option(help="Sampling seed: the same seed writes the same text.")] = 0,
        chat: Annotated[
            bool | None,
            typer.Option(
                "--chat/--raw",
                help="Send the prompt as a user turn through the chat template, or as raw text to continue "
                "(default: chat when the tokenizer has a template).",
                show_default=False,
            ),
        ] = None,
    ) -> None:
        """Print the text the finetuned model writes after the prompt."""
        from widelora.generation import generate as sample_run

        typer.echo(sample_run(run, prompt, max_new_tokens, temperature, top_p, seed, chat))

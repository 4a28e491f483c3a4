"""`widelora export RUN --merged OUT | --peft OUT`: a finished run as a standalone model or a PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Attach `widelora export` to the main app."""

    @app.command("export")
    def export(
        run: Annotated[Path, typer.Argument(help="A `widelora finetune` run folder.")],
        merged: Annotated[
            Path | None,
            typer.Option(
                help="Write a standalone transformers folder here (adapter merged into the weights)."
            ),
        ] = None,
        peft: Annotated[
            Path | None, typer.Option(help="Write the adapter here in PEFT's format (with the tokenizer).")
        ] = None,
        dtype: Annotated[
            str, typer.Option(help="Weights of the merged folder: float32 (exact), bfloat16 or float16.")
        ] = "float32",
    ) -> None:
        """Export a trained run; OUT must be new or empty (or an earlier export, which is replaced)."""
        from widelora.errors import UserError
        from widelora.export import EXPORT_DTYPES, export_merged, export_peft

        if merged is None and peft is None:
            raise UserError("export needs --merged OUT and/or --peft OUT")
        if dtype not in EXPORT_DTYPES:
            raise UserError(f"--dtype {dtype!r} is not valid; valid: {list(EXPORT_DTYPES)}")
        if merged is not None and peft is not None and merged.resolve() == peft.resolve():
            raise UserError("--merged and --peft must be different folders")
        if peft is not None:
            typer.echo(f"adapter (PEFT): {export_peft(run, peft)}")
        if merged is not None:
            typer.echo(f"merged model: {export_merged(run, merged, dtype=dtype)}")

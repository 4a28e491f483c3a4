"""`widelora evaluate RUN [--split test|val|val+test]`: a finished run's held-out numbers, on any split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Attach `widelora evaluate` to the main app."""

    @app.command("evaluate")
    def evaluate(
        run: Annotated[Path, typer.Argument(help="A finished `widelora finetune` run folder.")],
        split: Annotated[
            str, typer.Option(help="test | val | val+test (both held-out splits pooled).")
        ] = "test",
        as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
        out: Annotated[
            Path | None, typer.Option(help="Also write the numbers as JSON to this file (atomically).")
        ] = None,
    ) -> None:
        """Evaluate a finished run again on a held-out split (its config rebuilds the same split)."""
        from widelora.files import atomic_write_json
        from widelora.train.reevaluate import evaluate_run

        numbers = {"run": str(run), "split": split, **evaluate_run(run, split)}
        if out is not None:
            atomic_write_json(out, numbers)
        if as_json:
            typer.echo(json.dumps(numbers))
            return
        shown = ", ".join(
            f"{k} {v:.4g}" if k != "examples" else f"{int(v)} examples"
            for k, v in numbers.items()
            if k not in ("run", "split")
        )
        typer.echo(f"{run} on {split}: {shown}")

"""`widelora claims CLAIMS.yaml`: regenerate the claims ledger (docs/claims.md) from stored sweep results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Attach `widelora claims` to the main app."""

    @app.command("claims")
    def claims(
        claims_file: Annotated[Path, typer.Argument(help="Claims file naming sources, groups and rules.")],
        out: Annotated[Path, typer.Option(help="The ledger (markdown).")] = Path("docs/claims.md"),
        figures: Annotated[
            Path | None, typer.Option(help="Folder for the figures (default: figures/claims beside --out).")
        ] = None,
        readme_table: Annotated[
            Path | None,
            typer.Option(help="Also write the short 'What holds' table for the README to this file."),
        ] = None,
        refresh: Annotated[
            bool,
            typer.Option(
                help="First export every source's live store (if on this machine) to its result file."
            ),
        ] = False,
    ) -> None:
        """Evaluate each claim by its stated rule on the result files and write the ledger, one row per
        claim."""
        from widelora.report.claims import evaluate
        from widelora.report.claims import refresh as refresh_sources
        from widelora.report.claims_render import write_ledger
        from widelora.report.claims_spec import load_ledger

        ledger = load_ledger(claims_file)
        if refresh:
            for line in refresh_sources(ledger):
                typer.echo(line)
        results = evaluate(ledger)
        command = f"widelora claims {claims_file} --out {out}" + (
            f" --readme-table {readme_table}" if readme_table else ""
        )
        written = write_ledger(
            ledger, results, out, figures or out.parent / "figures" / "claims", readme_table, command
        )
        for r in results:
            typer.echo(f"{r.definition.id:<24} {r.verdict.text():<48} CPU {r.cost.text()}")
        for path in written:
            typer.echo(f"wrote {path}")

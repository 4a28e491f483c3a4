"""`widelora report RESULTS`: paper-style PNG figures and one self-contained index.html for a sweep store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Attach `widelora report` to the main app."""

    @app.command("report")
    def report(
        results: Annotated[Path, typer.Argument(help="A sweep's .sqlite store, or the folder holding it.")],
        out: Annotated[
            Path | None, typer.Option(help="Output folder (default: 'report' beside the store).")
        ] = None,
        metric: Annotated[
            str | None, typer.Option(help="Headline metric (default: the spec's, else inferred).")
        ] = None,
        goal: Annotated[
            str | None, typer.Option(help="max or min: which direction of the metric is better.")
        ] = None,
        all_trials: Annotated[
            bool,
            typer.Option(
                "--all-trials",
                help="Also report trials of earlier versions of the spec (kept apart, never averaged "
                "with the current ones).",
            ),
        ] = False,
    ) -> None:
        """Write metric-vs-LR, heatmap and training-curve PNGs plus index.html; print the best setups."""
        from widelora.errors import UserError
        from widelora.report import build_report
        from widelora.report.summary import display_scale

        try:
            page, figures, res = build_report(results, out, metric=metric, goal=goal, all_trials=all_trials)
        except UserError as exc:  # until the app-wide handler: one line, no traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        scale = display_scale(res.metric)
        typer.echo(f"{res.name}: {len(res.trials)} trials ({res.counts}); headline {res.metric} ({res.goal})")
        for note in res.notes:
            typer.echo(f"note: {note}")
        for g in res.groups():
            best = g.best(res.goal)
            div = f", {g.diverged} diverged" if g.diverged else ""
            if best is None:
                typer.echo(f"  {g.label:<32} no finished trial ({g.failed} failed{div})")
            else:
                typer.echo(
                    f"  {g.label:<32} best lr {best.lr_text:<8} {res.metric} {best.mean * scale:.4g} "
                    f"± {best.se * scale:.2g} ({best.n} seed(s){div})"
                )
        for path in figures.values():
            typer.echo(f"figure: {path}")
        typer.echo(f"report: {page}")

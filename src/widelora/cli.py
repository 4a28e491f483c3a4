"""The `widelora` command-line tool: one typer app; each subcommand lives in widelora.commands.<name>.

Every command's expected failures end the same way (widelora.commands.failures): one `error:` line and exit
code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from widelora.commands import (
    claims,
    demo,
    evaluate,
    export,
    failures,
    finetune,
    generate,
    place,
    recommend,
    report,
    sweep,
    width_study,
)


class _ReportingGroup(TyperGroup):
    """The app's command group: turns an expected failure of any subcommand into one clear line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not failures.is_expected(exc) or ctx.meta.get(failures.DEBUG_KEY):
                raise
            typer.secho(f"error: {failures.describe(exc)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(failures.EXIT_EXPECTED_FAILURE) from None


app = typer.Typer(
    name="widelora",
    cls=_ReportingGroup,
    help="Principled LoRA finetuning: width-aware inits, LoRA+, LoRA-One, PLoP, feature-learning monitors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a bug shows Python's plain traceback, never local variables
)

for _module in (
    width_study,
    finetune,
    sweep,
    place,
    report,
    demo,
    recommend,
    claims,
    export,
    generate,
    evaluate,
):
    _module.register(app)


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="WIDELORA_DEBUG", help="Show the full traceback of an error."),
    ] = False,
) -> None:
    ctx.meta[failures.DEBUG_KEY] = debug


@app.command()
def version() -> None:
    """Print the installed widelora version."""
    from widelora import __version__

    typer.echo(__version__)


if __name__ == "__main__":  # pragma: no cover - `python -m widelora.cli`
    app()

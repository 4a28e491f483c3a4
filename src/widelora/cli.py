"""The `widelora` command-line tool: one typer app; each subcommand lives in widelora.commands.<name>."""

from __future__ import annotations

import typer

from widelora.commands import demo, finetune, place, report, sweep, width_study

app = typer.Typer(
    name="widelora",
    help="Principled LoRA finetuning: width-aware inits, LoRA+, LoRA-One, PLoP, feature-learning monitors.",
    no_args_is_help=True,
    add_completion=False,
)

for _module in (width_study, finetune, sweep, place, report, demo):
    _module.register(app)


@app.command()
def version() -> None:
    """Print the installed widelora version."""
    from widelora import __version__

    typer.echo(__version__)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m widelora.cli`
    main()

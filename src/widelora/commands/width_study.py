"""`widelora width-study` command (not yet implemented)."""

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the main app."""

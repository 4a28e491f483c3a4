"""Expected failures: what the command line reports as one clear message instead of a traceback.

Raise `UserError` (or a subclass) for a mistake the user can fix: its message names what went wrong, the file
or key, and what would be valid. It subclasses ValueError so library callers that catch ValueError keep
working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input, files or environment, reported without a traceback by the CLI."""


class FileProblem(UserError):
    """A file or folder that cannot be read, parsed or written: the message names the path."""

    def __init__(self, path: object, problem: str, hint: str = "") -> None:
        self.path = str(path)
        message = f"{self.path}: {problem}"
        super().__init__(f"{message}. {hint}" if hint else message)

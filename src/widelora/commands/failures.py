"""How the command line reports an expected failure: one line on stderr and exit code 2, never a traceback.

Expected failures are the ones a user can act on: a `widelora.errors.UserError` (a mistake in an argument, a
config, a data file; a `FileProblem` names the file), a ValueError or TypeError from an argument check, an
OSError (read-only or full disk, a file where a folder should be), a malformed YAML or JSON file, a SQLite
file that is not a result store, a corrupt safetensors file. Each becomes `error: <what, where, what to do>`.

Anything else is a bug in widelora and keeps its traceback, so that it gets reported. `widelora --debug` (or
`WIDELORA_DEBUG=1`) shows the traceback of an expected failure too. Exit codes: 0 success, 1 a run that
finished but did not succeed (diverged or failed trials), 2 an expected failure or a usage error (as click
reports them).
"""

from __future__ import annotations

import errno
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import yaml
from safetensors import SafetensorError

from widelora.errors import UserError

EXIT_EXPECTED_FAILURE = 2
DEBUG_KEY = "widelora.debug"

#: What to do about an OSError, by errno.
_OS_HINTS: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write somewhere else",
    errno.EROFS: "the file system is read-only: choose a folder you can write to",
    errno.EACCES: "permission denied: choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted: choose a folder you can write to (or fix its permissions)",
    errno.ENOTDIR: "a file stands where a folder is expected: move it away or choose another path",
    errno.EISDIR: "a folder stands where a file is expected: choose a file path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "it already exists: choose another path",
}


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _os_error(exc: OSError) -> str:
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    hint = _OS_HINTS.get(exc.errno) if exc.errno is not None else None
    if exc.errno == errno.EEXIST and exc.filename is not None and Path(exc.filename).is_file():
        hint = "is a file where a folder is expected: choose another path"
    if hint is None:
        return f"{where}: {exc.strerror or exc}" if where else str(exc)
    return f"{where}: {hint}" if where else f"{hint} ({exc.strerror or exc})"


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"malformed YAML: {problem}"
    where = "" if mark.name.startswith("<") else f"{mark.name}: "
    return f"{where}malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"


def _database_error(exc: sqlite3.DatabaseError) -> str:
    return f"{exc}: the file is not a widelora result store (or it is damaged); pass a store's results.sqlite"


def _safetensors_error(exc: SafetensorError) -> str:
    return f"a safetensors file is corrupt or truncated ({exc}); delete it or restore it from a backup"


def _unicode_error(exc: UnicodeDecodeError) -> str:
    return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"


#: First match wins, so the more specific types come first.
_DESCRIBE: list[tuple[type[BaseException], Callable]] = [
    (UserError, str),
    (yaml.YAMLError, _yaml_error),
    (json.JSONDecodeError, _json_error),
    (UnicodeDecodeError, _unicode_error),
    (sqlite3.DatabaseError, _database_error),
    (SafetensorError, _safetensors_error),
    (OSError, _os_error),
    (ModuleNotFoundError, str),
    (ValueError, str),
    (TypeError, str),
]

EXPECTED: tuple[type[BaseException], ...] = tuple(kind for kind, _ in _DESCRIBE)


def is_expected(exc: BaseException) -> bool:
    """Whether `exc` is a failure the user can act on (a broken pipe is left to click, which ignores it)."""
    if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
        return False
    return isinstance(exc, EXPECTED)


def describe(exc: BaseException) -> str:
    """The one-line message for an expected failure."""
    for kind, render in _DESCRIBE:
        if isinstance(exc, kind):
            return _one_line(render(exc))
    return _one_line(f"{type(exc).__name__}: {exc}")

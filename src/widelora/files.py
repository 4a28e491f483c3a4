"""Safe files: atomic writes, and folders that a command writes into or empties only when it created them.

A crash or kill never leaves half a file where a user (or a resume) will read it; `claim_folder` keeps a
command away from a user's own folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from widelora.errors import FileProblem


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    The file gets the usual 0644 mode (mkstemp's 0600 would make results unreadable to other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # after the write: some writers (safetensors) recreate the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dump_options: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, **({"indent": 2} | dump_options)))


#: The file that marks a folder as created by a widelora command (its JSON names the command).
OWNER_MARKER = ".widelora-owner"


def claim_folder(path: str | os.PathLike[str], owner: str, fresh: bool = False) -> Path:
    """Create `path` for the command `owner` and mark it, or reuse a folder that already carries its mark.

    Why: a command that writes many files into a folder, or empties it with `fresh`, must never touch a user's
    own folder. A folder is the command's only when it carries the marker this function writes; a missing or
    empty folder is claimed; anything else is refused with a FileProblem before a file is written or deleted.
    `fresh` empties a marked folder (keeping the folder itself, which may be a link the user made).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileProblem(path, "is a file, not a folder", "choose a folder path")
    marker = path / OWNER_MARKER
    if path.is_dir() and any(path.iterdir()):
        mark = _owner_of(marker)
        if mark != owner:
            whose = f"widelora {mark}'s" if mark else "not widelora's"
            raise FileProblem(
                path,
                f"is not empty and was not created by `widelora {owner}` (it is {whose})",
                "choose a new or empty folder; widelora never writes "
                "into, or deletes, a folder it did not create",
            )
        if fresh:
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    if _owner_of(marker) != owner:
        atomic_write_json(marker, {"owner": owner})
    return path


def _owner_of(marker: Path) -> str:
    try:
        owner = json.loads(marker.read_text(encoding="utf-8")).get("owner")
    except (OSError, ValueError, AttributeError):
        return ""
    return owner if isinstance(owner, str) else ""

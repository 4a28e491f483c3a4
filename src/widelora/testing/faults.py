"""Deterministic file-system faults for tests: a read-only folder or a full disk, simulated in this process.

Why: chmod cannot make a folder read-only for root (tests often run as root in containers), and a real full
disk cannot be arranged in a test. `failing_writes(folder, errno.ENOSPC)` makes every Python-level write under
`folder` fail the way the kernel would (opening a file for writing, creating a folder, renaming into it),
while reads and everything outside `folder` keep working.
"""

from __future__ import annotations

import builtins
import contextlib
import errno as errnos
import io
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@contextlib.contextmanager
def failing_writes(folder: str | os.PathLike[str], error: int = errnos.ENOSPC) -> Iterator[None]:
    """Inside the block, writes under `folder` raise OSError(`error`) naming the path (EROFS: read-only)."""
    root = os.path.abspath(folder)

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return False
        full = os.path.abspath(os.fspath(path))
        return full == root or full.startswith(root + os.sep)

    def fail(path: object) -> OSError:
        return OSError(error, os.strerror(error), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename = os.replace, os.rename

    def guarded_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise fail(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & _WRITE_FLAGS:
            raise fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path) and not Path(path).exists():
            raise fail(path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_move(real):
        def move(src, dst, *args, **kwargs):
            if inside(dst):
                raise fail(dst)
            return real(src, dst, *args, **kwargs)

        return move

    with (
        mock.patch.object(builtins, "open", guarded_open),
        mock.patch.object(io, "open", guarded_open),
        mock.patch.object(os, "open", guarded_os_open),
        mock.patch.object(os, "mkdir", guarded_mkdir),
        mock.patch.object(os, "replace", guarded_move(real_replace)),
        mock.patch.object(os, "rename", guarded_move(real_rename)),
    ):
        yield

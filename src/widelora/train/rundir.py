"""The run folder: never overwrite a user's files, never let two runs share one folder, name the path on
failure.

A folder is accepted when it is absent or empty, or when it holds a widelora run of the same config and the
caller resumes (`finetune --resume`, `run_trial`). Anything else — a file, a folder of someone's files, a run
of another config, a run whose process still holds `run.lock` — is refused with a message that says what to
do. The lock is a file created exclusively and holding `host:pid`; a lock left by a process that died on this
host is stale and taken over."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from widelora.errors import FileProblem
from widelora.files import atomic_write_text
from widelora.train.config import RunConfig

LOCK = "run.lock"
CONFIG = "config.json"
RESULT = "result.json"

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space, then continue the run with --resume",
    errno.EDQUOT: "the disk quota is exhausted: free some space, then continue the run with --resume",
    errno.EROFS: "the file system is read-only: choose a folder you can write to",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
}


@contextlib.contextmanager
def file_errors(run_dir: Path) -> Iterator[None]:
    """Turn an OSError while writing the run (full disk, read-only folder, ...) into a FileProblem with the
    path."""
    try:
        yield
    except FileProblem:
        raise
    except OSError as exc:
        path = exc.filename or run_dir
        raise FileProblem(path, exc.strerror or str(exc), _HINTS.get(exc.errno, "")) from exc


def read_json(path: Path) -> Any:
    """A JSON file of the run; a damaged one is a FileProblem naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FileProblem(
            path, f"cannot be read as JSON ({exc})", "restore it or use a new run folder"
        ) from None


def _is_run_config(saved: Any) -> bool:
    """A run's config.json: RunConfig keys only (an older run may lack newer keys), naming a model and a
    task."""
    return isinstance(saved, dict) and {"model", "task"} <= set(saved) <= set(RunConfig.keys())


def _differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Keys (other than resume-free ones) whose value differs; keys absent from an older run's file take their
    defaults."""
    before = {**RunConfig().to_dict(), **saved}
    now = cfg.to_dict()
    free = RunConfig.resume_free_keys()
    return sorted(k for k in now if k not in free and json.dumps(before.get(k)) != json.dumps(now[k]))


class RunFolder:
    """One run's folder, checked and locked for this process (only the main process writes or locks)."""

    def __init__(self, path: str | os.PathLike, cfg: RunConfig, resume: bool, writer: bool = True):
        self.path = Path(path)
        self.cfg = cfg
        self.resume = resume
        self.writer = writer
        self._locked = False

    # -- checks, before anything is written
    def check(self) -> None:
        """Refuse a folder this run must not write into (see the module docstring)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise FileProblem(path, "is a file, not a folder", "give --out a folder (new or empty)")
        entries = {p.name for p in path.iterdir()} - {LOCK} if path.is_dir() else set()
        if not entries:
            return
        if CONFIG not in entries:
            raise FileProblem(
                path,
                f"is not empty and holds no widelora run ({', '.join(sorted(entries)[:3])}, ...)",
                "choose a new or empty folder for --out; widelora does not write over other files",
            )
        saved = read_json(path / CONFIG)
        if not _is_run_config(saved):
            raise FileProblem(
                path,
                f"is not empty and holds no widelora run (its {CONFIG} is not a run config)",
                "choose a new or empty folder for --out; widelora does not write over other files",
            )
        diff = _differences(saved, self.cfg)
        other = f" with a different config (keys {diff})" if diff else ""
        if not self.resume:
            raise FileProblem(
                path,
                f"already holds a run{other}",
                f"choose another --out, or continue that run with --resume {path}",
            )
        if diff:
            raise FileProblem(
                path, f"holds a run{other}", "resume with the same config or use a new run folder"
            )

    def finished_result(self) -> dict[str, Any] | None:
        """The result of a run that already ended (done or diverged): it is not trained again."""
        result_path = self.path / RESULT
        if not (self.resume and result_path.is_file()):
            return None
        previous = read_json(result_path)
        ended = isinstance(previous, dict) and previous.get("status") in ("done", "diverged")
        return previous if ended else None

    # -- the lock
    def lock(self) -> None:
        """Create `run.lock` exclusively; a live holder is a FileProblem, a dead one's lock is taken over."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock.read_text(encoding="utf-8", errors="replace").strip() if lock.exists() else ""
                if not _is_stale(lock, holder):
                    raise FileProblem(
                        self.path,
                        f"is in use by another widelora run ({holder})",
                        f"wait for it to finish, or delete {lock} if that process is gone",
                    ) from None
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self._locked = True
            return
        raise FileProblem(lock, "could not be created", "another run keeps taking this folder")

    def unlock(self) -> None:
        if self._locked:
            self._locked = False
            with contextlib.suppress(OSError):
                (self.path / LOCK).unlink()

    def __enter__(self) -> Self:
        with file_errors(self.path):
            self.check()
            self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # -- writing
    def write_config(self) -> None:
        if self.writer:
            atomic_write_text(self.path / CONFIG, json.dumps(self.cfg.to_dict(), indent=1))

    def record_failure(self, exc: BaseException) -> None:
        """Best effort (a full disk may refuse even this): mark this run failed in its result.json."""
        from widelora.train.checkpoint import latest_checkpoint

        with contextlib.suppress(OSError):
            if self.writer and self._locked:
                ckpt = latest_checkpoint(self.path)
                error = f"{type(exc).__name__}: {exc}"
                self.write_result({"status": "failed", "final": {}, "error": error, "run_dir": str(self.path),
                                   "checkpoint": str(ckpt) if ckpt else None})  # fmt: skip

    def write_result(self, result: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_text(self.path / RESULT, json.dumps(result, indent=1))


def _is_stale(lock: Path, holder: str) -> bool:
    """A lock is stale when its process, on this host, no longer runs (a lock from another host is trusted).
    An empty lock is being written by its creator unless it is older than a few seconds."""
    if not holder:
        with contextlib.suppress(OSError):
            return time.time() - lock.stat().st_mtime > 10
        return True
    host, _, pid_text = holder.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False

"""Who is driving a sweep: each driver process registers itself in the store and keeps a heartbeat there.

A trial is claimed by one driver at a time. A ``running`` trial may be taken back only when its driver is
really gone: on this host, its process no longer exists (or its pid now belongs to another process, told apart
by the process start time); on another host, its heartbeat is older than ``stale_after`` seconds. A driver
that is merely slow keeps its trials, so no trial ever runs twice.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 300.0


@dataclass(frozen=True)
class DriverInfo:
    """A row of the ``drivers`` table."""

    id: str
    host: str
    pid: int
    token: str
    heartbeat: float
    stopped: float | None


def process_token(pid: int) -> str:
    """Start time of process ``pid`` (Linux ``/proc``), so a reused pid is not taken for the old process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of stat: starttime (clock ticks since boot)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def driver_alive(
    info: DriverInfo | None, now: float | None = None, stale_after: float = STALE_AFTER_SECONDS
) -> bool:
    """Whether the driver that owns a trial may still be running it (see the module docstring)."""
    if info is None or info.stopped is not None:
        return False
    if info.host == socket.gethostname():
        if not pid_alive(info.pid):
            return False
        token = process_token(info.pid)
        return not (info.token and token and token != info.token)
    return (now if now is not None else time.time()) - info.heartbeat < stale_after


class DriverLease:
    """This process's registration as a driver of one store, with a heartbeat thread while it is held."""

    def __init__(self, store_path: str | Path, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = process_token(self.pid)
        self._path = str(Path(store_path).resolve())  # the heartbeat must not follow a later chdir
        self._interval = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin the heartbeat (the store inserts the driver's row itself, in ``register_driver``)."""
        self._thread = threading.Thread(target=self._beat, name=f"widelora-heartbeat-{self.id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        conn = sqlite3.connect(self._path, timeout=60.0, isolation_level=None)
        try:
            while not self._stop.wait(self._interval):
                try:
                    conn.execute("UPDATE drivers SET heartbeat = ? WHERE id = ?", (time.time(), self.id))
                except sqlite3.OperationalError:  # busy for a minute: the next beat tries again
                    continue
        finally:
            conn.close()

"""The store's SQLite schema, and opening a file as a store: checked, created, or migrated in place.

A path that is a folder, a file that is not a SQLite database, or a database that is not a widelora store is a
`FileProblem` naming the path. An older store is migrated in one transaction when it is opened, so its results
are kept; a store written by a newer widelora is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from widelora.errors import FileProblem

SCHEMA_VERSION = 2
STORE_HINT = "give a sweep's results.sqlite, or the name of a new file"

TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE trials (
    id TEXT PRIMARY KEY,
    idx INTEGER NOT NULL,
    config TEXT NOT NULL,
    labels TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_dir TEXT,
    checkpoint TEXT,
    worker TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    owner TEXT
);
CREATE TABLE metrics (
    trial_id TEXT NOT NULL REFERENCES trials(id),
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (trial_id, step, name)
);
CREATE TABLE finals (
    trial_id TEXT NOT NULL REFERENCES trials(id),
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (trial_id, name)
);
CREATE TABLE drivers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    token TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    stopped REAL
);
"""


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` as a store connection (autocommit; transactions are explicit), or raise FileProblem."""
    if path.is_dir():
        raise FileProblem(
            path, "is a folder, not a sweep store", f"give a file such as {path / 'results.sqlite'}"
        )
    if not _empty_or_sqlite(
        path
    ):  # SQLite would take a short text file for an empty database and overwrite it
        raise FileProblem(
            path, "cannot be opened as a sweep store (file is not a database: no SQLite header)", STORE_HINT
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.DatabaseError) as exc:
        raise FileProblem(path, f"cannot be opened as a sweep store ({exc})", STORE_HINT) from None
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _empty_or_sqlite(path: Path) -> bool:
    """True for a new or empty file, or one that starts with SQLite's 16-byte header."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except (FileNotFoundError, NotADirectoryError):
        return True  # a new store, or one connect() reports
    return not head or head == b"SQLite format 3\x00"


def prepare(conn: sqlite3.Connection, path: Path, store_dir: Path) -> None:
    """Create the tables in a new file, or migrate an older store to :data:`SCHEMA_VERSION`."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            for stmt in filter(None, (s.strip() for s in TABLES.split(";"))):
                conn.execute(stmt)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        else:
            if not {"meta", "trials"} <= tables:
                raise FileProblem(path, "is a SQLite database but not a widelora sweep store", STORE_HINT)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 1
            if version > SCHEMA_VERSION:
                raise FileProblem(
                    path,
                    f"was written by a newer widelora (store schema {version}; this one "
                    f"reads up to {SCHEMA_VERSION})",
                    "upgrade widelora to read it",
                )
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](conn, store_dir)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _v1_to_v2(conn: sqlite3.Connection, store_dir: Path) -> None:
    """Add trial owners and the drivers table; make run folders independent of the working directory.

    Version 1 stored run folders relative to the directory the first driver ran in. A folder that exists from
    here becomes absolute; the default layout ``runs/<id>`` becomes relative to the store's own folder.
    """
    conn.execute("ALTER TABLE trials ADD COLUMN owner TEXT")
    drivers = next(s for s in TABLES.split(";") if "CREATE TABLE drivers" in s)
    conn.execute(drivers)
    for tid, run_dir in conn.execute("SELECT id, run_dir FROM trials WHERE run_dir IS NOT NULL").fetchall():
        p = Path(run_dir)
        if p.is_absolute():
            continue
        if p.exists():
            new = str(p.resolve())
        elif p.parts[-2:] == ("runs", tid):
            new = f"runs/{tid}"
        else:
            new = str(p.resolve())
        conn.execute("UPDATE trials SET run_dir = ? WHERE id = ?", (new, tid))


#: ``MIGRATIONS[v]`` turns a version-``v`` store into a version ``v + 1`` one, inside the opening transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection, Path], None]] = {1: _v1_to_v2}

"""The sweep store shared by several drivers: atomic claims, no trial run twice, finished trials never
overwritten, run folders independent of the working directory, bad store paths, and migration of old
stores."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from widelora.errors import FileProblem
from widelora.sweep import ResultStore, parse_spec, register_trial, run_sweep, unregister_trial
from widelora.sweep.grid import expand
from widelora.sweep.lease import DriverInfo, driver_alive, process_token
from widelora.testing.toy_trial import run_toy_trial


def toy_spec(axes: str, base: str = "{steps: 20, width: 16}", name: str = "toy", trial: str = "toy") -> str:
    return textwrap.dedent(f"""\
        name: {name}
        trial_fn: {trial}
        metric: test_loss
        goal: min
        base: {base}
        axes:
        """) + textwrap.indent(textwrap.dedent(axes), "  ")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _add_driver(
    store_path: Path,
    driver: str,
    pid: int,
    host: str | None = None,
    heartbeat: float | None = None,
    token: str = "",
) -> None:
    with sqlite3.connect(store_path) as conn:
        now = time.time()
        conn.execute(
            "INSERT INTO drivers VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (driver, host or socket.gethostname(), pid, token, now, heartbeat or now),
        )


# -- two drivers on one store --------------------------------------------------------------------------------
@pytest.fixture
def nested_driver(tmp_path: Path):
    """A trial function that, while running the first trial, starts a second driver on the same store."""
    runs: list[str] = []
    state: dict = {}

    def trial(config: dict, run_dir: Path, on_metrics=None) -> dict:
        runs.append(run_dir.name)
        if not state.get("started"):
            state["started"] = True
            with ResultStore(state["store"]) as other:  # a second driver, with its own connection
                state["second"] = run_sweep(state["spec"], other, workers=0, threads=1)
        return {"status": "done", "final": {"test_loss": float(config["lr"])}}

    register_trial("nested-driver")(trial)
    state["spec"] = parse_spec(toy_spec("lr: [1e-3, 2e-3, 3e-3, 4e-3]\n", trial="nested-driver"))
    state["store"] = tmp_path / "s.sqlite"
    yield state, runs
    unregister_trial("nested-driver")


def test_two_drivers_share_the_work_and_never_run_a_trial_twice(nested_driver) -> None:
    """Driver A runs trial 0; meanwhile driver B starts on the same store. B must leave A's running trial
    alone (A is alive) and run the other three; A then finds nothing left. Every trial runs exactly once."""
    state, runs = nested_driver
    with ResultStore(state["store"]) as store:
        first = run_sweep(state["spec"], store, workers=0, threads=1)
        recs = store.trials()
    second = state["second"]
    assert sorted(runs) == sorted(r.id for r in recs)  # each trial ran once
    assert len(first.ran) == 1 and len(second.ran) == 3 and not set(first.ran) & set(second.ran)
    assert all(r.status == "done" and r.attempts == 1 for r in recs)
    assert {r.id: r.final["test_loss"] for r in recs} == {r.id: r.config["lr"] for r in recs}


def test_finished_trial_is_never_overwritten(tmp_path: Path) -> None:
    trials = expand({"steps": 5}, {"lr": [1e-2, 1e-3]})
    with ResultStore(tmp_path / "s.sqlite") as store:
        store.add_trials(trials)
        order = [t.id for t in trials]
        rec = store.claim(order, "driver-a")
        assert store.finish(rec.id, "done", {"test_loss": 0.5}, driver="driver-a")
        # a late or stray report (another driver, or the same one twice) cannot turn `done` into `failed`
        assert not store.finish(rec.id, "failed", error="worker died", driver="driver-b")
        assert not store.finish(rec.id, "failed", error="again")
        store.log_metrics(rec.id, 3, {"loss": 9.0}, driver="driver-b")
        other = store.claim(order, "driver-a")
        assert not store.finish(other.id, "done", {"test_loss": 1.0}, driver="driver-b")  # not its trial
        kept = store.trial(rec.id)
        assert kept.status == "done" and kept.final == {"test_loss": 0.5} and kept.error is None
        assert store.metrics(rec.id) == {}
        assert store.trial(other.id).status == "running"


def test_running_trials_are_reclaimed_only_from_drivers_that_are_gone(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    trials = expand({"steps": 5}, {"lr": [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]})
    order = [t.id for t in trials]
    with ResultStore(path) as store:
        store.add_trials(trials)
        now = time.time()
        _add_driver(path, "alive", os.getpid(), token=process_token(os.getpid()))
        _add_driver(path, "dead", _dead_pid())
        _add_driver(path, "reused-pid", os.getpid(), token="not-my-start-time")
        _add_driver(path, "remote-fresh", 1, host="another-host", heartbeat=now)
        _add_driver(path, "remote-stale", 1, host="another-host", heartbeat=now - 3600)
        owners = ["alive", "dead", "reused-pid", "remote-fresh", "remote-stale"]
        claimed = {store.claim(order, owner).id: owner for owner in owners}
        back = store.reclaim_orphans()
        assert sorted(claimed[t] for t in back) == ["dead", "remote-stale", "reused-pid"]
        assert {r.owner for r in store.trials() if r.status == "running"} == {"alive", "remote-fresh"}
    assert not driver_alive(None)
    assert not driver_alive(DriverInfo("x", socket.gethostname(), os.getpid(), "", time.time(), time.time()))


@pytest.mark.integration
def test_two_driver_processes_on_one_store(tmp_path: Path) -> None:
    """Two `widelora sweep` processes started together on one store: all trials done, each exactly once."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        toy_spec("lr: [1e-2, 2e-2, 3e-2, 4e-2, 5e-2, 6e-2]\n", base="{steps: 20, eval_every: 5, sleep: 0.02}")
    )
    store_path = tmp_path / "s.sqlite"
    cmd = [
        sys.executable,
        "-c",
        "from widelora.cli import app; app()",
        "sweep",
        str(spec_file),
        "--store",
        str(store_path),
        "--workers",
        "1",
        "--threads",
        "1",
        "--no-report",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with ResultStore(store_path) as store:
        recs = store.trials()
        drivers = store.drivers()
    assert len(recs) == 6 and all(r.status == "done" and r.attempts == 1 for r in recs)
    for r in recs:  # the toy trial appends one line per start: one start each
        assert len((tmp_path / "runs" / r.id / "starts.log").read_text().splitlines()) == 1
    assert len(drivers) == 2 and all(d.stopped is not None for d in drivers.values())


# -- run folders ---------------------------------------------------------------------------------------------
def test_run_folders_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store opened by a relative path from A keeps its trials' folders when the sweep is rerun from B: an
    interrupted trial resumes in its own folder instead of restarting in a new one."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    spec = parse_spec(toy_spec("lr: [1e-2]\n", base="{steps: 20, eval_every: 5}"))
    monkeypatch.chdir(first)
    with ResultStore("sweep/s.sqlite") as store:
        store.add_trials(spec.trials())
        rec = store.claim([spec.trials()[0].id], "crashed-driver")
    expected = first / "sweep" / "runs" / rec.id
    assert rec.run_dir == str(expected)
    run_toy_trial({**rec.config, "steps": 10}, expected)  # the crashed driver got half-way: checkpoint at 10
    _add_driver(first / "sweep" / "s.sqlite", "crashed-driver", _dead_pid())
    monkeypatch.chdir(second)
    with ResultStore(first / "sweep" / "s.sqlite") as store:
        assert store.trial(rec.id).run_dir == str(expected)
        out = run_sweep(spec, store, workers=0, threads=1)
        done = store.trial(rec.id)
    assert out.ran == [rec.id] and done.status == "done" and done.attempts == 2
    assert len((expected / "starts.log").read_text().splitlines()) == 2  # resumed in the same folder
    assert not list(second.rglob("*"))  # nothing was created relative to the new working directory
    with sqlite3.connect(first / "sweep" / "s.sqlite") as conn:
        assert conn.execute("SELECT run_dir FROM trials").fetchone()[0] == f"runs/{rec.id}"


def test_runs_dir_outside_the_store_folder_is_stored_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    trials = expand({"steps": 5}, {"lr": [1e-2]})
    with ResultStore(tmp_path / "store" / "s.sqlite") as store:
        store.add_trials(trials, runs_dir="elsewhere")
        assert store.trials()[0].run_dir == str(tmp_path / "elsewhere" / trials[0].id)


# -- files that are not stores, and stores of an older schema ------------------------------------------------
def test_paths_that_are_not_stores_are_clear_file_problems(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a database\n" * 50)
    with pytest.raises(
        FileProblem, match=rf"{text}: cannot be opened as a sweep store \(file is not a database"
    ):
        ResultStore(text)
    assert text.read_text().startswith("these are my notes")  # untouched
    with pytest.raises(FileProblem, match=rf"{tmp_path}: is a folder, not a sweep store"):
        ResultStore(tmp_path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(FileProblem, match="is a SQLite database but not a widelora sweep store"):
        ResultStore(other)
    with ResultStore(tmp_path / "new.sqlite") as store:
        store.set_meta("schema_version", 99)
    with pytest.raises(FileProblem, match=r"newer widelora \(store schema 99"):
        ResultStore(tmp_path / "new.sqlite")
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    with pytest.raises(FileProblem, match="cannot be opened as a sweep store"):
        ResultStore(blocked / "s.sqlite")


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE trials (
    id TEXT PRIMARY KEY, idx INTEGER NOT NULL, config TEXT NOT NULL, labels TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    error TEXT, attempts INTEGER NOT NULL DEFAULT 0, run_dir TEXT, checkpoint TEXT, worker TEXT,
    created REAL NOT NULL, started REAL, finished REAL);
CREATE TABLE metrics (trial_id TEXT NOT NULL REFERENCES trials(id), step INTEGER NOT NULL, name TEXT NOT NULL,
    value REAL, PRIMARY KEY (trial_id, step, name));
CREATE TABLE finals (trial_id TEXT NOT NULL REFERENCES trials(id), name TEXT NOT NULL, value REAL,
    PRIMARY KEY (trial_id, name));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO meta VALUES ('name', '"toy"');
"""


def test_version_1_store_is_migrated_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written before drivers and store-relative folders opens, keeps its results and resumes."""
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(toy_spec("lr: [1e-2, 2e-2]\n", base="{steps: 10, eval_every: 5}"))
    done, cut = spec.trials()
    path = tmp_path / "sweeps" / "toy" / "results.sqlite"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
        for t, status in ((done, "done"), (cut, "running")):
            conn.execute(
                "INSERT INTO trials (id, idx, config, labels, status, attempts, run_dir, created) "
                "VALUES (?, ?, ?, ?, ?, 1, ?, 0)",
                (t.id, t.index, __import__("json").dumps(t.config), "{}", status, f"sweeps/toy/runs/{t.id}"),
            )
        conn.execute("INSERT INTO finals VALUES (?, 'test_loss', 0.125)", (done.id,))
    (tmp_path / "sweeps" / "toy" / "runs" / done.id).mkdir(parents=True)  # v1 folder, relative to the old cwd
    with ResultStore(path) as store:
        assert store.get_meta("schema_version") == 2
        recs = {r.id: r for r in store.trials()}
        assert recs[done.id].final == {"test_loss": 0.125}
        assert recs[done.id].run_dir == str(tmp_path / "sweeps" / "toy" / "runs" / done.id)
        assert recs[cut.id].run_dir == str(path.parent / "runs" / cut.id)
        assert store.reclaim_orphans() == [cut.id]  # a v1 running trial has no live driver
        out = run_sweep(spec, store, workers=0, threads=1)
        assert out.ran == [cut.id] and store.trial(done.id).final == {"test_loss": 0.125}
    with ResultStore(path) as store:  # opening again changes nothing
        assert store.get_meta("schema_version") == 2 and store.counts()["done"] == 2


def test_driver_heartbeat_is_kept_while_the_lease_is_held(tmp_path: Path) -> None:
    from widelora.sweep.lease import DriverLease

    with ResultStore(tmp_path / "s.sqlite") as store:
        lease = DriverLease(store.path, heartbeat=0.05)
        store.register_driver(lease)
        first = store.drivers()[lease.id].heartbeat
        lease.start()
        try:
            deadline = time.time() + 10
            while store.drivers()[lease.id].heartbeat == first and time.time() < deadline:
                time.sleep(0.05)
        finally:
            lease.stop()
        assert store.drivers()[lease.id].heartbeat > first
        store.unregister_driver(lease.id)
        assert store.drivers()[lease.id].stopped is not None

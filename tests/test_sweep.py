"""Sweeps: spec expansion and errors, the crash-safe store, local and Ray runners on a cheap toy trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from widelora.errors import UserError
from widelora.sweep import ResultStore, SpecError, get_trial, parse_spec, run_sweep, trial_id
from widelora.sweep.executors import execute_trial, normalize_result
from widelora.sweep.grid import Trial, expand
from widelora.testing.toy_trial import run_toy_trial

TOY = "toy"


def toy_spec(axes: str, base: str = "{steps: 20, width: 16}", name: str = "toy") -> str:
    return textwrap.dedent(f"""\
        name: {name}
        trial_fn: {TOY}
        metric: test_loss
        goal: min
        base: {base}
        axes:
        """) + textwrap.indent(textwrap.dedent(axes), "  ")


# -- specs ---------------------------------------------------------------------------------------------------
def test_spec_expands_product_with_stable_ids() -> None:
    spec = parse_spec(
        toy_spec("""\
        init: [init_a, init_b]
        lr: [1e-3, 1e-2, 1e-1]
        seed: [0, 1]
        """)
    )
    trials = spec.trials()
    assert len(trials) == 12
    assert len({t.id for t in trials}) == 12
    assert all(isinstance(t.config["lr"], float) for t in trials)  # 1e-3 is a float, not the string "1e-3"
    assert trials[0].config == {"steps": 20, "width": 16, "init": "init_a", "lr": 1e-3, "seed": 0}
    # Reordering the axes changes the order, never the ids: stored results stay attached to their trials.
    again = parse_spec(
        toy_spec("""\
        seed: [1, 0]
        lr: [1e-1, 1e-2, 1e-3]
        init: [init_b, init_a]
        """)
    ).trials()
    assert {t.id for t in again} == {t.id for t in trials}
    assert again[0].id != trials[0].id


def test_spec_range_and_setup_bundles() -> None:
    spec = parse_spec(
        toy_spec("""\
        lr: {min: 1e-4, max: 1e-2, num: 3}
        setup:
          - {label: PEFT default, init: kaiming, method: adamw}
          - {label: widelora, init: init_a, method: loraplus, ratio: 16}
        """)
    )
    assert spec.axes["lr"] == pytest.approx([1e-4, 1e-3, 1e-2])
    trials = spec.trials()
    assert len(trials) == 6
    wide = next(t for t in trials if t.labels["setup"] == "widelora")
    assert wide.config["method"] == "loraplus" and wide.config["ratio"] == 16
    assert (
        "setup" not in wide.config and "label" not in wide.config
    )  # labels name trials, they do not configure


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["lr", "rank", "seed", "init", "width"]),
        st.one_of(st.integers(-5, 5), st.floats(1e-6, 1.0), st.text(max_size=4)),
        min_size=1,
    )
)
def test_trial_id_ignores_key_order(config: dict) -> None:
    reordered = dict(reversed(list(config.items())))
    assert trial_id(config) == trial_id(reordered)
    assert len(trial_id(config)) == 12


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_expand_size_is_the_product(sizes: list[int]) -> None:
    names = ["lr", "rank", "seed"][: len(sizes)]
    axes = {n: [i + 1 for i in range(k)] for n, k in zip(names, sizes, strict=True)}
    trials = expand({"init": "init_a"}, axes)
    expected = 1
    for k in sizes:
        expected *= k
    assert len(trials) == expected == len({t.id for t in trials})
    assert all(isinstance(t, Trial) for t in trials)


def test_malformed_yaml_names_the_line() -> None:
    text = "name: toy\nbase: {steps: 3}\naxes:\n  lr: [1e-3, 1e-2\n  seed: [0]\n"
    with pytest.raises(SpecError, match=r"line \d+.*malformed YAML"):
        parse_spec(text, source="bad.yaml")


def test_unknown_axis_names_line_and_valid_keys() -> None:
    text = toy_spec("""\
        init: [init_a]
        learning_rate: [1e-3]
        """)
    with pytest.raises(SpecError) as err:
        parse_spec(text, source="spec.yaml")
    msg = str(err.value)
    assert "spec.yaml line 8" in msg and "'learning_rate'" in msg
    assert "valid keys:" in msg and " lr," in msg and "seed" in msg


def test_unknown_top_level_and_base_keys() -> None:
    with pytest.raises(SpecError, match=r"line 2: unknown top-level key 'axis'.*valid keys: axes, base"):
        parse_spec("name: t\naxis: {lr: [1]}\nbase: {}\n")
    with pytest.raises(SpecError, match=r"line 4: unknown base key 'stepz'"):
        parse_spec("name: t\ntrial_fn: toy\nbase:\n  stepz: 3\naxes: {lr: [1e-3]}\n")


@pytest.mark.parametrize(
    ("axes", "pattern"),
    [
        ("lr: []\n", "non-empty list"),
        ("lr: [0.1, -1]\n", "lr values must be positive"),
        ("lr: {min: 1e-3, max: 1e-1}\n", "min, max, num required"),
        ("lr: [1e-3, 1e-3]\n", "same trial config"),
        ("setup: [{init: init_a}]\n", "with a 'label'"),
    ],
)
def test_bad_axes_are_clear(axes: str, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        parse_spec(toy_spec(axes))


def test_duplicate_key_and_bad_goal() -> None:
    with pytest.raises(SpecError, match=r"line 4: duplicate key 'lr' \(first at line 3\)"):
        parse_spec("base: {}\naxes:\n  lr: [1]\n  lr: [2]\n")
    with pytest.raises(SpecError, match="goal 'up' must be 'max' or 'min'"):
        parse_spec("goal: up\ntrial_fn: toy\nbase: {}\naxes: {lr: [1]}\n")


# -- store ---------------------------------------------------------------------------------------------------
def _trials(n: int = 3) -> list[Trial]:
    return expand({"steps": 5}, {"lr": [10.0 ** -(i + 1) for i in range(n)]})


def test_store_lifecycle_and_reclaim(tmp_path: Path) -> None:
    trials = _trials()
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.add_trials(trials, tmp_path / "runs") == 3
        assert store.add_trials(trials) == 0  # same ids: nothing new, nothing reset
        order = [t.id for t in trials]
        first = store.claim(order, "driver-a", "w0")
        assert first is not None and first.id == trials[0].id and first.owner == "driver-a"
        store.log_metrics(first.id, 1, {"loss": 2.0, "note": "text is skipped"}, driver="driver-a")
        store.log_metrics(
            first.id, 1, {"loss": 1.5}, driver="driver-a"
        )  # a resumed trial re-logs: overwritten
        assert store.finish(first.id, "done", {"test_loss": 0.25, "nan": float("nan")}, driver="driver-a")
        second = store.claim(order, "driver-b")
        assert second is not None and second.id == trials[1].id
        assert store.counts()["running"] == 1
    with ResultStore(tmp_path / "s.sqlite") as store:  # "restart": driver-b never registered, so it is gone
        assert store.reclaim_orphans() == [trials[1].id]
        rec = store.trial(trials[0].id)
        assert rec.status == "done" and rec.final["test_loss"] == 0.25 and rec.attempts == 1
        assert store.metrics(trials[0].id)[trials[0].id]["loss"] == [(1, 1.5)]
        assert [r.id for r in store.pending()] == [trials[1].id, trials[2].id]
        assert rec.run_dir == str(tmp_path / "runs" / trials[0].id)
        with pytest.raises(UserError, match="not a final status"):
            store.finish(trials[1].id, "running")


def test_store_survives_kill_mid_write(tmp_path: Path) -> None:
    """A process killed inside a transaction (after writing, before COMMIT) leaves the store as it was."""
    path = tmp_path / "s.sqlite"
    trials = _trials(2)
    with ResultStore(path) as store:
        store.add_trials(trials)
        store.claim([trials[0].id], "gone-driver")
    code = textwrap.dedent(f"""
        import os, signal
        from widelora.sweep.store import ResultStore
        s = ResultStore({str(path)!r})
        with s._tx() as c:
            c.execute("UPDATE trials SET status = 'done' WHERE id = ?", ({trials[0].id!r},))
            c.execute("INSERT INTO finals VALUES (?, 'test_loss', 0.5)", ({trials[0].id!r},))
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with ResultStore(path) as store:
        assert store.integrity_ok()
        rec = store.trial(trials[0].id)
        assert rec.status == "running" and rec.final == {}
        assert store.reclaim_orphans() == [trials[0].id]


def test_store_rejects_directory_and_other_sweep(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a folder"):
        ResultStore(tmp_path)
    spec_a = parse_spec(toy_spec("lr: [1e-2]\n", name="a"))
    spec_b = parse_spec(toy_spec("lr: [1e-2]\n", name="b"))
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert run_sweep(spec_a, store, workers=0, threads=1).counts["done"] == 1
        with pytest.raises(ValueError, match="holds sweep 'a', not 'b'"):
            run_sweep(spec_b, store)


# -- trial contract ------------------------------------------------------------------------------------------
def test_execute_trial_turns_exceptions_into_failed(tmp_path: Path) -> None:
    res = execute_trial(run_toy_trial, {"fail": "boom"}, tmp_path / "r")
    assert res["status"] == "failed" and res["error"].startswith("RuntimeError: boom")
    assert normalize_result(3)["status"] == "failed"
    assert "status 'ok'" in normalize_result({"status": "ok"})["error"]
    assert normalize_result({"status": "done", "final": {"a": 1}})["final"] == {"a": 1}


def test_run_sweep_checks_arguments(tmp_path: Path) -> None:
    spec = parse_spec(toy_spec("lr: [1e-2]\n"))
    with ResultStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(ValueError, match="backend: 'slurm' is not one of local, ray"):
            run_sweep(spec, store, backend="slurm")
        with pytest.raises(ValueError, match="workers: -1"):
            run_sweep(spec, store, workers=-1)
        with pytest.raises(
            UserError, match=r"'no_such_module:f' is not a registered trial function; valid: .*toy"
        ):
            run_sweep(spec, store, trial_fn="no_such_module:f")
        assert store.trials() == []  # nothing registered when a call fails


# -- runners -------------------------------------------------------------------------------------------------
MIXED_AXES = """\
    lr: [3e-2, 1e4]
    setup:
      - {label: ok-a, init: init_a}
      - {label: ok-b, init: init_b}
      - {label: bad-init, init: nonsense}
      - {label: raises, fail: planned failure}
      - {label: crashes, exit: 7}
    """


def test_local_sweep_records_failed_diverged_and_crashed(tmp_path: Path) -> None:
    spec = parse_spec(toy_spec(MIXED_AXES))
    with ResultStore(tmp_path / "s.sqlite") as store:
        out = run_sweep(spec, store, workers=2, threads=1)
        recs = {(r.labels["setup"], r.labels["lr"]): r for r in store.trials()}
    assert out.counts == {"pending": 0, "running": 0, "done": 2, "diverged": 2, "failed": 6}
    assert recs[("ok-a", 3e-2)].status == "done" and recs[("ok-a", 3e-2)].final["test_loss"] < 0.05
    assert recs[("ok-a", 1e4)].status == "diverged" and "diverged at step" in recs[("ok-a", 1e4)].error
    assert "ValueError: init: 'nonsense'" in recs[("bad-init", 3e-2)].error
    assert "RuntimeError: planned failure" in recs[("raises", 3e-2)].error
    assert "worker process died (exit code 7)" in recs[("crashes", 3e-2)].error


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
def test_kill_9_mid_trial_resumes_without_rerunning(tmp_path: Path) -> None:
    """kill -9 the sweep driver while a trial runs: rerun finishes everything, finished trials are not rerun,
    the interrupted one resumes from its checkpoint and ends exactly where an uninterrupted run does."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        toy_spec("lr: [1e-2, 2e-2, 3e-2]\n", base="{steps: 60, eval_every: 10, sleep: 0.03}")
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
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "runs"

    def second_trial_checkpointed() -> bool:
        if not store_path.exists():
            return False
        with ResultStore(store_path) as s:
            recs = s.trials()
        running = [r for r in recs if r.status == "running"]
        return (
            sum(r.status == "done" for r in recs) >= 1
            and bool(running)
            and (runs / running[0].id / "toy_checkpoint.safetensors").exists()
        )

    try:
        _wait_for(second_trial_checkpointed, 120, "a finished trial and a checkpointed running one")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with ResultStore(store_path) as s:
        before = {r.id: r for r in s.trials()}
    interrupted = [r for r in before.values() if r.status == "running"]
    finished = [r for r in before.values() if r.status == "done"]
    assert len(interrupted) == 1 and finished
    time.sleep(1.0)  # the orphaned worker notices its driver is gone and exits
    rerun = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    with ResultStore(store_path) as s:
        after = {r.id: r for r in s.trials()}
    assert all(r.status == "done" for r in after.values())
    for r in finished:  # nothing lost, nothing rerun
        assert after[r.id].attempts == 1 and after[r.id].final == r.final
        assert len((runs / r.id / "starts.log").read_text().splitlines()) == 1
    cut = interrupted[0]
    assert after[cut.id].attempts == 2
    assert len((runs / cut.id / "starts.log").read_text().splitlines()) == 2
    fresh = execute_trial(run_toy_trial, cut.config, tmp_path / "fresh")
    assert after[cut.id].final["test_loss"] == pytest.approx(fresh["final"]["test_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("local") / "s.sqlite"
    spec = parse_spec(toy_spec("init: [init_a, init_b]\nlr: [1e-2, 1e-1]\nseed: [0, 1]\n"))
    with ResultStore(path) as store:
        out = run_sweep(spec, store, workers=2, threads=1)
    assert out.counts["done"] == 8
    return path


@pytest.mark.integration
def test_ray_matches_local(local_store: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    spec = parse_spec(toy_spec("init: [init_a, init_b]\nlr: [1e-2, 1e-1]\nseed: [0, 1]\n"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ResultStore(tmp_path / "ray.sqlite") as store:
            out = run_sweep(spec, store, backend="ray", workers=2, threads=1)
            ray_recs = {r.id: r for r in store.trials()}
            ray_curves = store.metrics()
    finally:
        ray.shutdown()
    assert out.counts["done"] == 8
    with ResultStore(local_store) as store:
        local_recs = {r.id: r for r in store.trials()}
        local_curves = store.metrics()
    assert set(ray_recs) == set(local_recs)
    for tid, rec in local_recs.items():
        # bit-identical: same seeds, same thread count; cpu_s is a timing, not a result
        untimed = {k: v for k, v in rec.final.items() if k != "cpu_s"}
        assert {k: v for k, v in ray_recs[tid].final.items() if k != "cpu_s"} == untimed
    assert ray_curves == local_curves  # metrics over time travelled from the Ray tasks to the driver's store
    assert json.loads(json.dumps(out.counts)) == out.counts


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parent.parent / "examples" / "sweeps").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_example_specs_parse(path: Path) -> None:
    from widelora.sweep import load_spec

    spec = load_spec(path)
    trials = spec.trials()
    assert len(trials) >= 2 and spec.metric
    assert "seed" in spec.axes  # an lr axis is optional: a setup may choose its own learning rate


# -- trial functions: a registry, never an import from a spec ------------------------------------------------
def test_spec_cannot_import_arbitrary_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """`trial_fn: os:system` used to import and call any function; now only registered names are accepted."""
    imported: list[str] = []
    real_import = __import__

    def spy(name: str, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", spy)
    with pytest.raises(
        SpecError,
        match=r"line 2: trial_fn: 'os:system' is not a registered trial function; "
        r"valid: finetune, toy",
    ):
        parse_spec("name: t\ntrial_fn: os:system\nbase: {}\naxes: {lr: [1e-3]}\n")
    monkeypatch.undo()
    assert "os" not in imported
    with pytest.raises(UserError, match="valid: finetune, toy"):
        get_trial("widelora.sweep.toy:nope")
    # the built-in names earlier specs spelled as "module:function" still mean the built-ins
    assert get_trial("widelora.sweep.toy:run_toy_trial").name == "toy"
    assert get_trial("widelora.train:run_trial").name == "finetune"


def test_toy_trial_is_imported_only_when_a_spec_names_it() -> None:
    """The sweep package never loads the test double on import; naming `toy` registers it then."""
    code = (
        "import sys\n"
        "import widelora.sweep as s\n"
        "assert 'widelora.testing.toy_trial' not in sys.modules, 'imported eagerly'\n"
        "assert 'toy' in s.trial_names()\n"
        "assert s.get_trial('toy').fn.__module__ == 'widelora.testing.toy_trial'\n"
        "assert 'widelora.testing.toy_trial' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_finetune_spec_is_checked_against_run_config() -> None:
    """Keys come from RunConfig itself (no stale copy); every trial's values are validated before a run."""
    from widelora.train import RunConfig

    with pytest.raises(SpecError, match=r"unknown base key 'learning_rate'.*valid keys:.*max_grad_norm"):
        parse_spec("name: t\nbase: {learning_rate: 1e-3}\naxes: {seed: [0]}\n")
    with pytest.raises(SpecError, match=r"trial \{'rank': -2\} is not a valid finetune config: rank=-2"):
        parse_spec("name: t\nbase: {steps: 3}\naxes: {rank: [4, -2]}\n")
    spec = parse_spec("name: t\nbase: {steps: 3}\naxes: {rank: [4, 8]}\n")
    assert spec.trial_fn == "finetune" and len(spec.trials()) == 2
    assert set(get_trial("finetune").config_keys) == set(RunConfig.keys()) | {"preset"}

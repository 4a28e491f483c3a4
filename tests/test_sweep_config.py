"""What a spec puts into each trial's config reaches the trial function unchanged: explicit nulls (to switch
clipping off) and `setup: recommended`, on every executor."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from widelora.sweep import ResultStore, SpecError, parse_spec, register_trial, run_sweep, unregister_trial


def record_trial(config: dict, run_dir: Path, on_metrics=None) -> dict:
    """Writes the config it was given (a spawned worker's view comes back through the file)."""
    (run_dir / "config.json").write_text(json.dumps(config))
    return {"status": "done", "final": {"score": 1.0}}


@pytest.fixture
def recorder():
    register_trial("record", config_keys={"lr", "seed", "max_grad_norm", "epochs", "steps", "setup", "init"})(
        record_trial
    )
    yield
    unregister_trial("record")


def spec_text(body: str) -> str:
    return "name: rec\ntrial_fn: record\nmetric: score\n" + textwrap.dedent(body)


def configs_seen(store: ResultStore) -> dict[str, dict]:
    return {r.id: json.loads((Path(r.run_dir) / "config.json").read_text()) for r in store.trials()}


@pytest.mark.parametrize("workers", [0, 1])
def test_nulls_reach_the_trial_function(recorder, tmp_path: Path, workers: int) -> None:
    spec = parse_spec(
        spec_text("""\
        base: {max_grad_norm: null, steps: null, epochs: 1.0}
        axes:
          lr: [1e-3]
          init: [null, init_a]
        """)
    )
    assert all(t.config["max_grad_norm"] is None and t.config["steps"] is None for t in spec.trials())
    with ResultStore(tmp_path / "s.sqlite") as store:
        run_sweep(spec, store, workers=workers, threads=1)
        seen = configs_seen(store)
        stored = {r.id: r.config for r in store.trials()}
    assert seen == stored and len(seen) == 2
    for config in seen.values():
        assert "max_grad_norm" in config and config["max_grad_norm"] is None and config["steps"] is None
    assert sorted(str(c["init"]) for c in seen.values()) == ["None", "init_a"]


def test_finetune_trials_get_their_nulls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Through the built-in `finetune` trial, `max_grad_norm: null` reaches RunConfig (clipping off)."""
    from widelora.train import loop

    seen = []

    def fake_train(cfg, run_dir, on_metrics=None, resume=True, **options):  # options: e.g. the model cache
        seen.append(cfg)
        return {"status": "done", "final": {"accuracy": 0.5}, "error": None, "checkpoint": None}

    monkeypatch.setattr(loop, "train", fake_train)
    spec = parse_spec("name: ft\nbase: {max_grad_norm: null, steps: 3}\naxes: {seed: [0]}\n")
    with ResultStore(tmp_path / "s.sqlite") as store:
        out = run_sweep(spec, store, workers=0, threads=1)
    assert out.counts["done"] == 1 and len(seen) == 1
    assert seen[0].max_grad_norm is None


def test_setup_recommended_reaches_every_trial(recorder, tmp_path: Path) -> None:
    spec = parse_spec(
        spec_text("""\
        setup: recommended
        base: {steps: 3}
        axes:
          lr: [1e-3, 1e-2]
        """)
    )
    assert [t.config["setup"] for t in spec.trials()] == ["recommended", "recommended"]
    with ResultStore(tmp_path / "s.sqlite") as store:
        run_sweep(spec, store, workers=0, threads=1)
        assert [c["setup"] for c in configs_seen(store).values()] == ["recommended", "recommended"]


def test_setup_as_an_axis_value(recorder, tmp_path: Path) -> None:
    spec = parse_spec(
        spec_text("""\
        base: {steps: 3}
        axes:
          seed: [0]
          setup:
            - {label: PEFT default, init: kaiming}
            - recommended
        """)
    )
    trials = spec.trials()
    assert [t.labels["setup"] for t in trials] == ["PEFT default", "recommended"]
    assert trials[0].config == {"steps": 3, "seed": 0, "init": "kaiming"}
    assert trials[1].config == {"steps": 3, "seed": 0, "setup": "recommended"}
    with ResultStore(tmp_path / "s.sqlite") as store:
        run_sweep(spec, store, workers=0, threads=1)
        seen = configs_seen(store)
    assert seen[trials[1].id]["setup"] == "recommended" and "setup" not in seen[trials[0].id]


def test_setup_needs_a_trial_function_that_takes_it(recorder) -> None:
    with pytest.raises(
        SpecError, match=r"line 3: trial function 'toy' takes no 'setup' key; valid keys: .*lr"
    ):
        parse_spec("name: t\ntrial_fn: toy\nsetup: recommended\nbase: {}\naxes: {lr: [1e-3]}\n")
    with pytest.raises(SpecError, match="trial function 'toy' takes no 'setup' key"):
        parse_spec("name: t\ntrial_fn: toy\nbase: {}\naxes:\n  setup: [recommended]\n")
    with pytest.raises(SpecError, match="setup 3 must be a setup name"):
        parse_spec("name: t\ntrial_fn: record\nsetup: 3\nbase: {}\naxes: {lr: [1e-3]}\n")


def test_finetune_spec_with_setup_recommended() -> None:
    spec = parse_spec("name: ft\nsetup: recommended\nbase: {steps: 3}\naxes: {seed: [0, 1]}\n")
    assert [t.config["setup"] for t in spec.trials()] == ["recommended", "recommended"]
    with pytest.raises(SpecError, match="not a valid finetune config"):
        parse_spec("name: ft\nsetup: nonsense\nbase: {steps: 3}\naxes: {seed: [0]}\n")

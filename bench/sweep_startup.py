"""Sweeps that keep what they loaded: trials per hour of the demo's sweep with and without the start-up cache.

The demo's Init[A]-vs-Init[B] sweep (`widelora.experiments.demo_plan.init_spec`: MiniLM, Wikipedia topics,
the evaluation protocol's base), shortened to `--steps` steps and `--eval-examples` held-out examples per
evaluation so that it runs in minutes, driven by `widelora.sweep.run_sweep` with one local worker process of
one thread, exactly as `widelora demo` drives it. Two trial functions:

- ``fresh``  every trial loads the tokenizer, tokenizes the data and loads the model again (before);
- ``kept``   `run_trial` as shipped: the worker keeps them between trials (after; `widelora.train.cache`).

The two sweeps alternate (`--rounds` each) so machine load hits both alike. Reported: trials per hour from the
sweep's wall time, and from the trials' own CPU seconds (less noisy on a shared machine); and, measured
separately in this process, the start-up of one trial (`build_run`: tokenizer, data, model, adapters,
optimizer) fresh vs kept, median of `--startup-repeats`.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/sweep_startup.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from widelora.experiments.demo_plan import DemoPlan, init_spec
from widelora.sweep import ResultStore, parse_spec, run_sweep
from widelora.sweep.registry import register_trial
from widelora.train import RunConfig, build_config, run_trial
from widelora.train import cache as startup


def fresh_trial(config: dict, run_dir: Path, on_metrics: Any = None) -> dict:
    """`run_trial` with a cache that keeps nothing: what every trial paid before."""
    startup._SHARED = startup.StartupCache(models=0, datasets=0)
    return run_trial(config, run_dir, on_metrics)


def shortened_spec(steps: int, eval_examples: int, seeds: list[int]) -> dict:
    spec = init_spec(DemoPlan(seeds=seeds))
    spec["base"].update(steps=steps, eval_every=0, eval_examples=eval_examples)
    return spec


def sweep_once(spec_dict: dict, trial_fn: str, root: Path) -> dict[str, float]:
    import yaml

    spec = parse_spec(yaml.safe_dump(spec_dict), "bench")
    store = ResultStore(root / "results.sqlite")
    t0 = time.perf_counter()
    outcome = run_sweep(spec, store, workers=1, threads=1, trial_fn=trial_fn, runs_dir=root / "runs")
    wall = time.perf_counter() - t0
    trials = ResultStore(outcome.store).trials()
    done = [t for t in trials if t.status == "done"]
    if len(done) != len(trials):
        raise RuntimeError(f"{trial_fn}: {[t.error for t in trials if t.status != 'done'][:1]}")
    cpu = sum(t.final["cpu_s"] for t in done)
    return {"trials": len(done), "wall_s": wall, "cpu_s": cpu,
            "per_hour_wall": 3600 * len(done) / wall, "per_hour_cpu": 3600 * len(done) / cpu}  # fmt: skip


def startup_seconds(spec_dict: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds (process CPU) of `build_run` for the sweep's first trial config: fresh vs from a warm cache."""
    from widelora.train.distributed import Processes
    from widelora.train.run import build_run

    config = dict(spec_dict["base"]) | {"init": "init_a", "lr": 3.2e-3, "seed": 0}
    cfg: RunConfig = build_config(overrides=config)
    procs = Processes.start("cpu")
    kept = startup.StartupCache()
    build_run(cfg, procs, kept)  # warm it
    times: dict[str, list[float]] = {"fresh": [], "kept": []}
    for _ in range(repeats):
        for name, cache in (("fresh", None), ("kept", kept)):
            c0 = time.process_time()
            build_run(cfg, procs, cache)
            times[name].append(time.process_time() - c0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--startup-repeats", type=int, default=5)
    args = ap.parse_args()
    register_trial("finetune_fresh", config_keys=set(RunConfig.keys()) | {"preset"})(fresh_trial)
    spec = shortened_spec(args.steps, args.eval_examples, [int(s) for s in args.seeds.split(",")])

    runs: dict[str, list[dict[str, float]]] = {"fresh": [], "kept": []}
    with tempfile.TemporaryDirectory(prefix="sweep-startup-") as tmp:
        for r in range(args.rounds):
            for name, fn in (("fresh", "finetune_fresh"), ("kept", "finetune")) if r % 2 == 0 else (
                ("kept", "finetune"), ("fresh", "finetune_fresh")):  # fmt: skip
                runs[name].append(sweep_once(spec, fn, Path(tmp) / f"{name}{r}"))
                print(name, runs[name][-1], flush=True)
    start = startup_seconds(spec, args.startup_repeats)

    rows, out = [], {"env": common.env_info(), "args": vars(args), "sweeps": runs, "startup_cpu_s": start}
    for name in ("fresh", "kept"):
        wall = [x["per_hour_wall"] for x in runs[name]]
        cpu = [x["per_hour_cpu"] for x in runs[name]]
        s = common.summary(start[name])
        rows.append([
            name, runs[name][0]["trials"], f"{statistics.median(wall):.0f} ({min(wall):.0f}–{max(wall):.0f})",
            f"{statistics.median(cpu):.0f} ({min(cpu):.0f}–{max(cpu):.0f})",
            f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})",
        ])  # fmt: skip
    out["table"] = common.print_table(
        ["trials", "per sweep", "trials/hour (wall)", "trials/hour (trial CPU)", "start-up CPU s"], rows
    )
    print(f"\nwritten: {common.write_json('sweep_startup', out)}")


if __name__ == "__main__":
    main()

"""Pool validation and test for the accuracy of finished sweep trials (issue 12: ≥ 1000 held-out examples).

MiniLM topics splits 9,033 documents 80/10/10, so each seed's test split is 903 documents. Nothing in the
evaluation protocol selects on the validation split (it is read once, at half budget, for the ranking check),
so validation ∪ test is a 1,806-document held-out set. This script evaluates every finished trial's final
weights on each split (`widelora.train.reevaluate`, which rebuilds the run's own split and model from its
folder; one pass per split, pooled from the sums) and writes `heldout.json` into the trial's run folder:
the pooled numbers at its top level, each split's under `by_split`, and whether the test numbers equal
the ones the trial recorded (they must: otherwise the rebuild is not the trained model). Trials that already
have a complete heldout.json are skipped, so it resumes. `--export FOLDER` then writes each store as the JSON
of `widelora.report.export` with `heldout_accuracy` among each trial's final metrics, which
`bench/recommend_eval.py --metric heldout_accuracy` reads like the store.

    OMP_NUM_THREADS=1 nice -n 5 python bench/heldout_eval.py sweeps/eval-minilm-topics ... --export OUT
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread each, beside running sweeps

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from widelora.files import atomic_write_json
from widelora.report.summary import find_store
from widelora.sweep import ResultStore
from widelora.sweep.store import TrialRecord
from widelora.train.cache import StartupCache
from widelora.train.reevaluate import evaluate_run_splits

HELDOUT = "heldout.json"
SPLIT = "val+test"
#: How closely a recomputed test number must equal the recorded one (accuracy: exactly; it counts examples).
TOLERANCE = {"accuracy": 0.0, "eval_loss": 1e-6, "perplexity": 1e-6}

CACHE = StartupCache(models=0, datasets=3)  # the seeds' splits, tokenized once


def recorded_check(final: dict[str, float], test: dict[str, float]) -> dict[str, Any]:
    """The trial's recorded final numbers beside the recomputed test ones; `matches` when all agree."""
    compared = {k: (final[k], test[k]) for k in TOLERANCE if k in final and k in test}
    ok = all(math.isclose(a, b, rel_tol=TOLERANCE[k], abs_tol=TOLERANCE[k]) for k, (a, b) in compared.items())
    return {"recorded": {k: a for k, (a, _) in compared.items()}, "matches": bool(compared) and ok}


def heldout_record(t: TrialRecord, previous: dict[str, Any] | None) -> dict[str, Any]:
    """Evaluate trial `t` on test, val and both pooled; `previous`: an older pooled-only record to check."""
    t0 = time.process_time()
    by_split = evaluate_run_splits(t.run_dir, ("test", "val", SPLIT), cache=CACHE)
    pooled = by_split.pop(SPLIT)
    record = {"split": SPLIT, "trial": t.id, "labels": t.labels, **pooled}
    record["cpu_s"] = time.process_time() - t0
    record["by_split"] = by_split
    record["test_vs_recorded"] = recorded_check(t.final, by_split["test"])
    if previous and "accuracy" in previous:
        record["previous_pooled_accuracy"] = previous["accuracy"]
    return record


def pool(store: str) -> dict[str, Any]:
    """Evaluate every done trial of `store` lacking a complete heldout.json; counts and the mismatches."""
    with ResultStore(find_store(store)) as st:
        trials = [t for t in st.trials() if t.status == "done" and t.run_dir]
    done = skipped = 0
    mismatches: list[str] = []
    for t in trials:
        out = Path(t.run_dir) / HELDOUT
        previous = json.loads(out.read_text()) if out.is_file() else None
        if previous and "by_split" in previous:
            record, skipped = previous, skipped + 1
        else:
            record = heldout_record(t, previous)
            atomic_write_json(out, record)
            done += 1
            test = record["by_split"]["test"]
            print(
                f"{time.strftime('%H:%M:%S')} {t.id} {t.labels}: {SPLIT} accuracy {record.get('accuracy')}, "
                f"test {test.get('accuracy')} (recorded {t.final.get('accuracy')}), "
                f"{record['cpu_s']:.1f} s CPU",
                flush=True,
            )
        if not record["test_vs_recorded"]["matches"]:
            mismatches.append(f"{t.id} {t.labels}: test {record['by_split']['test']} vs {t.final}")
        old = record.get("previous_pooled_accuracy")
        if old is not None and old != record.get("accuracy"):
            mismatches.append(f"{t.id} {t.labels}: pooled accuracy {record.get('accuracy')} was {old} before")
    return {"trials": len(trials), "evaluated": done, "skipped": skipped, "mismatches": mismatches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", help="sweep stores (.sqlite or their folders)")
    ap.add_argument(
        "--export", type=Path, help="then write each store as FOLDER/<sweep name>.json, with heldout_accuracy"
    )
    args = ap.parse_args(argv)
    bad = 0
    for store in args.stores:
        r = pool(store)
        bad += len(r["mismatches"])
        print(
            f"{store}: {r['trials']} done trials; {r['evaluated']} evaluated, {r['skipped']} already had "
            f"{HELDOUT}; test numbers equal to the recorded ones: {r['trials'] - len(r['mismatches'])} "
            f"of {r['trials']}"
        )
        for line in r["mismatches"]:
            print("  MISMATCH", line)
    if args.export:
        from recommend_eval import export  # bench/ is on sys.path when this runs as a script

        print("exported:", ", ".join(str(p) for p in export(args.stores, args.export)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Pool validation and test for the accuracy of finished sweep trials (issue 12: ≥ 1000 held-out examples).

MiniLM topics splits 9,033 documents 80/10/10, so each seed's test split is 903 documents. Nothing in the
evaluation protocol selects on the validation split (it is read once, at half budget, for the ranking check),
so validation ∪ test is a 1,806-document held-out set. This script evaluates every finished trial's final
weights on it (`widelora.train.reevaluate`, which rebuilds the run's own split and model from its folder) and
writes `heldout.json` into the trial's run folder; it skips trials that already have one, so it resumes.
`bench/recommend_eval.py --metric heldout_accuracy` then reads those numbers in place of the test accuracy.

    OMP_NUM_THREADS=1 nice -n 10 python bench/heldout_eval.py sweeps/eval-minilm-topics sweeps/eval-minilm-...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from widelora.files import atomic_write_json
from widelora.report.summary import find_store
from widelora.sweep import ResultStore
from widelora.train.cache import StartupCache
from widelora.train.reevaluate import evaluate_run

HELDOUT = "heldout.json"
SPLIT = "val+test"


CACHE = StartupCache(models=0, datasets=3)  # the seeds' splits, tokenized once


def pool(store: str) -> tuple[int, int]:
    """Evaluate every done trial of `store` without a heldout.json; (evaluated, skipped)."""
    with ResultStore(find_store(store)) as st:
        trials = [t for t in st.trials() if t.status == "done" and t.run_dir]
    done = skipped = 0
    for t in trials:
        out = Path(t.run_dir) / HELDOUT
        if out.exists():
            skipped += 1
            continue
        t0 = time.process_time()
        numbers = evaluate_run(t.run_dir, SPLIT, cache=CACHE)
        numbers["cpu_s"] = time.process_time() - t0
        atomic_write_json(out, {"split": SPLIT, "trial": t.id, "labels": t.labels, **numbers})
        done += 1
        print(f"{time.strftime('%H:%M:%S')} {t.labels} {SPLIT}: {numbers}", flush=True)
    return done, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", help="sweep stores (.sqlite or their folders)")
    args = ap.parse_args(argv)
    for store in args.stores:
        done, skipped = pool(store)
        print(f"{store}: {done} evaluated, {skipped} already had {HELDOUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

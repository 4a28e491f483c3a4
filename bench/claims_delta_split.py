"""Claims ledger (issue 13, claim 3): the δ1/δ2 split of the LoRA feature update at each init's optimal
learning rate, per width, on the width study's teacher-student model (seed 001, Theorem 2: under Init[B], B is
undertrained and δ2's share vanishes with width; under Init[A] both terms carry the update).

Reads a width study folder (its config and, per (width, init), the optimal grid learning rate at ``--budget``
steps), retrains those configurations the plain way with the feature monitor (`width_reference.run_single`,
every 10 steps) and writes the shares as JSON for `widelora claims` (rule width_delta_split):

    python bench/claims_delta_split.py /work/claims-stores/width_1000 --budget 500 \
        --widths 128,512,2048,8192 --seeds 0,1 --out docs/results/claims/width_delta_split.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from widelora.experiments.width_config import WidthStudyConfig
from widelora.experiments.width_reference import run_single
from widelora.experiments.width_results import ChunkResult, chunk_path, find_optimum
from widelora.experiments.width_study import _study_data
from widelora.files import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--budget", type=int, default=500)
    ap.add_argument("--widths", default="128,512,2048,8192")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = WidthStudyConfig.from_dict(json.loads((args.study / "config.json").read_text()))
    run_config = replace(config, steps=args.budget, eval_steps=())
    data = _study_data(run_config)
    rows, t0, cpu0 = [], time.time(), time.process_time()
    for init in config.inits:
        for width in [int(w) for w in args.widths.split(",")]:
            chunk = ChunkResult.from_json(json.loads(chunk_path(args.study, width, init).read_text()))
            budget = None if args.budget == config.steps else args.budget
            lr = find_optimum(chunk, config.select_by, None, budget).lr_grid
            for seed in [int(s) for s in args.seeds.split(",")]:
                run = run_single(run_config, data, width, init, lr, seed, monitor_every=10)
                layer = next(iter(run.monitor_summary.values()))
                rows.append(
                    {
                        "init": init,
                        "width": width,
                        "lr": lr,
                        "seed": seed,
                        "train_loss": run.train_loss,
                        "delta1_mean": layer["delta1_mean"],
                        "delta2_mean": layer["delta2_mean"],
                        "delta2_share": layer["delta2_share"],
                        "seconds": run.seconds,
                    }
                )
                print(rows[-1], flush=True)
    atomic_write_json(
        args.out,
        {
            "study": str(args.study),
            "budget": args.budget,
            "config": config.to_dict(),
            "rows": rows,
            "cpu_seconds": time.process_time() - cpu0,
            "wall_seconds": time.time() - t0,
        },
    )


if __name__ == "__main__":
    main()

"""Time the width study's batched engine against a plain one-run-per-config PyTorch loop on the same sub-grid.

Three ways to train the same (width, init, lr, seed) grid, with the same weights, batches and optimizer:
  plain     ToyModel (widelora LoRALinear) + autograd + torch.optim.AdamW, one configuration at a time
            (what one would write first; every step recomputes W_h φ(W_in x));
  cached    the engine's cached features and hand-written backward, still one configuration at a time
            (isolates the gain of caching from the gain of batching);
  batched   the engine: all LRs × seeds of a (width, init) in one pass (what `widelora width-study` runs).

Prints a table and the speed-ups, writes JSON. Usage:
    python bench/width_study.py [--widths 128,512,2048] [--steps 100] [--out bench/out/width_study.json]
All runs use one torch thread so the comparison does not depend on how busy the other core is; the load
average is recorded because the timings of a shared machine are only comparable within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from widelora.experiments import width_study as ws
from widelora.experiments.toy import make_data


def _initials(cfg, data, cache, init):
    a0, b0 = zip(
        *[ws.initial_adapters(cfg, data, cache.frozen[i], init, s)[:2] for i, s in enumerate(cfg.seeds)],
        strict=True,
    )
    return torch.stack(a0), torch.stack(b0)


def bench(widths: list[int], steps: int, lrs: tuple[float, ...], seeds: tuple[int, ...], batch: int) -> dict:
    torch.set_num_threads(1)
    cfg = ws.WidthStudyConfig(
        widths=tuple(widths),
        lrs=lrs,
        seeds=seeds,
        steps=steps,
        batch_size=batch,
        workers=1,
        trace_points=11,
        curve_points=10,
    )
    data = make_data(cfg.d, cfg.teacher_width, cfg.teacher_rank, cfg.n_train, cfg.n_test, cfg.data_seed)
    # warm-up (imports of the init registry, first-call allocations) so no timing below includes it
    warm = ws.build_cache(cfg, data, 16)
    ws.train_chunk(dataclasses.replace(cfg, steps=2), warm, data, *_initials(cfg, data, warm, "init_a"))
    ws.run_single(dataclasses.replace(cfg, steps=2), data, 16, "init_a", lrs[0], seeds[0])
    rows = []
    for width in widths:
        for init in cfg.inits:
            t0 = time.perf_counter()
            cache = ws.build_cache(cfg, data, width)
            a0, b0 = _initials(cfg, data, cache, init)
            chunk = ws.train_chunk(cfg, cache, data, a0, b0, init=init)
            t_batched = time.perf_counter() - t0

            t0 = time.perf_counter()
            cache = ws.build_cache(cfg, data, width)
            a0, b0 = _initials(cfg, data, cache, init)
            cached_train = np.zeros((len(seeds), len(lrs)))
            for si, seed in enumerate(seeds):
                for li, lr in enumerate(lrs):
                    one = dataclasses.replace(cfg, lrs=(lr,), seeds=(seed,))
                    sub = ws.WidthCache(
                        width,
                        cache.h_train[si : si + 1],
                        cache.u_train[si : si + 1],
                        cache.h_test[si : si + 1],
                        cache.u_test[si : si + 1],
                        cache.w_out[si : si + 1],
                        cache.frozen[si : si + 1],
                    )
                    cached_train[si, li] = ws.train_chunk(
                        one, sub, data, a0[si : si + 1], b0[si : si + 1], init=init
                    ).train_loss[0, 0]
            t_cached = time.perf_counter() - t0

            t0 = time.perf_counter()
            plain_train = np.zeros((len(seeds), len(lrs)))
            for si, seed in enumerate(seeds):
                frozen = cache.frozen[si]
                for li, lr in enumerate(lrs):
                    plain_train[si, li] = ws.run_single(
                        cfg, data, width, init, lr, seed, frozen=frozen
                    ).train_loss
            t_plain = time.perf_counter() - t0

            both = np.isfinite(plain_train) & np.isfinite(chunk.train_loss)
            rel = np.abs(chunk.train_loss - plain_train)[both] / np.abs(
                plain_train[both]
            )  # float32 vs float32
            rows.append(
                {
                    "width": width,
                    "init": init,
                    "configs": len(lrs) * len(seeds),
                    "plain_s": t_plain,
                    "cached_s": t_cached,
                    "batched_s": t_batched,
                    "speedup_vs_plain": t_plain / t_batched,
                    "speedup_vs_cached": t_cached / t_batched,
                    "max_rel_diff_final_train_loss": float(rel.max()) if rel.size else None,
                    "median_rel_diff_final_train_loss": float(np.median(rel)) if rel.size else None,
                    "same_divergence": bool(
                        (np.isfinite(plain_train) == np.isfinite(chunk.train_loss)).all()
                    ),
                }
            )
            print(
                f"  n={width:5d} {init}: plain {t_plain:7.2f}s  cached {t_cached:7.2f}s "
                f" batched {t_batched:6.2f}s  ×{t_plain / t_batched:5.1f}",
                flush=True,
            )
    tot = {k: sum(r[k] for r in rows) for k in ("plain_s", "cached_s", "batched_s")}
    return {
        "rows": rows,
        "total": tot,
        "speedup_vs_plain": tot["plain_s"] / tot["batched_s"],
        "speedup_vs_cached": tot["cached_s"] / tot["batched_s"],
        "steps": steps,
        "batch_size": batch,
        "lrs": list(lrs),
        "seeds": list(seeds),
        "threads": 1,
        "loadavg": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="128,512,2048")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="bench/out/width_study.json")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    lrs = ws.lr_grid(-15, -3)
    print(
        f"width-study bench: widths {widths}, 2 inits × {len(lrs)} LRs × {len(seeds)} seeds, "
        f"{args.steps} steps, batch {args.batch_size}, 1 thread, load average {os.getloadavg()[0]:.1f}"
    )
    res = bench(widths, args.steps, lrs, seeds, args.batch_size)
    print()
    print(
        f"{'width':>6} {'init':>7} {'configs':>7} {'plain s':>9} {'cached s':>9} {'batched s':>9} "
        f"{'×plain':>7} {'×cached':>8} {'rel diff med/max':>18}"
    )
    for r in res["rows"]:
        print(
            f"{r['width']:>6} {r['init']:>7} {r['configs']:>7} {r['plain_s']:>9.2f} {r['cached_s']:>9.2f} "
            f"{r['batched_s']:>9.2f} {r['speedup_vs_plain']:>7.1f} {r['speedup_vs_cached']:>8.1f} "
            f"{r['median_rel_diff_final_train_loss']:>9.1e}/{r['max_rel_diff_final_train_loss']:.1e}"
        )
    t = res["total"]
    print(
        f"{'total':>6} {'':>7} {'':>7} {t['plain_s']:>9.2f} {t['cached_s']:>9.2f} {t['batched_s']:>9.2f} "
        f"{res['speedup_vs_plain']:>7.1f} {res['speedup_vs_cached']:>8.1f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    print(
        f"\nspeed-up of the batched engine: ×{res['speedup_vs_plain']:.1f} vs the plain loop, "
        f"×{res['speedup_vs_cached']:.1f} vs per-config with cached features; written {out}"
    )


if __name__ == "__main__":
    main()

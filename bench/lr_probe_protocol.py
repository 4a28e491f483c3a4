"""Probe v3 on the evaluation protocol: the probe exactly as a sweep's `setup: recommended` runs it, the
spread of its edge over seeds, and the safety factor from a tuned grid (subcommands `protocol`, `spread`,
`factor` of bench/lr_probe.py, which says how to run them; records: docs/results/recommend_calibration.json).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "recommend_calibration.json"


def protocol_run(spec: str, seed: int) -> dict:
    """The probe of `setup: recommended` for this seed of the spec's base run, built as the run builds it."""
    import yaml

    from widelora.recommend import rules
    from widelora.recommend.probe import PROBE_VERSION
    from widelora.recommend.runconfig import recommend_for_config
    from widelora.train.cache import StartupCache
    from widelora.train.presets import build_config
    from widelora.train.schedule import BatchOrder

    base = yaml.safe_load((ROOT / spec).read_text())["base"]
    cfg = build_config(overrides={**base, "seed": seed, "setup": "recommended"})
    torch.manual_seed(cfg.seed)
    cache = StartupCache()
    data = cache.data(cfg, cache.tokenizer(cfg.model))
    model = cache.model(cfg, data.num_labels)
    order = BatchOrder(len(data.train), cfg.batch_size, cfg.seed)
    count = min(cfg.init_batches, order.per_epoch)
    batches = [data.collate([data.train[i] for i in order.indices(m)]) for m in range(count)]
    t0 = time.process_time()
    rec = recommend_for_config(cfg, model, batches, steps=cfg.steps)
    cpu = time.process_time() - t0
    p = rec.probe
    older = {"v1": p["edge_lr"] / 4.0}  # v1 and v2 read the same readings: the stop rule did not change
    older["v2"] = p["edge_lr"] / rules.edge_factor(rec.width, p["reason"])[0]
    return {
        "kind": "protocol",
        "spec": spec,
        "version": PROBE_VERSION,
        "seed": seed,
        "lr": rec.lr,
        "lr_source": p["lr_source"],
        "stop_edge": p["edge_lr"],
        "reason": p["reason"],
        "response_lr": p["response_lr"],
        "older_lr": older,
        "head_lr": rec.head_lr,
        "ratio": rec.ratio,
        "cost_fraction": p["cost_fraction"],
        "cpu_s": cpu,
        "curve": [
            {k: r[k] for k in ("lr", "loss", "out_ratio", "out_q", "za_growth", "ref_loss")}
            for r in p["curve"]
        ],
    }


def spread(spec: str) -> None:
    """Per-seed lrs of each version and the spread of the edges over seeds (geometric sd, max / min)."""
    rows = [r for r in json.loads(OUT.read_text()) if r["kind"] == "protocol" and r["spec"] == spec]
    for version in sorted({r["version"] for r in rows}):
        got = sorted((r for r in rows if r["version"] == version), key=lambda r: r["seed"])
        series = {
            "stop edge (v1/v2's edge)": [r["stop_edge"] for r in got],
            "response edge": [r["response_lr"] for r in got if r["response_lr"] is not None],
            f"lr ({version})": [r["lr"] for r in got],
            "lr (v2)": [r["older_lr"]["v2"] for r in got],
            "cost fraction": [r["cost_fraction"] for r in got],
        }
        print(f"{spec}, probe {version}, seeds {[r['seed'] for r in got]}")
        for name, values in series.items():
            if len(values) < 2:
                continue
            logs = [math.log(v) for v in values]
            mean = sum(logs) / len(logs)
            sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
            print(
                f"  {name:26s} geo-mean {math.exp(mean):.3g}  sd(ln) {sd:.3f}  max/min "
                f"{max(values) / min(values):.2f}  [{', '.join(f'{v:.3g}' for v in values)}]"
            )


#: Multiplicative errors of the lr (sd of its log) the factor is chosen against: none (in sample) to ×e.
SIGMAS = (0.0, 0.2, 0.35, 0.5, 0.69, 1.0)


def factor(spec: str, grid: str, setup: str = "recommend (tuned)") -> None:
    """The factor F in lr = response edge / F: per seed, the grid's optimum (a parabola through its best three
    points in log lr) against the probe's response edge; then the expected accuracy E_σ(F) of lr = edge / F ×
    e^(σ z), z ~ N(0, 1), read off each seed's grid curve (linear in log lr, clamped at its ends); the rule
    picks the F whose worst regret max_σ [max_F' E_σ(F') − E_σ(F)] is least."""
    import numpy as np

    from widelora.report.export import open_results

    curves: dict[int, dict[float, float]] = {}
    for t in open_results(ROOT / grid).trials:
        if t.labels.get("setup") == setup and t.status == "done":
            curves.setdefault(int(t.config["seed"]), {})[float(t.config["lr"])] = 100 * t.final["accuracy"]
    rows = [r for r in json.loads(OUT.read_text()) if r["kind"] == "protocol" and r["spec"] == spec]
    edges = {r["seed"]: r["response_lr"] for r in rows if r["seed"] in curves and r["response_lr"]}
    seeds = sorted(edges)
    ratios = []
    for s in seeds:
        lrs, acc = zip(*sorted(curves[s].items()), strict=True)
        x, i = np.log(lrs), int(np.argmax(acc))
        c = np.polyfit(x[i - 1 : i + 2], acc[i - 1 : i + 2], 2)
        optimum = math.exp(-c[1] / (2 * c[0]))
        ratios.append(edges[s] / optimum)
        print(
            f"seed {s}: response edge {edges[s]:.3g}, optimum {optimum:.3g}, edge / optimum {ratios[-1]:.1f}"
        )
    print(f"geometric mean edge / optimum: {math.exp(np.mean(np.log(ratios))):.1f}")
    z = np.linspace(-3, 3, 61)
    w = np.exp(-0.5 * z**2) / np.exp(-0.5 * z**2).sum()
    factors = np.exp(np.linspace(math.log(16), math.log(256), 161))

    def expected(f: float, sigma: float) -> float:
        got = []
        for s in seeds:
            lrs, acc = zip(*sorted(curves[s].items()), strict=True)
            lr = edges[s] / f * np.exp(sigma * z)
            got.append(float((w * np.interp(np.log(lr), np.log(lrs), acc)).sum()))
        return float(np.mean(got))

    table = np.array([[expected(f, sg) for f in factors] for sg in SIGMAS])
    regret = (table.max(1, keepdims=True) - table).max(0)
    best = int(np.argmin(regret))
    print(f"least worst-case regret: F = {factors[best]:.1f} (worst regret {regret[best]:.2f} points)")
    for f in sorted({27.0, 38.0, 53.0, 64.0, 76.0, 90.0, 107.0, 128.0}):
        k = int(np.argmin(abs(factors - f)))
        cells = "  ".join(f"σ={sg:g}: {table[j, k]:.1f}" for j, sg in enumerate(SIGMAS))
        print(f"  F {f:5.0f}: {cells}  worst regret {regret[k]:.2f}")

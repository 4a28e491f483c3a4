"""Figures of the ratio / stability-edge calibration, from ``docs/results/ratio_calibration.json``.

``python -m widelora.report.ratio_figures CALIBRATION.json OUT_DIR`` redraws them from the file alone, so
anyone can re-plot without rerunning the studies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from widelora.report.width_figures import _color, _label, _plt, _save


def plot_ratio(cal: dict, path: Path) -> Path:
    """Left: optimal LoRA+ ratio vs width (seed-mean, per-seed faint, fit, ∝ n reference). Right: the gain."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for init, block in cal["ratio"].items():
        rows = block["per_width"]
        c = _color(init, [init])
        w = np.array([r["width"] for r in rows], dtype=float)
        for r in rows:
            ax.scatter(
                [r["width"]] * len(r["per_seed_ratio"]), r["per_seed_ratio"], s=12, color=c, alpha=0.3, lw=0
            )
        fit = block["optimal_ratio_vs_width"]
        label = _label(init)
        if fit:
            label += f": slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
        ax.plot(w, [r["ratio"] for r in rows], "o-", color=c, label=label)
        ref = np.array([r["ratio"] for r in rows], dtype=float)
        centre = float(np.exp(np.log(ref[ref > 0]).mean())) if (ref > 0).any() else 1.0
        ax.plot(
            w,
            centre * w / np.exp(np.log(w).mean()),
            "--",
            color="0.4",
            lw=1,
            label=r"$\propto n$ (LoRA+ limit)",
        )
        gains = [r["gain"] for r in rows]
        errs = [(2 ** r["gain_log2_se"] - 1) * r["gain"] if r["gain_log2_se"] else 0 for r in rows]
        ax2.errorbar(w, gains, yerr=errs, fmt="o-", color=c, capsize=3, label=_label(init))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width n")
    ax.set_ylabel("optimal ratio lr_B / lr_A")
    ax.set_title("Best LoRA+ ratio (each at its best lr_A)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax2.axhline(1.0, color="0.5", lw=1)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("width n")
    ax2.set_ylabel("loss at ratio 1 / loss at the best ratio")
    ax2.set_title("Gain from tuning the ratio (± seed s.e.)", fontsize=10)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_edge(cal: dict, path: Path) -> Path:
    """Left: edge and optimum vs width (final budget). Right: edge/optimum factor vs budget per width."""
    plt = _plt()
    keys = list(cal["edge"])
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.6 * (1 + len(keys)), 3.9), squeeze=False)
    ax = axes[0, 0]
    for k, key in enumerate(keys):
        init = key.split("@")[0]
        c = _color(init, [init]) if k < 2 else "#2ca02c"
        final = max(cal["edge"][key], key=int)
        rows = cal["edge"][key][final]
        w = [r["width"] for r in rows]
        ax.plot(
            w, [r["edge"] for r in rows], "v-", color=c, label=f"{_label(init)} {key.split('@')[1]}: edge"
        )
        ax.plot(w, [r["optimum"] for r in rows], "o--", color=c, label="optimum", alpha=0.8)
        sub = axes[0, 1 + k]
        budgets = sorted(cal["edge"][key], key=int)
        shades = plt.cm.viridis(np.linspace(0.05, 0.9, len(rows)))
        for wi, color in enumerate(shades):
            f = [cal["edge"][key][b][wi]["factor_log2_mean"] for b in budgets]
            se = [cal["edge"][key][b][wi]["factor_log2_se"] or 0 for b in budgets]
            xs = [int(b) for b in budgets]
            sub.errorbar(
                xs,
                np.exp2(f),
                yerr=[np.exp2(f) - np.exp2(np.subtract(f, se)), np.exp2(np.add(f, se)) - np.exp2(f)],
                fmt="o-",
                color=color,
                ms=3,
                capsize=2,
                label=f"n={rows[wi]['width']}",
            )
        sub.set_xscale("log", base=2)
        sub.set_yscale("log", base=2)
        sub.set_xlabel("step budget")
        sub.set_ylabel("edge / optimum (per seed, ± s.e.)")
        sub.set_title(f"{_label(init)}, {key.split('@')[1]}", fontsize=10)
        sub.legend(fontsize=6, frameon=False, ncol=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width n")
    ax.set_ylabel("learning rate (lr_A)")
    ax.set_title("Stability edge vs optimum (longest budget)", fontsize=10)
    ax.legend(fontsize=6, frameon=False)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def make_figures(calibration: dict, out_dir: Path) -> list[Path]:
    """Both figures for every setup of the calibration file (``<figure>_<setup>.png``)."""
    out = Path(out_dir)
    paths = []
    for name, cal in calibration.items():
        paths.append(plot_ratio(cal, out / f"ratio_vs_width_{name}.png"))
        paths.append(plot_edge(cal, out / f"edge_vs_optimum_{name}.png"))
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in make_figures(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])):
        print(p)


def plot_exponent_sensitivity(rows: list[dict], path: Path) -> Path:
    """Optimal-LR exponent vs step budget per init, a marker per LR grid, 95 % intervals, predictions."""
    plt = _plt()
    inits = list(dict.fromkeys(r["init"] for r in rows))
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    fig, axes = plt.subplots(1, len(inits), figsize=(4.8 * len(inits), 3.8), squeeze=False, sharey=True)
    for ax, init in zip(axes[0], inits, strict=True):
        for k, (grid, marker) in enumerate(zip(grids, "os^", strict=True)):
            sel = [r for r in rows if r["init"] == init and r["grid"] == grid and r["slope"] is not None]
            x = np.array([r["budget"] for r in sel], dtype=float) * 2 ** ((k - 1) * 0.08)  # dodge
            y = np.array([r["slope"] for r in sel])
            err = [y - [r["ci_low"] for r in sel], [r["ci_high"] for r in sel] - y]
            ax.errorbar(
                x,
                y,
                yerr=err,
                fmt=marker,
                color=_color(init, inits),
                alpha=1.0 - 0.3 * k,
                capsize=2,
                label=grid,
            )
        ax.axhline(-1.0, color="0.3", ls="--", lw=1, label="n^-1")
        ax.axhline(-0.5, color="0.3", ls=":", lw=1, label="n^-1/2")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("step budget")
        ax.set_title(_label(init), fontsize=10)
        ax.legend(fontsize=7, frameon=False)
    axes[0, 0].set_ylabel("optimal-LR exponent (95% CI)")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out

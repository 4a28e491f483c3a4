"""Paper-style PNG figures of a sweep: metric vs learning rate (seed mean ± standard error, optimum marked —
the initialization paper's Figures 4/5), an LR × group heatmap, and training curves at each group's best LR.

Figures are written atomically (temp file, then rename) with the non-interactive Agg backend, so a report can
be built on a headless machine while a sweep still runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from widelora.files import atomic_write
from widelora.report.summary import (
    Group,
    SweepResults,
    display_scale,
    metric_label,
    pretty,
)

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9.5,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "savefig.bbox": "tight",
    "figure.dpi": 100,
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
DPI = 150


def save(fig: plt.Figure, path: Path) -> Path:
    """Write a PNG atomically and close the figure."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    finally:
        plt.close(fig)


def plot_metric_by_group(res: SweepResults, path: Path) -> Path | None:
    """A sweep without an lr axis: one bar per group (seed mean ± s.e.), diverged seeds written on it."""
    groups = res.groups()
    scale = display_scale(res.metric)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(groups) + 2.0), 4.2))
        for i, g in enumerate(groups):
            p = g.points[0]
            if p.n:
                ax.bar(
                    i,
                    p.mean * scale,
                    yerr=p.se * scale if p.n > 1 else None,
                    color=COLORS[i % len(COLORS)],
                    alpha=0.85,
                    capsize=4,
                )
            if p.diverged or not p.n:
                note = f"{p.diverged} diverged" if p.diverged else "no result"
                ax.annotate(
                    note,
                    (i, 0),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    color="#aa0000",
                    fontsize=9,
                )
        ax.set_xticks(range(len(groups)))
        tilt = len(groups) > 3 or max(len(g.label) for g in groups) > 12
        ax.set_xticklabels(
            [g.label for g in groups], rotation=20 if tilt else 0, ha="right" if tilt else "center"
        )
        ax.set_ylabel(metric_label(res.metric))
        ax.set_title(f"{res.name}: {res.metric} per group (seed mean ± s.e.)", fontsize=11)
        return save(fig, path)


def plot_metric_vs_lr(res: SweepResults, path: Path, title: str | None = None) -> Path | None:
    """Metric vs learning rate, one line per group: seed mean, ±1 standard-error band, best LR starred; points
    where some seeds diverged are ringed in red, learning rates where every seed diverged are crossed."""
    groups = [g for g in res.groups() if any(p.lr is not None for p in g.points)]
    if not groups:
        return None
    for g in groups:
        g.points = [p for p in g.points if p.lr is not None]
    scale = display_scale(res.metric)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.6, 4.3))
        all_lrs = sorted({p.lr for g in groups for p in g.points})
        div_y = None
        finite = [p.mean * scale for g in groups for p in g.points if p.n]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
            div_y = lo - pad if res.goal == "max" else hi + pad
        seeds = max((p.n + p.diverged for g in groups for p in g.points), default=0)
        dead_labelled = partial_labelled = False
        for i, g in enumerate(groups):
            color = COLORS[i % len(COLORS)]
            pts = [p for p in g.points if p.n]
            if pts:
                x = np.array([p.lr for p in pts])
                m = np.array([p.mean for p in pts]) * scale
                se = np.array([p.se for p in pts]) * scale
                best = g.best(res.goal)
                label = (
                    g.label
                    if best is None
                    else f"{g.label}  (best {best.mean * scale:.4g} @ lr {best.lr:.2g})"
                )
                ax.plot(x, m, "-o", color=color, lw=1.8, ms=4.5, label=label)
                ax.fill_between(x, m - se, m + se, color=color, alpha=0.18, lw=0)
                if best is not None:
                    ax.plot(
                        [best.lr],
                        [best.mean * scale],
                        marker="*",
                        ms=16,
                        color=color,
                        mec="black",
                        mew=0.7,
                        zorder=5,
                        alpha=0.9,
                    )
                partial = [p for p in pts if p.diverged]
                if partial:
                    ax.plot(
                        [p.lr for p in partial],
                        [p.mean * scale for p in partial],
                        "o",
                        ms=11,
                        mfc="none",
                        mec="#aa0000",
                        mew=1.6,
                        zorder=6,
                        label=None if partial_labelled else "some seeds diverged (ringed)",
                    )
                    partial_labelled = True
            dead = [p.lr for p in g.points if p.diverged and not p.n]
            if dead and div_y is not None:
                ax.plot(
                    dead,
                    [div_y] * len(dead),
                    "x",
                    color=color,
                    ms=8 + 3 * i,
                    mew=2,
                    alpha=0.85,
                    label=None if dead_labelled else "every seed diverged",
                )
                dead_labelled = True
        ax.set_xscale("log")
        if res.goal == "min" and finite and min(finite) > 0 and max(finite) / min(finite) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(metric_label(res.metric))
        if len(all_lrs) <= 12:
            ax.set_xticks(all_lrs)
            ax.set_xticklabels([f"{v:.2g}" for v in all_lrs], rotation=35 if len(all_lrs) > 6 else 0)
            ax.minorticks_off()
        band = "±1 s.e. over seeds" if seeds > 1 else "single seed"
        ax.set_title(
            title or f"{res.name}: {res.metric} vs learning rate (mean, {band}; ★ best)", fontsize=11
        )
        n_entries = len(groups) + int(dead_labelled) + int(partial_labelled)
        ax.legend(
            frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1 if n_entries > 4 else 2
        )
        return save(fig, path)


def plot_heatmap(res: SweepResults, path: Path) -> Path | None:
    """Groups × learning rates, cell = seed-mean metric; each row's best LR boxed, diverged seeds counted."""
    groups = [g for g in res.groups() if g.points]
    if not groups:
        return None
    lrs = sorted({p.lr for g in groups for p in g.points}, key=lambda v: (v is not None, v or 0.0))
    scale = display_scale(res.metric)
    grid = np.full((len(groups), len(lrs)), np.nan)
    diverged = np.zeros_like(grid, dtype=int)
    for i, g in enumerate(groups):
        for p in g.points:
            j = lrs.index(p.lr)
            if p.n:
                grid[i, j] = p.mean * scale
            diverged[i, j] = p.diverged
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(max(5.0, 0.85 * len(lrs) + 2.6), 0.6 * len(groups) + 1.9))
        cmap = plt.get_cmap("viridis" if res.goal == "max" else "viridis_r").with_extremes(bad="#dddddd")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap)
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(groups)):
            for j in range(len(lrs)):
                v = grid[i, j]
                if np.isfinite(v):
                    dark = (v < mid) == (res.goal == "max")
                    extra = f"\n+{diverged[i, j]} div." if diverged[i, j] else ""
                    ax.text(
                        j,
                        i,
                        f"{v:.3g}{extra}",
                        ha="center",
                        va="center",
                        fontsize=9 if not extra else 8,
                        color="white" if dark else "black",
                    )
                elif diverged[i, j]:
                    ax.text(j, i, "div.", ha="center", va="center", fontsize=9, color="#aa0000")
            best = groups[i].best(res.goal)
            if best is not None:
                j = lrs.index(best.lr)
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2.2))
        ax.set_xticks(range(len(lrs)))
        ax.set_xticklabels(
            ["default" if v is None else f"{v:.2g}" for v in lrs], rotation=35 if len(lrs) > 6 else 0
        )
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels([g.label for g in groups])
        ax.set_xlabel("learning rate")
        ax.set_title(
            f"{res.name}: {res.metric} (seed mean; red box = best LR per row; div. = diverged seeds)"
        )
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label(metric_label(res.metric))
        return save(fig, path)


def curve_names(res: SweepResults, limit: int = 2) -> list[str]:
    """Metrics logged over time worth plotting: a training loss and the headline metric when logged."""
    names: dict[str, int] = {}
    for per in res.curves.values():
        for name, pts in per.items():
            names[name] = max(names.get(name, 0), len(pts))
    multi = [n for n, k in names.items() if k > 2]  # two points (before/after) are a table, not a curve
    order = sorted(multi, key=lambda n: (n != res.metric, "loss" not in n, n))
    preferred = [n for n in order if n == res.metric or "loss" in n or "acc" in n or "ppl" in n]
    return (preferred or order)[:limit]


def plot_curves(res: SweepResults, path: Path) -> Path | None:
    """Logged metrics vs step for each group at its best learning rate (seed mean, thin lines per seed)."""
    names = curve_names(res)
    groups = [g for g in res.groups() if g.best(res.goal) is not None]
    if not names or not groups:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 4.0), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            scale = display_scale(name)
            smoothed = 1
            for i, g in enumerate(groups):
                best = g.best(res.goal)
                color = COLORS[i % len(COLORS)]
                series = [
                    res.curves[t.id][name]
                    for t in res.trials_of(g, best.lr)
                    if t.status == "done" and name in res.curves.get(t.id, {})
                ]
                if not series:
                    continue
                window = _window(max(len(s) for s in series))
                for s in series:
                    ax.plot(
                        [p[0] for p in s],
                        _smooth([p[1] * scale for p in s], window),
                        color=color,
                        lw=0.6,
                        alpha=0.35,
                    )
                steps = sorted(set.intersection(*({p[0] for p in s} for s in series)))
                if steps:
                    mean = [np.mean([dict(s)[k] for s in series]) * scale for k in steps]
                    ax.plot(
                        steps,
                        _smooth(mean, window),
                        color=color,
                        lw=2,
                        label=f"{g.label} (lr {best.lr_text})",
                    )
                    smoothed = max(smoothed, window)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(metric_label(name))
            if "loss" in name and _span(res, name) > 30:
                ax.set_yscale("log")
            note = f", running mean over {smoothed} logs" if smoothed > 1 else ""
            ax.set_title(f"{name.replace('_', ' ')} at each group's best LR{note}", fontsize=11)
            ax.legend(frameon=False)
        return save(fig, path)


def _window(n: int) -> int:
    """Running-mean window for a curve of ``n`` logged points: none for short curves, ~n/12 for long ones."""
    return 1 if n < 30 else max(3, n // 12)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing running mean (the first points average what exists so far), so noisy per-step losses read."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _span(res: SweepResults, name: str) -> float:
    vals = [v for per in res.curves.values() for s, v in per.get(name, []) if math.isfinite(v) and v > 0]
    return max(vals) / min(vals) if vals else 1.0


def make_figures(res: SweepResults, out_dir: str | Path) -> dict[str, Path]:
    """Write every figure that the data supports; returns {kind: path}."""
    out = Path(out_dir)
    made: dict[str, Path] = {}
    has_lr = any(p.lr is not None for g in res.groups() for p in g.points)
    first = ("metric_vs_lr", plot_metric_vs_lr) if has_lr else ("metric_by_group", plot_metric_by_group)
    for kind, fn in (first, ("heatmap", plot_heatmap), ("curves", plot_curves)):
        p = fn(res, out / f"{res.name}_{kind}.png")
        if p is not None:
            made[kind] = p
    return made


__all__ = [
    "Group",
    "make_figures",
    "plot_curves",
    "plot_heatmap",
    "plot_metric_by_group",
    "plot_metric_vs_lr",
    "pretty",
    "save",
]

"""Figures and the short report of the width study (paper Figures 2–3 and the loss-vs-LR curves behind them).

The study computes (``widelora.experiments.width_study``); this module presents, and only the command (or the
demo) calls it, so the library never imports plotting code. ``write_figures_and_report`` writes every PNG
(matplotlib, Agg backend) and ``report.md``; ``report_markdown`` gives the predicted-vs-measured exponent
table and the optima as markdown, ready to paste into docs or an HTML report.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from widelora.experiments.width_results import fit_key
from widelora.files import atomic_write, atomic_write_text
from widelora.theory import INFORMATIVE_CI_WIDTH

if TYPE_CHECKING:  # pragma: no cover
    from widelora.experiments.width_results import WidthStudyResult

INIT_COLORS = {"init_a": "#d62728", "init_b": "#1f77b4", "kaiming": "#2ca02c", "gaussian": "#9467bd"}
INIT_LABELS = {"init_a": "Init[A]", "init_b": "Init[B]"}
_EXTRA_COLORS = ["#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _color(init: str, inits: list[str]) -> str:
    if init in INIT_COLORS:
        return INIT_COLORS[init]
    return _EXTRA_COLORS[inits.index(init) % len(_EXTRA_COLORS)]


def _label(init: str) -> str:
    return INIT_LABELS.get(init, init)


def shown_ratio(result: WidthStudyResult) -> float:
    """The LoRA+ ratio the width figures show: 1 (plain AdamW, the paper's setting) when the study has it."""
    ratios = result.config.ratios
    return 1.0 if 1.0 in ratios else ratios[0]


def _optima(result: WidthStudyResult, init: str) -> list:
    ratio = shown_ratio(result)
    return sorted((o for o in result.optima if o.init == init and o.ratio == ratio), key=lambda o: o.width)


def _fit(result: WidthStudyResult, init: str):
    return result.fits.get(fit_key(init, shown_ratio(result), len(result.config.ratios) == 1))


def _slice(chunk, values: np.ndarray, ratio: float) -> np.ndarray:
    """[seed, config, ...] → [seed, lr, ...] of one ratio."""
    return chunk.grid(values)[:, chunk.ratio_index(ratio)]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "figure.dpi": 110,
            "savefig.dpi": 110,
        }
    )
    return plt


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def plot_optimal_lr(result: WidthStudyResult, path: Path) -> Path:
    """Figure 2: optimal LR vs width per init, log–log, fitted slopes and n^-1, n^-1/2 reference lines."""
    plt = _plt()
    cfg = result.config
    inits = list(cfg.inits)
    widths = np.array(sorted(cfg.widths), dtype=float)
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for init in inits:
        opt = _optima(result, init)
        c = _color(init, inits)
        w = np.array([o.width for o in opt], dtype=float)
        lr = np.array([o.lr for o in opt])
        edge = np.array([o.at_edge for o in opt])
        for o in opt:  # per-seed best grid points, faint
            ax.scatter([o.width] * len(o.per_seed), o.per_seed, s=12, color=c, alpha=0.25, lw=0, zorder=2)
        label = _label(init)
        fit = _fit(result, init)
        if fit is not None and fit.ci_high - fit.ci_low > INFORMATIVE_CI_WIDTH:
            label += f": slope not determined (95% CI {fit.ci_high - fit.ci_low:.1f} wide)"
        elif fit is not None:
            label += f": slope {fit.slope:.2f} [{fit.ci_low:.2f}, {fit.ci_high:.2f}]"
            ax.plot(widths, fit.predict(widths), color=c, lw=1, alpha=0.6, ls="-")
        ax.plot(w[~edge], lr[~edge], "o-", color=c, label=label, ms=6, zorder=3)
        if edge.any():
            ax.plot(w[edge], lr[edge], "o", mfc="white", color=c, ms=6, zorder=3)
    # reference lines through the geometric centre of the optima (constants only set the vertical position)
    finite = np.array([o.lr for i in inits for o in _optima(result, i) if math.isfinite(o.lr)])
    if finite.size:
        centre_lr = float(np.exp(np.log(finite).mean()))
        centre_w = float(np.exp(np.log(widths).mean()))
        for expo, ls, name in ((-1.0, "--", r"$\propto n^{-1}$"), (-0.5, ":", r"$\propto n^{-1/2}$")):
            ax.plot(widths, centre_lr * (widths / centre_w) ** expo, color="0.35", ls=ls, lw=1.2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width n")
    ax.set_ylabel(f"optimal learning rate ({cfg.select_by} loss)")
    ax.set_title(
        f"Optimal LR vs width (r={cfg.rank}, {cfg.steps} steps, batch {cfg.batch_size})", fontsize=10
    )
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    lo, hi = min(cfg.lrs), max(cfg.lrs)
    ax.axhspan(lo / 1.5, lo, color="0.9", zorder=0)
    ax.axhspan(hi, hi * 1.5, color="0.9", zorder=0)
    ax.text(
        0.99,
        0.99,
        "hollow: optimum at a grid edge\nshaded: outside the LR grid\nfaint dots: per-seed optima",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=7,
        color="0.4",
    )
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_features(result: WidthStudyResult, path: Path, widths: tuple[int, int] | None = None) -> Path:
    """Figure 3: |Z_A| and |Z_B| (means over the train set) during training at each init's optimal LR,
    for a small and a large width, every seed."""
    plt = _plt()
    cfg = result.config
    inits = list(cfg.inits)
    ws = widths or (min(cfg.widths), max(cfg.widths))
    fig, axes = plt.subplots(len(ws), 2, figsize=(9, 3.0 * len(ws)), squeeze=False, sharex=True)
    styles = ["-", "--", ":", "-."]
    for row, width in enumerate(ws):
        titles = []
        for init in inits:
            chunk = result.chunks.get((width, init))
            opt = next((o for o in _optima(result, init) if o.width == width), None)
            if chunk is None or opt is None or not math.isfinite(opt.lr_grid):
                continue
            li = chunk.lrs.index(opt.lr_grid)
            z_a, z_b = _slice(chunk, chunk.z_a, opt.ratio), _slice(chunk, chunk.z_b, opt.ratio)
            c = _color(init, inits)
            for si, seed in enumerate(chunk.seeds):
                ls = styles[si % len(styles)]
                lab = f"{_label(init)} seed {seed}"
                axes[row, 0].plot(chunk.trace_steps, z_a[si, li], ls, color=c, label=lab, lw=1.4)
                zb = np.where(z_b[si, li] > 0, z_b[si, li], np.nan)  # log axis: drop exact zeros
                axes[row, 1].plot(chunk.trace_steps, zb, ls, color=c, label=lab, lw=1.4)
            loss = np.nanmean(_slice(chunk, chunk.train_loss, opt.ratio)[:, li])
            titles.append(f"{_label(init)}: lr={opt.lr_grid:.2g}, train loss {loss:.3g}")
        axes[row, 0].set_ylabel(f"n = {width}\n|Z_A|")
        axes[row, 1].set_ylabel("|Z_B|  (log scale)")
        axes[row, 1].set_yscale("log")
        axes[row, 0].set_title("; ".join(titles), fontsize=8, loc="left")
        axes[row, 0].legend(fontsize=7, frameon=False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("LoRA features over training at the optimal LR (means over the train set)", fontsize=10)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_loss_vs_lr(result: WidthStudyResult, path: Path) -> Path:
    """Final train (solid) and test (dashed) loss vs LR per width: the curves the optima are read from."""
    plt = _plt()
    cfg = result.config
    inits = list(cfg.inits)
    widths = sorted(cfg.widths)
    cols = min(4, len(widths))
    rows = -(-len(widths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False, sharex=True)
    lrs = np.array(cfg.lrs)
    for k, width in enumerate(widths):
        ax = axes[k // cols, k % cols]
        for init in inits:
            chunk = result.chunks.get((width, init))
            if chunk is None:
                continue
            c = _color(init, inits)
            ratio = shown_ratio(result)
            train, test = _slice(chunk, chunk.train_loss, ratio), _slice(chunk, chunk.test_loss, ratio)
            for arr, ls, name in ((train, "-", "train"), (test, "--", "test")):
                bad = ~np.isfinite(arr).all(axis=0)  # a seed diverged: no mean
                mean = np.where(bad, np.nan, np.where(np.isfinite(arr), arr, 0.0).mean(axis=0))
                ax.plot(
                    lrs,
                    mean,
                    ls,
                    color=c,
                    lw=1.3,
                    marker="o" if ls == "-" else None,
                    ms=2.5,
                    label=f"{_label(init)} {name}",
                )
            opt = next((o for o in _optima(result, init) if o.width == width), None)
            if opt is not None and math.isfinite(opt.lr):
                ax.axvline(opt.lr, color=c, lw=0.8, alpha=0.6)
            div_step = _slice(chunk, chunk.diverged_step, ratio)
            div = np.array([(div_step[:, i] >= 0).any() for i in range(len(lrs))])
            if div.any():
                ax.plot(lrs[div], np.full(div.sum(), np.nan), "x", color=c)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"n = {width}", fontsize=9)
        if k % cols == 0:
            ax.set_ylabel("final loss (MSE)")
        if k // cols == rows - 1:
            ax.set_xlabel("learning rate")
    for k in range(len(widths), rows * cols):
        axes[k // cols, k % cols].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(
        "Final loss vs learning rate (mean over seeds; vertical line: optimum; gaps: diverged)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=len(labels),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_optimal_lr_compare(results: dict[str, WidthStudyResult], path: Path) -> Path:
    """Optimal LR vs width for several studies (e.g. step budgets) side by side, one panel per init."""
    plt = _plt()
    inits = list(dict.fromkeys(i for r in results.values() for i in r.config.inits))
    fig, axes = plt.subplots(1, len(inits), figsize=(4.6 * len(inits), 3.8), squeeze=False, sharey=True)
    shades = plt.cm.viridis(np.linspace(0.1, 0.85, len(results)))
    for ax, init in zip(axes[0], inits, strict=True):
        for (label, res), color in zip(results.items(), shades, strict=True):
            opt = _optima(res, init)
            fit = _fit(res, init)
            lab = label + (f": {fit.slope:.2f} [{fit.ci_low:.2f}, {fit.ci_high:.2f}]" if fit else "")
            ax.plot([o.width for o in opt], [o.lr for o in opt], "o-", color=color, label=lab, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(_label(init), fontsize=10)
        ax.set_xlabel("width n")
        ax.legend(fontsize=7, frameon=False, loc="lower left", title="slope [95% CI]", title_fontsize=7)
    axes[0, 0].set_ylabel("optimal learning rate")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def make_figures(result: WidthStudyResult, out_dir: str | os.PathLike) -> list[Path]:
    """All figures of the study into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    return [
        plot_optimal_lr(result, out / "optimal_lr.png"),
        plot_features(result, out / "features.png"),
        plot_loss_vs_lr(result, out / "loss_vs_lr.png"),
    ]


def _fmt(x: float, spec: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report_markdown(result: WidthStudyResult) -> str:
    """Predicted vs measured exponents, the optima per width, and the run's settings, as markdown."""
    cfg = result.config
    lines = ["## Width study: optimal learning rate vs width", ""]
    conf = int(100 * next(iter(result.fits.values())).confidence) if result.fits else 95
    header = (
        "| init | predicted max-stable exponent | expected optimal "
        f"exponent | measured slope ({conf}% CI) | R² | consistent |"
    )
    lines += [header, "|---|---|---|---|---|---|"]
    for row in result.exponent_rows():
        lo, hi = row["predicted_optimal_range"]
        rng = f"{lo:g}" if lo == hi else f"between {lo:g} and {hi:g}"
        if not row["informative"]:  # an interval this wide says nothing: never shown as a result
            lines.append(
                f"| {_label(row['init'])} | {_fmt(row['predicted_max_stable'], 'g')} | {rng} | not "
                f"determined (95% CI {row['ci_high'] - row['ci_low']:.1f} wide) | {row['r2']:.2f} | – |"
            )
            continue
        lines.append(
            f"| {_label(row['init'])} | {_fmt(row['predicted_max_stable'], 'g')} | {rng} | "
            f"{row['measured_slope']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] | "
            f"{row['r2']:.2f} | {'yes' if row['consistent'] else 'no'} |"
        )
    lines += ["", "Optimal learning rate (refined; grid point in brackets; * = at the grid edge):", ""]
    inits = list(cfg.inits)
    lines.append("| width | " + " | ".join(_label(i) for i in inits) + " |")
    lines.append("|---|" + "---|" * len(inits))
    for w in sorted(cfg.widths):
        cells = []
        for i in inits:
            o = next((o for o in _optima(result, i) if o.width == w), None)
            if o is None:
                cells.append("–")
            else:
                cells.append(
                    f"{_fmt(o.lr)} ({_fmt(o.lr_grid)}){'*' if o.at_edge else ''}, loss {_fmt(o.loss)}"
                )
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    settings = (
        f"Settings: {len(cfg.widths)} widths × {len(inits)} inits × {len(cfg.lrs)} LRs "
        f"({_fmt(min(cfg.lrs))}–{_fmt(max(cfg.lrs))}) × {len(cfg.seeds)} seeds; {cfg.steps} steps, batch "
        f"{cfg.batch_size}, r={cfg.rank}, scale s={cfg.scale:g}, LoRA+ ratio {shown_ratio(result):g}, AdamW "
        f"betas {cfg.betas}, eps {cfg.eps:g}, weight decay {cfg.weight_decay:g}, {cfg.schedule} LR "
        f"schedule; optimum read from the final {cfg.select_by} loss (mean over seeds). Wall time "
        f"{result.seconds:.1f} s ({result.loaded} of {len(result.chunks)} chunks resumed from disk; chunk "
        f"wall times summed over the parallel workers: {result.compute_seconds:.1f} s)."
    )
    lines += ["", settings, ""]
    return "\n".join(lines)


def write_figures_and_report(
    result: WidthStudyResult, out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Figures into ``<out>/figures`` and ``<out>/report.md`` (out defaults to the study's folder); the figure
    paths are also stored in ``result.figures``."""
    base = Path(out_dir) if out_dir is not None else result.out_dir
    if base is None:
        raise ValueError("out_dir: the study was run without a folder; pass one to write the figures into")
    result.figures = make_figures(result, base / "figures")
    write_report(result, base / "report.md")
    return result.figures


def write_report(result: WidthStudyResult, path: str | os.PathLike) -> Path:
    p = Path(path)
    text = report_markdown(result)
    figs = [f for f in result.figures if Path(f).exists()]
    if figs:
        text += "\n" + "\n".join(f"![{Path(f).stem}]({os.path.relpath(f, p.parent)})" for f in figs) + "\n"
    return atomic_write_text(p, text)

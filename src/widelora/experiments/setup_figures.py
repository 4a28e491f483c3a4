"""One figure for setup comparisons: metric vs learning rate per setup (seed mean ± standard error), with the
setups that choose their own learning rate drawn as a star at their seeds' mean choice (a horizontal bar spans
the seeds' choices) — so "tuned on a grid" and "untuned" are read off the same axes."""

from __future__ import annotations

import math
from pathlib import Path

from widelora.experiments.setup_comparison import SetupResult
from widelora.files import atomic_write


def plot_setups(
    panels: list[tuple[str, dict[str, SetupResult]]], ylabel: str, scale: float, path: Path
) -> Path:
    """Draw one panel per (title, setups) side by side into ``path`` (PNG); colours follow the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours: dict[str, str] = {}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, setups) in zip(axes[0], panels, strict=True):
        for label, s in setups.items():
            colour = colours.setdefault(label, f"C{len(colours)}")
            grid = [s.cells[lr] for lr in s.grid if s.cells[lr].n]
            if grid:
                ax.errorbar(
                    [c.lr for c in grid],
                    [scale * c.mean for c in grid],
                    yerr=[scale * _se0(c.se) for c in grid],
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=colour,
                    label=label,
                )
            own = s.cells.get(None)
            if own is not None and own.n and own.lr_by_seed:
                lrs = list(own.lr_by_seed.values())
                mid = math.exp(sum(math.log(v) for v in lrs) / len(lrs))
                ax.errorbar(
                    [mid],
                    [scale * own.mean],
                    yerr=[scale * _se0(own.se)],
                    xerr=[[max(0.0, mid - min(lrs))], [max(0.0, max(lrs) - mid)]],
                    marker="*",
                    ms=13,
                    capsize=3,
                    color=colour,
                    ls="none",
                    label=f"{label}: its own lr",
                )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (lr of A; B runs at ratio × lr under LoRA+)")
        ax.set_ylabel(ylabel)
        if ylabel.startswith("perplexity"):  # a collapsed run (10^3) would flatten every other point
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _se0(se: float) -> float:
    return se if math.isfinite(se) else 0.0

"""The demo's page: three answers in plain words first, then the evidence (figures and tables) for each.

Why a module of its own: the command runs things; this only turns measured results into one self-contained
HTML file (figures embedded), so it can be rebuilt from stored results without running anything again.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widelora.experiments.setup_comparison import SetupResult


@dataclass
class DemoOutcome:
    """What the demo measured: answers, per-question setups, the width study, timings and notes."""

    out: Path
    answers: dict[str, str] = field(default_factory=dict)  # "width" | "init" | "recommend" -> sentence
    setups: dict[str, dict[str, SetupResult]] = field(default_factory=dict)  # "init" | "recommend" -> setups
    figures: dict[str, Path] = field(default_factory=dict)
    width: Any = None  # WidthStudyResult
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


QUESTIONS = (
    ("width", "(a) Does the optimal learning rate scale with width as the theory says?"),
    ("init", "(b) Init[A] vs Init[B] on a real model, each at its own best learning rate"),
    ("recommend", "(c) widelora.recommend, untuned, vs PEFT's default tuned on a grid"),
)


def setup_table(setups: dict[str, SetupResult]) -> list[list[Any]]:
    """Rows: setup, lr, accuracy per seed, mean ± s.e., for every cell (the best one of each setup marked)."""
    from widelora.report.html import Raw

    rows = []
    for label, s in setups.items():
        best = s.best("max")
        for lr, cell in sorted(s.cells.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0.0)):
            if lr is None:
                lr_text = "probe: " + ", ".join(f"{v:.2g}" for v in cell.lr_by_seed.values())
            else:
                lr_text = f"{lr:.3g}"
            per_seed = ", ".join(f"{100 * v:.1f}" for _, v in sorted(cell.by_seed.items()))
            if cell.diverged or cell.failed:
                per_seed += f" ({cell.diverged} diverged, {cell.failed} failed)"
            err = f" ± {100 * cell.se:.1f}" if math.isfinite(cell.se) else ""
            mean = f"{100 * cell.mean:.1f}{err}" if cell.n else "–"
            mark = " ◀ best" if cell is best and lr is not None else ""
            rows.append([label, lr_text, per_seed, Raw(f"<b>{mean}</b>{mark}" if mark else mean)])
    return rows


def write_demo_page(o: DemoOutcome) -> Path:
    """``<out>/index.html``: the answers, then a section per question, then timings and notes."""
    from widelora.report.html import Section, table, write_html

    total = sum(o.seconds.values())
    timing = ", ".join(f"{k} {v / 60:.1f} min" for k, v in o.seconds.items())
    headline = (
        f"<div class='headline'><b>widelora demo</b> — {total / 60:.1f} min on {os.cpu_count()} CPU "
        f"core(s) ({html.escape(timing)}).</div>"
    )
    intro = [headline, "<h2>The answers</h2><ol>"]
    for key, title in QUESTIONS:
        intro.append(f"<li><b>{html.escape(title)}</b><br>{html.escape(o.answers.get(key, 'not run'))}</li>")
    intro.append("</ol>")
    if o.notes:
        intro.append(
            "<p><b>Notes:</b></p><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in o.notes) + "</ul>"
        )
    sections: list[Section] = []
    for key, title in QUESTIONS:
        sec = Section(title=title)
        sec.paragraphs.append(html.escape(o.answers.get(key, "not run")))
        if key in o.figures:
            sec.figures.append((o.figures[key], title))
        if key in o.setups:
            sec.tables.append(
                table(
                    ["setup", "learning rate", "accuracy per seed (%)", "mean ± s.e. (%)"],
                    setup_table(o.setups[key]),
                )
            )
        if key == "width" and o.width is not None:
            _width_section(sec, o.width)
        sections.append(sec)
    sections.append(_method_section())
    return write_html(o.out / "index.html", "widelora demo", sections, intro="\n".join(intro))


def _width_section(sec: Any, width: Any) -> None:
    from widelora.report.html import table

    cfg = width.config
    sec.paragraphs.append(
        f"The initialization paper's Section 3.7 experiment: widths {', '.join(map(str, cfg.widths))}, "
        f"{len(cfg.lrs)} learning rates a factor 2 apart, seeds {', '.join(map(str, cfg.seeds))}, "
        f"{cfg.steps} steps. Theory: the optimal learning rate scales like n^-1 for Init[B] and between "
        "n^-1 and n^-1/2 for Init[A]. A fit whose interval is wider than 0.5 is not reported as a result."
    )
    rows = []
    for r in width.exponent_rows():
        lo, hi = r["ci_low"], r["ci_high"]
        rows.append(
            [
                r["init"],
                f"{r['measured_slope']:.2f}",
                f"[{lo:.2f}, {hi:.2f}]",
                f"{hi - lo:.2f}",
                str(r.get("predicted_optimal_range")),
                str(r.get("consistent")),
            ]
        )
    sec.tables.append(
        table(["init", "measured exponent", "95% CI", "CI width", "theory's range", "consistent"], rows)
    )
    for fig in getattr(width, "figures", []) or []:
        if Path(fig).suffix == ".png":
            sec.figures.append((Path(fig), Path(fig).stem.replace("_", " ")))


def _method_section() -> Any:
    from widelora.experiments.demo_plan import EVAL_BASE
    from widelora.report.html import Section

    b = EVAL_BASE
    sec = Section(title="How the real-model numbers were made")
    sec.paragraphs.append(
        html.escape(
            f"all-MiniLM-L6-v2 (width 384) + a fresh 11-way linear head on the Wikipedia topics; adapters "
            f"rank {b['rank']}, alpha {b['alpha']} on {', '.join(b['targets'])} (PEFT's defaults) except "
            f"where recommend chooses; {b['steps']} steps of batch {b['batch_size']} at sequence length "
            f"{b['seq_len']}, linear warmup and decay, clipping at {b['max_grad_norm']}; accuracy on each "
            "seed's whole held-out test split (903 documents). Gaps are paired by seed (the same seed is the "
            "same split, data order and test set for every setup), mean ± standard error. The same protocol "
            "with 3 seeds and an 8-point grid for every setup is in docs/results/recommend_eval.md."
        )
    )
    return sec

"""One self-contained HTML page per report: figures embedded as base64 PNG, tables of the best configurations,
every trial, and the sweep's metadata — a single file that can be mailed or attached to a paper's supplement.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from widelora.files import atomic_write_text
from widelora.report.summary import SweepResults, display_scale, metric_label, pretty

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#eef7ee;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.muted{color:#666;font-size:.9em}
.headline{background:#f6f8fa;border-left:4px solid #1f77b4;padding:.6em 1em;margin:1em 0}
code,pre{background:#f6f8fa;padding:.1em .3em;border-radius:3px;font-size:.9em}
pre{padding:.6em;overflow-x:auto}
.st-done{color:#1a7f37}.st-diverged{color:#b35900}.st-failed{color:#cf222e}
"""


@dataclass
class Section:
    """A titled block of the page: paragraphs (HTML allowed), figures (PNG paths) and raw HTML tables."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)


def mean_se(mean: float, se: float, n: int, mean_fmt: str = ".4g", se_fmt: str = ".2g") -> str:
    """ "mean ± s.e." — or "mean (1 seed)" where a standard error does not exist (it is not 0)."""
    if n < 2 or not math.isfinite(se):
        return f"{mean:{mean_fmt}} ({n} seed)"
    return f"{mean:{mean_fmt}} ± {se:{se_fmt}}"


def embed_png(path: str | Path, alt: str) -> str:
    """An <img> tag holding the PNG itself, so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], best_rows: Sequence[int] = ()) -> str:
    """A plain HTML table; numbers right-aligned; rows in ``best_rows`` highlighted."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for v in row:
            if isinstance(v, Raw):
                cells.append(f"<td>{v.html}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{_fmt(v)}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        cls = ' class="best"' if i in best_rows else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


@dataclass
class Raw:
    """A table cell that is already HTML (not escaped)."""

    html: str


def best_table(res: SweepResults) -> str:
    """Best learning rate of each group with its seed mean ± s.e.; the overall best row highlighted."""
    scale = display_scale(res.metric)
    rows, scores = [], []
    for g in res.groups():
        best = g.best(res.goal)
        diverged = Raw(f'<span class="st-diverged">{g.diverged}</span>') if g.diverged else 0
        if best is None:
            rows.append([g.label, "—", "—", 0, diverged, g.failed])
            scores.append(math.nan)
            continue
        rows.append(
            [
                g.label,
                best.lr if best.lr is not None else "default",
                Raw(mean_se(best.mean * scale, best.se * scale, best.n)),
                best.n,
                diverged,
                g.failed,
            ]
        )
        scores.append(best.mean)
    finite = [(s, i) for i, s in enumerate(scores) if math.isfinite(s)]
    top = [(max if res.goal == "max" else min)(finite)[1]] if finite else []
    return table(
        ["group", "best lr", f"{metric_label(res.metric)} (mean ± s.e.)", "seeds", "diverged", "failed"],
        rows,
        top,
    )


def trials_table(res: SweepResults) -> str:
    """Every trial: labels, status, final metrics, wall time and the first line of any error."""
    names: list[str] = []
    for t in res.trials:
        for k in t.final:
            if k not in names:
                names.append(k)
    names = names[:6]
    label_keys: list[str] = []
    for t in res.trials:
        for k in t.labels:
            if k not in label_keys:
                label_keys.append(k)
    rows = []
    for t in res.trials:
        status = Raw(f'<span class="st-{t.status}">{t.status}</span>')
        err = (t.error or "").splitlines()[0][:120] if t.error else ""
        rows.append(
            [
                Raw(f"<code>{t.id}</code>"),
                *[pretty(t.labels.get(k, "")) for k in label_keys],
                status,
                *[t.final.get(k, "") for k in names],
                t.seconds if t.seconds is not None else "",
                t.attempts,
                err,
            ]
        )
    return table(["id", *label_keys, "status", *names, "seconds", "attempts", "error"], rows)


def metadata_table(res: SweepResults) -> str:
    """Sweep name, store, trial counts, base config and axes, wall time of each invocation."""
    spec = res.spec
    counts = ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items()))
    total_s = sum(inv.get("seconds", 0.0) for inv in res.invocations)
    rows = [
        ["sweep", res.name],
        ["store", str(res.path)],
        ["trials", f"{len(res.trials)} ({counts})"],
        ["headline metric", f"{res.metric} ({'higher' if res.goal == 'max' else 'lower'} is better)"],
        ["trial function", spec.get("trial_fn", "")],
        ["axes", Raw(f"<code>{html.escape(json.dumps(spec.get('axes', {})))}</code>")],
        ["base config", Raw(f"<code>{html.escape(json.dumps(spec.get('base', {})))}</code>")],
        ["invocations", f"{len(res.invocations)} (total wall time {total_s / 60:.1f} min)"],
    ]
    for inv in res.invocations:
        when = _dt.datetime.fromtimestamp(inv.get("started", 0), _dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        rows.append(
            [
                "",
                (
                    f"{when}: backend {inv.get('backend')}, {inv.get('workers')} worker(s) × "
                    f"{inv.get('threads')} thread(s), ran {inv.get('ran')} trial(s) in "
                    f"{inv.get('seconds', 0):.0f} s"
                ),
            ]
        )
    return table(["", ""], rows)


def sweep_sections(res: SweepResults, figures: dict[str, Path]) -> list[Section]:
    """The standard sections of one sweep's report."""
    sec = Section(title=f"Sweep {res.name}")
    if res.spec.get("description"):
        sec.paragraphs.append(html.escape(res.spec["description"]))
    sec.paragraphs.extend(f'<span class="st-diverged">Note: {html.escape(n)}.</span>' for n in res.notes)
    captions = {
        "metric_vs_lr": (
            f"{res.metric} vs learning rate: seed mean with a ±1 standard-error band; the star marks each "
            "group's best learning rate; a red ring marks points where some seeds diverged (they are left "
            "out of the mean); × marks learning rates where every seed diverged."
        ),
        "metric_by_group": (
            f"{res.metric} of each group (the sweep has no lr axis): seed mean ± 1 standard error; diverged "
            "seeds are written on the bar and left out of the mean."
        ),
        "heatmap": (
            "Seed-mean metric for every group and learning rate; the red box is each row's best; 'div.' "
            "counts diverged seeds (never averaged in)."
        ),
        "curves": (
            "Metrics logged during training at each group's best learning rate (thick: seed mean; thin: "
            "individual seeds)."
        ),
    }
    for kind in ("metric_vs_lr", "metric_by_group", "heatmap", "curves"):
        if kind in figures:
            sec.figures.append((figures[kind], captions[kind]))
    sec.tables.append("<h3>Best configuration per group</h3>" + best_table(res))
    sec.tables.append("<h3>Sweep metadata</h3>" + metadata_table(res))
    sec.tables.append("<h3>All trials</h3>" + trials_table(res))
    return [sec]


def write_html(path: str | Path, title: str, sections: Sequence[Section], intro: str = "") -> Path:
    """Write the page atomically; every figure is embedded, so the page is the only file needed."""
    path = Path(path)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='muted'>generated {stamp} by widelora</p>",
    ]
    if intro:
        parts.append(intro)
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.extend(f"<p>{p}</p>" for p in sec.paragraphs)
        for fig, caption in sec.figures:
            parts.append(
                f"<figure>{embed_png(fig, caption)}<figcaption class='muted'>{html.escape(caption)}"
                "</figcaption></figure>"
            )
        parts.extend(sec.tables)
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"

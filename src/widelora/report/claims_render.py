"""The claims ledger as markdown (docs/claims.md and the README's short "What holds" table) and its figures in
the paper's style: metric vs learning rate per setup with seed bands, and optimal learning rate vs width.

Everything here is drawn from `widelora.report.claims` results; the files say they are generated and by which
command, so nobody edits the numbers by hand.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from widelora.files import atomic_write_text
from widelora.report.claims import ClaimResult, ExperimentResult
from widelora.report.claims_spec import LedgerDef
from widelora.report.figures import COLORS, STYLE, plot_metric_vs_lr, plt, save
from widelora.report.summary import SweepResults
from widelora.report.verdicts import MARK, RULES
from widelora.report.width_claims import delta_split_parts

HOW_VERDICTS = (
    "**How a verdict is computed.** Each claim is checked as parts by a stated rule (given under each "
    "claim). Setups are compared each at its own best learning rate of the grid (seed mean ± standard "
    "error); a difference counts when the seed-paired difference exceeds {z:g} standard errors, and a part "
    "counts only with at least {min_seeds} seeds (fewer: shown as preliminary, marked …). A part holds (✓), "
    "is within noise (≈) or is contradicted (✗). Every measured part holds → **holds**; none → **does not "
    "hold here**; otherwise **holds in part**; nothing measured → **not yet measured**. CPU time is the sum "
    "of the trials' CPU seconds as the sweep store recorded them."
)
RULE_TEXT = {
    "pending": "no experiment has been run yet",
    "width_delta_split": " ".join((delta_split_parts.__doc__ or "").split()),
    "width_feature_growth": (
        "the log-log slope of |Z_A| (at each width's optimal learning rate, end of training, seed mean) over "
        "width must have its 95% interval above 0; below 0 contradicts; containing 0 is within noise"
    ),
    "width_exponent": (
        "the fitted exponent's 95% interval must contain the prediction (a range: the estimate inside it and "
        "the interval overlapping it) and be at most 0.5 wide (a wider one determines nothing: within "
        "noise); an interval that excludes the prediction contradicts the claim"
    ),
}


def rule_text(rule: str) -> str:
    """The stated rule behind a verdict: the rule function's docstring summary."""
    if rule in RULE_TEXT:
        return RULE_TEXT[rule]
    doc = (RULES[rule].__doc__ or rule).strip()
    return " ".join(doc.split())


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def make_figures(results: list[ClaimResult], out_dir: Path) -> dict[str, list[Path]]:
    """The figures each claim asks for: {claim id: [png, ...]}."""
    made: dict[str, list[Path]] = {}
    for r in results:
        kind = r.definition.figure
        for i, e in enumerate(r.experiments, 1):
            path = out_dir / f"{r.definition.id}_{i}.png"
            title = f"{r.definition.id}: {e.definition.title or e.source.name}"
            drawn = None
            if kind == "metric_vs_lr" and e.trials and e.results is not None:
                drawn = _metric_vs_lr(e, path, title)
            elif kind == "optimal_lr_vs_width" and e.summaries:
                drawn = _optimal_lr_vs_width(e, path, title)
            if drawn is not None:
                made.setdefault(r.definition.id, []).append(drawn)
    return made


def _metric_vs_lr(e: ExperimentResult, path: Path, title: str) -> Path | None:
    """The experiment's groups on one metric-vs-LR plot (seed mean, ±1 s.e. band, best starred)."""
    names = {(g.source, g.setup): g.name for g in e.definition.groups}
    trials = []
    for t in e.trials:
        for (_src, setup), name in names.items():
            if str(t.labels.get("setup")) == setup:
                trials.append(dataclasses.replace(t, labels={**t.labels, "setup": name}))
                break
    res = e.results
    merged = SweepResults(res.name, res.path, res.spec, res.metric, res.goal, trials, {}, [])
    return plot_metric_vs_lr(
        merged, path, title=f"{title}\n{res.metric} vs learning rate (mean ± 1 s.e.; ★ best)"
    )


def _optimal_lr_vs_width(e: ExperimentResult, path: Path, title: str) -> Path | None:
    """Optimal learning rate vs width per init (refined optimum; per-seed grid argmins as dots; fitted
    line)."""
    summary = e.summaries[0]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.2, 4.3))
        for i, (init, name) in enumerate(e.definition.inits.items()):
            color = COLORS[i % len(COLORS)]
            optima = sorted((o for o in summary["optima"] if o["init"] == init), key=lambda o: o["width"])
            if not optima:
                continue
            w = np.array([o["width"] for o in optima], dtype=float)
            lr = np.array([o["lr"] if o["lr"] is not None else np.nan for o in optima], dtype=float)
            for o in optima:
                seeds = [v for v in o.get("per_seed") or [] if v]
                ax.plot([o["width"]] * len(seeds), seeds, ".", color=color, alpha=0.35, ms=5)
            fit = summary["fits"].get(init)
            label = (
                name
                if fit is None
                else f"{name}: n^{fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
            )
            ax.plot(w, lr, "-o", color=color, lw=1.8, ms=5, label=label)
            if fit is not None:
                ax.plot(w, np.exp(fit["intercept"]) * w ** fit["slope"], "--", color=color, lw=1, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("width n (log scale)")
        ax.set_ylabel("optimal learning rate (log scale)")
        ax.set_title(f"{title}\noptimal LR vs width (dots: per-seed grid optima; dashed: fit)", fontsize=10.5)
        ax.legend(frameon=False)
        return save(fig, path)


def ledger_markdown(
    ledger: LedgerDef, results: list[ClaimResult], out: Path, figures: dict[str, list[Path]], command: str
) -> str:
    """docs/claims.md: the one-row-per-claim table, then each claim's checks, experiments and figures."""
    s = ledger.settings
    lines = [
        f"# {ledger.title}",
        "",
        f"<!-- generated by `{command}` from {_rel(ledger.path, out.parent)} and the result files it names; "
        + "edit those, not this file -->",
        "",
    ]
    if ledger.intro:
        lines += [ledger.intro.strip(), ""]
    lines += [
        HOW_VERDICTS.format(z=s.z, min_seeds=s.min_seeds),
        "",
        "| # | claim (source) | experiment | measured (seed mean ± s.e.) | verdict | what would change it | "
        "CPU time |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        d = r.definition
        exps = (
            "<br>".join(
                f"{e.definition.title or e.source.name}: `{e.source.command}`"
                if e.source.command
                else (e.definition.title or e.source.name)
                for e in r.experiments
            )
            or "—"
        )
        measured = "<br>".join(_measured(e) for e in r.experiments) or "—"
        lines.append(
            f"| {i} | [{_cell(d.claim)}](#claim-{d.id}) ({_cell(d.origin)}) | {_cell(exps)} | "
            f"{_cell(measured)} | **{r.verdict.text()}** | {_cell(d.would_change)} | {r.cost.text()} |"
        )
    lines.append("")
    for i, r in enumerate(results, 1):
        lines += _section(i, r, out, figures.get(r.definition.id, []))
    return "\n".join(lines).rstrip() + "\n"


def _measured(e: ExperimentResult) -> str:
    title = e.definition.title or e.source.name
    return f"*{title}:* " + ("; ".join(e.measured) if e.measured else "not run yet")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(i: int, r: ClaimResult, out: Path, figs: list[Path]) -> list[str]:
    d = r.definition
    rules = list(dict.fromkeys([d.rule, *(e.definition.rule for e in r.experiments if e.definition.rule)]))
    lines = [
        f'<a id="claim-{d.id}"></a>',
        f"## {i}. {d.claim}",
        "",
        f"*Source:* {d.origin or '—'}. *Verdict:* **{r.verdict.text()}**. *CPU time:* {r.cost.text()}.",
        "",
        *[f"*Rule ({rule}):* {rule_text(rule)}\n" for rule in rules],
        "Checks:",
        "",
    ]
    lines += [f"- {p.line()}" for p in r.verdict.parts] + [""]
    seen: set[str] = set()
    for e in r.experiments:
        lines += _experiment(e, repeat=e.source.name in seen)
        seen.add(e.source.name)
    for f in figs:
        lines += [f"![{d.id}]({_rel(f, out.parent)})", ""]
    if d.note:
        lines += [d.note.strip(), ""]
    if d.would_change:
        lines += [f"*What would change it:* {d.would_change.strip()}", ""]
    return lines


def _experiment(e: ExperimentResult, repeat: bool = False) -> list[str]:
    title = e.definition.title or e.source.name
    setting = "Same setting and run as above." if repeat else e.source.setting.strip()
    lines = [f"**{title}.** {setting}".rstrip(), ""]
    if e.source.command:
        lines += [f"- command: `{e.source.command}`"]
    lines += [f"- result file: `{e.source.file.name}`" + ("" if e.available else " (not there yet)")]
    if e.measured:
        lines += [f"- measured: {'; '.join(e.measured)}"]
    if e.ranking_full:
        lines += [f"- ranking at full budget: {' > '.join(e.ranking_full)}"]
    if e.ranking_half:
        step = next((g.half_step for g in e.groups if g.half_step), None)
        lines += [f"- ranking at half budget (validation at step {step}): {' > '.join(e.ranking_half)}"]
    if e.remaining:
        lines += [f"- still to run: {e.remaining} trial(s) of these setups (the sweep resumes)"]
    lines += [f"- CPU time: {e.cost.text()}", ""]
    return lines


def readme_table(results: list[ClaimResult], link: str) -> str:
    """The short "What holds" table for the top of the README, linking each claim to its ledger section."""
    lines = ["| claim | verdict |", "|---|---|"]
    for r in results:
        d = r.definition
        lines.append(
            f"| [{_cell(d.claim)}]({link}#claim-{d.id}) | {MARK.get(_mark(r), '')} {r.verdict.text()} |"
        )
    return "\n".join(lines) + "\n"


def _mark(r: ClaimResult) -> str:
    return {"holds": "holds", "does not hold here": "contradicted", "not yet measured": "missing"}.get(
        r.verdict.verdict, "tie"
    )


def write_ledger(
    ledger: LedgerDef,
    results: list[ClaimResult],
    out: Path,
    figures_dir: Path | None,
    readme: Path | None,
    command: str,
) -> list[Path]:
    """Write the ledger (and its figures, and the README table when asked); returns the files written."""
    figures = make_figures(results, figures_dir) if figures_dir is not None else {}
    written = [atomic_write_text(out, ledger_markdown(ledger, results, out, figures, command))]
    written += [p for ps in figures.values() for p in ps]
    if readme is not None:
        # the table is pasted into the README at the repository root: links relative to where the command runs
        written.append(atomic_write_text(readme, readme_table(results, _rel(out, Path.cwd()))))
    return written

"""Reports: paper-style PNG figures of a sweep and one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

from widelora.report.summary import SweepResults, load_results


def build_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    goal: str | None = None,
    all_trials: bool = False,
) -> tuple[Path, dict[str, Path], SweepResults]:
    """Figures + ``index.html`` for the sweep store at ``results``; returns (page, figures, summary).

    ``out_dir`` defaults to a ``report`` folder beside the store.
    """
    from widelora.report.figures import make_figures
    from widelora.report.html import sweep_sections, write_html

    res = load_results(results, metric=metric, goal=goal, all_trials=all_trials)
    out = Path(out_dir) if out_dir is not None else res.path.parent / "report"
    figures = make_figures(res, out)
    page = write_html(out / "index.html", f"widelora sweep report: {res.name}", sweep_sections(res, figures))
    return page, figures, res


__all__ = ["SweepResults", "build_report", "load_results"]

"""`widelora width-study`: the teacher–student width study of the initialization paper (Figures 2–3)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_OUT = Path("results/width_study")
_POW_RANGE = re.compile(r"^2\^(-?\d+)\.\.2\^(-?\d+)(?:/(\d+))?$")


def parse_widths(text: str) -> tuple[int, ...]:
    """ "128,256,512" or "2^7..2^13" (every power of two in between)."""
    m = _POW_RANGE.match(text.replace(" ", ""))
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo < 0 or hi < lo:
            raise ValueError(f"widths: bad range {text!r}; expected e.g. 2^7..2^13")
        return tuple(2**k for k in range(lo, hi + 1))
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"widths: {text!r} is not a comma-separated list of ints or a range like 2^7..2^13"
        ) from None
    if not values or min(values) < 1:
        raise ValueError(f"widths: {text!r}; expected positive ints")
    return values


def parse_lrs(text: str) -> tuple[float, ...]:
    """ "1e-4,3e-4" or "2^-16..2^-2" (factor 2 apart) or "2^-16..2^-2/2" (2 points per octave)."""
    from widelora.experiments.width_config import lr_grid

    m = _POW_RANGE.match(text.replace(" ", ""))
    if m:
        per = int(m.group(3) or 1)
        return lr_grid(int(m.group(1)), int(m.group(2)), per)
    try:
        values = tuple(sorted(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise ValueError(
            f"lrs: {text!r} is not a comma-separated list of numbers or a range like 2^-16..2^-2"
        ) from None
    if not values or min(values) <= 0:
        raise ValueError(f"lrs: {text!r}; expected positive learning rates")
    return values


def parse_ratios(text: str) -> tuple[float, ...]:
    """ "1,4,16" or "2^0..2^8" (every power of two in between)."""
    from widelora.experiments.width_config import lr_grid

    m = _POW_RANGE.match(text.replace(" ", ""))
    if m:
        return lr_grid(int(m.group(1)), int(m.group(2)), int(m.group(3) or 1))
    try:
        values = tuple(sorted(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise ValueError(
            f"ratios: {text!r} is not a comma-separated list of numbers or a range like 2^0..2^8"
        ) from None
    if not values or min(values) <= 0:
        raise ValueError(f"ratios: {text!r}; expected positive ratios lr_B / lr_A")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(app: typer.Typer) -> None:
    """Attach `width-study` to the main app."""

    @app.command("width-study")
    def width_study(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable).")] = DEFAULT_OUT,
        quick: Annotated[
            bool, typer.Option("--quick", help="Small study for demos: 3 widths, 1 seed, < 1 min.")
        ] = False,
        widths: Annotated[
            str | None, typer.Option(help="e.g. 128,1024,8192 or 2^7..2^13 (default: 2^7..2^13)")
        ] = None,
        inits: Annotated[
            str, typer.Option(help="Registered init schemes, comma-separated.")
        ] = "init_a,init_b",
        lrs: Annotated[
            str | None, typer.Option(help="e.g. 2^-15..2^-3 (factor 2), 2^-15..2^-3/2, or 1e-4,3e-4")
        ] = None,
        seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (default: 0,1,2,3).")] = None,
        steps: Annotated[int | None, typer.Option(help="AdamW steps per run (default: 500).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Mini-batch size (default: 16).")] = None,
        rank: Annotated[int, typer.Option(help="Student LoRA rank r.")] = 4,
        alpha: Annotated[
            float | None, typer.Option(help="LoRA alpha; s = alpha/r (default: alpha = r).")
        ] = None,
        ratios: Annotated[
            str,
            typer.Option(help="LoRA+ ratios lr_B / lr_A, a grid axis: 1 (plain AdamW), 1,4,16 or 2^0..2^8."),
        ] = "1",
        eval_steps: Annotated[
            str, typer.Option(help="Earlier budgets at which losses are also recorded, e.g. 125,250.")
        ] = "",
        weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
        schedule: Annotated[str, typer.Option(help="LR schedule: constant | linear | cosine.")] = "constant",
        select_by: Annotated[
            str, typer.Option(help="Loss the optimum is read from: train | test.")
        ] = "train",
        dtype: Annotated[str, typer.Option(help="float32 | float64.")] = "float32",
        threads: Annotated[int | None, typer.Option(help="torch threads per process (default: 1).")] = None,
        workers: Annotated[
            int | None, typer.Option(help="Processes, 1 thread each (default: 2; --quick: 1).")
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume/--no-resume", help="Skip chunks already in --out.")
        ] = True,
        progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
        figures: Annotated[bool, typer.Option("--figures/--no-figures")] = True,
    ) -> None:
        """Optimal LR vs width for Init[A] / Init[B] on the paper's teacher–student model, with figures."""
        from widelora.experiments.width_study import WidthStudyConfig, run_width_study
        from widelora.report.width_figures import report_markdown, write_figures_and_report

        overrides: dict = {
            "inits": _names(inits),
            "rank": rank,
            "alpha": alpha,
            "weight_decay": weight_decay,
            "schedule": schedule,
            "select_by": select_by,
            "dtype": dtype,
            "threads": threads,
        }
        if workers is not None:
            overrides["workers"] = workers
        try:
            overrides["ratios"] = parse_ratios(ratios)
            overrides["eval_steps"] = tuple(int(v) for v in _names(eval_steps))
            if widths:
                overrides["widths"] = parse_widths(widths)
            if lrs:
                overrides["lrs"] = parse_lrs(lrs)
            if seeds:
                overrides["seeds"] = tuple(int(s) for s in _names(seeds))
            if steps is not None:
                overrides["steps"] = steps
            if batch_size is not None:
                overrides["batch_size"] = batch_size
            config = WidthStudyConfig.quick(**overrides) if quick else WidthStudyConfig(**overrides)
            from widelora.methods.init import get_scheme

            for name in config.inits:
                get_scheme(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        result = run_width_study(config, out, progress=progress, resume=resume)
        if figures:
            write_figures_and_report(result, out)
        typer.echo(report_markdown(result))
        typer.echo(f"results: {out}/results.csv, {out}/optima.csv, {out}/summary.json, {out}/report.md")
        for fig in result.figures:
            typer.echo(f"figure: {fig}")

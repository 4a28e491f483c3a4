"""`widelora demo --out demo-report` (what `make demo` runs): three answers in under 15 minutes on 2 cores.

(a) the width study — all 7 widths, 4 seeds — and whether its optimal-learning-rate exponents agree with the
theory; (b) Init[A] vs Init[B] on a real model (MiniLM-L6 topic classification), each at its own best learning
rate, 2 seeds; (c) `widelora.recommend` untuned against PEFT's default tuned on a small grid, 2 seeds. The
page
(``<out>/index.html``, self-contained) leads with the three answers in plain words, whatever their sign; the
real-model trials use the evaluation protocol's budget (``widelora.experiments.demo_plan``), so they are a
subset
of docs/results/recommend_eval.md. Every part is a resumable store under ``<out>``: running the demo again
resumes (``--fresh`` starts over, and only in a folder that an earlier demo created). A part that fails is
reported with a note rather than failing the whole demo.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from widelora.experiments.demo_page import DemoOutcome, write_demo_page
from widelora.experiments.demo_plan import DemoPlan, init_spec, peft_spec, recommend_spec
from widelora.files import claim_folder


def run_width_part(out: Path, o: DemoOutcome, plan: DemoPlan, workers: int) -> None:
    """(a) The full width study (7 widths) with ``plan.width_seeds`` seeds, figures and its answer."""
    from widelora.experiments.demo_plan import width_answer
    from widelora.experiments.width_study import WidthStudyConfig, run_width_study
    from widelora.report.width_figures import write_figures_and_report

    t0 = time.time()
    try:
        config = WidthStudyConfig(seeds=tuple(range(plan.width_seeds)), workers=max(1, workers), threads=1)
        o.width = run_width_study(config, out / "width-study", progress=True)
        write_figures_and_report(o.width)
        o.answers["width"] = width_answer(o.width.exponent_rows(), len(config.widths), len(config.seeds))
    except Exception as exc:
        o.notes.append(f"width study failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    o.seconds["width study"] = time.time() - t0


def run_sweep_part(out: Path, name: str, spec_dict: dict[str, Any], workers: int) -> Any:
    """One question's sweep into ``<out>/<name>/results.sqlite`` (resumed when present); its summary."""
    import yaml

    from widelora.report.summary import load_results
    from widelora.sweep import ResultStore, TrialProgress, parse_spec, run_sweep

    spec = parse_spec(yaml.safe_dump(spec_dict, sort_keys=False), source=f"demo spec {name}")
    path = out / name / "results.sqlite"
    with ResultStore(path) as store:
        run_sweep(spec, store, workers=workers, threads=1, progress=TrialProgress(metric=spec.metric))
    return load_results(path)


def run_real_parts(out: Path, o: DemoOutcome, plan: DemoPlan, workers: int, only: set[str]) -> None:
    """(b) and (c): the sweeps, their answers and figures."""
    from widelora.experiments.demo_plan import init_answer, recommend_answer
    from widelora.experiments.setup_comparison import collect
    from widelora.experiments.setup_figures import plot_setups

    parts = {
        "init": [("init", init_spec(plan))],
        "recommend": [("peft", peft_spec(plan)), ("recommend", recommend_spec(plan))],
    }
    answers = {"init": init_answer, "recommend": recommend_answer}
    titles = {"init": "Init[A] vs Init[B], MiniLM topics", "recommend": "recommend (untuned) vs PEFT default"}
    for key, sweeps in parts.items():
        if key not in only:
            continue
        t0 = time.time()
        typer.echo(
            f"== ({'b' if key == 'init' else 'c'}) {titles[key]}: "
            + " + ".join(f"{_count(s)} trials" for _, s in sweeps)
        )
        try:
            setups: dict[str, Any] = {}
            for name, spec in sweeps:
                res = run_sweep_part(out, name, spec, workers)
                setups.update(collect(res.trials, res.metric))
            o.setups[key] = setups
            o.answers[key] = answers[key](setups)
            o.figures[key] = plot_setups(
                [(titles[key], setups)], "test accuracy (%)", 100.0, out / "figures" / f"{key}.png"
            )
        except Exception as exc:
            o.notes.append(f"{titles[key]} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        o.seconds[titles[key]] = time.time() - t0


def _count(spec: dict[str, Any]) -> int:
    n = 1
    for values in spec["axes"].values():
        n *= len(values)
    return n


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from widelora.errors import UserError

        raise UserError(f"{flag} {text!r} must be comma-separated numbers") from None


def register(app: typer.Typer) -> None:
    """Attach `widelora demo` to the main app."""

    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option(help="Output folder (index.html, figures, stores).")] = Path(
            "demo-report"
        ),
        seeds: Annotated[str, typer.Option(help="Comma-separated seeds of the real-model parts.")] = "0,1",
        width_seeds: Annotated[int, typer.Option(help="Seeds of the width study.")] = 4,
        init_lrs: Annotated[str | None, typer.Option(help="Learning rates of (b), comma-separated.")] = None,
        peft_lrs: Annotated[
            str | None, typer.Option(help="PEFT default's grid in (c), comma-separated.")
        ] = None,
        workers: Annotated[
            int, typer.Option(help="Processes (one thread each); 0 runs trials in this process.")
        ] = 2,
        parts: Annotated[str, typer.Option(help="Which answers to compute: width,init,recommend.")] = (
            "width,init,recommend"
        ),
        skip_width: Annotated[bool, typer.Option(help="Leave out (a), the width study.")] = False,
        skip_real: Annotated[bool, typer.Option(help="Leave out (b) and (c), the real-model parts.")] = False,
        fresh: Annotated[
            bool, typer.Option(help="Delete an earlier demo's results in --out first (else resume).")
        ] = False,
    ) -> None:
        """Answer three questions (width study, Init[A] vs Init[B], recommend vs PEFT); write index.html."""
        from widelora.errors import UserError

        for key, value in (
            ("TRANSFORMERS_VERBOSITY", "error"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("TOKENIZERS_PARALLELISM", "false"),
        ):
            os.environ.setdefault(key, value)
        plan = DemoPlan(seeds=_numbers(seeds, int, "--seeds"), width_seeds=width_seeds)
        if init_lrs:
            plan.init_lrs = _numbers(init_lrs, float, "--init-lrs")
        if peft_lrs:
            plan.peft_lrs = _numbers(peft_lrs, float, "--peft-lrs")
        only = {p.strip() for p in parts.split(",") if p.strip()}
        unknown = only - {"width", "init", "recommend"}
        if unknown:
            raise UserError(f"--parts: unknown part(s) {sorted(unknown)}; valid: width, init, recommend")
        only -= {"width"} if skip_width else set()
        only -= {"init", "recommend"} if skip_real else set()
        if workers < 0:
            raise UserError(f"--workers {workers}: must be 0 (in this process) or more")
        plan.validate()
        claim_folder(out, "demo", fresh=fresh)  # refuses a folder that an earlier demo did not create
        o = DemoOutcome(out=out)
        if "width" in only:
            typer.echo(f"== (a) width study: 7 widths x {plan.width_seeds} seeds")
            run_width_part(out, o, plan, workers)
        run_real_parts(out, o, plan, workers, only)
        page = write_demo_page(o)
        typer.echo("")
        for note in o.notes:
            typer.echo(f"note: {note}")
        for key in ("width", "init", "recommend"):
            if key in o.answers:
                typer.echo(f"- {o.answers[key]}")
        typer.echo(f"demo finished in {sum(o.seconds.values()) / 60:.1f} min; report: {page.resolve()}")

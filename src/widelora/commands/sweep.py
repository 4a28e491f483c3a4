"""`widelora sweep spec.yaml`: expand a grid spec into trials and run the unfinished ones, resumably."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Attach `widelora sweep` to the main app."""

    @app.command("sweep")
    def sweep(
        spec: Annotated[Path, typer.Argument(help="YAML sweep spec: name, base run config, axes to vary.")],
        backend: Annotated[
            str, typer.Option(help="local (worker processes) or ray (a Ray cluster).")
        ] = "local",
        address: Annotated[
            str | None,
            typer.Option(
                help="Ray address (e.g. auto or ray://head:10001); none with --backend ray: a local Ray.",
            ),
        ] = None,
        workers: Annotated[
            int,
            typer.Option(
                help="Trials at once (local processes or Ray tasks); 0 = one by one in this process."
            ),
        ] = 1,
        threads: Annotated[
            int | None,
            typer.Option(
                help="Torch threads per trial (default: cores / workers); also each Ray task's num_cpus."
            ),
        ] = None,
        gpus: Annotated[float, typer.Option(help="GPUs per trial (Ray backend).")] = 0.0,
        store: Annotated[
            Path | None, typer.Option(help="SQLite result store (default: sweeps/<name>/results.sqlite).")
        ] = None,
        runs_dir: Annotated[
            Path | None, typer.Option(help="Per-trial run folders (default: 'runs' beside the store).")
        ] = None,
        retry_failed: Annotated[bool, typer.Option(help="Run trials recorded as failed again.")] = False,
        dry_run: Annotated[bool, typer.Option(help="Only list the trials the spec expands to.")] = False,
        report: Annotated[
            bool, typer.Option(help="Write the report (PNGs + index.html) beside the store at the end.")
        ] = True,
    ) -> None:
        """Run a learning-rate × init × method grid; run it again after a crash to resume, or from several
        shells (or machines sharing the store) at once to share the work."""
        from widelora.errors import UserError

        try:
            _run(
                spec, backend, address, workers, threads, gpus, store, runs_dir, retry_failed, dry_run, report
            )
        except UserError as exc:  # until the app-wide handler: one line, no traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


def _run(
    spec: Path,
    backend: str,
    address: str | None,
    workers: int,
    threads: int | None,
    gpus: float,
    store: Path | None,
    runs_dir: Path | None,
    retry_failed: bool,
    dry_run: bool,
    report: bool,
) -> None:
    from widelora.sweep import ResultStore, TrialProgress, load_spec, run_sweep

    parsed = load_spec(spec)
    trials = parsed.trials()
    if dry_run:
        for t in trials:
            typer.echo(f"{t.id}  " + " ".join(f"{k}={v}" for k, v in t.labels.items()))
        typer.echo(f"{len(trials)} trials")
        return
    store_path = store or Path("sweeps") / parsed.name / "results.sqlite"
    progress = TrialProgress(metric=parsed.metric)
    try:
        with ResultStore(store_path) as st:
            typer.echo(f"sweep {parsed.name}: {len(trials)} trials, store {store_path}")
            outcome = run_sweep(
                parsed,
                st,
                backend=backend,
                workers=workers,
                threads=threads,
                address=address,
                gpus_per_trial=gpus,
                runs_dir=runs_dir,
                retry_failed=retry_failed,
                progress=progress,
            )
    finally:
        progress.close()
    counts = ", ".join(f"{k} {v}" for k, v in outcome.counts.items() if v)
    typer.echo(
        f"ran {len(outcome.ran)} trial(s) in {outcome.seconds:.0f} s, {outcome.skipped} already "
        f"finished; store now: {counts}"
    )
    if report:
        from widelora.report import build_report

        page, _figs, _res = build_report(store_path)
        typer.echo(f"report: {page}")

"""`widelora sweep spec.yaml`: expand a grid spec into trials and run the unfinished ones, resumably."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Attach `widelora sweep` to the main app."""

    @app.command("sweep")
    def sweep(
        spec: Path = typer.Argument(..., help="YAML sweep spec: name, base run config, axes to vary."),
        backend: str = typer.Option("local", help="local (worker processes) or ray (a Ray cluster)."),
        address: str | None = typer.Option(None, help="Ray cluster address (e.g. ray://head:10001 or auto); "
                                           "with --backend ray and no address a local Ray instance is started."),
        workers: int = typer.Option(1, help="Trials run at once (local processes or concurrent Ray tasks); 0 = one by one in this process."),
        threads: int | None = typer.Option(None, help="Torch threads per trial (default: cores / workers); "
                                           "also the num_cpus each Ray task asks for."),
        gpus: float = typer.Option(0.0, help="GPUs per trial (Ray backend)."),
        store: Path | None = typer.Option(None, help="SQLite result store (default sweeps/<name>/results.sqlite)."),
        runs_dir: Path | None = typer.Option(None, help="Per-trial run folders (default: 'runs' beside the store)."),
        retry_failed: bool = typer.Option(False, help="Run trials recorded as failed again."),
        dry_run: bool = typer.Option(False, help="Only list the trials the spec expands to."),
        report: bool = typer.Option(True, help="Write the report (PNGs + index.html) beside the store at the end."),
    ) -> None:
        """Run a learning-rate × init × method grid; run the same command again after a crash to resume."""
        from widelora.sweep import ResultStore, SpecError, load_spec, run_sweep
        from widelora.sweep.runners import default_progress

        try:
            parsed = load_spec(spec)
        except SpecError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        trials = parsed.trials()
        if dry_run:
            for t in trials:
                typer.echo(f"{t.id}  " + " ".join(f"{k}={v}" for k, v in t.labels.items()))
            typer.echo(f"{len(trials)} trials")
            return
        store_path = store or Path("sweeps") / parsed.name / "results.sqlite"
        try:
            with ResultStore(store_path) as st:
                typer.echo(f"sweep {parsed.name}: {len(trials)} trials, store {store_path}")
                outcome = run_sweep(parsed, st, backend=backend, workers=workers, threads=threads,
                                    address=address, gpus_per_trial=gpus, runs_dir=runs_dir,
                                    retry_failed=retry_failed, progress=default_progress())
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        counts = ", ".join(f"{k} {v}" for k, v in outcome.counts.items() if v)
        typer.echo(f"ran {len(outcome.ran)} trial(s) in {outcome.seconds:.0f} s, {outcome.skipped} already "
                   f"finished; store now: {counts}")
        if report:
            from widelora.report import build_report

            page, _figs, _res = build_report(store_path)
            typer.echo(f"report: {page}")

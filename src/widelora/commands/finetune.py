"""`widelora finetune`: finetune a real model with LoRA from flags, a YAML config, or a preset.

Precedence: defaults ← `--preset` ← `--config file.yaml` ← flags ← `--set key=value`. `--resume RUN_DIR`
continues an interrupted run with the config stored in RUN_DIR. One flag per RunConfig field, generated from
the field's metadata (help, choices), so a new field needs no edit here. Expected failures (a bad key or
value, a folder that is not a run) raise a UserError; the app turns it into one `error:` line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from widelora.errors import FileProblem, UserError
from widelora.train.config import RunConfig, field_help
from widelora.train.presets import PRESETS, build_config
from widelora.train.rundir import CONFIG, read_json

#: The first field of each group of flags in `--help`.
_PANELS = {
    "model": "What to train",
    "targets": "The adapter",
    "method": "Optimizer and schedule",
    "eval_every": "Evaluation, logging, checkpoints",
}
#: Flag names that differ from `--field-name`.
_FLAG_NAMES = {"out_dir": ("--out", "-o", "--out-dir")}


def _flag_type(f: dataclasses.Field) -> type:
    """The type a flag parses: bool / int / float from the field's annotation, text otherwise (lists, tuples
    and choices are parsed and checked by RunConfig)."""
    first = str(f.type).split("|")[0].strip()
    return {"bool": bool, "int": int, "float": float}.get(first, str)


def _field_flags() -> list[inspect.Parameter]:
    params, panel = [], None
    for f in dataclasses.fields(RunConfig):
        panel = _PANELS.get(f.name, panel)
        kind = _flag_type(f)
        dashed = f.name.replace("_", "-")
        names = (f"--{dashed}/--no-{dashed}",) if kind is bool else _FLAG_NAMES.get(f.name, (f"--{dashed}",))
        option = typer.Option(
            None, *names, help=field_help(f.name), rich_help_panel=panel, show_default=False
        )
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)
        )
    return params


def _parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` (value parsed as YAML: numbers, lists, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value; valid keys: {RunConfig.keys()}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return out


def _resolve(
    preset: str | None, config: str | None, resume: str | None, flags: dict[str, Any], set_: list[str]
) -> RunConfig:
    """The run's config: from RUN_DIR's config.json when resuming, else defaults ← preset ← file; then
    flags."""
    given = {k: v for k, v in flags.items() if v is not None}  # a flag left out is "not given"
    given.update(_parse_set(set_))  # `--set key=null` is a real null (no clipping, no step cap)
    if "epochs" in given and "steps" not in given:  # --epochs alone means "train by epochs"
        given["steps"] = None
    if resume is None:
        return build_config(preset, config, given)
    saved_path = Path(resume) / CONFIG
    if not saved_path.is_file():
        raise FileProblem(
            resume, f"has no {CONFIG} (not a widelora run folder)", "give --resume a run folder"
        )
    saved = read_json(saved_path)
    if not isinstance(saved, dict):
        raise FileProblem(saved_path, "is not a widelora run config")
    return RunConfig.from_dict({**saved, **given, "out_dir": str(resume)})


def _summary(result: dict, task: str) -> str:
    final = result.get("final", {})
    metric = "perplexity" if task == "causal_lm" else "accuracy"
    lines = [f"status: {result['status']}"]
    if f"before_{metric}" in final:
        after = final.get(metric)
        lines.append(
            f"{metric}: {final[f'before_{metric}']:.4g} -> "
            f"{'n/a' if after is None else format(after, '.4g')} (held-out, {final.get('step')} steps)"
        )
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    lines.append(f"run dir: {result.get('run_dir')}  (metrics.jsonl, metrics.csv, result.json, adapter/)")
    if result.get("checkpoint"):
        lines.append(f"checkpoint: {result['checkpoint']}")
    return "\n".join(lines)


def finetune(
    *,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="YAML/JSON file of RunConfig keys.")
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="A named preset (--list-presets).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue the run in this folder (its config.json).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any RunConfig key as YAML: --set max_grad_norm=null."),
    ] = None,
    list_presets: Annotated[bool, typer.Option("--list-presets", help="Print the presets and exit.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    auto: Annotated[
        bool,
        typer.Option(
            "--auto", help="widelora chooses init, ratio and learning rates (= --setup recommended)."
        ),
    ] = False,
    **flags: Any,
) -> None:
    """Finetune a model with LoRA; prints held-out perplexity/accuracy before and after."""
    if list_presets:
        for name, p in sorted(PRESETS.items()):
            typer.echo(f"{name:28s} model={p.get('model')} dataset={p.get('dataset')} task={p.get('task')}")
        return
    if auto:
        flags["setup"] = "recommended"
    cfg = _resolve(preset, config, resume, flags, set_ or [])
    if dry_run:
        typer.echo(json.dumps(cfg.to_dict(), indent=1))
        return
    from widelora.train.loop import train

    result = train(cfg, Path(cfg.out_dir), resume=resume is not None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(_summary(result, cfg.task))
    if result["status"] != "done":
        raise typer.Exit(1)


_own = [
    p
    for p in inspect.signature(finetune, eval_str=True).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
]
finetune.__signature__ = inspect.Signature(_own + _field_flags())


def register(app: typer.Typer) -> None:
    """Attach `finetune` to the main app."""
    app.command("finetune")(finetune)

"""`widelora finetune`: finetune a real model with LoRA from flags, a YAML config, or a preset.

Precedence: defaults ← `--preset` ← `--config file.yaml` ← flags. `--resume RUN_DIR` continues an interrupted run
with the config stored in RUN_DIR. `--targets auto` places adapters with PLoP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from widelora.train.config import PRESETS, RunConfig, build_config, parse_targets

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` (value parsed as YAML: numbers, lists, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value; valid keys: {RunConfig.keys()}")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
    config: str = typer.Option(
        None, "--config", "-c", help="YAML/JSON file of RunConfig keys (flags override)."
    ),
    preset: str = typer.Option(None, "--preset", "-p", help=f"Named preset: {', '.join(sorted(PRESETS))}."),
    resume: str = typer.Option(None, "--resume", help="Continue the run in this folder (its config.json)."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (metrics, checkpoints, adapter)."),
    model: str = typer.Option(None, help="Shipped name (smollm2-135m, minilm-l6), local folder or hub id."),
    task: str = typer.Option(None, help="causal_lm | classification."),
    dataset: str = typer.Option(
        None, help="wikipedia | shakespeare | tweets | a .txt/.jsonl/.csv file | hf:path[:config]."
    ),
    text_field: str = typer.Option(None, help="Text column/field of a user file ('a,b' joins fields)."),
    label_field: str = typer.Option(None, help="Label column/field of a user file."),
    targets: str = typer.Option(None, help="'q_proj,v_proj', a regex, 'all-linear', or 'auto' (PLoP)."),
    rank: int = typer.Option(None, help="LoRA rank r."),
    alpha: float = typer.Option(None, help="LoRA alpha (scale alpha/r); default alpha = r."),
    init: str = typer.Option(
        None, help="init_a | init_b | kaiming | gaussian | pissa | lora_one | lora_ga ..."
    ),
    method: str = typer.Option(None, help="Optimizer: adamw | loraplus | lora_one | scaled_gd ..."),
    lr: float = typer.Option(None, help="Learning rate (of A under LoRA+)."),
    ratio: float = typer.Option(None, help="LoRA+ ratio lr_B / lr_A."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay."),
    dropout: float = typer.Option(None, help="LoRA dropout."),
    steps: int = typer.Option(None, help="Optimizer steps (wins over --epochs)."),
    epochs: float = typer.Option(None, help="Passes over the training set (used when --steps is not given)."),
    batch_size: int = typer.Option(None, help="Examples per micro-batch (per process under torchrun)."),
    grad_accum: int = typer.Option(None, help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(None, help="Tokens per block (LM) / truncation length (classification)."),
    warmup: float = typer.Option(None, help="Warmup: fraction of steps if < 1, else steps."),
    decay: str = typer.Option(None, help="linear | cosine | constant."),
    seed: int = typer.Option(None, help="Seed for data split, order, init and dropout."),
    eval_every: int = typer.Option(
        None, help="Evaluate on the validation split every N steps (0: only at the end)."
    ),
    eval_examples: int = typer.Option(None, help="Held-out examples (LM: blocks) per evaluation."),
    max_train_examples: int = typer.Option(None, help="Cap on training examples (LM: blocks)."),
    checkpoint_every: int = typer.Option(None, help="Checkpoint every N steps (0: at the end and at evals)."),
    monitor: bool = typer.Option(None, "--monitor/--no-monitor", help="Log feature-learning statistics."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Show a progress bar."),
    dtype: str = typer.Option(None, help="float32 | bfloat16 | float16."),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any other RunConfig key: --set max_grad_norm=0.5.")
    ] = None,
    list_presets: bool = typer.Option(False, "--list-presets", help="Print the presets and exit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Finetune a model with LoRA; prints held-out perplexity/accuracy before and after."""
    if list_presets:
        for name in sorted(PRESETS):
            p = PRESETS[name]
            typer.echo(f"{name:28s} model={p['model']} dataset={p['dataset']} task={p['task']}")
        return
    flags = dict(  # noqa: C408
        model=model,
        task=task,
        dataset=dataset,
        text_field=text_field,
        label_field=label_field,
        targets=parse_targets(targets) if targets else None,
        rank=rank,
        alpha=alpha,
        init=init,
        method=method,
        lr=lr,
        ratio=ratio,
        weight_decay=weight_decay,
        dropout=dropout,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        warmup=warmup,
        decay=decay,
        seed=seed,
        eval_every=eval_every,
        eval_examples=eval_examples,
        max_train_examples=max_train_examples,
        checkpoint_every=checkpoint_every,
        monitor=monitor,
        progress=progress,
        dtype=dtype,
        device=device,
        out_dir=out,
    )
    flags = {k: v for k, v in flags.items() if v is not None}  # a flag left out is "not given"
    try:
        flags.update(_parse_set(set_ or []))  # `--set key=null` is a real null (no clipping, no step cap)
        if resume is not None:
            saved = Path(resume) / "config.json"
            if not saved.is_file():
                raise ValueError(
                    f"--resume {str(resume)!r}: no config.json there (not a widelora run folder)"
                )
            data = json.loads(saved.read_text())
            data.update(flags)
            data["out_dir"] = str(resume)
            cfg = RunConfig.from_dict(data)
        else:
            cfg = build_config(preset, config, flags)
        if epochs is not None and steps is None and cfg.steps is not None:  # --epochs alone means "by epochs"
            cfg = RunConfig.from_dict({**cfg.to_dict(), "steps": None})
        if dry_run:
            typer.echo(json.dumps(cfg.to_dict(), indent=1))
            return
        from widelora.train.loop import train

        run_dir = Path(cfg.out_dir)
        if resume is None and (run_dir / "checkpoints" / "latest").is_file():
            raise ValueError(
                f"run folder {str(run_dir)!r} already holds a run; continue it with "
                f"--resume {run_dir} or choose another --out"
            )
        result = train(cfg, run_dir, resume=resume is not None)
    except _USER_ERRORS as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(_summary(result, cfg.task))
    if result["status"] != "done":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Attach `finetune` to the main app."""
    app.command("finetune")(finetune)

"""`widelora recommend`: the LoRA setup widelora would use for a run, each choice with its reason.

It builds the run as `widelora finetune` would (same presets, config files and flags), probes the model on its
first training batches (≤ 10 % of the run, counted in training steps and printed), and prints the table of
choices, the probe's curve and what it cost — or the whole recommendation as JSON (`--json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from widelora.errors import FileProblem


def _curve_lines(probe: dict) -> list[str]:
    lines = [f"{'lr':>9}  {'loss':>7}  {'|Z_B|/|Wx|':>10}  {'|Z_A| growth':>12}"]
    for row in probe["curve"]:
        out = "-" if row["out_ratio"] is None else f"{row['out_ratio']:.3g}"
        za = "-" if row["za_growth"] is None else f"{row['za_growth']:.3g}"
        lines.append(f"{row['lr']:>9.3g}  {row['loss']:>7.4g}  {out:>10}  {za:>12}")
    lines.append(
        f"stop {probe['edge_lr']:.3g} ({probe['reason']}); lr = {probe.get('lr_source', 'edge')} "
        f"{probe.get('lr_edge', probe['edge_lr']):.3g} / {probe['factor']:.3g}; loss lowest "
        f"after lr {probe['min_loss_lr']:.3g}"
        + (f"; internal instability from lr {probe['internal_lr']:.3g}" if probe["internal_lr"] else "")
    )
    lines.append(
        f"probe cost: {len(probe['curve'])} of {probe['steps']} planned steps of ≤ {probe['batch_size']} "
        "examples = "
        f"{probe['cost_steps']:.3g} training steps ({100 * probe['cost_fraction']:.1f} % of the run)"
    )
    head = probe.get("head")
    if head:
        lines.append(
            f"head: first Adam step best at {head['first_step']:.3g} on {head['examples']} cached examples; "
            f"head lr = {head['multiplier']:g} × that (no extra forward: features cached)"
        )
    return lines


def recommend_command(
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="A finetune preset to start from.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML/JSON run config.")] = None,
    model: Annotated[str | None, typer.Option(help="Shipped name, local folder or hub id.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="wikipedia | shakespeare | tweets | a file | hf:...")
    ] = None,
    task: Annotated[str | None, typer.Option(help="causal_lm | classification.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps of the run to configure.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per micro-batch of the run.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per example / block.")] = None,
    targets: Annotated[
        str | None, typer.Option(help="Adapted modules (default: the config's, else all-linear).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (default: the config's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data split, order and adapter init.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the recommendation as JSON.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the JSON to this file.")] = None,
) -> None:
    """Recommend init, targets, rank, LoRA+ ratio, learning rate and head learning rate, with reasons."""
    import torch

    from widelora.data import prepare
    from widelora.models import load_model, load_tokenizer
    from widelora.recommend.runconfig import batches_needed, recommend_for_config, run_batch
    from widelora.train import build_config
    from widelora.train.config import parse_targets

    if out is not None and out.is_dir():
        raise FileProblem(out, "is a folder", "--out takes the path of a JSON file, e.g. recommendation.json")
    flags = {
        "model": model,
        "dataset": dataset,
        "task": task,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "seed": seed,
        "targets": parse_targets(targets) if targets else None,
    }
    cfg = build_config(
        preset_name=preset, config_file=config, overrides={k: v for k, v in flags.items() if v is not None}
    )  # None: flag not given
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(
        cfg.dataset,
        tokenizer,
        task=cfg.task,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        max_train=cfg.max_train_examples,
        max_eval=1,
        text_field=cfg.text_field,
        label_field=cfg.label_field,
    )
    net, _ = load_model(cfg.model, task=cfg.task, num_labels=data.num_labels, seed=cfg.seed)
    total = cfg.steps
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    b = cfg.batch_size
    count = min(batches_needed(total or 1000, run_batch(cfg)) * cfg.grad_accum, len(order) // b)
    batches = [
        data.collate([data.train[i] for i in order[k * b : (k + 1) * b]]) for k in range(max(1, count))
    ]
    rec = recommend_for_config(cfg, net, batches, targets_given=bool(targets or preset or config))
    text = rec.to_json()
    if out is not None:
        from widelora.files import atomic_write_text

        atomic_write_text(out, text + "\n")
    if as_json:
        typer.echo(text)
        return
    typer.echo(
        f"Recommended setup for {cfg.model} on {cfg.dataset} ({cfg.task}, {rec.steps} steps of "
        f"{run_batch(cfg)} examples):\n"
    )
    typer.echo(rec.table())
    if rec.probe:
        typer.echo("\nprobe (LR range test; A at lr, B at ratio·lr, the head frozen):")
        typer.echo("\n".join(_curve_lines(rec.probe)))
    if out is not None:
        typer.echo(f"\nwrote {out}")
    typer.echo(
        "\nuse it: widelora finetune --auto ...  |  setup: recommended (sweeps)  |  wl.attach(model, "
        "setup=rec); wl.create_optimizer(model, setup=rec)"
    )


def register(app: typer.Typer) -> None:
    """Attach `widelora recommend` to the main app."""
    app.command("recommend")(recommend_command)

"""Convergence: steps (and seconds) to reach PEFT-default's final held-out loss with widelora's recommended
setups.

Setups, all rank 16, alpha 16, every linear layer except the output head, no dropout, constant learning rate:
- ``peft-default``  PEFT LoraConfig defaults (kaiming-uniform A, B = 0) + torch AdamW, one lr for A and B;
- ``initA+lora+``   wl.attach(init="init_a") + wl.create_optimizer(method="loraplus", ratio=16);
- ``lora-one``      wl.attach + wl.initialize("lora_one") on a few training batches + the preconditioned
                    optimizer (method="lora_one"); its init time is counted in its seconds.
Tuning: each setup runs its lr grid (``TASKS[task]["grids"]``, or ``--lrs``) on the first seed, the lr with
the lowest final held-out loss is kept, then the other seeds run at that lr. The target of a seed is
PEFT-default's final held-out loss on that seed (same data order); "steps to target" is the first evaluation
at or below it. The table also gives the steps to reach PEFT's held-out loss at mid-run (early-training
speed). Per seed the data order, the adapter init and the evaluation set are identical across setups.

    .venv/bin/python bench/convergence.py --task minilm
    .venv/bin/python bench/convergence.py --task smollm2
    .venv/bin/python bench/convergence.py --plot-only      # redraw figures from bench/out/convergence_*.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import widelora as wl
from widelora.data import make_loader, prepare

ROOT = Path(__file__).resolve().parents[1]
FIG_DIR = ROOT / "docs" / "figures" / "bench"
SETUPS = ("peft-default", "initA+lora+", "lora-one")

# Per task: data, sizes and the lr grids (same size for every setup; LoRA+'s grid sits lower, as its paper
# advises lr_A about 2x below vanilla LoRA's optimum, since B moves 16x faster).
TASKS: dict[str, dict[str, Any]] = {
    "minilm": {
        "model": "minilm-l6",
        "task": "classification",
        "dataset": "wikipedia",
        "seq": 32,
        "batch": 16,
        "steps": 100,
        "eval_every": 10,
        "n_eval": 128,
        "lora_one_batches": 8,
        "grids": {
            "peft-default": [3e-4, 1e-3, 3e-3],
            "initA+lora+": [1e-4, 3e-4, 1e-3],
            "lora-one": [3e-4, 1e-3, 3e-3],
        },
    },
    # SmolLM2 is ~10x costlier a step: one lr per setup, fixed a priori (PEFT 1e-3; LoRA+ lr_A = half of it,
    # the LoRA+ paper's guidance; LoRA-One the same as PEFT). Pass --grid to use a two-point grid instead.
    "smollm2": {
        "model": "smollm2-135m",
        "task": "causal_lm",
        "dataset": "wikipedia",
        "seq": 32,
        "batch": 4,
        "steps": 16,
        "eval_every": 2,
        "n_eval": 8,
        "lora_one_batches": 4,
        "grids": {"peft-default": [1e-3], "initA+lora+": [5e-4], "lora-one": [1e-3]},
        "wide_grids": {"peft-default": [3e-4, 1e-3], "initA+lora+": [1.5e-4, 5e-4], "lora-one": [3e-4, 1e-3]},
    },
}


def load_task(name: str, cfg: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    from widelora.models import load_model

    if cfg["task"] == "classification":
        tok = load_model(cfg["model"], task="classification", num_labels=2)[1]
        data = prepare(
            cfg["dataset"], tok, task="classification", seq_len=cfg["seq"], seed=0, max_eval=cfg["n_eval"]
        )
        model, _ = load_model(cfg["model"], task="classification", num_labels=data.num_labels, seed=0)
    else:
        model, tok = load_model(cfg["model"])
        data = prepare(
            cfg["dataset"],
            tok,
            task="causal_lm",
            seq_len=cfg["seq"],
            seed=0,
            max_train=cfg["steps"] * cfg["batch"] * 2,
            max_eval=cfg["n_eval"],
        )
    model.requires_grad_(False)
    return model, data


def build(
    setup: str, base: torch.nn.Module, cfg: dict[str, Any], lr: float, seed: int, init_batches: list
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    names = wl.match_targets(base, "all-linear")
    cls = cfg["task"] == "classification"
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if setup == "peft-default":
        from peft import LoraConfig, get_peft_model

        conf = LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=names,
            modules_to_save=["classifier"] if cls else None,
        )
        model = get_peft_model(model, conf)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model = wl.attach(
        model,
        targets=names,
        rank=16,
        alpha=16,
        init="init_a",
        seed=seed,
        trainable=("classifier",) if cls else (),
    )
    if setup == "initA+lora+":
        return model, wl.create_optimizer(model, lr=lr, method="loraplus", ratio=16.0)
    if setup == "lora-one":
        wl.initialize(model, "lora_one", seed=seed, batches=init_batches, progress=False)
        return model, wl.create_optimizer(model, lr=lr, method="lora_one_precond")
    raise ValueError(f"setup={setup!r} is unknown; valid: {list(SETUPS)}")


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b["labels"] != -100).sum()) if b["labels"].dim() == 2 else b["labels"].shape[0]
        total += float(model(**b).loss) * n
        count += n
    model.train()
    return total / count


def run_one(setup: str, base, data, cfg, lr: float, seed: int, eval_batches) -> dict[str, Any]:
    loader = make_loader(data.train, cfg["batch"], data.collate, shuffle=True, seed=seed, drop_last=True)
    train_batches = []
    while len(train_batches) < cfg["steps"]:
        for b in loader:
            train_batches.append(b)
            if len(train_batches) == cfg["steps"]:
                break
    c0, t0 = time.process_time(), time.perf_counter()
    model, opt = build(setup, base, cfg, lr, seed, train_batches[: cfg["lora_one_batches"]])
    init_cpu, init_wall = time.process_time() - c0, time.perf_counter() - t0
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rec: dict[str, Any] = {
        "setup": setup,
        "lr": lr,
        "seed": seed,
        "init_cpu_s": init_cpu,
        "init_wall_s": init_wall,
        "step": [0],
        "loss": [held_out_loss(model, eval_batches)],
        "cpu_s": [init_cpu],
        "wall_s": [init_wall],
        "train_loss": [],
    }
    cpu, wall = init_cpu, init_wall
    for i, b in enumerate(train_batches, start=1):
        c0, t0 = time.process_time(), time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - t0
        rec["train_loss"].append(float(loss.detach()))
        if not torch.isfinite(loss):
            rec["diverged_at"] = i
            break
        if i % cfg["eval_every"] == 0 or i == cfg["steps"]:
            rec["step"].append(i)
            rec["loss"].append(held_out_loss(model, eval_batches))
            rec["cpu_s"].append(cpu)
            rec["wall_s"].append(wall)
    print(
        f"  {setup:13s} lr={lr:<8g} seed={seed}  held-out {rec['loss'][0]:.4f} -> {rec['loss'][-1]:.4f}  "
        f"({cpu:.0f} s cpu)",
        flush=True,
    )
    return rec


def final(rec: dict[str, Any]) -> float:
    return rec["loss"][-1] if "diverged_at" not in rec and all(map(_finite, rec["loss"])) else float("inf")


def _finite(v: float) -> bool:
    return math.isfinite(v)


def reach(rec: dict[str, Any], target: float) -> tuple[int | None, float | None, float | None]:
    """(steps, cpu seconds, wall seconds) at the first evaluation with held-out loss <= target."""
    for s, loss, c, w in zip(rec["step"], rec["loss"], rec["cpu_s"], rec["wall_s"], strict=True):
        if loss <= target:
            return s, c, w
    return None, None, None


def summarize(runs: list[dict[str, Any]], cfg: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Chosen lr per setup (lowest final held-out loss on the first seed), then per seed: the target is PEFT's
    final held-out loss on that seed (same data order), and a setup's steps / CPU seconds to reach it."""
    chosen = {}
    for setup in SETUPS:
        grid = [r for r in runs if r["setup"] == setup and r["seed"] == seeds[0]]
        if grid:
            chosen[setup] = min(grid, key=final)["lr"]
    best = {s: {r["seed"]: r for r in runs if r["setup"] == s and r["lr"] == chosen[s]} for s in chosen}
    peft = best["peft-default"]
    targets = {seed: final(r) for seed, r in peft.items()}
    table = []
    for s, by_seed in best.items():
        steps, cpu, ratios, cpu_ratios = {}, {}, [], []
        for seed, r in sorted(by_seed.items()):
            if seed not in targets:
                continue
            st, c, _ = (
                reach(r, targets[seed]) if s != "peft-default" else (cfg["steps"], r["cpu_s"][-1], None)
            )
            steps[seed], cpu[seed] = st, c
            if st is not None:
                ratios.append(st / cfg["steps"])
                cpu_ratios.append(c / peft[seed]["cpu_s"][-1])
        complete = bool(steps) and len(ratios) == len(steps)
        # the same question at half the budget: steps to reach PEFT's held-out loss at its mid-run evaluation
        half = {}
        for seed, r in sorted(by_seed.items()):
            if seed in peft:
                pr = peft[seed]
                mid = min(range(len(pr["step"])), key=lambda i: abs(pr["step"][i] - cfg["steps"] / 2))
                half[seed] = (pr["step"][mid], reach(r, pr["loss"][mid])[0])
        table.append(
            {
                "setup": s,
                "lr": chosen[s],
                "final_losses": {k: final(r) for k, r in sorted(by_seed.items())},
                "steps_to_target": steps,
                "cpu_s_to_target": cpu,
                "steps_ratio_vs_peft": statistics.mean(ratios) if complete else None,
                "cpu_ratio_vs_peft": statistics.mean(cpu_ratios) if complete else None,
                "half_budget": {k: {"peft_step": a, "steps": b} for k, (a, b) in half.items()},
            }
        )
    return {
        "chosen_lr": chosen,
        "targets": targets,
        "target_loss": statistics.mean(targets.values()),
        "peft_steps": cfg["steps"],
        "setups": table,
    }


def plot(name: str, payload: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = payload["summary"]
    colors = {"peft-default": "#7f7f7f", "initA+lora+": "#1f77b4", "lora-one": "#d62728"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for setup, lr in summ["chosen_lr"].items():
        rs = [r for r in payload["runs"] if r["setup"] == setup and r["lr"] == lr]
        n = min(len(r["loss"]) for r in rs)
        steps = rs[0]["step"][:n]
        losses = torch.tensor([r["loss"][:n] for r in rs])
        label = f"{setup} (lr {lr:g}, {len(rs)} seeds)"
        for a, x in ((ax, steps), (ax2, [statistics.mean(r["cpu_s"][i] for r in rs) for i in range(n)])):
            a.plot(x, losses.mean(0), color=colors[setup], label=label, lw=2)
            a.fill_between(
                x, losses.min(0).values, losses.max(0).values, color=colors[setup], alpha=0.2, lw=0
            )
    for a in (ax, ax2):
        a.axhline(summ["target_loss"], color="k", ls="--", lw=1, label="PEFT-default final loss (seed mean)")
        a.set_ylabel("held-out loss")
        a.grid(alpha=0.3)
    ax.set_xlabel("training step")
    ax2.set_xlabel("CPU seconds (training + init), mean over seeds")
    shown = [r for r in payload["runs"] if r["lr"] == summ["chosen_lr"].get(r["setup"])]
    lo = min(summ["target_loss"], *(min(r["loss"]) for r in shown))
    hi = max(max(r["loss"][1:] or r["loss"]) for r in shown)
    ax.set_ylim(lo - 0.08 * (hi - lo), hi + 0.05 * (hi - lo))
    ax2.set_ylim(ax.get_ylim())
    ax.legend(fontsize=8, loc="upper right")
    cfg = payload["config"]
    fig.suptitle(
        f"{cfg['model']} on {cfg['dataset']} ({cfg['task']}): held-out loss, band = min-max over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    FIG_DIR.mkdir(parents=True, exist_ok=True)
    path = FIG_DIR / f"convergence_{name}.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def print_summary(name: str, summ: dict[str, Any]) -> None:
    tg = ", ".join(f"seed {k}: {v:.4f}" for k, v in summ["targets"].items())
    print(
        f"\n{name}: target = PEFT-default's final held-out loss after {summ['peft_steps']} steps, per seed "
        f"({tg})"
    )
    rows = []
    for e in summ["setups"]:
        rows.append(
            [
                e["setup"],
                f"{e['lr']:g}",
                " / ".join(f"{v:.4f}" for v in e["final_losses"].values()),
                " / ".join(str(s) if s is not None else "never" for s in e["steps_to_target"].values()),
                "-" if e["steps_ratio_vs_peft"] is None else f"{e['steps_ratio_vs_peft']:.2f}",
                "-" if e["cpu_ratio_vs_peft"] is None else f"{e['cpu_ratio_vs_peft']:.2f}",
                " / ".join(
                    f"{v['steps'] if v['steps'] is not None else 'never'} (of {v['peft_step']})"
                    for v in e["half_budget"].values()
                ),
            ]
        )
    common.print_table(
        [
            "setup",
            "lr",
            "final held-out (per seed)",
            "steps to target",
            "steps /peft",
            "cpu s /peft",
            "steps to PEFT's mid-run loss",
        ],
        rows,
    )


def merged(task: str) -> dict[str, Any] | None:
    """All runs of `task` from bench/out/convergence_<task>*.json (one (setup, lr, seed) once),
    re-summarized."""
    paths = sorted(common.OUT_DIR.glob(f"convergence_{task}*.json"))
    if not paths:
        return None
    runs: dict[tuple, dict[str, Any]] = {}
    payload: dict[str, Any] = {}
    for path in paths:
        part = json.loads(path.read_text())
        payload = payload or part
        for r in part["runs"]:
            runs.setdefault((r["setup"], r["lr"], r["seed"]), r)
    payload = dict(payload)
    payload["runs"] = sorted(runs.values(), key=lambda r: (SETUPS.index(r["setup"]), r["seed"], r["lr"]))
    payload["seeds"] = sorted({r["seed"] for r in payload["runs"]})
    if any(r["setup"] == "peft-default" for r in payload["runs"]):
        payload["summary"] = summarize(payload["runs"], payload["config"], payload["seeds"])
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="minilm")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=None, help="override the task's step count")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", action="store_true", help="use the task's wider lr grid where it has one")
    p.add_argument("--lrs", default=None, help="comma list of lrs replacing every selected setup's grid")
    p.add_argument(
        "--part",
        default="",
        help="suffix of the JSON name, to split one task over processes; "
        "--plot-only merges every convergence_<task>*.json",
    )
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    if args.plot_only:
        for task in sorted(TASKS):
            payload = merged(task)
            if payload is None or "summary" not in payload:
                continue
            print(f"wrote {common.write_json(f'convergence_{task}', payload)}")
            print(plot(task, payload))
            print_summary(task, payload["summary"])
        return
    torch.set_num_threads(args.threads)
    cfg = dict(TASKS[args.task])
    if args.steps:
        cfg["steps"] = args.steps
    if args.grid and "wide_grids" in cfg:
        cfg["grids"] = cfg["wide_grids"]
    if args.lrs:
        cfg["grids"] = {s: [float(v) for v in args.lrs.split(",")] for s in SETUPS}
    seeds = [int(s) for s in args.seeds.split(",")]
    setups = [s for s in args.setups.split(",") if s]
    base, data = load_task(args.task, cfg)
    ev_loader = make_loader(data.val, 16 if cfg["task"] == "classification" else 8, data.collate)
    eval_batches = list(ev_loader)
    runs: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "env": common.env_info(),
        "config": dict(cfg),
        "seeds": seeds,
        "runs": runs,
    }
    print(
        f"{args.task}: {len(data.train)} train examples, {sum(len(b['labels']) for b in eval_batches)} "
        f"held-out, {cfg['steps']} steps",
        flush=True,
    )
    for setup in setups:  # grid on the first seed
        for lr in cfg["grids"][setup]:
            runs.append(run_one(setup, base, data, cfg, lr, seeds[0], eval_batches))
            common.write_json(f"convergence_{args.task}{args.part}", payload)
    for setup in setups:  # the chosen lr on the other seeds
        best_lr = min((r for r in runs if r["setup"] == setup), key=final)["lr"]
        for seed in seeds[1:]:
            runs.append(run_one(setup, base, data, cfg, best_lr, seed, eval_batches))
            common.write_json(f"convergence_{args.task}{args.part}", payload)
    if "peft-default" not in setups:
        print(
            f"wrote {common.write_json(f'convergence_{args.task}{args.part}', payload)} (no peft-default "
            "run: no summary)"
        )
        return
    payload["summary"] = summarize(runs, cfg, seeds)
    print(f"wrote {common.write_json(f'convergence_{args.task}{args.part}', payload)}")
    print(f"figure {plot(args.task, payload)}")
    print_summary(args.task, payload["summary"])


if __name__ == "__main__":
    main()

"""Gradient checkpointing in widelora's loop: activation memory saved vs step time added, on SmolLM2-135M.

One model (SmolLM2-135M, float32, widelora adapters on every linear layer but the head, fused path, LoRA+),
one batch, and three setups toggled on that same model before each step, so weights, batch and adapters are
identical:

- ``off``       plain training step;
- ``every 1``   every decoder layer checkpointed (`RunConfig.gradient_checkpointing`, what the loop enables);
- ``every 2``   every second layer checkpointed (transformers' `every_n_layers=2`): half the recompute.

A step is forward + loss + backward + optimizer.step + zero_grad. Time: process CPU seconds at one thread,
repeats interleaved with a rotating order, ratios taken per round; median and min-max. Activation memory: the
peak bytes allocated during a step above the level at its start (CPU: the torch profiler's allocation events
replayed in order; CUDA: max_memory_allocated), median of `--memory-repeats` untimed steps.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/grad_checkpointing.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import widelora as wl
from widelora.train.precision import enable_gradient_checkpointing

SETUPS = ("off", "every 1", "every 2")


def set_mode(model: torch.nn.Module, setup: str) -> None:
    """Switch the model to `setup` (cheap: sets a flag on each decoder layer)."""
    model.activation_checkpointing_disable()
    if setup == "every 1":
        enable_gradient_checkpointing(model, "smollm2-135m")
    elif setup == "every 2":
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)


def make_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, setup: str
) -> Callable[[], float]:
    def step() -> float:
        set_mode(model, setup)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = common.load_smollm2()
    model.to(args.device)
    wl.attach(model, targets="all-linear", rank=args.rank, alpha=args.rank, init="init_a", seed=0)
    model.train()
    opt = wl.create_optimizer(model, lr=1e-4, method="loraplus")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = {s: make_step(model, opt, batch, s) for s in SETUPS}

    losses = {s: steps[s]() for s in SETUPS}  # also a warmup; the losses differ only by the updates between
    memory = {
        s: statistics.median(
            common.peak_memory_bytes(steps[s], args.device) for _ in range(args.memory_repeats)
        )
        for s in SETUPS
    }
    times = common.interleaved_times(steps, args.repeats, args.warmup, args.device)
    clock = "cpu" if args.device == "cpu" else "wall"
    rows, out = [], {"env": common.env_info(), "args": vars(args), "setups": {}}
    for s in SETUPS:
        ratios = [t / b for t, b in zip(times[s][clock], times["off"][clock], strict=True)]
        mem_ratio = memory[s] / memory["off"]
        out["setups"][s] = {
            "seconds": common.summary(times[s][clock]),
            "time_ratio": common.summary(ratios),
            "peak_bytes": memory[s],
            "memory_ratio": mem_ratio,
            "first_loss": losses[s],
        }
        t, r = common.summary(times[s][clock]), common.summary(ratios)
        rows.append([
            s, f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f})",
            f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})",
            f"{memory[s] / 2**20:.0f}", f"{mem_ratio:.3f}", f"{1 - mem_ratio:.1%}",
        ])  # fmt: skip
    out["table"] = common.print_table(
        ["setup", f"step s ({clock})", "time / off", "activation MiB", "memory / off", "memory saved"], rows
    )
    print(f"\nwritten: {common.write_json('grad_checkpointing', out)}")


if __name__ == "__main__":
    main()

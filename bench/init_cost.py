"""Cost of the gradient-informed inits: widelora's lora_one / lora_ga vs PEFT's LoRA-GA vs a training step.

For each model, the same frozen base, batch, rank and targets (every linear layer except the head):

- ``train_step``   one widelora training step (attach init_a, fused path, LoRA+ AdamW): forward + backward +
  step;
- ``lora_one``     ``wl.initialize(model, "lora_one", batches=[batch])`` on an attached model (one batch);
- ``lora_ga``      the same with ``"lora_ga"``; both start each repeat from the user's W (an untimed
                   ``init_a`` re-initialization before the timed call), as a first initialization does;
- ``peft_lora_ga`` PEFT's own LoRA-GA (peft >= 0.18: ``preprocess_loraga`` with one forward + backward on the
                   batch, then ``get_peft_model`` with ``init_lora_weights="lora_ga"``), on a fresh deep copy
                   of the base made outside the timed region (its init rewrites W).

Time: wall and this process's CPU seconds, repeats interleaved in a rotating order, median and min-max; ratios
per round. Peak memory: bytes allocated above the level at the call during one run (torch profiler on CPU), in
separate untimed runs. Targets (issue 15): init <= PEFT's time, <= 5 training steps, peak <= 1.2x a step.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/init_cost.py --models minilm,smollm2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from step_time import HEADS, _batch

import widelora as wl


def _peft_lora_ga(base: torch.nn.Module, names: list[str], batch: dict, rank: int, save):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    cfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=names,
        modules_to_save=save,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )

    def run(model: torch.nn.Module) -> torch.nn.Module:
        preprocess_loraga(model, cfg, lambda: model(**batch).loss.backward())
        return get_peft_model(model, cfg)

    return run


def bench_model(label: str, base: torch.nn.Module, kind: str, batch: dict, args) -> dict:
    base.requires_grad_(False)
    for mod in base.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    names = wl.match_targets(base, "all-linear")
    head = [h for h in HEADS if any(n.split(".")[-1] == h for n, _ in base.named_modules())]
    trainable = tuple(head) if kind == "classification" else ()
    adapted = {}
    for k in ("train_step", "lora_one", "lora_ga"):
        adapted[k] = wl.attach(
            copy.deepcopy(base),
            targets=names,
            rank=args.rank,
            alpha=args.rank,
            init="init_a",
            seed=args.seed,
            trainable=trainable,
        ).train()
    opt = wl.create_optimizer(adapted["train_step"], lr=1e-4, method="loraplus")

    def train_step() -> None:
        adapted["train_step"](**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    self_timed: dict[str, list[tuple[float, float]]] = {"lora_one": [], "lora_ga": []}

    def reset(scheme: str) -> None:
        """Untimed: back to the user's W (a repeated lora_ga otherwise first saves every moved W, which a
        first initialization never does)."""
        wl.initialize(adapted[scheme], "init_a", seed=args.seed)

    def init(scheme: str):
        def run() -> None:
            reset(scheme)
            c0, t0 = time.process_time(), time.perf_counter()
            wl.initialize(adapted[scheme], scheme, batches=[batch], progress=False)
            self_timed[scheme].append((time.perf_counter() - t0, time.process_time() - c0))

        return run

    steps = {"train_step": train_step, "lora_one": init("lora_one"), "lora_ga": init("lora_ga")}
    peft_run = _peft_lora_ga(base, names, batch, args.rank, head if kind == "classification" else None)
    copies: list[torch.nn.Module] = []

    def peft_step() -> None:
        peft_run(copies.pop())

    if args.peft:
        steps["peft_lora_ga"] = peft_step
        # one fresh copy per call (warmup + repeats + the memory run), made before any timing
        copies.extend(copy.deepcopy(base).train() for _ in range(args.warmup + args.repeats + 1))
    times = common.interleaved_times(steps, args.repeats, args.warmup)
    for k, recorded in self_timed.items():  # the inits' own timings, without the untimed reset
        times[k] = {
            "wall": [w for w, _ in recorded[-args.repeats :]],
            "cpu": [c for _, c in recorded[-args.repeats :]],
        }
    peaks = {}
    for k, fn in steps.items():
        if k in self_timed:
            reset(k)

            def fn(k=k):
                return wl.initialize(adapted[k], k, batches=[batch], progress=False)

        peaks[k] = common.peak_memory_bytes(fn)
    result = {"targets": len(names), "batch": list(batch["input_ids"].shape), "setups": {}}
    for k in steps:
        result["setups"][k] = {
            "wall_s": common.summary(times[k]["wall"]),
            "cpu_s": common.summary(times[k]["cpu"]),
            "peak_bytes": peaks[k],
            "steps_equivalent": common.summary(
                [a / b for a, b in zip(times[k]["cpu"], times["train_step"]["cpu"], strict=True)]
            ),
            "peak_vs_step": peaks[k] / peaks["train_step"],
        }
        if args.peft:
            result["setups"][k]["cpu_ratio_vs_peft"] = common.summary(
                [a / b for a, b in zip(times[k]["cpu"], times["peft_lora_ga"]["cpu"], strict=True)]
            )
    return result


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--smol-batch", type=int, default=4)
    p.add_argument("--minilm-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-peft", dest="peft", action="store_false")
    p.add_argument("--name", default="init_cost")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"env": common.env_info(), "args": vars(args), "models": {}}
    rows = []
    for label in args.models.split(","):
        if label == "minilm":
            base, _ = common.load_minilm()
            batch = _batch(
                "classification", base.config.vocab_size, args.minilm_batch, args.seq, 11, args.seed
            )
            kind = "classification"
        elif label == "smollm2":
            base, _ = common.load_smollm2()
            batch = _batch("causal", base.config.vocab_size, args.smol_batch, args.seq, 0, args.seed)
            kind = "causal"
        elif label == "tiny":
            base = common.tiny_llama()
            batch = _batch("causal", base.config.vocab_size, 4, args.seq, 0, args.seed)
            kind = "causal"
        else:
            raise SystemExit(f"unknown model {label!r}; choose from minilm, smollm2, tiny")
        res = bench_model(label, base, kind, batch, args)
        out["models"][label] = res
        for k, e in res["setups"].items():
            rows.append(
                [
                    label,
                    k,
                    _fmt(e["cpu_s"]),
                    _fmt(e["steps_equivalent"]),
                    _fmt(e["cpu_ratio_vs_peft"]) if "cpu_ratio_vs_peft" in e else "—",
                    f"{e['peak_bytes'] / 2**20:.0f}",
                    f"{e['peak_vs_step']:.2f}",
                ]
            )
        common.write_json(args.name, out)
    common.print_table(
        ["model", "setup", "CPU s", "× train step", "× PEFT LoRA-GA", "peak MiB", "peak × step"], rows
    )


if __name__ == "__main__":
    main()

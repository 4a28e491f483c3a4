"""Gradient-informed inits, the preconditioner and PLoP placement on SmolLM2-135M + Wikipedia, one CPU budget.

Part 1 (methods, adapters on q_proj,v_proj, r=8, alpha=16): held-out perplexity after N steps for
  PEFT-default LoRA (kaiming A, B=0, AdamW) · Init[A] + LoRA+ (lr_A = lr/2, ratio 16, the LoRA+ guidance) ·
  LoRA-GA (+AdamW) · LoRA-One (+AdamW) · LoRA-One + its preconditioned AdamW.
Part 2 (placement, Init[A] + LoRA+): PLoP's NFN ranking of q,k,v,o,gate,up,down on training text (and on a
  second data sample, to show its stability), then perplexity for PLoP's k=3 choice vs attention-only (q,k,v,o)
  vs MLP-only (gate,up,down).

Every run goes through `widelora.train` (the library's own loop: warmup + linear decay, grad clipping 1.0,
held-out perplexity on the test split before and after). One learning rate per setup (no sweep fits the
budget): that is the main caveat of the comparison. Prints tables, writes bench/out/methods_comparison.json.

    .venv/bin/python bench/methods_comparison.py                 # defaults: ~15 min on 2 idle cores
    .venv/bin/python bench/methods_comparison.py --steps 4 --eval-blocks 4 --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR

import widelora.methods.gradient_inits  # registers the lora_one / lora_ga init schemes
import widelora.methods.precondition  # noqa: F401 - registers the lora_one / scaled_gd optimizers
from widelora.methods.placement import place

TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of seq-len tokens")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init-batches", type=int, default=4, help="batches for the gradient estimate")
    ap.add_argument("--plop-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="methods part only, no placement runs")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "methods_comparison.json")
    return ap.parse_args()


def _run(name: str, overrides: dict, base: dict, root: Path) -> dict:
    from widelora.train import train

    cfg = {**base, **overrides}
    t0 = time.time()
    result = train(cfg, root / name.replace(" ", "_").replace("+", "p").replace("/", "_"), resume=False)
    final = result["final"]
    row = {
        "setup": name, "status": result["status"], "targets": result["targets"],
        "init": cfg["init"], "method": cfg["method"], "lr": cfg["lr"],
        "ppl_before": final.get("before_perplexity"), "ppl_after": final.get("perplexity"),
        "train_loss": final.get("train_loss"), "wall_s": time.time() - t0,
    }
    print(f"  {name:<26} ppl {row['ppl_before']:.3f} -> {row['ppl_after'] if row['ppl_after'] is None else round(row['ppl_after'], 3)}"
          f"  ({row['wall_s']:.0f} s)", flush=True)
    return row


def _plop(model_name: str, seq_len: int, batch: int, n_batches: int, seed: int) -> dict:
    from widelora.data import make_loader, prepare
    from widelora.models import load_model

    model, tok = load_model(model_name)
    rankings = []
    for data_seed in (seed, seed + 1):
        data = prepare("wikipedia", tok, seq_len=seq_len, seed=data_seed, max_train=batch * n_batches, max_eval=1)
        loader = make_loader(data.train, batch, data.collate, shuffle=True, seed=data_seed)
        t0 = time.time()
        res = place(model, list(loader), k=3, types=TYPES, seed=data_seed, progress=False)
        rankings.append({"data_seed": data_seed, "targets": res.targets, "ranking": res.ranking(),
                         "tokens": res.num_tokens, "wall_s": time.time() - t0, "result": res})
    return {"model": model, "rankings": rankings}


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    base = {"model": args.model, "task": "causal_lm", "dataset": "wikipedia", "targets": ["q_proj", "v_proj"], "rank": 8,
                "alpha": 16, "steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                "eval_examples": args.eval_blocks, "max_train_examples": args.steps * args.batch,
                "init_batches": args.init_batches, "seed": args.seed, "progress": False, "warmup": 0.1, "decay": "linear",
                "eval_every": 0, "checkpoint_every": 0}
    methods = [
        ("PEFT-default LoRA", {"init": "kaiming", "method": "adamw"}),
        ("Init[A] + LoRA+", {"init": "init_a", "method": "loraplus", "lr": args.lr / 2, "ratio": 16.0}),
        ("LoRA-GA", {"init": "lora_ga", "method": "adamw"}),
        ("LoRA-One", {"init": "lora_one", "method": "adamw"}),
        ("LoRA-One + precond", {"init": "lora_one", "method": "lora_one"}),
    ]
    t_all = time.time()
    out: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
                 "torch_threads": torch.get_num_threads(), "methods": [], "placement": {}}
    with tempfile.TemporaryDirectory(prefix="widelora-bench-") as tmp:
        root = Path(tmp)
        console.print(f"[bold]methods[/] (q_proj,v_proj, r=8, alpha=16, {args.steps} steps of "
                      f"{args.batch}x{args.seq_len} tokens, lr {args.lr:g})")
        for name, over in methods:
            out["methods"].append(_run(name, over, base, root))
        if not args.quick:
            console.print("[bold]placement[/] (PLoP NFN ranking, then Init[A] + LoRA+ on each choice)")
            plop = _plop(args.model, args.seq_len, args.batch, args.plop_batches, args.seed)
            del plop["model"]
            for r in plop["rankings"]:
                console.print(r.pop("result").table(title=f"PLoP ranking, data seed {r['data_seed']}"))
            chosen = plop["rankings"][0]["targets"]
            out["placement"]["plop"] = plop["rankings"]
            placements = [
                (f"PLoP choice ({','.join(t.removesuffix('_proj') for t in chosen)})", chosen),
                ("attention-only (q,k,v,o)", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                ("MLP-only (gate,up,down)", ["gate_proj", "up_proj", "down_proj"]),
            ]
            out["placement"]["runs"] = [
                _run(name, {"init": "init_a", "method": "loraplus", "lr": args.lr / 2, "ratio": 16.0, "targets": targets},
                     base, root)
                for name, targets in placements
            ]
    out["wall_s"] = time.time() - t_all

    table = Table(title=f"held-out perplexity (Wikipedia test blocks) after {args.steps} steps")
    for col in ("setup", "init", "optimizer", "lr (A)", "ppl before", "ppl after", "wall s"):
        table.add_column(col)
    for row in out["methods"] + out["placement"].get("runs", []):
        table.add_row(row["setup"], row["init"], row["method"], f"{row['lr']:g}", f"{row['ppl_before']:.3f}",
                      "n/a" if row["ppl_after"] is None else f"{row['ppl_after']:.3f}", f"{row['wall_s']:.0f}")
    console.print(table)
    console.print(f"total {out['wall_s']:.0f} s on {torch.get_num_threads()} threads")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".methods_comparison.", dir=args.out.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    os.replace(tmp_path, args.out)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

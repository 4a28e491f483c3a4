"""Gradient-informed inits, the preconditioner and PLoP placement on SmolLM2-135M + Wikipedia, one CPU budget.

Part 1 (methods, adapters on q_proj,v_proj, r=8, alpha=16): held-out perplexity after N steps for
  PEFT-default LoRA (kaiming A, B=0, AdamW) · Init[A] + LoRA+ (lr_A = lr/2, ratio 16, the LoRA+ guidance) ·
  LoRA-GA (+AdamW) · LoRA-One (+AdamW) · LoRA-One + its preconditioned AdamW.
Part 2 (placement, Init[A] + LoRA+): PLoP's NFN ranking of q,k,v,o,gate,up,down on training text (and on a
  second data sample, to show its stability), then perplexity for PLoP's k=3 choice vs attention-only
  (q,k,v,o) vs MLP-only (gate,up,down).

Each run trains a deep copy of one loaded base model on the same batches, with the library's public API
(`attach`, `initialize`, `create_optimizer`, `place`) and `widelora.train.evaluation.evaluate` for held-out
perplexity: warmup 10 % + linear decay, grad clipping 1.0, like `widelora.train`, but the model is loaded,
the data tokenized and the base perplexity measured once instead of once per run (which `widelora.train`
does and which this budget cannot afford on a shared 2-core machine). One learning rate per setup (no sweep
fits the budget): that is the main caveat. Prints tables, writes bench/out/methods_comparison.json after
every run (so a cut-off run keeps what it measured).

    .venv/bin/python bench/methods_comparison.py            # defaults: 24 steps of 4x64 tokens, ~15 min idle
    .venv/bin/python bench/methods_comparison.py --steps 16 --init-batches 2 --eval-blocks 24 --plop-batches 2
    .venv/bin/python bench/methods_comparison.py --part placement   # only PLoP + the three placement runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR

from widelora.methods.plop import place

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
    ap.add_argument("--plop-seq-len", type=int, default=128)
    ap.add_argument("--part", choices=["all", "methods", "placement"], default="all")
    ap.add_argument("--only", default=None, help="comma-separated method setups to run (default: all five)")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "methods_comparison.json")
    return ap.parse_args()


def _lm_batches(ds, batch: int, collate) -> list[dict]:
    return [collate([ds[i] for i in range(j, min(j + batch, len(ds)))]) for j in range(0, len(ds), batch)]


@torch.no_grad()
def _perplexity(model, batches: list[dict]) -> float:
    from widelora.train.evaluation import evaluate

    return evaluate(model, batches, "causal_lm", torch.device("cpu"))["perplexity"]


def _run(
    name: str,
    setup: dict,
    base_model,
    train_batches: list[dict],
    eval_batches: list[dict],
    args: argparse.Namespace,
) -> dict:
    """One finetuning run on a copy of the base model: attach, initialize, train, held-out perplexity."""
    import widelora as wl

    t0 = time.time()
    model = copy.deepcopy(base_model)
    targets = setup.get("targets", ["q_proj", "v_proj"])
    init = setup["init"]
    needs_data = init in ("lora_one", "lora_ga")
    wl.attach(model, targets, rank=8, alpha=16, init="init_a" if needs_data else init, seed=args.seed)
    if needs_data:
        wl.initialize(model, init, seed=args.seed, batches=train_batches[: args.init_batches], progress=False)
    ppl_init = _perplexity(model, eval_batches) if needs_data else None
    lr = setup.get("lr", args.lr)
    opt = wl.create_optimizer(model, lr=lr, method=setup["method"], ratio=setup.get("ratio", 16.0))
    warm = max(1, round(0.1 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (args.steps - k) / max(1, args.steps - warm))
    )
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for step in range(args.steps):
        batch = train_batches[step % len(train_batches)]
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    ppl = _perplexity(model, eval_batches)
    row = {
        "setup": name,
        "targets": list(targets),
        "init": init,
        "method": setup["method"],
        "lr": lr,
        "trainable_params": sum(p.numel() for p in params),
        "ppl_after_init": ppl_init,
        "ppl_after": ppl,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "wall_s": time.time() - t0,
    }
    print(
        f"  {name:<30} ppl {ppl:8.3f}"
        + (f"  (after init only: {ppl_init:.3f})" if ppl_init else "")
        + f"  train loss {losses[0]:.3f} -> {losses[-1]:.3f}  ({row['wall_s']:.0f} s)",
        flush=True,
    )
    del model, opt
    return row


def _plop(model, tok, args: argparse.Namespace) -> list[dict]:
    """PLoP on whole Wikipedia training documents (padded, mask respected), for two data/random seeds."""
    from widelora.commands.place import sample_batches
    from widelora.data import load_corpus, split_corpus

    texts = split_corpus(load_corpus("wikipedia"), seed=args.seed)["train"].texts
    out = []
    for data_seed in (args.seed, args.seed + 1):
        batches = sample_batches(
            tok, texts, args.plop_batches * args.batch, args.batch, args.plop_seq_len, data_seed
        )
        t0 = time.time()
        res = place(model, batches, k=3, types=TYPES, seed=data_seed, progress=False)
        out.append(
            {
                "data_seed": data_seed,
                "targets": res.targets,
                "ranking": res.ranking(),
                "tokens": res.num_tokens,
                "wall_s": time.time() - t0,
                "result": res,
            }
        )
    return out


def _write(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    os.replace(tmp, path)


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from rich.console import Console
    from rich.table import Table

    from widelora.data import prepare
    from widelora.models import load_model

    console = Console()
    t_all = time.time()
    base_model, tok = load_model(args.model)
    data = prepare(
        "wikipedia",
        tok,
        seq_len=args.seq_len,
        seed=args.seed,
        max_train=args.steps * args.batch,
        max_eval=args.eval_blocks,
    )
    train_batches = _lm_batches(data.train, args.batch, data.collate)
    eval_batches = _lm_batches(data.test, args.batch, data.collate)
    out: dict = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "methods": [],
        "placement": {},
    }
    out["ppl_base"] = _perplexity(base_model, eval_batches)
    console.print(
        f"base model held-out perplexity: {out['ppl_base']:.3f} "
        f"({len(eval_batches)} batches of {args.batch}x{args.seq_len} test tokens)"
    )
    lr2 = args.lr / 2
    methods = [
        ("PEFT-default LoRA", {"init": "kaiming", "method": "adamw"}),
        ("Init[A] + LoRA+", {"init": "init_a", "method": "loraplus", "lr": lr2, "ratio": 16.0}),
        ("LoRA-GA", {"init": "lora_ga", "method": "adamw"}),
        ("LoRA-One", {"init": "lora_one", "method": "adamw"}),
        ("LoRA-One + precond", {"init": "lora_one", "method": "lora_one"}),
    ]
    if args.part in ("all", "methods"):
        console.print(
            f"[bold]methods[/] (q_proj,v_proj, r=8, alpha=16, {args.steps} steps of "
            f"{args.batch}x{args.seq_len} tokens, lr {args.lr:g})"
        )
        wanted = None if args.only is None else {n.strip() for n in args.only.split(",")}
        for name, setup in methods:
            if wanted is not None and name not in wanted:
                continue
            out["methods"].append(_run(name, setup, base_model, train_batches, eval_batches, args))
            _write(out, args.out)
    if args.part in ("all", "placement"):
        console.print("[bold]placement[/] (PLoP NFN ranking, then Init[A] + LoRA+ on each choice)")
        rankings = _plop(base_model, tok, args)
        for r in rankings:
            console.print(r.pop("result").table(title=f"PLoP ranking, data seed {r['data_seed']}"))
        out["placement"]["plop"] = rankings
        chosen = rankings[0]["targets"]
        placements = [
            (f"PLoP choice ({','.join(t.removesuffix('_proj') for t in chosen)})", chosen),
            ("attention-only (q,k,v,o)", ["q_proj", "k_proj", "v_proj", "o_proj"]),
            ("MLP-only (gate,up,down)", ["gate_proj", "up_proj", "down_proj"]),
        ]
        out["placement"]["runs"] = []
        for name, targets in placements:
            setup = {"init": "init_a", "method": "loraplus", "lr": lr2, "ratio": 16.0, "targets": targets}
            out["placement"]["runs"].append(_run(name, setup, base_model, train_batches, eval_batches, args))
            _write(out, args.out)
    out["wall_s"] = time.time() - t_all

    table = Table(
        title=f"held-out perplexity (Wikipedia test, base {out['ppl_base']:.3f}) after {args.steps} steps"
    )
    for col in ("setup", "init", "optimizer", "lr (A)", "params", "ppl after init", "ppl after", "wall s"):
        table.add_column(col)
    for row in out["methods"] + out["placement"].get("runs", []):
        table.add_row(
            row["setup"],
            row["init"],
            row["method"],
            f"{row['lr']:g}",
            str(row["trainable_params"]),
            "" if row["ppl_after_init"] is None else f"{row['ppl_after_init']:.3f}",
            f"{row['ppl_after']:.3f}",
            f"{row['wall_s']:.0f}",
        )
    console.print(table)
    console.print(f"total {out['wall_s']:.0f} s on {torch.get_num_threads()} threads")
    _write(out, args.out)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

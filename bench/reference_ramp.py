"""The reference-loss curve of a probe-like LR range test (the measurement behind probe v2's function edge).

A and B (Init[A], B at `--ratio` × lr) ramp from 1e-5 to 1e-1 over 16 steps of `--rows` training rows each;
after every update the loss of a fixed reference batch of `--reference` rows (held out of the ramp, eval mode)
is printed. `--reference 0` instead ramps on one fixed training batch and prints its loss (the rejected
variant).

    OMP_NUM_THREADS=1 python bench/reference_ramp.py smollm2-135m causal_lm --seq-len 64 --ratio 4.93 \\
        --seed 0 --rows 1 --reference 4
"""

from __future__ import annotations

import argparse
import sys

import torch

import widelora as wl
from widelora.data import prepare
from widelora.lora.pairs import require_pairs
from widelora.models import load_model, load_tokenizer

STEPS = 16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("task", choices=["causal_lm", "classification"])
    ap.add_argument("--dataset", default="wikipedia")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=4.93)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=1, help="training rows per ramp step")
    ap.add_argument("--reference", type=int, default=4, help="reference rows (0: ramp on one fixed batch)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    data = prepare(args.dataset, tok, task=args.task, seq_len=args.seq_len, seed=args.seed, max_eval=1)
    net, _ = load_model(args.model, task=args.task, num_labels=data.num_labels, seed=args.seed)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held = max(args.reference, 0)
    stream = [
        data.collate([data.train[i] for i in order[held + k * args.rows : held + (k + 1) * args.rows]])
        for k in range(STEPS)
    ]
    fixed = data.collate([data.train[i] for i in order[:held]]) if held else stream[0]
    if not held:
        stream = [stream[0]] * STEPS
    targets = ["q_proj", "v_proj"] if args.task == "causal_lm" else ["query", "value"]
    wl.attach(net, targets=targets, rank=8, alpha=8, init="init_a", seed=args.seed)
    pairs = require_pairs(net)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in pairs:
        p.A.requires_grad_(True)
        p.B.requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": [p.A for p in pairs]}, {"params": [p.B for p in pairs]}], lr=1e-5, weight_decay=0.0
    )

    def reference_loss() -> float:
        net.eval()
        with torch.no_grad():
            value = float(net(**fixed).loss)
        net.train()
        return value

    print("step lr reference_loss training_loss")
    print(-1, 0.0, round(reference_loss(), 4))
    for k in range(STEPS):
        lr = 1e-5 * 1e4 ** (k / (STEPS - 1))
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, lr * args.ratio
        loss = net(**stream[k]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(k, f"{lr:.2e}", round(reference_loss(), 4), round(float(loss.detach()), 3), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

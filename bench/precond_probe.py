"""Probe: does the scaled-GD preconditioner change what Adam does? One LoRA-One init, three short runs.

From the same LoRA-One initialization of SmolLM2-135M (q_proj, v_proj, r=8, alpha=16, 2 gradient batches),
take 3 steps (lr 1e-3) with plain AdamW, the preconditioned AdamW (bias correction on, widelora's default)
and the preconditioned AdamW without bias correction (the references' choice); print the mean |Δ(BA)|_F per
layer and a held-out batch's loss. Results in docs/results/methods.md. About 1 min on 2 idle cores.

    .venv/bin/python bench/precond_probe.py
"""

from __future__ import annotations

import copy

import torch

import widelora as wl
from widelora.data import prepare
from widelora.models import load_model

VARIANTS = [
    ("adamw", {}),
    ("lora_one precond", {"method": "lora_one_precond"}),
    ("lora_one precond, no bias corr.", {"method": "lora_one_precond", "bias_correction": False}),
]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    data = prepare("wikipedia", tok, seq_len=64, seed=0, max_train=16, max_eval=4)
    batches = [data.collate([data.train[i] for i in range(j, j + 4)]) for j in range(0, 16, 4)]
    wl.attach(model, ["q_proj", "v_proj"], rank=8, alpha=16, seed=0)
    wl.initialize(model, "lora_one", batches=batches[:2], progress=False)
    held = batches[3]
    with torch.no_grad():
        loss0 = model(**held).loss.item()
    for name, options in VARIANTS:
        trial = copy.deepcopy(model)
        opt = wl.create_optimizer(trial, lr=1e-3, **options)
        pairs = wl.lora_pairs(trial)
        before = [p.delta().detach().clone() for p in pairs]
        for k in range(3):
            opt.zero_grad()
            trial(**batches[k]).loss.backward()
            opt.step()
        moved = [(p.delta().detach() - b).norm().item() for p, b in zip(pairs, before, strict=True)]
        with torch.no_grad():
            loss1 = trial(**held).loss.item()
        print(
            f"{name:34s} held loss {loss0:.4f} -> {loss1:.4f}   mean |d(BA)| {sum(moved) / len(moved):.4g}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Calibrate widelora.recommend on a real task: the probe's edge vs the grid-best lr, and the head-lr rule.

MiniLM-L6 (width 384) + a fresh 11-way head on Wikipedia topics, LoRA r = 8 on query/value, the run the probe
configures: 60 steps of 16 examples, seq 128, warmup 6 %, linear decay, grad-norm clip 1, AdamW (wd 0).
Every run uses the recommended setup (`widelora.recommend`, same targets and rank) and varies only what is
calibrated:

    probe   recommend() per seed: edge, head edge, the curve, cost (no training run)
    grid    the recommendation at lr = each value of --lrs (head at the probe's head_lr) -> accuracy
    headA   the same, but the head at lr_A (what LoRA+'s reference grouping does) -> accuracy
    head    head-only training on cached features (body frozen) at each head lr over the run's schedule:
            best head lr vs the head's first-step size η₁ (cheap: one no-grad forward per example)
    protocol  the probe exactly as a sweep's `setup: recommended` runs it (the spec's base config, the run's
            first `init_batches` batches in BatchOrder), per seed: the stop, the linear-response edge, the lr
            of this probe version and of v1 / v2 on the same readings (the stop rule is the same), cost, CPU
    spread  the spread over seeds of each version's edge and lr, from the stored `protocol` records
    factor  the safety factor from the tuned grid (--grid: a store or export of `recommend (tuned)`) and the
            stored `protocol` records: per seed edge / optimum, expected accuracy against the factor under a
            log-normal error of the lr, and the factor of least worst-case regret

Results are appended to docs/results/recommend_calibration.json (one record per run, keyed by
kind/seed/lr, and by spec and version for `protocol`).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/lr_probe.py probe --seeds 0,1
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/lr_probe.py grid --seeds 0,1 \
        --lrs 5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/lr_probe.py protocol --seeds 0,1,2,3,4,5,6,7 \
        --spec examples/sweeps/eval_minilm_topics_untuned.yaml
    .venv/bin/python bench/lr_probe.py spread --spec examples/sweeps/eval_minilm_topics_untuned.yaml
    .venv/bin/python bench/lr_probe.py factor \
        --grid docs/results/recommend_eval/eval-minilm-topics-recommend.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lr_probe_protocol import factor, protocol_run, spread

import widelora as wl
from widelora.data import make_loader, prepare
from widelora.lora.pairs import lora_pairs
from widelora.models import load_model, load_tokenizer
from widelora.recommend.head import first_step_size

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "recommend_calibration.json"
TASK = {
    "model": "minilm-l6",
    "dataset": "wikipedia",
    "targets": ["query", "value"],
    "rank": 8,
    "steps": 60,
    "batch": 16,
    "seq": 128,
    "warmup": 0.06,
    "n_eval": 512,
}


def load(seed: int):
    tok = load_tokenizer(TASK["model"])
    data = prepare(
        TASK["dataset"], tok, task="classification", seq_len=TASK["seq"], seed=seed, max_eval=TASK["n_eval"]
    )
    model, _ = load_model(TASK["model"], task="classification", num_labels=data.num_labels, seed=seed)
    return data, model


def order(data, seed: int) -> list[dict]:
    """The run's batches, in the run's order (the probe sees the first ones, as a user's loader gives)."""
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    b = TASK["batch"]
    return [data.collate([data.train[i] for i in perm[k * b : (k + 1) * b]]) for k in range(TASK["steps"])]


_RECS: dict[int, wl.Recommendation] = {}


def get_rec(model, batches, seed: int) -> wl.Recommendation:
    """The recommendation for this seed (computed once per process: it is deterministic given the seed)."""
    if seed not in _RECS:
        torch.manual_seed(seed)
        _RECS[seed] = _recommend(model, batches, seed)
    return _RECS[seed]


def _recommend(model, batches, seed: int) -> wl.Recommendation:
    return wl.recommend(
        model, batches[:8], steps=TASK["steps"], targets=TASK["targets"], rank=TASK["rank"], seed=seed
    )


def schedule(step: int) -> float:
    warm = round(TASK["warmup"] * TASK["steps"])
    if step < warm:
        return (step + 1) / (warm + 1)
    return max(0.0, 1.0 - (step - warm) / max(1, TASK["steps"] - warm))


@torch.no_grad()
def accuracy(model, data) -> tuple[float, float]:
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for batch in make_loader(data.test, 64, data.collate):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    model.train()
    return correct / total, loss / total


def train_run(seed: int, lr: float, head_mode: str) -> dict:
    data, model = load(seed)
    batches = order(data, seed)
    rec = get_rec(model, batches, seed)
    wl.attach(model, **{**rec.attach_kwargs(), "seed": seed})
    pairs = lora_pairs(model)
    a_ids, b_ids = {id(p.A) for p in pairs}, {id(p.B) for p in pairs}
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_lr = rec.head_lr if head_mode == "probe" else lr
    groups = [
        {"params": [p for p in trainable if id(p) in a_ids], "lr": lr},
        {"params": [p for p in trainable if id(p) in b_ids], "lr": lr * rec.ratio},
        {"params": [p for p in trainable if id(p) not in a_ids | b_ids], "lr": head_lr},
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    torch.manual_seed(seed)
    model.train()
    status, losses = "done", []
    for batch in batches:
        loss = model(**batch).loss
        if not math.isfinite(float(loss)):
            status = "diverged"
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    acc, eval_loss = accuracy(model, data) if status == "done" else (math.nan, math.nan)
    return {
        "kind": "grid" if head_mode == "probe" else "headA",
        "seed": seed,
        "lr": lr,
        "head_lr": head_lr,
        "ratio": rec.ratio,
        "status": status,
        "accuracy": acc,
        "eval_loss": eval_loss,
        "train_loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "probe_lr": rec.lr,
    }


def probe_run(seed: int) -> dict:
    data, model = load(seed)
    batches = order(data, seed)
    t0 = time.process_time()
    torch.manual_seed(seed)
    rec = _recommend(model, batches, seed)
    cpu = time.process_time() - t0
    return {"kind": "probe", "seed": seed, "cpu_s": cpu, "recommendation": rec.to_dict()}


@torch.no_grad()
def features(model, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The head's inputs (pooled output after dropout, train mode) for every batch of the run."""
    cache: list[torch.Tensor] = []
    h = model.classifier.register_forward_hook(lambda _m, i, _o: cache.append(i[0].detach().clone()))
    model.train()
    out = []
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        out.append((cache.pop(), b["labels"]))
    h.remove()
    return out


def head_run(seed: int, lrs: list[float]) -> list[dict]:
    """Head-only training on cached features over the run's schedule; the head's probed edge on 5 batches."""
    data, model = load(seed)
    batches = order(data, seed)
    feats = features(model, batches)
    test = features(model.eval(), list(make_loader(data.test, 64, data.collate)))  # eval mode: no dropout
    small = [(f[:6], y[:6]) for f, y in feats[:5]]  # what the probe caches: 5 probe steps of 6 examples
    eta, _ = first_step_size(model.classifier, small)
    rows = []
    for lr in lrs:
        head = torch.nn.Linear(model.classifier.in_features, model.classifier.out_features)
        head.load_state_dict(model.classifier.state_dict())
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        for f, y in feats:
            with torch.enable_grad():
                loss = F.cross_entropy(head(f), y)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        acc = sum(int((head(f).argmax(-1) == y).sum()) for f, y in test) / sum(len(y) for _, y in test)
        rows.append({"kind": "head", "seed": seed, "lr": lr, "accuracy": acc, "first_step": eta})
    return rows


def save(rows: list[dict]) -> None:
    existing = json.loads(OUT.read_text()) if OUT.is_file() else []

    def key(r: dict) -> tuple:
        return (
            r["kind"],
            r["seed"],
            r.get("lr") if r["kind"] != "protocol" else None,
            r.get("spec"),
            r.get("version"),
        )

    keys = {key(r) for r in rows}
    kept = [r for r in existing if key(r) not in keys]
    OUT.write_text(json.dumps(kept + rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["probe", "grid", "headA", "head", "protocol", "spread", "factor"])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2")
    ap.add_argument("--spec", default="examples/sweeps/eval_minilm_topics_untuned.yaml")
    ap.add_argument("--grid", default="docs/results/recommend_eval/eval-minilm-topics-recommend.json")
    args = ap.parse_args()
    if args.kind == "spread":
        spread(args.spec)
        return
    if args.kind == "factor":
        factor(args.spec, args.grid)
        return
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    for seed in seeds:
        t0 = time.time()
        if args.kind == "probe":
            rows = [probe_run(seed)]
        elif args.kind == "protocol":
            rows = [protocol_run(args.spec, seed)]
        elif args.kind == "head":
            rows = head_run(seed, lrs)
        else:
            rows = []
            for lr in lrs:
                rows.append(train_run(seed, lr, "probe" if args.kind == "grid" else "lr_a"))
                save(rows[-1:])
                print(json.dumps(rows[-1]), flush=True)
        save(rows)
        print(f"{args.kind} seed {seed}: {time.time() - t0:.0f} s", flush=True)
        for r in rows:
            print(json.dumps(r)[:400], flush=True)


if __name__ == "__main__":
    main()

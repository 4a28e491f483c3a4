"""Training-step time and memory: widelora vs PEFT vs the frozen-model bound, in one process.

For each model, the same base weights (shared, frozen), the same batch, rank, alpha, targets (every linear
layer except the output head, spelled out as one explicit list and passed to both libraries) and seed:

- ``peft``            PEFT LoraConfig(r, alpha, dropout 0) + torch AdamW;
- ``widelora``        wl.attach(init="init_a") + wl.create_optimizer(method="loraplus"): fused path on,
  siblings
                      reading one input (q/k/v, gate/up) with their A products stacked (lora/shared_input.py);
- ``widelora-separate`` the same with the stacking off (wl.set_shared_input(model, False)): one fused layer
  each;
- ``widelora-plain``  the same model class with the fused path switched off (wl.set_fused(model, False));
- ``bound``           no adapters, every weight frozen, but the input-embedding output requires grad so the
                      backward pass still runs through every layer: what any LoRA step must at least cost.

A step is forward + loss + backward + optimizer.step + zero_grad. Repeats are interleaved with a rotating
order; ratios are taken per round (same round, same machine state) and summarized by median and min-max.
Memory (separate, untimed runs): bytes autograd saves for backward (distinct non-parameter storages) and the
peak bytes allocated during a whole step above the level at its start (CPU: torch-profiler allocation events;
CUDA: max_memory_allocated).

    .venv/bin/python bench/step_time.py --models tiny,minilm,smollm2 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import widelora as wl
from widelora.lora.fused import fused_lora_linear

HEADS = ("lm_head", "classifier", "score")


def _shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that shares the frozen base parameters (not the heads) with `base`: no extra weight
    memory."""
    memo: dict[int, Any] = {}
    for name, p in base.named_parameters():
        if not any(h in name.split(".") for h in HEADS):
            memo[id(p)] = p
    return copy.deepcopy(base, memo)


def _batch(
    kind: str, vocab: int, batch: int, seq: int, num_labels: int, seed: int
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if kind == "classification":
        # random token ids keep the cost identical across setups; the task content is irrelevant for timing
        ids[:, 0] = 101  # BERT [CLS]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, num_labels, (batch,), generator=g),
        }
    return {"input_ids": ids, "labels": ids}


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def build_setups(
    base: torch.nn.Module, kind: str, rank: int, seed: int, lr: float = 1e-4
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer | None], list[str]]:
    """The setups of the module docstring, all sharing `base`'s frozen weights."""
    from peft import LoraConfig, get_peft_model

    base.requires_grad_(False)
    names = wl.match_targets(base, "all-linear")
    head = [h for h in HEADS if any(n.split(".")[-1] == h for n, _ in base.named_modules())]
    save = head if kind == "classification" else None

    torch.manual_seed(seed)
    pm = get_peft_model(
        _shared_copy(base),
        LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, modules_to_save=save),
    )
    pm.train()
    peft_adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0
    )
    if peft_adapted != sorted(names):
        raise RuntimeError(f"PEFT adapted {len(peft_adapted)} modules, widelora {len(names)}: targets differ")

    models: dict[str, torch.nn.Module] = {"peft": pm}
    opts: dict[str, torch.optim.Optimizer | None] = {
        "peft": torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    }
    for name, fused, shared in (
        ("widelora", True, True),
        ("widelora-separate", True, False),
        ("widelora-plain", False, False),
    ):
        m = wl.attach(
            _shared_copy(base),
            targets=names,
            rank=rank,
            alpha=rank,
            init="init_a",
            seed=seed,
            trainable=tuple(head) if kind == "classification" else (),
        )
        wl.set_fused(m, fused)
        wl.set_shared_input(m, shared)
        m.train()
        models[name] = m
        opts[name] = wl.create_optimizer(m, lr=lr, method="loraplus")

    bound = _shared_copy(base)
    bound.requires_grad_(False)
    bound.train()
    bound.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())
    models["bound"] = bound
    opts["bound"] = None
    for m in models.values():  # no dropout anywhere: identical arithmetic, and the fused path applies
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    return models, opts, names


def make_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer | None, batch: dict[str, torch.Tensor]
) -> Callable[[], float]:
    def step() -> float:
        loss = _loss(model, batch)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def memory_of(
    model: torch.nn.Module, step: Callable[[], float], batch: dict[str, torch.Tensor], device: str
) -> dict[str, int]:
    with common.saved_activation_bytes(model) as saved:
        loss = _loss(model, batch)
    del loss
    return {"saved_bytes": saved["bytes"], "peak_bytes": common.peak_memory_bytes(step, device)}


def _ratios(
    times: dict[str, dict[str, list[float]]], num: str, den: str, key: str = "wall"
) -> dict[str, float]:
    return common.summary([a / b for a, b in zip(times[num][key], times[den][key], strict=True)])


def bench_model(label: str, base: torch.nn.Module, kind: str, batch: dict[str, torch.Tensor], args) -> dict:
    models, opts, names = build_setups(base, kind, args.rank, args.seed)
    steps = {k: make_step(models[k], opts[k], batch) for k in models}
    # same loss at step 0 (B = 0 everywhere): a cheap check that all setups compute the same function
    first = {k: float(_loss(models[k], batch).detach()) for k in models}
    spread = max(first.values()) - min(first.values())
    if spread > 1e-3:
        raise RuntimeError(f"{label}: setups disagree at step 0: {first}")
    times = common.interleaved_times(steps, args.repeats, args.warmup, args.device)
    mem = {k: memory_of(models[k], steps[k], batch, args.device) for k in models}
    rows, result = [], {"targets": len(names), "batch": list(batch["input_ids"].shape), "setups": {}}
    for k in models:
        entry = {
            "wall_s": common.summary(times[k]["wall"]),
            "cpu_s": common.summary(times[k]["cpu"]),
            **mem[k],
            "ratio_vs_peft": _ratios(times, k, "peft"),
            "ratio_vs_bound": _ratios(times, k, "bound"),
            "cpu_ratio_vs_peft": _ratios(times, k, "peft", "cpu"),
            "cpu_ratio_vs_bound": _ratios(times, k, "bound", "cpu"),
        }
        result["setups"][k] = entry
        cpu = entry["cpu_s"]
        rows.append(
            [
                label,
                k,
                f"{cpu['median']:.3f} ({cpu['min']:.3f}-{cpu['max']:.3f})",
                _fmt_ratio(entry["cpu_ratio_vs_peft"]),
                _fmt_ratio(entry["cpu_ratio_vs_bound"]),
                f"{entry['ratio_vs_peft']['median']:.3f}",
                f"{entry['ratio_vs_bound']['median']:.3f}",
                f"{mem[k]['saved_bytes'] / 2**20:.1f}",
                f"{mem[k]['peak_bytes'] / 2**20:.1f}",
                f"{mem[k]['peak_bytes'] / mem['peft']['peak_bytes']:.3f}",
            ]
        )
    result["rows"] = rows
    return result


def _fmt_ratio(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} ({s['min']:.2f}-{s['max']:.2f})"


# ------------------------------------------------------------------------------------- layer-level micro
# bench
def bench_layer(args) -> dict:
    """One adapted linear at SmolLM2 shapes: plain vs fused (xAᵀ saved / recomputed) vs frozen bound."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(args.seed)
    out: dict[str, Any] = {}
    rows = []
    for fin, fout in ((576, 576), (576, 1536), (1536, 576)):
        n, r = args.layer_tokens, args.rank
        x0 = torch.randn(n, fin, generator=g)
        w = torch.randn(fout, fin, generator=g) / fin**0.5
        a = (torch.randn(r, fin, generator=g) / fin**0.5).requires_grad_()
        b = (torch.randn(fout, r, generator=g) * 0.01).requires_grad_()
        gy = torch.randn(n, fout, generator=g)

        def run(kind: str, x0=x0, w=w, a=a, b=b, gy=gy) -> None:
            x = x0.clone().requires_grad_()  # same (tiny) clone cost in every variant
            if kind == "plain":
                y = F.linear(x, w) + F.linear(F.linear(x, a), b) * 1.0
            elif kind == "bound":
                y = F.linear(x, w)
            else:
                y = fused_lora_linear(x, w, None, a, b, 1.0, save_xa=(kind == "fused"))
            y.backward(gy)

        kinds = ("plain", "fused", "fused-recompute", "bound")
        t = common.interleaved_times({k: (lambda k=k: run(k)) for k in kinds}, args.layer_repeats, 3)
        peaks = {k: common.peak_memory_bytes(lambda k=k: run(k)) for k in kinds}
        key = f"{fin}x{fout}"
        out[key] = {
            k: {
                "cpu_s": common.summary(t[k]["cpu"]),
                "wall_s": common.summary(t[k]["wall"]),
                "peak_bytes": peaks[k],
            }
            for k in kinds
        }
        for k in kinds:
            med = statistics.median(t[k]["cpu"])
            rows.append(
                [
                    key,
                    k,
                    f"{med * 1e3:.2f}",
                    f"{med / statistics.median(t['plain']['cpu']):.3f}",
                    f"{med / statistics.median(t['bound']['cpu']):.3f}",
                    f"{peaks[k] / 2**20:.2f}",
                ]
            )
    print(
        f"\nlayer-level (N={args.layer_tokens} tokens, r={args.rank}, CPU time, median of "
        f"{args.layer_repeats})"
    )
    out["table"] = common.print_table(["in x out", "path", "ms", "/plain", "/bound", "peak MiB"], rows)
    return out


def bench_qkv(args) -> dict:
    """Prototype for 'merged QKV': q, k, v adapted on one input x (SmolLM2 shapes 576 -> 576, 192, 192).

    Separate: three fused_lora_linear calls (as widelora runs today). Merged: one GEMM against the stacked
    frozen weight [Wq; Wk; Wv] and one rank-3r GEMM against [Aq; Ak; Av] in forward, and the mirror image in
    backward (hand-written here, not an autograd Function: it measures what a merged path could save, not a
    shipped one)."""
    g = torch.Generator().manual_seed(args.seed)
    n, r, fin, outs = args.layer_tokens, args.rank, 576, (576, 192, 192)
    x0 = torch.randn(n, fin, generator=g)
    ws = [torch.randn(o, fin, generator=g) / fin**0.5 for o in outs]
    a_s = [(torch.randn(r, fin, generator=g) / fin**0.5) for _ in outs]
    b_s = [(torch.randn(o, r, generator=g) * 0.01) for o in outs]
    gys = [torch.randn(n, o, generator=g) for o in outs]
    w_cat = torch.cat(ws)  # frozen: built once, as a merged layer would cache it
    a_leaf = [a.clone().requires_grad_() for a in a_s]
    b_leaf = [b.clone().requires_grad_() for b in b_s]
    cols = [0, outs[0], outs[0] + outs[1], sum(outs)]

    def separate() -> None:
        x = x0.clone().requires_grad_()
        ys = [fused_lora_linear(x, w, None, a, b, 1.0) for w, a, b in zip(ws, a_leaf, b_leaf, strict=True)]
        torch.autograd.backward(ys, gys)

    def merged() -> None:
        x = x0.clone()
        a_cat = torch.cat(a_s)  # (3r, in): the adapters change every step, so this copy is per step
        xa = torch.mm(x, a_cat.t())  # forward thin GEMM, one pass over x
        y = torch.mm(x, w_cat.t())
        for i, b in enumerate(b_s):
            y[:, cols[i] : cols[i + 1]].addmm_(xa[:, i * r : (i + 1) * r], b.t())
        gy = torch.cat(gys, dim=1)  # in a real merged op the three grads would arrive as one tensor
        gb = torch.empty(n, 3 * r)
        for i, b in enumerate(b_s):
            torch.mm(gy[:, cols[i] : cols[i + 1]], b, out=gb[:, i * r : (i + 1) * r])
        gx = torch.mm(gy, w_cat)
        gx.addmm_(gb, a_cat)
        torch.mm(gb.t(), x)  # grad of the stacked A
        for i in range(3):
            torch.mm(gy[:, cols[i] : cols[i + 1]].t(), xa[:, i * r : (i + 1) * r])  # grad of each B

    def bound() -> None:
        x = x0.clone().requires_grad_()
        ys = [torch.nn.functional.linear(x, w) for w in ws]
        torch.autograd.backward(ys, gys)

    t = common.interleaved_times(
        {"separate": separate, "merged": merged, "bound": bound}, args.layer_repeats, 3
    )
    med = {k: statistics.median(v["cpu"]) for k, v in t.items()}
    rows = [
        [k, f"{med[k] * 1e3:.2f}", f"{med[k] / med['separate']:.3f}", f"{med[k] / med['bound']:.3f}"]
        for k in med
    ]
    print(f"\nmerged-QKV prototype (N={n}, r={r}, CPU time, median of {args.layer_repeats})")
    table = common.print_table(["q,k,v path", "ms", "/separate", "/bound"], rows)
    return {k: {"cpu_s": common.summary(v["cpu"])} for k, v in t.items()} | {"table": table}


# ----------------------------------------------------------------------------------------------------- main
def load(label: str, args) -> tuple[torch.nn.Module, str, dict[str, torch.Tensor]]:
    if label == "tiny":
        model = common.tiny_llama(seed=args.seed)
        return model, "causal_lm", _batch("causal_lm", model.config.vocab_size, 4, args.seq, 0, args.seed)
    if label == "smollm2":
        model, _ = common.load_smollm2()
        return (
            model,
            "causal_lm",
            _batch("causal_lm", model.config.vocab_size, args.smol_batch, args.seq, 0, args.seed),
        )
    if label == "minilm":
        model, _ = common.load_minilm(num_labels=11)
        return (
            model,
            "classification",
            _batch("classification", model.config.vocab_size, args.minilm_batch, args.seq, 11, args.seed),
        )
    raise ValueError(f"model {label!r} is unknown; valid: tiny, minilm, smollm2")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,minilm,smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--smol-batch", type=int, default=4)
    p.add_argument("--minilm-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: CPU time is then a low-noise measure on a shared machine)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--layer", action="store_true", help="also run the layer-level micro benchmark")
    p.add_argument("--layer-only", action="store_true")
    p.add_argument("--layer-tokens", type=int, default=512)
    p.add_argument("--layer-repeats", type=int, default=30)
    p.add_argument("--name", default="step_time", help="JSON file name under bench/out/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"env": common.env_info(), "args": vars(args), "models": {}}
    if args.layer or args.layer_only:
        payload["layer"] = bench_layer(args)
        payload["qkv"] = bench_qkv(args)
    if not args.layer_only:
        rows = []
        for label in [m for m in args.models.split(",") if m]:
            base, kind, batch = load(label, args)
            base.to(args.device)
            batch = {k: v.to(args.device) for k, v in batch.items()}
            res = bench_model(label, base, kind, batch, args)
            payload["models"][label] = res
            rows += res["rows"]
            print(f"[{label}] done: {res['targets']} adapted linears, batch {res['batch']}", flush=True)
            del base
        print(
            f"\nstep time: process CPU seconds, median (min-max) of {args.repeats} interleaved rounds; "
            "ratios "
            f"per round; rank {args.rank}, all linear layers, torch threads {torch.get_num_threads()}"
        )
        payload["table"] = common.print_table(
            [
                "model",
                "setup",
                "cpu s/step",
                "/peft",
                "/bound",
                "wall /peft",
                "wall /bound",
                "saved MiB",
                "peak MiB",
                "peak /peft",
            ],
            rows,
        )
    path = common.write_json(args.name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

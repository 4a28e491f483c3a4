"""Shared helpers for the benchmark scripts: interleaved timing, CPU/CUDA memory, models, tables, JSON.

Timing rule: every setup being compared runs in the same process, and repeats are interleaved (A B C A B C
...) so that noise from other processes on the machine hits all setups alike; only ratios within one run are
reported as results, with the median and the min-max over repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT_DIR = Path(__file__).resolve().parent / "out"


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    """Wait for queued device work so a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(
    steps: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """Run each step `warmup` times, then `repeats` rounds of one call of each, in a rotating order.

    The order rotates every round (A B C, B C A, ...) so no setup always runs right after the same other one.
    Returns, per step, wall-clock seconds ("wall") and this process's CPU seconds over all its threads
    ("cpu"). On a machine shared with other jobs, CPU seconds at one thread are far less noisy than wall time
    (a descheduled process accrues no CPU time); with several threads they also count spin-waits at barriers.
    """
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            steps[n]()
            sync(device)
            times[n]["wall"].append(time.perf_counter() - t0)
            times[n]["cpu"].append(time.process_time() - c0)
    return times


def summary(xs: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ----------------------------------------------------------------------------------------------- memory
def _param_ptrs(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()
    }


@contextmanager
def saved_activation_bytes(model: torch.nn.Module):
    """Sum the bytes of distinct non-parameter storages autograd saves for backward inside the block.

    Yields a dict whose "bytes" entry is filled when the block exits. Parameters and buffers are excluded
    (saving them costs nothing); a storage saved by several ops (the input x of base and lora_A) counts once.
    """
    params = _param_ptrs(model)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    result: dict[str, int] = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


def peak_memory_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes allocated above the level at the call, while `fn` runs.

    CUDA: torch.cuda.max_memory_allocated. CPU: the allocation/free events recorded by the torch profiler with
    profile_memory=True, replayed in time order (tracemalloc does not see torch's allocator).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


# ----------------------------------------------------------------------------------------------- models
def tiny_llama(seed: int = 0, hidden: int = 256, layers: int = 4, vocab: int = 2048) -> torch.nn.Module:
    """A small Llama-style causal LM built from a config (no download), fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M (fp32, eval mode) and its tokenizer, through widelora.models (cached GGUF conversion)."""
    from widelora.models import load_model

    return load_model("smollm2-135m")


def load_minilm(num_labels: int = 11, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 with a fresh classification head initialized from `seed`, and its tokenizer."""
    from widelora.models import load_model

    return load_model("minilm-l6", task="classification", num_labels=num_labels, seed=seed)


def linear_names(
    model: torch.nn.Module, exclude: Sequence[str] = ("lm_head", "classifier", "score")
) -> list[str]:
    """Full names of every nn.Linear except output heads: the 'all-linear' target set, spelled out."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(n == e or n.endswith("." + e) for e in exclude)
    ]


# ----------------------------------------------------------------------------------------------- output
def env_info() -> dict[str, Any]:
    import peft
    import transformers

    info = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/out/<name>.json atomically (temp name, then rename)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a GitHub-markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text

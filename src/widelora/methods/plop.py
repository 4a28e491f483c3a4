"""PLoP: choose which module types get adapters from the normalized feature norm (NFN) of each module.

For a linear module with weight ``W`` (out × in) and input tokens ``z``: normalize each token ``ẑ = z/|z|``
and the weight ``W_n = W / RMS(W)``; ``actual = mean_tokens |W_n ẑ| / sqrt(d_in)``; ``random`` is the same
with ``ẑ`` replaced by as many normalized Gaussian vectors; ``NFN = actual / random`` per batch, averaged over
batches. A type's score is the mean NFN over its modules; adapters go on the ``k`` types with the LOWEST
scores: those whose inputs are least aligned with what the pretrained weight already amplifies, i.e. where
finetuning has the most to add (Hayou, Ghosh, Yu 2025).

Unlike the reference implementation, padding tokens (``attention_mask == 0``) are excluded: they are not
data, and with right padding they would otherwise weigh each batch by its padding length.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widelora.errors import UserError
from widelora.files import atomic_write_json
from widelora.lora.modules import is_conv1d, is_linear, is_output_head_name

__all__ = ["PlacementResult", "linear_modules", "module_nfn", "nfn_modules", "place"]


@dataclass
class PlacementResult:
    """Outcome of :func:`place`: per-type and per-module NFN scores and the chosen types (lowest first)."""

    targets: list[str]
    scores: dict[str, float]
    module_scores: dict[str, float]
    k: int
    num_batches: int
    num_tokens: int
    counts: dict[str, int] = field(default_factory=dict)

    def ranking(self) -> list[tuple[str, float]]:
        """Module types sorted by score, lowest (most recommended) first."""
        return sorted(self.scores.items(), key=lambda kv: (kv[1], kv[0]))

    def table(self, title: str | None = None) -> Any:
        """A rich Table of the ranking; print it with ``rich.console.Console().print(result.table())``."""
        from rich.table import Table

        table = Table(title=title or f"PLoP ranking (NFN, lowest first; {self.num_tokens} tokens)")
        table.add_column("rank", justify="right")
        table.add_column("module type")
        table.add_column("mean NFN", justify="right")
        table.add_column("min", justify="right")
        table.add_column("max", justify="right")
        table.add_column("modules", justify="right")
        table.add_column("chosen", justify="center")
        for i, (typ, score) in enumerate(self.ranking(), start=1):
            values = [v for n, v in self.module_scores.items() if module_type(n) == typ]
            table.add_row(
                str(i),
                typ,
                f"{score:.3f}",
                f"{min(values):.3f}",
                f"{max(values):.3f}",
                str(len(values)),
                "✓" if typ in self.targets else "",
            )
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "k": self.k,
            "ranking": [{"type": t, "nfn": s, "modules": self.counts.get(t, 0)} for t, s in self.ranking()],
            "scores": dict(self.scores),
            "module_scores": dict(self.module_scores),
            "num_batches": self.num_batches,
            "num_tokens": self.num_tokens,
        }

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON atomically (temp file, then rename)."""
        return atomic_write_json(path, self.to_dict())


def module_type(name: str) -> str:
    """A module's type from its path: the last component ("model.layers.3.mlp.down_proj" → "down_proj")."""
    return name.rsplit(".", 1)[-1]


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable linear layer of ``model`` by path: output heads, embeddings and LoRA factors excluded.

    On an adapted model (widelora or PEFT) the frozen ``base_layer`` is reported under its wrapper's name.
    """
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        if out is not None:
            heads.add(id(out))
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not name or id(mod) in heads:
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        base = _base_linear(mod)
        if base is None or (parts[-1] == "base_layer" and name.rsplit(".", 1)[0] in found):
            continue
        if parts[-1] == "base_layer":
            parts = parts[:-1]
        if is_output_head_name(".".join(parts)):
            continue
        # an adapted layer is scored through its wrapper: a fused forward may never call the base layer,
        # while the wrapper always receives the base layer's input
        found[".".join(parts)] = mod
    return found


def _base_linear(mod: nn.Module) -> nn.Module | None:
    """The frozen linear layer of ``mod``: itself, or the end of its ``base_layer`` chain (LoRA wrappers)."""
    seen = 0
    while not is_linear(mod):
        child = mod._modules.get("base_layer") if hasattr(mod, "_modules") else None
        if child is None or seen > 4:
            return None
        mod, seen = child, seen + 1
    return mod


def module_nfn(
    weight: torch.Tensor,
    z: torch.Tensor,
    generator: torch.Generator | None = None,
    conv1d: bool = False,
    wz: torch.Tensor | None = None,
) -> tuple[float, float]:
    """(actual, random) feature norms of one module on tokens ``z`` (n_tokens × d_in); NFN = actual/random.

    ``wz``, when given, is ``W z`` already computed (the module's own output without bias), saving a matmul.
    """
    w = weight.detach().float()
    if conv1d:
        w = w.T
    rms = w.pow(2).mean().sqrt().clamp_min(1e-30)
    w_n = w / rms
    z = z.detach().float()
    d_in = z.shape[-1]
    z_norm = z.norm(dim=-1).clamp_min(1e-30)
    if wz is None:
        token_norms = (z @ w_n.T).norm(dim=-1) / z_norm
    else:
        token_norms = wz.detach().float().norm(dim=-1) / (rms * z_norm)
    actual = token_norms.mean() / math.sqrt(d_in)
    g = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device)
    g_hat = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    random = (g_hat @ w_n.T).norm(dim=-1).mean() / math.sqrt(d_in)
    return float(actual), float(random)


def _inputs(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping):
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise UserError(f"each batch needs 'input_ids'; got keys {sorted(batch)}")
        return {k: v for k, v in batch.items() if k not in ("labels", "label")}
    raise TypeError(
        f"batches must yield tensors of input ids or mappings of model inputs; got {type(batch).__name__}"
    )


def _runner(model: nn.Module, targets: Mapping[str, nn.Module]) -> nn.Module:
    """The transformers backbone when it holds every target (no LM-head logits computed), else the model."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model or type(base).__name__ == "LoraModel":
        return model
    inside = {id(m) for m in base.modules()}
    return base if all(id(m) in inside for m in targets.values()) else model


def nfn_modules(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    modules: Mapping[str, nn.Module] | None = None,
    num_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, float], int, int]:
    """NFN of each module (default: every linear layer) averaged over batches; returns (scores, batches,
    tokens).

    Padding tokens are excluded through the batch's ``attention_mask``; no gradients are computed.
    """
    targets = dict(modules) if modules is not None else linear_modules(model)
    if not targets:
        raise UserError("the model has no linear modules to score (output heads and embeddings excluded)")
    if num_batches is not None and num_batches < 1:
        raise UserError(f"num_batches must be a positive integer or None; got {num_batches}")
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(targets, 0.0)
    seen = dict.fromkeys(targets, 0)
    state: dict[str, Any] = {"mask": None}

    def make_hook(name: str, module: nn.Module):
        base = _base_linear(module)
        conv1d = is_conv1d(base)

        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            z = args[0]
            # a plain bias-free layer's output is W z: reuse it instead of recomputing
            wz = (
                output
                if (mod is base and getattr(base, "bias", None) is None and isinstance(output, torch.Tensor))
                else None
            )
            mask = state["mask"]
            if mask is not None and tuple(z.shape[:-1]) == tuple(mask.shape):
                z = z[mask]
                wz = wz[mask] if wz is not None else None
            else:
                z = z.reshape(-1, z.shape[-1])
                wz = wz.reshape(-1, wz.shape[-1]) if wz is not None else None
            if z.shape[0] == 0:
                return
            actual, rnd = module_nfn(base.weight, z, generator, conv1d=conv1d, wz=wz)
            state["acc"][name] = state["acc"].get(name, 0.0) + actual / rnd
            state["calls"][name] = state["calls"].get(name, 0) + 1

        return hook

    handles = [mod.register_forward_hook(make_hook(name, mod)) for name, mod in targets.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    runner = _runner(model, targets)
    n_batches = n_tokens = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches, desc="PLoP NFN", unit="batch", leave=False)
    try:
        with torch.no_grad():
            for batch in itertools.islice(iter(batches), num_batches):
                inputs = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _inputs(batch).items()
                }
                mask = inputs.get("attention_mask")
                state["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None
                state["acc"], state["calls"] = {}, {}
                runner(**inputs)
                for name in targets:
                    if state["calls"].get(name):
                        sums[name] += state["acc"][name] / state["calls"][name]
                        seen[name] += 1
                n_batches += 1
                ids = inputs.get("input_ids")
                if state["mask"] is not None:
                    n_tokens += int(state["mask"].sum())
                elif isinstance(ids, torch.Tensor):
                    n_tokens += ids.numel()
                if bar is not None:
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    if n_batches == 0:
        raise UserError("batches yielded no batch: PLoP needs a data sample")
    scores = {name: sums[name] / seen[name] for name in targets if seen[name]}
    if not scores:
        raise UserError("none of the scored modules ran in the forward pass (or every token was padding)")
    return scores, n_batches, n_tokens


def place(
    model: nn.Module,
    batches: Iterable[Any],
    k: int = 3,
    *,
    types: Sequence[str] | None = None,
    num_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PlacementResult:
    """Rank module types by mean NFN on ``batches`` and choose the ``k`` lowest (PLoP).

    ``types`` restricts the candidates (e.g. ``["q_proj", "k_proj", ...]``); by default every linear type
    except the output head. ``result.targets`` can be passed to ``widelora.attach(targets=...)``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"k must be a positive integer; got {k!r}")
    candidates = linear_modules(model)
    if types is not None:
        wanted = list(types)
        available = sorted({module_type(n) for n in candidates})
        missing = [t for t in wanted if t not in available]
        if missing:
            raise UserError(
                f"types {missing} match no linear module of the model; available types: {available}"
            )
        candidates = {n: m for n, m in candidates.items() if module_type(n) in wanted}
    if not candidates:
        raise UserError("the model has no linear modules to score (output heads and embeddings excluded)")
    n_types = len({module_type(n) for n in candidates})
    if k > n_types:
        raise UserError(f"k={k} exceeds the number of module types ({n_types}); choose 1 <= k <= {n_types}")
    module_scores, n_batches, n_tokens = nfn_modules(
        model, batches, modules=candidates, num_batches=num_batches, seed=seed, progress=progress
    )
    by_type: dict[str, list[float]] = {}
    for name, score in module_scores.items():
        by_type.setdefault(module_type(name), []).append(score)
    scores = {t: sum(v) / len(v) for t, v in by_type.items()}
    ranking = sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))
    return PlacementResult(
        targets=[t for t, _ in ranking[:k]],
        scores=scores,
        module_scores=module_scores,
        k=k,
        num_batches=n_batches,
        num_tokens=n_tokens,
        counts={t: len(v) for t, v in by_type.items()},
    )

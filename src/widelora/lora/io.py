"""Adapters on disk in PEFT's own format: `adapter_config.json` + `adapter_model.safetensors`.

What widelora writes, `peft.PeftModel.from_pretrained` loads and gives the same outputs; what PEFT wrote,
`load_adapter` reads. Files are written under a temporary name and renamed, so a crash never leaves half a file.
When an init moved the base weight (PiSSA, LoRA-GA: `W_res = W - s·B0 A0`), the saved adapter folds the move back
in as a rank-2r adapter `[B, -B0] [A; A0]` with the same scale, so it applies to the unmodified base model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from widelora.files import atomic_write
from widelora.lora.layer import LoRALinear
from widelora.lora.modules import is_linear, linear_shape
from widelora.lora.pairs import PEFT_PREFIX, LoRAPair, require_pairs

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _is_rslora(pair: LoRAPair) -> bool:
    if pair.kind == "widelora":
        return pair.module.scaling_mode == "rslora"
    flags = getattr(pair.module, "use_rslora", {})
    return bool(next(iter(flags.values()), False)) if isinstance(flags, dict) else bool(flags)


def _portable_factors(pair: LoRAPair) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) that reproduce this pair's change relative to the user's original base weight."""
    a, b = pair.A.detach(), pair.B.detach()
    offset = pair.base_offset
    if offset is None:
        return a, b
    b0, a0 = offset
    return torch.cat([a, a0.to(a)], dim=0), torch.cat([b, -b0.to(b)], dim=1)


def _modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """Extra trainable modules saved whole: widelora's `trainable=` and PEFT's ModulesToSaveWrapper."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        clean = name.removeprefix(PEFT_PREFIX)
        if type(module).__name__ == "ModulesToSaveWrapper":
            adapter = module.active_adapters[0] if module.active_adapters else "default"
            found[clean] = module.modules_to_save[adapter]
    for extra in getattr(model, "_widelora_trainable", []):
        for name, module in model.named_modules():
            if name == extra or name.endswith("." + extra):
                found[name] = module
    return found


def _target_spec(model: nn.Module, names: list[str]) -> list[str] | str:
    """The leaf names when they select exactly `names` under PEFT's suffix rule, else an exact regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = set(names)
    inner = tuple(f".{x}" for x in ("base_layer", "lora_A", "lora_B", "lora_dropout", "modules_to_save",
                                    "original_module"))
    candidates = set()
    for n, _ in model.named_modules():
        n = n.removeprefix(PEFT_PREFIX)
        if n and not any(s in n for s in inner) and n.rsplit(".", 1)[-1] in leaves:
            candidates.add(n)
    if candidates == chosen:
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _task_type(model: nn.Module) -> str | None:
    if type(model).__name__.startswith("PeftModel"):
        return getattr(getattr(model, "peft_config", {}).get("default"), "task_type", None)
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of `model` (widelora or PEFT) as a PEFT adapter folder; returns the folder."""
    from peft import LoraConfig

    pairs = require_pairs(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rslora = all(_is_rslora(p) for p in pairs)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for p in pairs:
        a, b = _portable_factors(p)
        r = a.shape[0]
        ranks[p.name] = r
        alphas[p.name] = p.scale * (math.sqrt(r) if rslora else r)
        tensors[f"{PEFT_PREFIX}{p.name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{p.name}.lora_B.weight"] = b.contiguous().cpu()
    extras = _modules_to_save(model)
    for mod_name, module in extras.items():
        for p_name, param in module.named_parameters():
            tensors[f"{PEFT_PREFIX}{mod_name}.{p_name}"] = param.detach().contiguous().cpu()
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    transposed = {p.transposed for p in pairs}
    dropouts = {float(getattr(p.dropout, "p", 0.0)) for p in pairs}
    name_or_path = base_model_name_or_path
    if name_or_path is None:
        cfg = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
        name_or_path = getattr(cfg, "_name_or_path", None) or None
    config = LoraConfig(
        r=r0,
        lora_alpha=a0,
        target_modules=_target_spec(model, [p.name for p in pairs]),
        lora_dropout=max(dropouts) if dropouts else 0.0,
        use_rslora=rslora,
        fan_in_fan_out=transposed == {True},
        bias="none",
        modules_to_save=sorted({n.rsplit(".", 1)[-1] for n in extras}) or None,
        task_type=_task_type(model),
        base_model_name_or_path=name_or_path,
        rank_pattern={f"^{re.escape(n)}$": r for n, r in ranks.items() if r != r0},
        alpha_pattern={f"^{re.escape(n)}$": a for n, a in alphas.items() if a != a0},
        inference_mode=True,
    ).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["peft_type"] = "LORA"
    config["task_type"] = config.get("task_type")
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))
    return out


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter folder {directory} has no {path.name} (expected {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}, PEFT's format)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON ({exc}); the adapter config is corrupt") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={config.get('peft_type') if isinstance(config, dict) else None!r}"
                         "; widelora loads LoRA adapters only (peft_type 'LORA')")
    unsupported = [k for k in ("use_dora", "lora_bias") if config.get(k)]
    if unsupported:
        raise ValueError(f"{cfg_path}: {unsupported} adapters are not supported by widelora's loader")
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt headers
        raise ValueError(f"{w_path} is corrupt or truncated and cannot be read: {exc}") from exc
    return config, tensors


def _lookup(pattern: dict, name: str, default):
    for key, value in (pattern or {}).items():
        if re.fullmatch(key, name) or re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the adapter stored in `directory` (written by widelora or PEFT) to a base `model`.

    Everything is checked before the model is touched: missing modules or shape mismatches (a different base
    model) and corrupt files raise and leave `model` unchanged.
    """
    from widelora.lora.attach import attach

    directory = Path(directory)
    config, tensors = _read_adapter(directory)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = value
        elif "lora_embedding" in name or "lora_magnitude" in name:
            raise ValueError(f"{directory}: tensor {key} belongs to an adapter type widelora cannot load")
        else:
            extras[name] = value
    if not lora:
        raise ValueError(f"{directory / WEIGHTS_NAME} holds no lora_A/lora_B tensors")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    base_hint = config.get("base_model_name_or_path")
    plan: list[tuple[str, int, float, torch.Tensor, torch.Tensor]] = []
    for name, pair in sorted(lora.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{directory}: module {name} has only lora_{''.join(pair)}; the file is incomplete")
        module = modules.get(name)
        if isinstance(module, LoRALinear):
            if module.rank != pair["A"].shape[0]:
                raise ValueError(f"module {name} already has a rank-{module.rank} adapter; the file has rank "
                                 f"{pair['A'].shape[0]}")
            module = module.base_layer
        if module is None or not is_linear(module):
            raise ValueError(f"adapter targets module {name!r}, which this model ({type(model).__name__}) "
                             f"{'does not have' if module is None else 'has but is not a linear layer'}; the "
                             f"adapter was made for a different base model ({base_hint or 'unknown'})")
        out_f, in_f = linear_shape(module)
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
            raise ValueError(f"adapter shapes for {name} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit the "
                             f"model's layer ({out_f}x{in_f}); the adapter was made for a different base model "
                             f"({base_hint or 'unknown'})")
        alpha = float(_lookup(config.get("alpha_pattern"), name, config.get("lora_alpha", r)))
        plan.append((name, r, alpha, a, b))
    for name, value in extras.items():
        target = params.get(name)
        if target is None or target.shape != value.shape:
            raise ValueError(f"adapter tensor {name} {tuple(value.shape)} has no matching parameter in the model"
                             f"{'' if target is None else f' (model has {tuple(target.shape)})'}")
    trainable = sorted({n.rsplit(".", 1)[0] for n in extras})
    scaling = "rslora" if config.get("use_rslora") else "standard"
    dropout = float(config.get("lora_dropout") or 0.0)
    groups: dict[tuple[int, float], list[str]] = {}
    for name, r, alpha, _, _ in plan:
        if not isinstance(modules.get(name), LoRALinear):
            groups.setdefault((r, alpha), []).append(name)
    for (r, alpha), names in groups.items():
        attach(model, "^(" + "|".join(re.escape(n) for n in names) + ")$", rank=r, alpha=alpha,
               scaling=scaling, dropout=dropout, init="init_a", seed=0, trainable=trainable)
    with torch.no_grad():
        for name, r, alpha, a, b in plan:
            layer = model.get_submodule(name)
            layer.lora_A.copy_(a.to(layer.lora_A))
            layer.lora_B.copy_(b.to(layer.lora_B))
        new_params = dict(model.named_parameters())
        for name, value in extras.items():
            new_params[name].copy_(value.to(new_params[name]))
    return model

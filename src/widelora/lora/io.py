"""Saving adapters in PEFT's own format: `adapter_config.json` + `adapter_model.safetensors`.

What widelora writes, `peft.PeftModel.from_pretrained` loads and gives the same outputs (reading is
`widelora.lora.load`). Files are written under a temporary name and renamed, so a crash never leaves half a
file. When an init moved the base weight (PiSSA, LoRA-GA: `W_res = W - s·B0 A0`), the saved adapter folds the
move back in as a rank-2r adapter `[B, -B0] [A; A0]` with the same scale, so it applies to the unmodified base
model. A PEFT model that PEFT itself initialized with PiSSA/OLoRA is saved as PEFT's `save_pretrained` saves
it: with its `init_lora_weights`, so every loader rebuilds the same residual base weight from the original
model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from widelora.errors import UserError
from widelora.files import atomic_write
from widelora.lora.adapter_file import CONFIG_NAME, RESIDUAL_INITS, WEIGHTS_NAME
from widelora.lora.pairs import PEFT_PREFIX, LoRAPair, require_pairs

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_adapter"]


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


def _peft_config(model: nn.Module):
    configs = getattr(model, "peft_config", None)
    return configs.get("default", next(iter(configs.values()), None)) if isinstance(configs, dict) else None


def _extra_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Non-LoRA tensors to save, the modules_to_save names and the bias mode.

    PEFT models: exactly what PEFT's own `get_peft_model_state_dict` writes. widelora models: the parameters
    of `trainable=` modules, and the biases a loaded `bias="all"`/"lora_only"` adapter made trainable.
    """
    config = _peft_config(model)
    if config is not None:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
        extras = {k: v.detach().cpu().clone() for k, v in state.items() if ".lora_" not in k}
        return extras, sorted(config.modules_to_save or []), str(config.bias)
    extras: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    for wanted in getattr(model, "_widelora_trainable", []):
        for name, module in model.named_modules():
            if name == wanted or name.endswith("." + wanted):
                names.add(wanted)
                for p_name, param in module.named_parameters():
                    extras[f"{PEFT_PREFIX}{name}.{p_name}"] = param.detach().contiguous().cpu()
    params = dict(model.named_parameters(remove_duplicate=False))
    for path in getattr(model, "_widelora_bias_params", []):
        key = path if path in params else path.rpartition(".")[0] + ".base_layer." + path.rpartition(".")[2]
        extras[f"{PEFT_PREFIX}{key}"] = params[key].detach().contiguous().cpu()
    return extras, sorted(names), getattr(model, "_widelora_bias", "none")


def _residual_init(model: nn.Module, pairs: list[LoRAPair]) -> str | bool:
    """PEFT's `init_lora_weights` when PEFT built a residual base (PiSSA/OLoRA), else True."""
    config = _peft_config(model)
    init = getattr(config, "init_lora_weights", True) if config is not None else True
    if not isinstance(init, str) or not init.startswith(RESIDUAL_INITS):
        return True
    if any(p.base_offset is not None for p in pairs):
        raise UserError(
            f"the PEFT model was initialized with init_lora_weights={init!r} (base weight moved by "
            "PEFT) and then re-initialized by widelora with a W-moving scheme; it cannot be saved "
            "portably — re-initialize a fresh PEFT model instead"
        )
    return init


def _target_spec(model: nn.Module, names: list[str]) -> list[str] | str:
    """The leaf names when they select exactly `names` under PEFT's suffix rule, else an exact regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = set(names)
    inner = tuple(
        f".{x}"
        for x in ("base_layer", "lora_A", "lora_B", "lora_dropout", "modules_to_save", "original_module")
    )
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
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if cls.endswith(suffix):
            return task
    return None


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
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
    extras, modules_to_save, bias = _extra_tensors(model)
    tensors.update(extras)
    init = _residual_init(model, pairs)
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
        bias=bias,
        init_lora_weights=init,
        modules_to_save=modules_to_save or None,
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
    atomic_write(
        out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str))
    )
    return out

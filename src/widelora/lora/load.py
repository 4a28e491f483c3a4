"""`load_adapter`: put a PEFT-format adapter (from widelora or PEFT) into a model, exactly as PEFT would.

Everything is planned and checked before the model is touched: a tensor the config does not cover, a
non-finite value, a module the model lacks or a shape that does not fit raise and leave the model unchanged.
Then:
- layers that already carry widelora adapters get the file's rank, alpha and factors; a base weight that a
  W-moving init (PiSSA, LoRA-GA) had moved is put back first: the file's adapter applies to the user's W;
- adapters whose config says `init_lora_weights="pissa"`/"olora" get the residual base weight PEFT rebuilds on
  load (widelora.lora.peft_residual), recorded as a base offset so `save_adapter` can fold it back;
- `modules_to_save` modules are loaded and made trainable (a tied head gets its own copy, as in PEFT), and
  biases saved with `bias="all"`/"lora_only"` are loaded into the biases and made trainable.
Adapters already in the model and trainable modules stay trainable whatever the file's rank groups.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from widelora.errors import FileProblem, UserError
from widelora.lora.adapter_file import RESIDUAL_INITS, AdapterFile, read_adapter
from widelora.lora.attach import add_adapters, mark_trainable
from widelora.lora.layer import LoRALinear, lora_scale
from widelora.lora.modules import is_conv1d, is_linear, linear_shape
from widelora.lora.pairs import PEFT_PREFIX, lora_pairs
from widelora.lora.peft_residual import residual_factors

_BASE = ".base_layer"


@dataclass
class _Extra:
    key: str
    owner_path: str
    param: str
    value: torch.Tensor
    module_to_save: str | None  # the modules_to_save module it belongs to, or None for a bias


def _different_base(f: AdapterFile, detail: str) -> UserError:
    hint = f.config.get("base_model_name_or_path") or "unknown"
    return UserError(f"{f.directory}: {detail}; the adapter was made for a different base model ({hint})")


def _plan_factors(model: nn.Module, f: AdapterFile) -> None:
    modules = dict(model.named_modules())
    for name, (a, b) in f.factors.items():
        module = modules.get(name)
        if isinstance(module, LoRALinear):
            if module.rank != a.shape[0]:
                raise UserError(
                    f"module {name} already has a rank-{module.rank} adapter; {f.weights_path} has rank "
                    f"{a.shape[0]} for it"
                )
            module = module.base_layer
        if module is None or not is_linear(module):
            raise _different_base(
                f,
                f"the adapter targets module {name!r}, which this model "
                f"({type(model).__name__}) "
                + ("does not have" if module is None else "has but is not a linear layer"),
            )
        if f.init == "olora" and is_conv1d(module):
            raise UserError(
                f"{f.config_path}: init_lora_weights='olora' on the Conv1D layer {name} cannot be "
                "rebuilt (PEFT's OLoRA does not support fan_in_fan_out layers)"
            )
        out_f, in_f = linear_shape(module)
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise _different_base(
                f,
                f"adapter shapes for {name} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit "
                f"the model's layer ({out_f}x{in_f})",
            )


def _covering_module(path: str, modules_to_save: list[str], names: set[str]) -> str | None:
    """The modules_to_save module (a model path) that contains `path`, if any."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in names and any(prefix == m or prefix.endswith("." + m) for m in modules_to_save):
            return prefix
    return None


def _plan_extras(model: nn.Module, f: AdapterFile) -> list[_Extra]:
    names = {n for n, _ in model.named_modules()}
    plan = []
    for key, value in sorted(f.extras.items()):
        owner_path, _, param = key.rpartition(".")
        plain = owner_path.replace(_BASE, "")
        covered = _covering_module(plain, f.modules_to_save, names)
        is_bias = param == "bias" and (f.bias == "all" or (f.bias == "lora_only" and plain in f.factors))
        if covered is None and not is_bias:
            raise FileProblem(
                f.weights_path,
                f"tensor {PEFT_PREFIX}{key} is not part of the adapter its config describes (modules_to_save="
                f"{f.modules_to_save}, bias={f.bias!r})",
                "loading it would overwrite a frozen base weight; the file is damaged or was edited",
            )
        owner = model.get_submodule(plain) if plain in names else None
        if isinstance(owner, LoRALinear):
            owner = owner.base_layer
        target = getattr(owner, param, None) if owner is not None else None
        if not isinstance(target, torch.Tensor) or target.shape != value.shape:
            where = "" if not isinstance(target, torch.Tensor) else f" (the model has {tuple(target.shape)})"
            raise _different_base(
                f, f"tensor {key} {tuple(value.shape)} has no matching parameter in the model{where}"
            )
        plan.append(_Extra(key, plain, param, value, covered))
    return plan


def _restore_moved_weights(model: nn.Module, names: set[str]) -> None:
    """Put back the user's W where a W-moving init (PiSSA, LoRA-GA) moved it: the file applies to that W."""
    for pair in lora_pairs(model):
        if pair.name in names and pair.base_offset is not None:
            b0, a0 = pair.base_offset
            w = pair.weight.detach().float() + pair.scale * (b0.float() @ a0.float()).to(pair.weight.device)
            pair.set_weight(w)
            pair.set_base_offset(None)


def _configure(layer: LoRALinear, alpha: float, scaling: str, dropout: float) -> None:
    layer.alpha = float(alpha)
    layer.scaling_mode = scaling
    layer.scale = lora_scale(alpha, layer.rank, scaling)
    layer.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the adapter in `directory` (written by widelora or PEFT) to `model`; see the module doc."""
    if hasattr(model, "peft_config"):
        raise UserError(
            f"{type(model).__name__} is a PEFT model: load the adapter with PEFT "
            "(model.load_adapter(path, adapter_name=...)), or load it with widelora into the base model"
        )
    f = read_adapter(Path(directory))
    _plan_factors(model, f)
    extras = _plan_extras(model, f)

    # Checked: change the model.
    with torch.no_grad():
        _restore_moved_weights(model, set(f.factors))
        modules = dict(model.named_modules())
        groups: dict[tuple[int, float], list[str]] = {}
        for name in f.factors:
            if not isinstance(modules.get(name), LoRALinear):
                groups.setdefault((f.rank(name), f.alphas[name]), []).append(name)
        for (r, alpha), names in groups.items():
            add_adapters(
                model,
                "^(" + "|".join(re.escape(n) for n in names) + ")$",
                rank=r,
                alpha=alpha,
                scaling=f.scaling,
                dropout=f.dropout,
            )
        for name, (a, b) in f.factors.items():
            layer = model.get_submodule(name)
            _configure(layer, f.alphas[name], f.scaling, f.dropout)
            layer.lora_A.copy_(a.to(layer.lora_A))
            layer.lora_B.copy_(b.to(layer.lora_B))
            if f.init in RESIDUAL_INITS:
                w = layer.base_layer.weight
                residual, b0, a0 = residual_factors(
                    f.init, w, layer.rank, layer.scale, layer.weight_transposed, name
                )
                w.copy_(residual)
                layer._widelora_base_offset = (b0.clone(), a0.clone())
        heads = sorted({e.module_to_save for e in extras if e.module_to_save is not None})
        if heads:
            mark_trainable(model, heads)
        bias_params = []
        for e in extras:
            owner = model.get_submodule(e.owner_path)
            owner = owner.base_layer if isinstance(owner, LoRALinear) else owner
            param = getattr(owner, e.param)
            param.copy_(e.value.to(param))
            if e.module_to_save is None:
                param.requires_grad_(True)
                bias_params.append(f"{e.owner_path}.{e.param}")
        if bias_params:
            model._widelora_bias = f.bias
            model._widelora_bias_params = sorted(
                set(getattr(model, "_widelora_bias_params", [])) | set(bias_params)
            )
    return model

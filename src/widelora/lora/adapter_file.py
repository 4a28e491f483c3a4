"""Reading a PEFT LoRA adapter folder without trusting it: every config value and tensor is checked first.

A loader that trusts the file can overwrite frozen base weights, load NaNs, or fail deep inside with an error
naming neither the file nor the key. `read_adapter` turns a folder into an `AdapterFile` whose every field has
been checked, or raises `FileProblem` naming the file and the key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from widelora.errors import FileProblem
from widelora.lora.pairs import PEFT_PREFIX

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIAS_MODES = ("none", "all", "lora_only")

# init_lora_weights values whose adapters apply to the unmodified base weight (PEFT leaves W alone on load).
PLAIN_INITS = (True, False, "gaussian", "eva", "lora_ga")
# ... and those for which PEFT rebuilds a residual base weight on load (widelora.lora.peft_residual does the
# same).
RESIDUAL_INITS = ("pissa", "olora")

_LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


@dataclass
class AdapterFile:
    """A checked adapter: per-module factors, rank and alpha, and the extra (non-LoRA) tensors by path."""

    directory: Path
    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)
    alphas: dict[str, float]
    scaling: str
    dropout: float
    bias: str
    modules_to_save: list[str]
    init: str | bool
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # "module.param" -> tensor

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    def rank(self, module: str) -> int:
        return self.factors[module][0].shape[0]


def _problem(path: Path, key: str, problem: str, hint: str = "") -> FileProblem:
    return FileProblem(path, f"{key}: {problem}", hint)


def _number(path: Path, config: dict, key: str, value: Any, positive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise _problem(path, key, f"{value!r} is not a {'positive ' if positive else ''}finite number")
    return float(value)


def _patterns(path: Path, config: dict, key: str, integer: bool) -> dict[str, float]:
    raw = config.get(key) or {}
    if not isinstance(raw, dict):
        raise _problem(
            path, key, f"must be a mapping of module-name regex to value, got {type(raw).__name__}"
        )
    for pattern, value in raw.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _problem(path, f"{key}[{pattern!r}]", f"is not a valid regular expression ({exc})") from exc
        _number(path, config, f"{key}[{pattern!r}]", value)
        if integer and int(value) != value:
            raise _problem(path, f"{key}[{pattern!r}]", f"rank {value!r} is not an integer")
    return raw


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern that matches a suffix of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_config(path: Path, config: Any) -> dict:
    if not isinstance(config, dict):
        raise FileProblem(path, "is not a JSON object", "an adapter_config.json holds PEFT's LoraConfig")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise _problem(
            path, "peft_type", f"{config.get('peft_type')!r}; widelora loads LoRA adapters only ('LORA')"
        )
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise _problem(path, key, "is set; widelora's loader does not support DoRA or LoRA-bias adapters")
    _number(path, config, "r", config.get("r", 8))
    _number(path, config, "lora_alpha", config.get("lora_alpha", 8))
    dropout = config.get("lora_dropout") or 0.0
    if _number(path, config, "lora_dropout", dropout, positive=False) < 0 or dropout >= 1:
        raise _problem(path, "lora_dropout", f"{dropout!r} is not in [0, 1)")
    if config.get("bias", "none") not in BIAS_MODES:
        raise _problem(path, "bias", f"{config.get('bias')!r} is not one of {list(BIAS_MODES)}")
    mts = config.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(m, str) and m for m in mts):
        raise _problem(path, "modules_to_save", f"{mts!r} is not a list of module names")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS and init not in RESIDUAL_INITS:
        raise _problem(
            path,
            "init_lora_weights",
            f"{init!r} is not supported: PEFT rebuilds the base weight for it on load in a way that "
            "widelora cannot reproduce exactly (pissa_niter_* uses a randomized SVD)",
            f"supported: {list(PLAIN_INITS) + list(RESIDUAL_INITS)}; convert the adapter with PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...) first",
        )
    return config


def canonical_param(name: str) -> str | None:
    """A non-LoRA tensor's parameter path as widelora sees it, or None for tensors with no role on load.

    PEFT writes `x.base_layer.bias` for biases of adapted layers, `head.modules_to_save.w` and
    `head.original_module.w` for modules_to_save wrappers (with bias="all"); the original module is unused
    while the adapter is active, so its tensors are skipped.
    """
    if ".original_module." in name:
        return None
    return name.replace(".modules_to_save.", ".")


def read_adapter(directory: Path) -> AdapterFile:
    """Read and check `directory`; raise FileProblem naming the file and key for anything wrong."""
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"adapter folder {directory} has no {path.name} (expected {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}, PEFT's format)"
            )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileProblem(cfg_path, f"is not valid JSON ({exc})", "the adapter config is corrupt") from exc
    config = _check_config(cfg_path, config)
    ranks = _patterns(cfg_path, config, "rank_pattern", integer=True)
    alpha_patterns = _patterns(cfg_path, config, "alpha_pattern", integer=False)
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt headers
        raise FileProblem(w_path, f"is corrupt or truncated and cannot be read: {exc}") from exc
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise _problem(
                w_path, key, "holds NaN or infinite values", "the adapter diverged or the file is damaged"
            )
        name = key.removeprefix(PEFT_PREFIX)
        m = _LORA_KEY.fullmatch(name)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = value
        elif "lora_embedding" in name or "lora_magnitude" in name:
            raise _problem(
                w_path, key, "belongs to an adapter type widelora cannot load (embedding LoRA or DoRA)"
            )
        else:
            param = canonical_param(name)
            if param is not None:
                if param in extras and not torch.equal(extras[param], value):
                    raise _problem(
                        w_path, key, f"disagrees with another tensor for the same parameter {param}"
                    )
                extras[param] = value
    if not factors:
        raise FileProblem(w_path, "holds no lora_A/lora_B tensors")
    checked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise _problem(w_path, name, f"has only lora_{''.join(pair)}; the file is incomplete")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise _problem(
                w_path, name, f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a pair"
            )
        r = int(pattern_value(ranks, name, config.get("r", 8)))
        if r != a.shape[0]:
            raise _problem(w_path, name, f"has rank {a.shape[0]} but the config says r={r} for it")
        checked[name] = (a, b)
        alphas[name] = float(pattern_value(alpha_patterns, name, config.get("lora_alpha", 8)))
    return AdapterFile(
        directory=directory,
        config=config,
        factors=checked,
        alphas=alphas,
        scaling="rslora" if config.get("use_rslora") else "standard",
        dropout=float(config.get("lora_dropout") or 0.0),
        bias=config.get("bias", "none"),
        modules_to_save=list(config.get("modules_to_save") or []),
        init=config.get("init_lora_weights", True),
        extras=extras,
    )

"""Sweep specs: a YAML file naming a base run and the axes to vary, expanded into trials with stable ids.

A spec looks like::

    name: minilm-topic-init
    trial_fn: widelora.train:run_trial      # "module:function"; the default
    metric: eval_accuracy                   # headline metric of reports
    goal: max                               # max | min
    base: {model: minilm-l6, task: topic, rank: 8, steps: 80}
    axes:
      init: [init_a, init_b]
      lr: {min: 1e-4, max: 3e-2, num: 7}    # log-spaced grid; a plain list works too
      seed: [0, 1]
      setup:                                # bundles: several keys varied together, named by `label`
        - {label: PEFT default, init: kaiming, method: adamw}
        - {label: widelora, init: init_a, method: loraplus, ratio: 16}

The trial id is a hash of the trial's canonical config, so the same trial keeps its id (and its results in the
store) when the spec is reordered or extended. Errors name the file, the line, the bad key and the valid keys,
because a typo found after an hour of sweeping costs an hour.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TRIAL_FN = "widelora.train:run_trial"

#: Top-level keys of a spec file.
SPEC_KEYS: dict[str, str] = {
    "name": "sweep name (letters, digits, - _ .); names the default store file",
    "description": "free text shown in reports",
    "trial_fn": "'module:function' run for every trial (default widelora.train:run_trial)",
    "metric": "headline final metric of the report, e.g. eval_accuracy",
    "goal": "max or min: whether a larger headline metric is better",
    "base": "mapping: the run config shared by every trial",
    "axes": "mapping: config key -> list of values (or {min, max, num[, scale]}); the grid is their product",
}

#: Run-config keys a trial may set, used when the trial function does not declare its own (``CONFIG_KEYS``).
DEFAULT_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "model", "task", "data", "dataset", "lr", "init", "method", "ratio", "rank", "alpha", "targets",
        "seed", "steps", "max_steps", "epochs", "batch_size", "eval_batch_size", "grad_accum", "seq_len",
        "max_length", "warmup", "warmup_ratio", "weight_decay", "dropout", "scaling", "eval_every",
        "eval_batches", "eval_size", "train_size", "betas", "eps", "schedule", "log_every",
        "checkpoint_every", "embedding_lr", "init_options", "method_options", "init_batches", "placement",
        "threads", "monitor", "trainable", "num_labels", "text_field", "label_field", "decay", "max_grad_norm",
        "eval_examples", "eval_split", "max_train_examples", "monitor_every", "progress", "dtype", "device",
        "out_dir", "preset",
    }
)

#: Axis names that are not config keys: a list of mappings varied together, each with a ``label``.
BUNDLE_AXES = frozenset({"setup"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """A sweep spec that cannot be used; the message names the file, line and valid choices."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``; everyone writes ``1e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Trial:
    """One point of the grid: ``config`` goes to the trial function, ``labels`` name it in reports."""

    id: str
    config: dict[str, Any]
    labels: dict[str, Any]
    index: int


@dataclass
class SweepSpec:
    """A parsed, validated sweep spec."""

    name: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    trial_fn: str = DEFAULT_TRIAL_FN
    metric: str | None = None
    goal: str = "max"
    description: str = ""
    source: str = "<spec>"
    raw: dict[str, Any] = field(default_factory=dict)

    def trials(self) -> list[Trial]:
        """Expand the axes' product (in spec order, last axis fastest) into trials with stable ids."""
        return expand(self.base, self.axes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form stored beside the results, so a report knows what was swept."""
        return {
            "name": self.name, "description": self.description, "trial_fn": self.trial_fn,
            "metric": self.metric, "goal": self.goal, "base": self.base, "axes": self.axes,
        }


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def trial_id(config: Mapping[str, Any]) -> str:
    """Stable 12-hex-digit id of a trial config (order of keys does not matter)."""
    return hashlib.sha256(canonical_json(dict(config)).encode()).hexdigest()[:12]


def expand(base: Mapping[str, Any], axes: Mapping[str, list[Any]]) -> list[Trial]:
    """Product of the axes over ``base``; a ``setup`` axis contributes several keys at once.

    Raises ValueError when two grid points give the same config (a duplicated value), since the store keys
    results by config and the duplicate would silently be run once.
    """
    names = list(axes)
    trials: list[Trial] = []
    seen: dict[str, dict[str, Any]] = {}
    for index, values in enumerate(itertools.product(*(axes[n] for n in names))):
        config = dict(base)
        labels: dict[str, Any] = {}
        for name, value in zip(names, values):
            if name in BUNDLE_AXES:
                bundle = dict(value)
                labels[name] = bundle.pop("label")
                config.update(bundle)
            else:
                config[name] = value
                labels[name] = value
        tid = trial_id(config)
        if tid in seen:
            raise ValueError(
                f"axes: grid points {seen[tid]} and {labels} give the same trial config {config}; "
                "remove the duplicated axis value"
            )
        seen[tid] = labels
        trials.append(Trial(id=tid, config=config, labels=labels, index=index))
    return trials


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file; raises SpecError naming the file and line of any problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec: no such file {str(path)!r}")
    return parse_spec(path.read_text(encoding="utf-8"), source=str(path))


def parse_spec(text: str, source: str = "<spec>", config_keys: Iterable[str] | None = None) -> SweepSpec:
    """Parse spec text. ``config_keys`` overrides the valid run-config keys (else the trial function's)."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{source}{where}: malformed YAML: {problem}") from None
    if root is None:
        raise SpecError(f"{source}: the spec is empty; it needs at least `base` and `axes`")
    if not isinstance(root, yaml.MappingNode):
        raise SpecError(f"{source} line {_line(root)}: the spec must be a mapping with keys {sorted(SPEC_KEYS)}")
    top = _mapping_nodes(root, source)
    for key, (knode, _v) in top.items():
        if key not in SPEC_KEYS:
            raise SpecError(_unknown(source, knode, "top-level key", key, SPEC_KEYS))
    for required in ("base", "axes"):
        if required not in top:
            raise SpecError(f"{source}: missing required key {required!r} (keys: {sorted(SPEC_KEYS)})")

    data = yaml.load(text, Loader=_Loader)
    name = data.get("name") or re.sub(r"[^A-Za-z0-9_.-]", "", Path(source).stem) or "sweep"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(f"{source} line {_line(top['name'][1]) if 'name' in top else 1}: name {name!r} must be "
                        "letters, digits, '-', '_' or '.' (it names the store file)")
    trial_fn = data.get("trial_fn", DEFAULT_TRIAL_FN)
    if not isinstance(trial_fn, str) or trial_fn.count(":") != 1:
        raise SpecError(f"{source} line {_line(top['trial_fn'][1])}: trial_fn {trial_fn!r} must look like "
                        "'package.module:function'")
    goal = data.get("goal", "max")
    if goal not in ("max", "min"):
        raise SpecError(f"{source} line {_line(top['goal'][1])}: goal {goal!r} must be 'max' or 'min'")
    metric = data.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise SpecError(f"{source} line {_line(top['metric'][1])}: metric {metric!r} must be a string")

    valid = frozenset(config_keys) if config_keys is not None else config_keys_of(trial_fn)
    base_node = top["base"][1]
    if not isinstance(base_node, yaml.MappingNode):
        raise SpecError(f"{source} line {_line(base_node)}: `base` must be a mapping of run-config keys")
    for key, (knode, _v) in _mapping_nodes(base_node, source).items():
        if key not in valid:
            raise SpecError(_unknown(source, knode, "base key", key, valid))
    axes_node = top["axes"][1]
    if not isinstance(axes_node, yaml.MappingNode) or not axes_node.value:
        raise SpecError(f"{source} line {_line(axes_node)}: `axes` must be a non-empty mapping "
                        "of config key -> list of values")
    axes: dict[str, list[Any]] = {}
    for key, (knode, vnode) in _mapping_nodes(axes_node, source).items():
        if key not in valid and key not in BUNDLE_AXES:
            raise SpecError(_unknown(source, knode, "axis", key, valid | BUNDLE_AXES))
        axes[key] = _axis_values(key, data["axes"][key], vnode, source, valid)
    spec = SweepSpec(
        name=name, base=dict(data["base"] or {}), axes=axes, trial_fn=trial_fn, metric=metric, goal=goal,
        description=str(data.get("description", "")), source=source, raw=data,
    )
    try:
        spec.trials()
    except ValueError as exc:
        raise SpecError(f"{source} line {_line(axes_node)}: {exc}") from None
    return spec


def config_keys_of(trial_fn: str) -> frozenset[str]:
    """The run-config keys the trial function accepts: ``fn.config_keys``, the module's ``CONFIG_KEYS`` or its
    ``RunConfig.keys()``, else :data:`DEFAULT_CONFIG_KEYS`."""
    module_name, _, func_name = trial_fn.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a missing trial module is reported when the sweep runs, not here
        return DEFAULT_CONFIG_KEYS
    keys = getattr(getattr(module, func_name, None), "config_keys", None) or getattr(module, "CONFIG_KEYS", None)
    run_config = getattr(module, "RunConfig", None)
    if not keys and run_config is not None and callable(getattr(run_config, "keys", None)):
        keys = set(run_config.keys()) | {"preset"}
    return frozenset(keys) if keys else DEFAULT_CONFIG_KEYS


def _axis_values(key: str, value: Any, node: yaml.Node, source: str, valid: frozenset[str]) -> list[Any]:
    line = _line(node)
    if isinstance(value, Mapping):
        return _range_values(key, value, source, line)
    if not isinstance(value, list) or not value:
        raise SpecError(f"{source} line {line}: axis {key!r} must be a non-empty list of values or "
                        f"{{min, max, num[, scale: log|linear]}}, got {value!r}")
    if key in BUNDLE_AXES:
        for item, inode in zip(value, node.value):
            if not isinstance(item, Mapping) or "label" not in item:
                raise SpecError(f"{source} line {_line(inode)}: each {key!r} entry must be a mapping with a "
                                f"'label' and config keys, got {item!r}")
            for ikey, (iknode, _v) in _mapping_nodes(inode, source).items():
                if ikey != "label" and ikey not in valid:
                    raise SpecError(_unknown(source, iknode, f"key in axis {key!r}", ikey, valid | {"label"}))
        labels = [item["label"] for item in value]
        if len(set(map(str, labels))) != len(labels):
            raise SpecError(f"{source} line {line}: labels of axis {key!r} must be distinct, got {labels}")
    if key == "lr":
        for item, inode in zip(value, node.value):
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not item > 0:
                raise SpecError(f"{source} line {_line(inode)}: lr values must be positive numbers, got {item!r}")
    return list(value)


def _range_values(key: str, value: Mapping[str, Any], source: str, line: int) -> list[Any]:
    allowed = {"min", "max", "num", "scale"}
    extra = set(value) - allowed
    if extra or not {"min", "max", "num"} <= set(value):
        raise SpecError(f"{source} line {line}: range for axis {key!r} takes keys {sorted(allowed)} "
                        f"(min, max, num required), got {sorted(value)}")
    lo, hi, num, scale = value["min"], value["max"], value["num"], value.get("scale", "log")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)):
        raise SpecError(f"{source} line {line}: range min/max of axis {key!r} must be numbers, got {lo!r}, {hi!r}")
    if not isinstance(num, int) or num < 1:
        raise SpecError(f"{source} line {line}: range num of axis {key!r} must be an integer >= 1, got {num!r}")
    if scale not in ("log", "linear"):
        raise SpecError(f"{source} line {line}: range scale of axis {key!r} must be 'log' or 'linear', got {scale!r}")
    if scale == "log" and not (lo > 0 and hi > 0):
        raise SpecError(f"{source} line {line}: a log range of axis {key!r} needs min, max > 0, got {lo}, {hi}")
    if num == 1:
        return [float(lo)]
    if scale == "log":
        a, b = math.log(lo), math.log(hi)
        return [float(f"{math.exp(a + (b - a) * i / (num - 1)):.6g}") for i in range(num)]
    return [float(f"{lo + (hi - lo) * i / (num - 1):.6g}") for i in range(num)]


def _mapping_nodes(node: yaml.MappingNode, source: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for knode, vnode in node.value:
        key = knode.value
        if key in out:
            raise SpecError(f"{source} line {_line(knode)}: duplicate key {key!r} "
                            f"(first at line {_line(out[key][0])})")
        out[key] = (knode, vnode)
    return out


def _unknown(source: str, knode: yaml.Node, what: str, key: str, valid: Iterable[str]) -> str:
    return f"{source} line {_line(knode)}: unknown {what} {key!r}; valid keys: {', '.join(sorted(valid))}"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1

"""Sweep specs: a YAML file naming a base run and the axes to vary, expanded into trials with stable ids.

A spec looks like::

    name: minilm-topic-init
    trial_fn: finetune                      # a registered trial function (widelora.sweep.trial_names())
    metric: eval_accuracy                   # headline metric of reports
    goal: max                               # max | min
    setup: recommended                      # optional: passed to every trial's run config
    base: {model: minilm-l6, task: topic, rank: 8, steps: 80, max_grad_norm: null}
    axes:
      init: [init_a, init_b]
      lr: {min: 1e-4, max: 3e-2, num: 7}    # log-spaced grid; a plain list works too
      seed: [0, 1]
      setup:                                # bundles: several keys varied together, named by `label`
        - {label: PEFT default, init: kaiming, method: adamw}
        - {label: widelora, init: init_a, method: loraplus, ratio: 16}
        - recommended                       # shorthand for {label: recommended, setup: recommended}

Keys are checked against the trial function's config keys (for ``finetune``: RunConfig's), and every trial's
config is checked by the trial function's own validator (``finetune`` builds its RunConfig), so a bad key or
value is found before anything runs. ``null`` is a value like any other: ``max_grad_norm: null`` switches
clipping off. Errors name the file, the line, the bad key and the valid keys, because a typo found after an
hour of sweeping costs an hour.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from widelora.errors import FileProblem, UserError
from widelora.sweep.grid import BUNDLE_AXES, Trial, expand
from widelora.sweep.registry import DEFAULT_TRIAL, get_trial

#: Top-level keys of a spec file.
SPEC_KEYS: dict[str, str] = {
    "name": "sweep name (letters, digits, - _ .); names the default store file",
    "description": "free text shown in reports",
    "trial_fn": "registered trial function run for every trial (default: finetune)",
    "metric": "headline final metric of the report, e.g. eval_accuracy",
    "goal": "max or min: whether a larger headline metric is better",
    "setup": "a setup name (e.g. recommended) put into every trial's config",
    "base": "mapping: the run config shared by every trial",
    "axes": "mapping: config key -> list of values (or {min, max, num[, scale]}); the grid is their product",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(UserError):
    """A sweep spec that cannot be used; the message names the file, line and valid choices."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float too (YAML 1.1 wants ``1.0e-4``; everyone writes ``1e-4``)."""


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


@dataclass
class SweepSpec:
    """A parsed, validated sweep spec."""

    name: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    trial_fn: str = DEFAULT_TRIAL
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
            "name": self.name,
            "description": self.description,
            "trial_fn": self.trial_fn,
            "metric": self.metric,
            "goal": self.goal,
            "base": self.base,
            "axes": self.axes,
        }


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file; raises SpecError naming the file and line of any problem."""
    path = Path(path)
    if not path.is_file():
        raise FileProblem(
            path,
            "no such spec file" if not path.exists() else "is not a file",
            "give a sweep spec such as examples/sweeps/toy_quick.yaml",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileProblem(path, f"cannot be read as a UTF-8 YAML spec ({exc})") from None
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "<spec>") -> SweepSpec:
    """Parse and validate spec text (``source`` names it in errors)."""
    root = _compose(text, source)
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
        raise SpecError(
            f"{source} line {_line(top['name'][1]) if 'name' in top else 1}: name {name!r} must be "
            "letters, digits, '-', '_' or '.' (it names the store file)"
        )
    try:
        trial = get_trial(data.get("trial_fn", DEFAULT_TRIAL))
    except UserError as exc:
        raise SpecError(f"{source} line {_line(top['trial_fn'][1])}: {exc}") from None
    goal = data.get("goal", "max")
    if goal not in ("max", "min"):
        raise SpecError(f"{source} line {_line(top['goal'][1])}: goal {goal!r} must be 'max' or 'min'")
    metric = data.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise SpecError(f"{source} line {_line(top['metric'][1])}: metric {metric!r} must be a string")

    valid = trial.config_keys
    base_node = top["base"][1]
    if not isinstance(base_node, yaml.MappingNode):
        raise SpecError(f"{source} line {_line(base_node)}: `base` must be a mapping of run-config keys")
    for key, (knode, _v) in _mapping_nodes(base_node, source).items():
        if valid is not None and key not in valid:
            raise SpecError(_unknown(source, knode, "base key", key, valid))
    base = dict(data["base"] or {})
    if "setup" in top:
        base["setup"] = _setup_value(data["setup"], top["setup"][1], source, valid, trial.name)
    axes_node = top["axes"][1]
    if not isinstance(axes_node, yaml.MappingNode) or not axes_node.value:
        raise SpecError(
            f"{source} line {_line(axes_node)}: `axes` must be a non-empty mapping "
            "of config key -> list of values"
        )
    axes: dict[str, list[Any]] = {}
    for key, (knode, vnode) in _mapping_nodes(axes_node, source).items():
        if valid is not None and key not in valid and key not in BUNDLE_AXES:
            raise SpecError(_unknown(source, knode, "axis", key, valid | BUNDLE_AXES))
        axes[key] = _axis_values(key, data["axes"][key], vnode, source, valid, trial.name)
    spec = SweepSpec(
        name=name,
        base=base,
        axes=axes,
        trial_fn=trial.name,
        metric=metric,
        goal=goal,
        description=str(data.get("description", "")),
        source=source,
        raw=data,
    )
    try:
        trials = spec.trials()
    except ValueError as exc:
        raise SpecError(f"{source} line {_line(axes_node)}: {exc}") from None
    if trial.check is not None:
        for t in trials:
            try:
                trial.check(dict(t.config))
            except (ValueError, TypeError) as exc:
                where = f"trial {t.labels}" if t.labels else "base"
                raise SpecError(f"{source}: {where} is not a valid {trial.name} config: {exc}") from None
    return spec


def _compose(text: str, source: str) -> yaml.MappingNode:
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
        raise SpecError(
            f"{source} line {_line(root)}: the spec must be a mapping with keys {sorted(SPEC_KEYS)}"
        )
    return root


def _setup_value(value: Any, node: yaml.Node, source: str, valid: frozenset[str] | None, trial: str) -> str:
    """A setup name (``recommended``) for each trial's ``setup`` key, if the trial function takes one."""
    if valid is not None and "setup" not in valid:
        raise SpecError(
            f"{source} line {_line(node)}: trial function {trial!r} takes no 'setup' key; "
            f"valid keys: {', '.join(sorted(valid))}"
        )
    if not isinstance(value, str) or not value:
        raise SpecError(
            f"{source} line {_line(node)}: setup {value!r} must be a setup name such as 'recommended'"
        )
    return value


def _axis_values(
    key: str, value: Any, node: yaml.Node, source: str, valid: frozenset[str] | None, trial: str
) -> list[Any]:
    line = _line(node)
    if isinstance(value, Mapping):
        return _range_values(key, value, source, line)
    if not isinstance(value, list) or not value:
        raise SpecError(
            f"{source} line {line}: axis {key!r} must be a non-empty list of values or "
            f"{{min, max, num[, scale: log|linear]}}, got {value!r}"
        )
    if key in BUNDLE_AXES:
        value = [
            _bundle(key, item, inode, source, valid, trial)
            for item, inode in zip(value, node.value, strict=True)
        ]
        labels = [item["label"] for item in value]
        if len(set(map(str, labels))) != len(labels):
            raise SpecError(f"{source} line {line}: labels of axis {key!r} must be distinct, got {labels}")
    if key == "lr":
        for item, inode in zip(value, node.value, strict=True):
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not item > 0:
                raise SpecError(
                    f"{source} line {_line(inode)}: lr values must be positive numbers, got {item!r}"
                )
    return list(value)


def _bundle(
    key: str, item: Any, node: yaml.Node, source: str, valid: frozenset[str] | None, trial: str
) -> dict[str, Any]:
    """One entry of a bundle axis: a mapping with a ``label``, or a setup name (``recommended``)."""
    if isinstance(item, str):
        return {"label": item, "setup": _setup_value(item, node, source, valid, trial)}
    if not isinstance(item, Mapping) or "label" not in item:
        raise SpecError(
            f"{source} line {_line(node)}: each {key!r} entry must be a mapping with a 'label' and "
            f"config keys, or a setup name such as 'recommended'; got {item!r}"
        )
    for ikey, (iknode, _v) in _mapping_nodes(node, source).items():
        if valid is not None and ikey != "label" and ikey not in valid:
            raise SpecError(_unknown(source, iknode, f"key in axis {key!r}", ikey, valid | {"label"}))
    return dict(item)


def _range_values(key: str, value: Mapping[str, Any], source: str, line: int) -> list[Any]:
    allowed = {"min", "max", "num", "scale"}
    extra = set(value) - allowed
    if extra or not {"min", "max", "num"} <= set(value):
        raise SpecError(
            f"{source} line {line}: range for axis {key!r} takes keys {sorted(allowed)} "
            f"(min, max, num required), got {sorted(value)}"
        )
    lo, hi, num, scale = value["min"], value["max"], value["num"], value.get("scale", "log")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)):
        raise SpecError(
            f"{source} line {line}: range min/max of axis {key!r} must be numbers, got {lo!r}, {hi!r}"
        )
    if not isinstance(num, int) or num < 1:
        raise SpecError(
            f"{source} line {line}: range num of axis {key!r} must be an integer >= 1, got {num!r}"
        )
    if scale not in ("log", "linear"):
        raise SpecError(
            f"{source} line {line}: range scale of axis {key!r} must be 'log' or 'linear', got {scale!r}"
        )
    if scale == "log" and not (lo > 0 and hi > 0):
        raise SpecError(
            f"{source} line {line}: a log range of axis {key!r} needs min, max > 0, got {lo}, {hi}"
        )
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
            raise SpecError(
                f"{source} line {_line(knode)}: duplicate key {key!r} (first at line {_line(out[key][0])})"
            )
        out[key] = (knode, vnode)
    return out


def _unknown(source: str, knode: yaml.Node, what: str, key: str, valid: Iterable[str]) -> str:
    return f"{source} line {_line(knode)}: unknown {what} {key!r}; valid keys: {', '.join(sorted(valid))}"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1

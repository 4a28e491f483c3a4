"""The grid of a sweep: trials as points of the axes' product, each named by a hash of its full config.

The id hashes the whole resolved config (base and axis values, explicit nulls included), so the same trial
keeps its id when a spec is reordered or extended, and a trial whose config changed in any key (an edited
``base``) is a different trial, never a new "seed" of the old one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Axis names that are not config keys: a list of mappings varied together, each with a ``label``.
BUNDLE_AXES = frozenset({"setup"})
#: Axes that repeat a configuration rather than change it: reports average over them.
SEED_KEYS = ("seed",)


@dataclass(frozen=True)
class Trial:
    """One point of the grid: ``config`` goes to the trial function, ``labels`` name it in reports."""

    id: str
    config: dict[str, Any]
    labels: dict[str, Any]
    index: int


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def trial_id(config: Mapping[str, Any]) -> str:
    """Stable 12-hex-digit id of a trial config (order of keys does not matter)."""
    return hashlib.sha256(canonical_json(dict(config)).encode()).hexdigest()[:12]


def config_key(config: Mapping[str, Any], leave_out: tuple[str, ...] = SEED_KEYS) -> str:
    """What a trial is apart from ``leave_out``: trials with equal keys may be averaged together."""
    return canonical_json({k: v for k, v in config.items() if k not in leave_out})


def expand(base: Mapping[str, Any], axes: Mapping[str, list[Any]]) -> list[Trial]:
    """Product of the axes over ``base`` (last axis fastest); a ``setup`` axis contributes several keys at
    once.

    Raises ValueError when two grid points give the same config (a duplicated value), since the store keys
    results by config and the duplicate would silently be run once.
    """
    names = list(axes)
    trials: list[Trial] = []
    seen: dict[str, dict[str, Any]] = {}
    for index, values in enumerate(itertools.product(*(axes[n] for n in names))):
        config = dict(base)
        labels: dict[str, Any] = {}
        for name, value in zip(names, values, strict=True):
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

"""Where a RunConfig comes from: defaults ← preset ← config file ← overrides.

Presets are data (`train/presets/<name>.yaml`, shipped as package data), read the same way as a user's config
file: a mapping of RunConfig keys that may start from another preset with `preset: NAME`.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from widelora.errors import FileProblem, UserError
from widelora.train.config import RunConfig, given

PRESET_DIR = Path(__file__).with_name("presets")


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) file holding a mapping; every problem is a FileProblem naming the file."""
    import yaml

    if not path.is_file():
        raise FileProblem(path, "does not exist" if not path.exists() else "is not a file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise FileProblem(
            path, f"cannot be read as {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})"
        ) from None
    if data is None:
        raise FileProblem(path, "is empty", "write RunConfig keys, e.g. `lr: 1e-4`")
    if not isinstance(data, dict):
        raise FileProblem(path, "must hold a mapping of RunConfig keys to values")
    return data


def _expand(data: dict[str, Any]) -> dict[str, Any]:
    """Resolve a `preset:` key: the named preset's keys, overridden by the rest of `data`."""
    if "preset" not in data:
        return data
    rest = dict(data)
    return {**_preset_data(rest.pop("preset")), **rest}


@cache
def _preset_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def _preset_data(name: str) -> dict[str, Any]:
    files = _preset_files()
    if name not in files:
        raise UserError(f"preset={name!r} is unknown; valid presets: {preset_names()}")
    return _expand(_read_mapping(files[name]))


def preset_names() -> list[str]:
    return [n for n in _preset_files() if not n.startswith("_")]


#: Preset name → the RunConfig keys it sets.
PRESETS: dict[str, dict[str, Any]] = {name: _preset_data(name) for name in preset_names()}


def preset(name: str) -> RunConfig:
    """A named preset as a validated RunConfig."""
    return RunConfig.from_dict({**RunConfig().to_dict(), **_preset_data(name)})


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping of RunConfig keys; a `preset:` key is expanded first."""
    return _expand(_read_mapping(Path(path)))


def build_config(
    preset_name: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults ← preset ← config file ← overrides; NOT_GIVEN overrides are skipped, None is a value."""
    data = RunConfig().to_dict()
    if preset_name:
        data.update(_preset_data(preset_name))
    if config_file is not None:
        data.update(load_config_file(config_file))
    data.update(given(overrides))
    return RunConfig.from_dict(data)

"""Trial functions a sweep spec may name: a registry, so that a spec is data and never imports code.

A spec's ``trial_fn`` is one of :func:`trial_names` (``finetune`` by default). Code that wants its own trial
function registers it before running the sweep::

    @register_trial("my-trial", config_keys={"lr", "seed", "width"})
    def my_trial(config, run_dir, on_metrics=None) -> dict: ...

``config_keys`` (None: any key) lets a spec's keys be checked before anything runs; ``check`` may validate one
trial's whole config (``finetune`` builds a RunConfig from it), so a bad value is found before the first hour
of sweeping, not after it. The built-in ``toy`` trial (a test double in `widelora.testing`) is imported only
when a spec names it, so the library proper never loads test code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from widelora.errors import UserError
from widelora.train import RunConfig, build_config, run_trial

TrialFn = Callable[..., Mapping[str, Any]]
DEFAULT_TRIAL = "finetune"
#: The ``module:function`` strings earlier specs used for the built-in trial functions.
LEGACY_NAMES = {"widelora.train:run_trial": "finetune", "widelora.sweep.toy:run_toy_trial": "toy"}


@dataclass(frozen=True)
class TrialFunction:
    """A registered trial function with what a spec may set for it."""

    name: str
    fn: TrialFn
    config_keys: frozenset[str] | None = None
    check: Callable[[dict[str, Any]], None] | None = None


_TRIALS: dict[str, TrialFunction] = {}


def register_trial(
    name: str,
    *,
    config_keys: Iterable[str] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[TrialFn], TrialFn]:
    """Decorator: make ``fn`` available to specs as ``trial_fn: <name>``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise UserError(f"trial function name {name!r} must be a non-empty string without ':'")

    def add(fn: TrialFn) -> TrialFn:
        if name in _TRIALS and _TRIALS[name].fn is not fn:
            raise UserError(
                f"trial function {name!r} is already registered ({_TRIALS[name].fn.__qualname__})"
            )
        keys = frozenset(config_keys) if config_keys is not None else None
        _TRIALS[name] = TrialFunction(name, fn, keys, check)
        return fn

    return add


def unregister_trial(name: str) -> None:
    """Remove a registered trial function (tests clean up after themselves with this)."""
    _TRIALS.pop(name, None)


def trial_names() -> list[str]:
    return sorted(set(_TRIALS) | set(_LAZY))


def get_trial(name: str) -> TrialFunction:
    """The registered trial function ``name`` (a built-in one is imported now); a UserError lists the valid
    names."""
    key = LEGACY_NAMES.get(name, name) if isinstance(name, str) else None
    if key is not None and key not in _TRIALS and key in _LAZY:
        _LAZY[key]()
    entry = _TRIALS.get(key) if key is not None else None
    if entry is None:
        raise UserError(
            f"trial_fn: {name!r} is not a registered trial function; valid: "
            f"{', '.join(trial_names())} (register others with widelora.sweep.register_trial)"
        )
    return entry


def _check_run_config(config: dict[str, Any]) -> None:
    """A finetune trial's config must make a valid RunConfig (``preset`` picks the base)."""
    data = dict(config)
    build_config(preset_name=data.pop("preset", None), overrides=data)


register_trial("finetune", config_keys=set(RunConfig.keys()) | {"preset"}, check=_check_run_config)(run_trial)


def _register_toy() -> None:
    from widelora.testing.toy_trial import CONFIG_KEYS, run_toy_trial

    register_trial("toy", config_keys=CONFIG_KEYS)(run_toy_trial)


#: Built-in trial functions registered on first use: name -> registering function.
_LAZY: dict[str, Callable[[], None]] = {"toy": _register_toy}

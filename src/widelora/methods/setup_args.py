"""`setup=`: take a function's keyword arguments from an object, with the caller's explicit arguments winning.

`widelora.attach(model, setup=rec)` and `widelora.create_optimizer(model, setup=rec)` accept any object with
`attach_kwargs() -> dict` / `optimizer_kwargs() -> dict` (e.g. `widelora.recommend`'s recommendation). A
parameter's default is the sentinel `UNSET`, so "the caller passed the default value on purpose" and "the
caller passed nothing" can be told apart: only the second is filled from the setup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from widelora.errors import UserError


class _Unset:
    """The sentinel type: a parameter the caller did not pass (one instance, `UNSET`)."""

    def __repr__(self) -> str:
        return "<unset>"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


def resolve(
    function: str,
    setup: object | None,
    hook: str,
    passed: Mapping[str, Any],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """Final keyword arguments of `function`: explicit (not UNSET) > `setup.<hook>()` > defaults.

    Keys the setup returns that `function` does not take are an error naming them and the valid keys, so a
    setup object written for another version never passes silently.
    """
    from_setup: dict[str, Any] = {}
    if setup is not None:
        method = getattr(setup, hook, None)
        if not callable(method):
            raise UserError(
                f"{function}(setup=...) needs an object with a {hook}() method returning a dict of keyword "
                f"arguments; got {type(setup).__name__}"
            )
        from_setup = dict(method())
        unknown = sorted(set(from_setup) - set(defaults))
        if unknown:
            raise UserError(
                f"{function}(setup=...): {type(setup).__name__}.{hook}() returned unknown keys {unknown}; "
                f"valid keys: {sorted(defaults)}"
            )
    out = dict(defaults)
    out.update(from_setup)
    out.update({k: v for k, v in passed.items() if v is not UNSET})
    return out

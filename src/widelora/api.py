"""The user-facing `widelora.attach`: add LoRA layers (widelora.lora) and initialize them (widelora.methods).

It lives above both packages so the layer code never imports the method code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from widelora.errors import UserError
from widelora.lora.attach import Targets, add_adapters
from widelora.methods.init import get_scheme, initialize
from widelora.methods.setup_args import UNSET, resolve

ATTACH_DEFAULTS: dict[str, Any] = {
    "targets": UNSET,
    "rank": 8,
    "alpha": None,
    "init": "init_a",
    "scaling": "standard",
    "dropout": 0.0,
    "seed": None,
    "trainable": (),
}


def attach(
    model: nn.Module,
    targets: Targets = UNSET,
    rank: int = UNSET,
    alpha: float | None = UNSET,
    init: str = UNSET,
    scaling: str = UNSET,
    dropout: float = UNSET,
    seed: int | None = UNSET,
    trainable: Sequence[str] = UNSET,
    setup: object | None = None,
) -> nn.Module:
    """Wrap the selected linear layers with LoRA adapters, freeze everything else, and initialize the
    adapters.

    Defaults: rank 8, `alpha=None` (alpha = rank, scale 1 with standard scaling), init "init_a", standard
    scaling, no dropout. `trainable` names extra modules (e.g. a classifier head) kept trainable; they are
    saved as PEFT `modules_to_save`. `setup` is any object with `attach_kwargs() -> dict` (e.g. a
    `widelora.recommend` recommendation): its values fill every argument not passed explicitly; explicit
    arguments win. Everything is checked before the model changes; a failing initialization undoes the whole
    call. Returns the same model.
    """
    passed = {
        "targets": targets,
        "rank": rank,
        "alpha": alpha,
        "init": init,
        "scaling": scaling,
        "dropout": dropout,
        "seed": seed,
        "trainable": trainable,
    }
    args = resolve("attach", setup, "attach_kwargs", passed, ATTACH_DEFAULTS)
    if args["targets"] is UNSET:
        raise UserError(
            "attach needs targets=... (module names, a regex, or 'all-linear'), or setup=<an object "
            "whose attach_kwargs() gives them>"
        )
    scheme = get_scheme(args["init"])
    if scheme.needs_data:
        raise UserError(
            f"init={args['init']!r} needs data: attach with a random scheme (e.g. init='init_a'), then call "
            f"widelora.initialize(model, {args['init']!r}, batches=...)"
        )
    added = add_adapters(
        model,
        args["targets"],
        rank=args["rank"],
        alpha=args["alpha"],
        scaling=args["scaling"],
        dropout=args["dropout"],
        trainable=args["trainable"],
    )
    try:
        initialize(model, args["init"], seed=args["seed"], only={id(layer) for layer in added.layers})
    except Exception:
        added.undo()
        raise
    return model

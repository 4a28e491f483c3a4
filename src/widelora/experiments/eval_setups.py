"""Two setups the evaluation of `widelora.recommend` needs besides `manual` and `recommended` (issue 12, part
3):

- ``recommended_tuned``: everything `recommend` chooses (init, method, LoRA+ ratio, head learning rate) with
  the base learning rate set by the run's ``lr`` instead of the probe — so the recommended setup can be tuned
  on the same grid as every other setup. The head's learning rate moves with it (``head_lr · lr / lr_probe``):
  one knob, as a user tuning "the learning rate" would have.
- ``recommended_at_ratio``: everything `recommend` chooses, except the LoRA+ ratio, which is the config's
  (the probe finds the lr for it) — the real-model ablation of the width-aware ratio rule.
- ``lr_finder``: the run's own choices (e.g. PEFT's default: Kaiming A, AdamW) with the learning rate a
  fastai-style range test suggests (`widelora.recommend.lr_finder`, "steepest descent ÷ 10", the issue's
  wording) — what users have today when they do not sweep.

Both are `widelora.train.setups` functions (cfg, model, batches) → SetupChoice, registered there by name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: Which of the finder's suggestions the `lr_finder` setup uses (widelora.recommend.lr_finder.SUGGESTIONS).
FINDER_SUGGESTION = "steep_div10"
#: Steps of the range test (fastai's `lr_find` default; its cost is reported, not capped).
FINDER_STEPS = 100


def recommended_tuned(cfg: Any, model: nn.Module, batches: list[dict], steps: int) -> Any:
    """`recommend`'s choices at the config's base learning rate (the head's rate scaled by the same
    factor)."""
    from widelora.recommend.runconfig import recommended_setup
    from widelora.train.setups import SetupChoice

    rec = recommended_setup(cfg, model, batches, steps=steps)
    scale = cfg.lr / rec.lr
    head = None if rec.head_lr is None else rec.head_lr * scale
    return SetupChoice(
        targets=rec.targets, init=rec.init, method=rec.method, lr=cfg.lr, ratio=rec.ratio, head_lr=head,
        probe=rec.probe,
    )  # fmt: skip


def recommended_at_ratio(cfg: Any, model: nn.Module, batches: list[dict], steps: int) -> Any:
    """`recommend`'s choices with the LoRA+ ratio fixed to the config's `ratio` instead of the width rule's;
    the probe measures the learning rate for that ratio. The ablation of the ratio rule on a real model."""
    from widelora.recommend.runconfig import recommend_for_config
    from widelora.train.setups import SetupChoice

    rec = recommend_for_config(cfg, model, batches, steps=steps, ratio=cfg.ratio)
    return SetupChoice(
        targets=rec.targets, init=rec.init, method=rec.method, lr=rec.lr, ratio=rec.ratio,
        head_lr=rec.head_lr, probe=(rec.probe or {}).get("version"),
    )  # fmt: skip


def lr_finder(cfg: Any, model: nn.Module, batches: list[dict], steps: int) -> Any:
    """The config's own adapter and optimizer with the learning rate a fastai-style LR finder suggests.

    The finder runs on the adapters the run will train (attached for the test and removed after, the model
    restored exactly), with plain AdamW over every trainable parameter, 100 steps from 1e-7 to 10 as fastai's
    ``lr_find`` does.
    """
    from widelora.recommend.lr_finder import lr_finder as range_test
    from widelora.recommend.snapshot import preserved, temporary_adapters
    from widelora.train.setups import SetupChoice

    heads = (
        [h for h in ("classifier", "score") if h in dict(model.named_children())]
        if cfg.task == ("classification")
        else []
    )
    with (
        preserved(model, tensors=False),
        temporary_adapters(
            model,
            targets=cfg.targets,
            rank=cfg.rank,
            alpha=cfg.alpha,
            init=cfg.init,
            scaling=cfg.scaling,
            seed=cfg.seed,
            trainable=list(cfg.trainable) or heads,
        ),
    ):
        result = range_test(model, batches, num_it=FINDER_STEPS, batch_size=cfg.batch_size)
    return SetupChoice(
        targets=cfg.targets,
        init=cfg.init,
        method=cfg.method,
        lr=result.suggestions[FINDER_SUGGESTION],
        ratio=cfg.ratio,
    )

"""`widelora.recommend(model, batches, steps=...)`: the whole setup, decided from the theory and a short
probe.

Order of decisions: the adapter (init, targets, rank, alpha, scaling) and the LoRA+ ratio come from rules of
the width alone (widelora.recommend.rules); the base learning rate comes from the probe's stability edge on
the user's own model and data divided by a width-aware factor; the fresh head's learning rate from its own
edge on cached features. Everything the probe touches is restored bit for bit (widelora.recommend.snapshot).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext

from torch import nn

from widelora.errors import UserError
from widelora.lora.layer import linear_shape
from widelora.lora.pairs import lora_pairs
from widelora.recommend import rules
from widelora.recommend.edge import StopRule
from widelora.recommend.head import first_step_size
from widelora.recommend.probe import (
    PROBE_VERSION,
    REFERENCE_ROWS,
    LossFn,
    hf_loss,
    plan_probe,
    range_test,
    split_reference,
)
from widelora.recommend.setup import Recommendation
from widelora.recommend.snapshot import preserved, temporary_adapters

HEADS = ("classifier", "score")  # the fresh heads Hugging Face's sequence classifiers create
TASKS = ("causal_lm", "classification")


def recommend(
    model: nn.Module,
    batches: Iterable[dict] | None = None,
    *,
    steps: int,
    task: str | None = None,
    batch_size: int | None = None,
    targets: list[str] | str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    ratio: float | None = None,
    trainable: list[str] | None = None,
    budget: float = 0.10,
    probe: bool = True,
    seed: int = 0,
    loss_fn: LossFn = hf_loss,
    rule: StopRule | None = None,
) -> Recommendation:
    """The recommended LoRA setup for training `model` for `steps` optimizer steps on data like `batches`.

    `model`: a base model (adapters are attached for the probe and removed after) or one with adapters already
    attached (widelora or PEFT; they are probed as they are and restored). `batches`: training batches as the
    run will see them (dicts the model's forward takes, with labels); None skips the probe (the lr then comes
    from the width rule alone). `batch_size`: examples per optimizer step of the run (default: the first
    batch's), used to count the probe's cost, which never exceeds `budget` × the run. `targets`, `rank`,
    `alpha`, `ratio`: the user's choice when given (the probe then measures the lr for that adapter).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UserError(
            f"steps={steps!r} is not valid; pass the number of optimizer steps of the run to configure"
        )
    if not 0 < budget <= 0.5:
        raise UserError(f"budget={budget!r} is not valid; the probe's share of the run must be in (0, 0.5]")
    task = task or _infer_task(model)
    if task not in TASKS:
        raise UserError(f"task={task!r} is not valid; valid: {list(TASKS)}")
    batches = list(batches) if batches is not None else None
    existing = lora_pairs(model)
    reasons: dict[str, str] = {}
    if existing:
        targets_out: list[str] | str = [p.name.rsplit(".", 1)[-1] for p in existing]
        targets_out = sorted(set(targets_out))
        rank_out, alpha_out, scaling = existing[0].rank, existing[0].scale * existing[0].rank, "standard"
        widths = [p.fan_in for p in existing]
        reasons.update(
            dict.fromkeys(("targets", "rank", "alpha", "scaling"), "already attached: probed as they are")
        )
        reasons["init"] = "already attached (widelora recommends Init[A]: B = 0, A ~ N(0, 1/n))"
    else:
        from widelora.lora.attach import match_targets

        targets_out = targets if targets is not None else "all-linear"
        reasons["targets"] = (
            "as given"
            if targets is not None
            else "every linear layer but the output head: "
            "the per-layer analysis holds for each; set targets, or use wl.place (PLoP) under a "
            "parameter budget"
        )
        rank_out, alpha_out, scaling, rank_reasons = rules.rank_alpha_scaling(rank, alpha)
        reasons.update(rank_reasons)
        widths = [linear_shape(model.get_submodule(n))[1] for n in match_targets(model, targets_out)]
        reasons["init"] = (
            "Init[A] (B = 0, A ~ N(0, 1/n)): stable up to lr ~ n^-1/2 with efficient feature "
            "learning, where Init[B] is stable only to n^-1 and undertrains B (seed 001, Thm 1-2)"
        )
    width = Counter(widths).most_common(1)[0][0]
    if ratio is None:
        ratio, reasons["ratio"] = rules.loraplus_ratio(width)
    elif isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
        raise UserError(f"ratio={ratio!r} is not valid; the LoRA+ ratio lr_B / lr_A must be a number >= 1")
    else:
        ratio, reasons["ratio"] = float(ratio), "as given (the probe measures the edge with B at this ratio)"
    reasons["method"] = "LoRA+ (AdamW, lr_B = ratio · lr_A): one lr for A and B is inefficient at large width"
    heads = list(trainable) if trainable is not None else _heads(model, task)
    rec = Recommendation(
        init="init_a",
        targets=targets_out,
        rank=rank_out,
        alpha=float(alpha_out),
        scaling=scaling,
        trainable=heads,
        method="loraplus",
        ratio=ratio,
        width=width,
        steps=steps,
        reasons=reasons,
    )
    if heads:
        reasons["trainable"] = "the fresh head is trained too (saved as modules_to_save)"

    plan = None
    reference = None
    if probe and batches:
        first = next((v for v in batches[0].values() if hasattr(v, "shape")), None)
        run_batch = batch_size or (int(first.shape[0]) if first is not None else 1)
        if not heads:  # the loss is the model's own objective: read it on a fixed reference batch too
            reference, rest = split_reference(batches, REFERENCE_ROWS)
            plan = (
                plan_probe(steps, run_batch, budget=budget, reference_rows=REFERENCE_ROWS) if rest else None
            )
            if reference is not None and plan is not None:
                batches = rest
            else:
                reference = None
        if plan is None:
            plan = plan_probe(steps, run_batch, budget=budget)
    if plan is None:
        rec.lr, reasons["lr"] = rules.fallback_lr(width)
        if heads:
            rec.head_lr = rec.lr * ratio
            reasons["head_lr"] = "no probe: B's rate (the head is the output-side matrix, like B)"
        return rec

    head_module = _single_head(model, heads)
    # outer: flags, modes, RNG and the module surgery; inner: every trainable tensor the probe may move
    with preserved(model, tensors=False):
        adapters = (
            nullcontext()
            if existing
            else temporary_adapters(
                model,
                targets=targets_out,
                rank=rank_out,
                alpha=alpha_out,
                init="init_a",
                scaling=scaling,
                seed=seed,
            )
        )
        with adapters, preserved(model):
            result = range_test(
                model,
                batches,
                plan,
                ratio,
                loss_fn=loss_fn,
                rule=rule,
                head=head_module,
                capture_steps=max(2, plan.steps // 3) if head_module is not None else 0,
                reference=reference,
            )
    verdict = result.verdict
    chosen = rules.probe_lr(width, verdict)
    rec.lr = chosen.lr
    summary = result.summary()
    summary.update(factor=chosen.factor, lr_edge=chosen.edge, lr_source=chosen.source, version=PROBE_VERSION)
    reasons["lr"] = (
        f"probe stopped at {verdict.edge_lr:.3g} ({verdict.reason}); {chosen.why}. Probe cost: "
        f"{summary['cost_steps']:.3g} training steps ({100 * summary['cost_fraction']:.1f} % of the run)"
    )
    if heads:
        if head_module is not None and result.head_inputs:
            eta, line = first_step_size(head_module, result.head_inputs)
            rec.head_lr = eta * rules.HEAD_STEP_MULTIPLIER
            reasons["head_lr"] = (
                f"{rules.HEAD_STEP_MULTIPLIER:g} × {eta:.3g}, the best size of the head's first "
                "Adam step on its cached input features: a fresh head learns a linear model from "
                "scratch, it is not a small perturbation like the adapters"
            )
            summary["head"] = {
                "first_step": eta,
                "multiplier": rules.HEAD_STEP_MULTIPLIER,
                "line": line,
                "examples": sum(len(y) for _, y in result.head_inputs),
            }
        else:
            rec.head_lr = rec.lr * ratio
            reasons["head_lr"] = (
                "B's rate (the head is an output-side matrix, like B); its input could not be cached"
            )
    rec.probe = summary
    return rec


def _infer_task(model: nn.Module) -> str:
    children = dict(model.named_children())
    return "classification" if any(h in children for h in HEADS) else "causal_lm"


def _heads(model: nn.Module, task: str) -> list[str]:
    if task != "classification":
        return []
    children = dict(model.named_children())
    return [h for h in HEADS if h in children]


def _single_head(model: nn.Module, heads: list[str]) -> nn.Module | None:
    """The head module whose input the probe caches (one head only; otherwise no cached-feature test)."""
    if len(heads) != 1:
        return None
    try:
        return model.get_submodule(heads[0])
    except AttributeError:
        matches = [m for n, m in model.named_modules() if n.endswith("." + heads[0])]
        return matches[0] if len(matches) == 1 else None

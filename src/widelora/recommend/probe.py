"""The learning-rate probe: a short LR range test on the user's own model and data that finds the stability
edge.

The learning rate grows geometrically over the probe's steps (A at lr, B at ratio · lr, as in the run); after
each step the feature monitor (widelora.features.FeatureMonitor) reports |Z_A| and |Z_B| per adapted layer,
and the stopping rule (widelora.recommend.edge) reads them with the loss. The probe stops at the first bad
state, which also keeps it cheap.

Cost. Its budget is a fraction (10 % by default) of the run it configures, counted in training examples — one
probe step on b examples costs b / run_batch training steps. The probe always takes the same number of steps
(16, so the learning rate grows by the same factor per step whatever the run length, which is what makes the
calibrated safety factor transferable) and spends the budget on the batch size: a 60-step run of 16 examples
buys 16 probe steps of 6 examples. Adam's step size is set by the learning rate, not by the batch, so smaller
probe batches see the same edge at the price of a noisier loss (smoothed by the rule).

A fresh head (a trainable module that is not an adapter) is frozen during the range test: its edge is found
separately (widelora.recommend.head) on its input features, cached from the first probe steps, where the
adapters have barely moved (B = 0 at step 0 exactly).

Without a fresh head the loss *is* the pretrained model's own objective, and the probe also reads it on a
small reference batch held out of the range test (the same rows at every step, in eval mode): a curve free of
batch noise whose first rise marks the step size past which an update makes the model worse (the function
edge). A forward-only reference row costs about a third of a training row, and that is counted in the budget.
With a fresh head the loss measures a random classifier, not the features, so only the feature edge is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from widelora.features import FeatureMonitor
from widelora.lora.pairs import require_pairs
from widelora.recommend.edge import Reading, StopRule, Verdict
from widelora.recommend.rules import geometric_lrs

LossFn = Callable[[nn.Module, dict], torch.Tensor]
PROBE_STEPS = 16
LR_RANGE = (1e-5, 1e-1)  # Adam on LoRA: every edge measured so far (widths 128-8192) lies well inside
#: Rows of the reference batch (when the loss is the model's own objective): 1 row was too noisy on SmolLM2
#: (edges 2.5e-3 ... 1.6e-2 over 3 seeds), 4 rows gave the same edge on all 3 seeds
#: (docs/results/recommend.md).
REFERENCE_ROWS = 4
#: Cost of a forward-only row relative to a training row (forward + backward ≈ 3 forwards).
FORWARD_COST = 1.0 / 3.0
#: Recorded with every recommendation, so results of different probes are never pooled.
PROBE_VERSION = "v3-fit"
#: What each version did (docs/results/recommend.md): results of different versions are never pooled.
PROBE_VERSIONS = {
    "v1": "feature edge (|Z_B| crossing |W x|, interpolated) / 4",
    "v2": "feature edge / 8; reference-loss edge / 2 without a fresh head",
    "v3-fit": "linear-response edge (median fit of the layers' upper-quartile |Z_B|/|W x| ∝ lr before A "
    "moves) / 77, capped at a break / 4; reference-loss edge / 2 without a fresh head",
}


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss a Hugging Face model computes itself from a batch with `labels`."""
    return model(**batch).loss


@dataclass(frozen=True)
class ProbePlan:
    """How many probe steps, how many examples each, and what that costs in training steps of the run."""

    steps: int
    batch_size: int
    run_steps: int
    run_batch: int
    lrs: list[float] = field(default_factory=list)
    reference_rows: int = 0

    @property
    def cost_steps(self) -> float:
        return self.steps * (self.batch_size + self.reference_rows * FORWARD_COST) / self.run_batch

    @property
    def cost_fraction(self) -> float:
        return self.cost_steps / self.run_steps

    def describe(self) -> str:
        ref = f" (+ a {self.reference_rows}-row reference forward each)" if self.reference_rows else ""
        return (
            f"{self.steps} probe steps × {self.batch_size} examples{ref} = {self.cost_steps:.3g} training "
            f"steps ({100 * self.cost_fraction:.1f} % of the {self.run_steps}-step run)"
        )


def plan_probe(
    run_steps: int,
    run_batch: int,
    budget: float = 0.10,
    steps: int = PROBE_STEPS,
    min_steps: int = 6,
    min_batch: int = 2,
    lr_range: tuple[float, float] = LR_RANGE,
    reference_rows: int = 0,
) -> ProbePlan | None:
    """The probe that fits in `budget` × the run (in examples), or None when not even `min_steps` fit.

    Fixed step count first (batch shrinks to fit); below `min_batch` examples per step, fewer steps. A
    reference batch of `reference_rows` rows, read at every step, is paid for first (at FORWARD_COST per row);
    it may take the training batch down to 1 row, since the reference curve, not the training loss, is then
    what the rule reads for the loss.
    """
    for name, v in (("run_steps", run_steps), ("run_batch", run_batch), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if isinstance(reference_rows, bool) or not isinstance(reference_rows, int) or reference_rows < 0:
        raise ValueError(f"reference_rows={reference_rows!r} must be an integer >= 0")
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r} must be a fraction in (0, 1]")
    examples = budget * run_steps * run_batch + 1e-9
    ref = reference_rows * FORWARD_COST
    if reference_rows:
        min_batch = 1
    batch = min(run_batch, math.floor(examples / steps - ref))
    count = steps
    if batch < min_batch:
        batch = min(min_batch, run_batch)
        count = min(steps, math.floor(examples / (batch + ref)))
    if count < min_steps:
        return None
    lrs = geometric_lrs(lr_range[0], lr_range[1], count)
    return ProbePlan(count, batch, run_steps, run_batch, lrs, reference_rows)


def batch_stream(batches: Iterable[dict], size: int) -> Iterator[dict]:
    """Chunks of `size` rows cut from the given batches, in order, cycling; a smaller batch is used whole."""
    cache = list(batches)
    if not cache:
        raise ValueError("the probe needs at least one batch")
    while True:
        for batch in cache:
            rows = _rows(batch)
            for start in range(0, rows, size):
                yield {k: v[start : start + size] if torch.is_tensor(v) else v for k, v in batch.items()}


def _rows(batch: dict) -> int:
    for v in batch.values():
        if torch.is_tensor(v):
            return int(v.shape[0])
    raise ValueError("a probe batch must hold tensors (input_ids, attention_mask, labels, ...)")


@dataclass
class ProbeResult:
    """The range test's curve and its verdict; `head_inputs` are the cached (features, labels) for the
    head."""

    plan: ProbePlan
    readings: list[Reading]
    verdict: Verdict
    examples: int
    head_inputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """A JSON-able record: the plan, its cost, the curve and the verdict (no tensors)."""
        return {
            "steps": self.plan.steps,
            "batch_size": self.plan.batch_size,
            "cost_steps": self.examples / self.plan.run_batch,
            "cost_fraction": self.examples / self.plan.run_batch / self.plan.run_steps,
            "curve": [asdict(r) for r in self.readings],
            **{k: v for k, v in self.verdict.to_dict().items() if k != "smoothed"},
            "smoothed": self.verdict.smoothed,
        }


def range_test(
    model: nn.Module,
    batches: Iterable[dict],
    plan: ProbePlan,
    ratio: float,
    loss_fn: LossFn = hf_loss,
    rule: StopRule | None = None,
    head: nn.Module | None = None,
    capture_steps: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    reference: dict | None = None,
) -> ProbeResult:
    """Run the range test *in place* (callers wrap it in `widelora.recommend.snapshot.preserved`).

    `reference`: a batch kept out of the range test whose loss is read before every step (module docstring).
    """
    rule = rule or StopRule()
    pairs = require_pairs(model)
    a_params = [p.A for p in pairs]
    b_params = [p.B for p in pairs]
    adapter_ids = {id(p) for p in a_params + b_params}
    for p in model.parameters():  # the head (and any other non-adapter) is frozen during the range test
        if id(p) not in adapter_ids:
            p.requires_grad_(False)
    for p in a_params + b_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": a_params}, {"params": b_params}], lr=plan.lrs[0], betas=betas, eps=eps, weight_decay=0.0
    )
    base_out: dict[str, float] = {}
    hooks = [p.module.register_forward_hook(_base_output_hook(p, base_out)) for p in pairs]
    captured: list[torch.Tensor] = []
    if head is not None and capture_steps > 0:
        hooks.append(
            head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach().clone()))
        )
    monitor = FeatureMonitor(model, every=1).attach()
    z_a0: dict[str, float] = {}
    readings: list[Reading] = []
    head_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    stream = batch_stream(batches, plan.batch_size)
    examples = 0.0
    model.train()
    try:
        for k, lr in enumerate(plan.lrs):
            ref_loss = None
            if reference is not None:
                ref_loss = _reference_loss(model, reference, loss_fn)
                examples += _rows(reference) * FORWARD_COST
            batch = next(stream)
            examples += _rows(batch)
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, lr * ratio
            loss = loss_fn(model, batch)
            if captured:
                if k < capture_steps and "labels" in batch:
                    head_inputs.append((captured[-1], batch["labels"].detach().clone()))
                captured.clear()
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            out_ratio, za_growth, out_q = _monitor_values(monitor.step(k), base_out, z_a0)
            readings.append(Reading(k, lr, value, out_ratio, za_growth, ref_loss=ref_loss, out_q=out_q))
            if rule.scan(readings).stop_step is not None:
                break
    finally:
        monitor.detach()
        for h in hooks:
            h.remove()
    return ProbeResult(plan, readings, rule.scan(readings), examples, head_inputs)


def _reference_loss(model: nn.Module, batch: dict, loss_fn: LossFn) -> float:
    """The loss on the reference batch in eval mode (no dropout noise), the model left in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            return float(loss_fn(model, batch).detach())
    finally:
        model.train()


def split_reference(batches: list[dict], rows: int) -> tuple[dict | None, list[dict]]:
    """The first `rows` rows of the batches as the reference batch, and the rest for the range test; (None,
    batches) when they hold too few rows to spare any."""
    total = sum(_rows(b) for b in batches)
    if rows <= 0 or total <= rows:
        return None, batches
    first = batches[0]
    if _rows(first) < rows:
        return None, batches
    ref = {k: v[:rows] if torch.is_tensor(v) else v for k, v in first.items()}
    rest = {k: v[rows:] if torch.is_tensor(v) else v for k, v in first.items()}
    return ref, ([rest] if _rows(first) > rows else []) + list(batches[1:])


def _base_output_hook(pair, store: dict[str, float]):
    """Records |W x| (mean over tokens) of the pretrained layer at the probe's first forward."""

    def hook(_module: nn.Module, inputs: tuple, _output: object) -> None:
        if pair.name in store or not inputs or not torch.is_tensor(inputs[0]):
            return
        with torch.no_grad():
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            store[pair.name] = float((x @ pair.weight.detach().float().T).norm(dim=-1).mean())

    return hook


def _monitor_values(records: list, base_out: dict[str, float], z_a0: dict[str, float]):
    """(max and upper quartile of |Z_B| / |W x|₀, mean |Z_A| / |Z_A|₀) over the recorded layers; Nones without
    records."""
    if not records:
        return None, None, None
    out_ratios, growth = [], []
    for r in records:
        z_a0.setdefault(r.layer, r.z_a)
        if base_out.get(r.layer):
            out_ratios.append(r.z_b / base_out[r.layer] if math.isfinite(r.z_b) else math.inf)
        if z_a0[r.layer] > 0:
            growth.append(r.z_a / z_a0[r.layer] if math.isfinite(r.z_a) else math.inf)
    out_ratio = max(out_ratios) if out_ratios else None
    out_q = upper_quartile(out_ratios) if out_ratios else None
    return out_ratio, (sum(growth) / len(growth) if growth else None), out_q


def upper_quartile(values: list[float]) -> float:
    """The 75th percentile, linear between order statistics (numpy's default); inf when any value is."""
    if any(not math.isfinite(v) for v in values):
        return math.inf
    ordered = sorted(values)
    pos = 0.75 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])

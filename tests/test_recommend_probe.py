"""The learning-rate probe on tiny models: exact restore, the cost cap, the stopping rule on a real curve, the
head."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import widelora as wl
from widelora.lora.layer import LoRALinear
from widelora.recommend import recommend, rules
from widelora.recommend.head import first_step_size
from widelora.recommend.probe import PROBE_VERSION, plan_probe, range_test, split_reference
from widelora.recommend.snapshot import ModelSnapshot, preserved
from widelora.testing.models import tiny_bert_classifier, tiny_llama


def _class_batches(n: int = 4, rows: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 60, (rows, 10), generator=g),
            "attention_mask": torch.ones(rows, 10, dtype=torch.long),
            "labels": torch.randint(0, 3, (rows,), generator=g),
        }
        for _ in range(n)
    ]


def _lm_batches(n: int = 2, rows: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (rows, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- exact restore
def test_probe_on_a_base_model_leaves_it_exactly_as_found() -> None:
    model = tiny_bert_classifier()
    model.train()
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    rec = recommend(model, _class_batches(), steps=100)
    assert rec.probe is not None and rec.head_lr is not None
    assert _same(before, _state(model))  # bit-exact, frozen and trainable alike
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and all(m.training for m in model.modules())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # the probe's adapters are gone
    assert not hasattr(model, "_widelora_trainable")
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws of the probe do not shift the user's run


def test_probe_on_attached_adapters_restores_every_trainable_tensor_and_flag() -> None:
    model = tiny_llama()
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, seed=0)
    with torch.no_grad():  # a mid-training state: B != 0
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.01)
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    rec = recommend(model, _lm_batches(), steps=200)
    assert rec.targets == ["q_proj", "v_proj"] and rec.rank == 4
    assert rec.probe["stop_step"] is not None or rec.probe["reason"] == "not reached"
    assert _same(before, _state(model))
    assert [p.requires_grad for p in model.parameters()] == flags


def test_snapshot_restores_an_optimizer_state_and_gradients() -> None:
    model = tiny_llama()
    wl.attach(model, targets=["q_proj"], rank=2, seed=0)
    opt = wl.create_optimizer(model, lr=1e-3)
    batch = _lm_batches(1)[0]
    model(**batch).loss.backward()
    opt.step()
    snap = ModelSnapshot(model, opt)
    before = _state(model)
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
    snap.restore()
    assert all(torch.equal(state[k], opt.state_dict()["state"][0][k]) for k in state)
    assert _same(before, _state(model))
    assert all(p.grad is not None for p, _ in snap.params.values())  # the gradients of the snapshot's moment


def test_an_exception_inside_the_probe_still_restores_the_model() -> None:
    model = tiny_llama()
    wl.attach(model, targets=["q_proj"], rank=2, seed=0)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"), preserved(model):
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).add_(1.0)
        raise RuntimeError("boom")
    assert _same(before, _state(model))


# ------------------------------------------------------------------------------------------------- the cost
@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 256), st.floats(0.01, 0.5))
def test_the_probe_never_costs_more_than_its_budget(run_steps: int, run_batch: int, budget: float) -> None:
    plan = plan_probe(run_steps, run_batch, budget=budget)
    if plan is not None:
        assert plan.cost_steps <= budget * run_steps + 1e-9
        assert plan.steps >= 6 and 1 <= plan.batch_size <= run_batch
        assert len(plan.lrs) == plan.steps and plan.lrs == sorted(plan.lrs)


def test_a_60_step_run_of_16_buys_16_probe_steps_of_6_and_a_tiny_run_buys_none() -> None:
    plan = plan_probe(60, 16)
    assert (plan.steps, plan.batch_size, plan.cost_steps) == (16, 6, 6.0)
    assert "10.0 % of the 60-step run" in plan.describe()
    assert plan_probe(10, 4) is None  # 4 examples cannot fund 6 probe steps


def test_recommend_reports_a_cost_within_the_budget_and_falls_back_without_one() -> None:
    rec = recommend(tiny_bert_classifier(), _class_batches(), steps=60, batch_size=8)
    assert rec.probe["cost_fraction"] <= 0.10 + 1e-9
    assert "% of the run" in rec.reasons["lr"]
    short = recommend(tiny_bert_classifier(), _class_batches(), steps=5, batch_size=8)
    assert short.probe is None and "no probe" in short.reasons["lr"]


# --------------------------------------------------------------------------------------- the probe's verdict
def test_a_non_finite_loss_stops_the_probe_at_that_step() -> None:
    """Deterministic divergence: the loss function returns NaN from the 6th probe step on."""
    model = tiny_llama()
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, seed=0)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = m(**batch).loss
        return loss * math.nan if len(calls) >= 6 else loss

    plan = plan_probe(400, 4)
    with preserved(model):
        result = range_test(model, _lm_batches(), plan, ratio=2.0, loss_fn=loss_fn)
    assert result.verdict.reason == "non-finite" and result.verdict.stop_step == 5
    assert result.verdict.edge_lr == plan.lrs[3]
    assert len(result.readings) == 6  # it stopped: no step was spent past the edge


def _check_lr_rule(rec) -> None:
    """The recorded lr is the rule's (rules.probe_lr) on the recorded verdict."""
    p = rec.probe
    assert rec.lr == pytest.approx(p["lr_edge"] / p["factor"])
    if p["lr_source"] == "linear response":
        assert (p["lr_edge"], p["factor"]) == (p["response_lr"], rules.RESPONSE_FACTOR)
        assert p["reason"] == "not reached" or rec.lr <= p["edge_lr"] / rules.BREAK_CAP_FACTOR
    elif p["lr_source"] == "reference loss":
        assert (p["lr_edge"], p["factor"]) == (p["edge_lr"], rules.LOSS_EDGE_FACTOR)
    else:
        assert p["lr_edge"] == p["edge_lr"]


def test_recommend_learning_rate_follows_the_probe_rule() -> None:
    rec = recommend(tiny_llama(), _lm_batches(), steps=200, targets=["q_proj", "v_proj"])
    _check_lr_rule(rec)
    assert rec.ratio == rules.loraplus_ratio(32)[0] and rec.width == 32
    cls = recommend(tiny_bert_classifier(), _class_batches(), steps=100)
    _check_lr_rule(cls)
    assert cls.probe["response_lr"] is not None and cls.probe["lr_source"] in ("linear response", "stop edge")


# ------------------------------------------------------------------------------------------------- the head
def test_first_step_size_minimizes_the_loss_along_the_sign_step_and_leaves_the_head_alone() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    before = _state(head)
    feats = torch.randn(20, 8) + 2.0  # a common component, as pooled features have
    labels = torch.randint(0, 3, (20,))
    eta, curve = first_step_size(head, [(feats[:10], labels[:10]), (feats[10:], labels[10:])])
    assert _same(before, _state(head))
    losses = dict(curve)
    assert losses[eta] == min(loss for e, loss in curve if e > 0)
    assert losses[eta] < curve[0][1]  # the step helps
    assert first_step_size(head, [(feats, labels)])[0] == eta  # chunks are one batch


def test_the_head_gets_its_own_rate_and_causal_lm_gets_none() -> None:
    rec = recommend(tiny_bert_classifier(), _class_batches(), steps=100)
    assert rec.trainable == ["classifier"] and rec.head_lr != rec.lr
    assert rec.probe["head"]["examples"] > 0
    lm = recommend(tiny_llama(), _lm_batches(), steps=200)
    assert lm.head_lr is None and lm.trainable == []


def test_recommend_rejects_a_missing_run_length_and_a_bad_budget() -> None:
    from widelora.errors import UserError

    with pytest.raises(UserError, match="steps"):
        recommend(tiny_llama(), _lm_batches(), steps=0)
    with pytest.raises(UserError, match="budget"):
        recommend(tiny_llama(), _lm_batches(), steps=100, budget=0.9)


def test_lr_finder_stops_on_divergence_and_restores_the_model() -> None:
    from widelora.recommend.lr_finder import lr_finder

    model = tiny_llama()
    wl.attach(model, targets=["q_proj", "v_proj"], rank=4, seed=0)
    before = _state(model)
    calls = []

    def loss_fn(m, batch):  # the loss explodes deterministically from the 30th step
        calls.append(1)
        loss = m(**batch).loss
        return loss * 1e3 if len(calls) >= 30 else loss

    result = lr_finder(model, _lm_batches(), num_it=100, loss_fn=loss_fn)
    assert len(result.lrs) == 30 and result.examples == 30 * 4
    assert result.suggestions["minimum"] < result.lrs[-1]
    assert _same(before, _state(model))


# ------------------------------------------------------------------------------------ the reference batch
# (v2)
@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 256), st.floats(0.01, 0.5), st.integers(0, 8))
def test_the_probe_with_a_reference_batch_stays_within_its_budget(
    run_steps: int, run_batch: int, budget: float, ref: int
) -> None:
    plan = plan_probe(run_steps, run_batch, budget=budget, reference_rows=ref)
    if plan is not None:
        assert plan.cost_steps <= budget * run_steps + 1e-9
        assert plan.steps >= 6 and 1 <= plan.batch_size <= run_batch and plan.reference_rows == ref


def test_the_smollm2_protocol_buys_16_steps_of_1_row_plus_a_4_row_reference() -> None:
    plan = plan_probe(48, 8, reference_rows=4)
    assert (plan.steps, plan.batch_size) == (16, 1)
    assert plan.cost_fraction == pytest.approx(16 * (1 + 4 / 3) / (48 * 8)) and plan.cost_fraction <= 0.10


def test_split_reference_takes_the_first_rows_out_of_the_range_test() -> None:
    batches = _lm_batches(n=2, rows=4)
    ref, rest = split_reference(batches, 3)
    assert torch.equal(ref["input_ids"], batches[0]["input_ids"][:3])
    assert [b["input_ids"].shape[0] for b in rest] == [1, 4]
    assert split_reference(batches, 9) == (None, batches)  # too few rows to spare: no reference


def test_without_a_fresh_head_the_probe_reads_the_reference_loss_and_records_its_version() -> None:
    rec = recommend(tiny_llama(), _lm_batches(n=4, rows=8), steps=400, targets=["q_proj", "v_proj"])
    refs = [r["ref_loss"] for r in rec.probe["curve"]]
    assert all(r is not None and math.isfinite(r) for r in refs)
    assert rec.probe["version"] == PROBE_VERSION == "v3-fit" and rec.probe["cost_fraction"] <= 0.10 + 1e-9
    _check_lr_rule(rec)
    cls = recommend(tiny_bert_classifier(), _class_batches(), steps=100)
    assert all(
        r["ref_loss"] is None for r in cls.probe["curve"]
    )  # a fresh head: the loss is a random classifier's


def test_a_rising_reference_loss_sets_the_lr_to_half_its_edge() -> None:
    """Deterministic: the reference loss (eval mode) falls for 5 readings, then jumps; training is
    untouched."""
    model = tiny_llama()
    calls = {"ref": 0}

    def loss_fn(m, batch):
        loss = m(**batch).loss
        if m.training:
            return loss
        calls["ref"] += 1
        return loss * 0.0 + (3.0 - 0.1 * calls["ref"] if calls["ref"] <= 5 else 9.0)

    rec = recommend(model, _lm_batches(n=4, rows=8), steps=400, targets=["q_proj", "v_proj"], loss_fn=loss_fn)
    lrs = [r["lr"] for r in rec.probe["curve"]]
    assert rec.probe["reason"] == "reference-loss rise" and rec.probe["stop_step"] == 5
    assert rec.probe["edge_lr"] == pytest.approx(lrs[3])
    assert rec.lr == pytest.approx(lrs[3] / 2.0)

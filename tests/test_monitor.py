"""The feature monitor: hand-computed norms, the δ split, scheduling, flags, PEFT and width-study traces."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import widelora as wl
from widelora.features import FeatureMonitor, delta_norms, feature_norms, gram_norms, monitor


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    return wl.attach(model, targets=["0", "2"], rank=2, alpha=4.0, init="init_a", seed=seed)


def set_adapters(model, gen):
    with torch.no_grad():
        for p in wl.lora_pairs(model):
            p.A.copy_(torch.randn(p.A.shape, generator=gen, dtype=p.A.dtype))
            p.B.copy_(torch.randn(p.B.shape, generator=gen, dtype=p.B.dtype))


def test_norms_match_hand_computation():
    model = tiny_model()
    set_adapters(model, torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, 6, dtype=torch.float64)  # (batch, tokens, features): tokens are all leading dims
    with monitor(model) as mon:
        model(x)
        recs = mon.step(0)
    pair0 = wl.lora_pairs(model)[0]
    assert pair0.scale == 2.0
    xs = x.reshape(-1, 6)
    z_a = xs @ pair0.A.detach().T
    z_b = 2.0 * z_a @ pair0.B.detach().T
    r0 = recs[0]
    assert r0.layer == pair0.name and r0.tokens == 12 and r0.step == 0
    assert r0.z_a == pytest.approx(z_a.norm(dim=1).mean().item(), rel=1e-6)
    assert r0.z_b == pytest.approx(z_b.norm(dim=1).mean().item(), rel=1e-6)  # includes the scale s
    assert r0.x == pytest.approx(xs.norm(dim=1).mean().item(), rel=1e-6)
    assert r0.delta1 is None  # no previous weights yet
    # the second layer's input is what the first layer produced (hooks, no second forward)
    h = torch.relu(model[0](x)).reshape(-1, 5)
    p1 = wl.lora_pairs(model)[1]
    assert recs[1].z_a == pytest.approx((h @ p1.A.detach().T).norm(dim=1).mean().item(), rel=1e-6)


def test_delta_split_matches_definitions_and_sums_to_the_update():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    set_adapters(model, gen)
    p = wl.lora_pairs(model)[0]
    A0, B0 = p.A.detach().clone(), p.B.detach().clone()
    x0 = torch.randn(7, 6, dtype=torch.float64)
    x1 = torch.randn(9, 6, dtype=torch.float64)
    mon = FeatureMonitor(model).attach()
    model(x0)
    mon.step(0)
    set_adapters(model, gen)  # "an optimizer step"
    A1, B1 = p.A.detach().clone(), p.B.detach().clone()
    model(x1)
    rec = mon.step(1)[0]
    mon.detach()
    s = p.scale
    d1 = s * (x1 @ (A1 - A0).T) @ B0.T
    d2 = s * (x1 @ A0.T) @ (B1 - B0).T
    d3 = s * (x1 @ (A1 - A0).T) @ (B1 - B0).T
    assert rec.delta1 == pytest.approx(d1.norm(dim=1).mean().item(), rel=1e-6)
    assert rec.delta2 == pytest.approx(d2.norm(dim=1).mean().item(), rel=1e-6)
    assert rec.delta3 == pytest.approx(d3.norm(dim=1).mean().item(), rel=1e-6)
    assert rec.z_b == pytest.approx((s * x1 @ (B1 @ A1).T).norm(dim=1).mean().item(), rel=1e-6)
    # δ1 + δ2 + δ3 is the change of the adapter output, so the recorded norms bound its size token by token
    change = (s * x1 @ (B1 @ A1 - B0 @ A0).T).norm(dim=1).mean().item()
    assert change <= rec.delta1 + rec.delta2 + rec.delta3 + 1e-12


def test_batched_helpers_agree_with_per_slice_calls():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 10, 8, generator=g)
    A, B = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    za, zb = feature_norms(x, A, B, 0.5)
    assert za.shape == (2, 3)
    za11, zb11 = feature_norms(x[1, 0], A[1, 1], B[1, 1], 0.5)
    assert za[1, 1] == pytest.approx(za11.item(), rel=1e-5) and zb[1, 1] == pytest.approx(
        zb11.item(), rel=1e-5
    )
    d = delta_norms(x[0, 0], A[0, 0], B[0, 0], A[0, 0], B[0, 0])
    assert all(v.item() == 0.0 for v in d)  # no change, no update


def test_every_paused_and_detach():
    model = tiny_model()
    x = torch.randn(3, 6, dtype=torch.float64)
    mon = FeatureMonitor(model, every=2).attach()
    for step in range(5):
        model(x)
        with mon.paused():
            model(x * 100)  # an evaluation forward: must not be recorded
        mon.step(step)
    assert sorted({r.step for r in mon.records}) == [0, 2, 4]
    assert all(r.tokens == 3 for r in mon.records)
    mon.detach()
    n = len(mon.records)
    model(x)
    mon.step(6)
    assert len(mon.records) == n
    rows = mon.to_rows()
    assert {"step", "layer", "z_a", "z_b", "delta1", "delta2", "z_a_ratio"} <= set(rows[0])


def test_flags_internal_and_output_instability():
    model = tiny_model()
    x = torch.randn(16, 6, dtype=torch.float64)
    p = wl.lora_pairs(model)[0]
    with monitor(model, za_threshold=10.0, zb_threshold=10.0) as mon:
        model(x)
        mon.step(0)
        with torch.no_grad():  # Z_A large, Z_B kept small: internal instability
            p.A.mul_(1000.0)
            p.B.fill_(1e-6)
        model(x)
        mon.step(1)
    s = mon.summary()[p.name]
    assert s["internal_instability"] and not s["output_instability"]
    assert s["z_a_ratio_last"] > 10.0

    model = tiny_model(1)
    p = wl.lora_pairs(model)[0]
    with torch.no_grad():
        p.B.fill_(1e3)
    with monitor(model) as mon:
        model(x)
        mon.step(0)
    assert mon.summary()[p.name]["output_instability"]

    healthy = tiny_model(2)
    with monitor(healthy) as mon:
        healthy(x)
        mon.step(0)
    assert not any(v["internal_instability"] or v["output_instability"] for v in mon.summary().values())


def test_works_on_a_peft_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(5, 6)
    with monitor(model) as mon:
        model(x)
        mon.step(0)
    (rec,) = mon.records
    p = wl.lora_pairs(model)[0]
    assert p.kind == "peft" and p.scale == 4.0
    z_b = p.scale * (x @ p.A.detach().T) @ p.B.detach().T
    assert rec.z_b == pytest.approx(z_b.norm(dim=1).mean().item(), rel=1e-5)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        FeatureMonitor(tiny_model(), every=0)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        FeatureMonitor(nn.Linear(2, 2)).attach()


def test_width_study_traces_equal_the_hook_monitor():
    """The engine's |Z_A|, |Z_B| traces (Figure 3) are the monitor's numbers on the toy model."""
    from widelora.experiments import width_study as ws
    from widelora.experiments.toy import ToyModel, make_data

    cfg = ws.WidthStudyConfig(
        widths=(24,),
        lrs=(3e-3,),
        seeds=(0,),
        steps=6,
        batch_size=8,
        n_train=32,
        n_test=8,
        teacher_width=16,
        teacher_rank=2,
        rank=2,
        trace_points=7,
        dtype="float64",
        workers=1,
        inits=("init_a",),
    )
    data = make_data(cfg.d, cfg.teacher_width, cfg.teacher_rank, cfg.n_train, cfg.n_test, 0, torch.float64)
    cache = ws.build_cache(cfg, data, 24)
    a0, b0, _ = ws.initial_adapters(cfg, data, cache.frozen[0], "init_a", 0)
    chunk = ws.train_chunk(cfg, cache, data, a0[None], b0[None], init="init_a")
    assert list(chunk.trace_steps) == list(range(7))

    model = ToyModel(cache.frozen[0], rank=2)
    with torch.no_grad():
        model.hidden.lora_A.copy_(a0)
        model.hidden.lora_B.copy_(b0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
    sched = ws.batch_schedule(cfg.n_train, cfg.batch_size, cfg.steps, 0)
    mon = FeatureMonitor(model).attach()
    for t in range(cfg.steps + 1):
        with torch.no_grad():
            model(data.x_train)  # record on the full train set, as the paper's Figure 3
        mon.step(t)
        if t == cfg.steps:
            break
        with mon.paused():
            loss = nn.functional.mse_loss(model(data.x_train[sched[t]]), data.y_train[sched[t]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mon.detach()
    za = [r.z_a for r in mon.records]
    zb = [r.z_b for r in mon.records]
    assert za == pytest.approx(list(chunk.z_a[0, 0]), rel=1e-9)
    assert zb == pytest.approx(list(chunk.z_b[0, 0]), rel=1e-9, abs=1e-12)
    assert math.isfinite(mon.summary()["hidden"]["delta2_mean"])


@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 4.0))
@settings(max_examples=25, deadline=None)
def test_gram_norms_and_delta_triangle_property(seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64)
    A0, A1 = (
        torch.randn(3, 7, generator=g, dtype=torch.float64),
        torch.randn(3, 7, generator=g, dtype=torch.float64),
    )
    B0, B1 = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )
    z = x @ A1.T
    assert torch.allclose(gram_norms(z, B1, scale), (scale * z @ B1.T).norm(dim=-1))
    d1, d2, d3 = delta_norms(x, A0, B0, A1, B1, scale)
    change = (scale * x @ (B1 @ A1 - B0 @ A0).T).norm(dim=-1).mean()
    assert change <= d1 + d2 + d3 + 1e-9  # ||δ1 + δ2 + δ3|| <= ||δ1|| + ||δ2|| + ||δ3||, token by token

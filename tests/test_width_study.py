"""The toy model, the batched engine against the plain loop, resume, optimum reading, CLI and figures."""

import json
import math

import numpy as np
import pytest
import torch

from widelora.experiments import width_study as ws
from widelora.experiments.toy import ToyModel, make_data, student_weights, toy_formula
from widelora.lora.pairs import lora_pairs


def tiny(**kw):
    base = {
        "widths": (16, 32),
        "lrs": ws.lr_grid(-9, -5, 1)[::2],
        "seeds": (0, 1),
        "steps": 12,
        "batch_size": 8,
        "n_train": 40,
        "n_test": 10,
        "teacher_width": 24,
        "teacher_rank": 3,
        "rank": 2,
        "trace_points": 5,
        "curve_points": 12,
        "dtype": "float64",
        "workers": 1,
    }
    base.update(kw)
    return ws.WidthStudyConfig(**base)


def test_toy_forward_matches_direct_formula():
    torch.manual_seed(0)
    fw = student_weights(5, 48, seed=3, dtype=torch.float64)
    model = ToyModel(fw, rank=3, alpha=6.0)
    with torch.no_grad():
        model.hidden.lora_A.normal_()
        model.hidden.lora_B.normal_()
    x = torch.randn(17, 5, dtype=torch.float64)
    expected = toy_formula(x, fw, model.hidden.lora_A, model.hidden.lora_B, scale=2.0)
    # the paper's eq. (4) written out by hand: Y_h = Y_in + (W_h + s B A) φ(Y_in), f = W_out φ(Y_h)
    y_in = x @ fw.w_in.T
    y_h = y_in + torch.relu(y_in) @ (fw.w_h + 2.0 * model.hidden.lora_B @ model.hidden.lora_A).T
    by_hand = torch.relu(y_h) @ fw.w_out
    assert torch.allclose(model(x), by_hand, rtol=1e-12, atol=1e-12)
    assert torch.allclose(expected, by_hand, rtol=1e-12, atol=1e-12)
    pairs = lora_pairs(model)  # built with widelora's own layer, so every widelora tool sees it
    assert [p.name for p in pairs] == ["hidden"] and pairs[0].scale == 2.0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["hidden.lora_A", "hidden.lora_B"]


def test_data_is_deterministic_and_teacher_shaped():
    a, b = make_data(n_train=30, n_test=5, seed=1), make_data(n_train=30, n_test=5, seed=1)
    assert torch.equal(a.y_train, b.y_train) and a.x_train.shape == (30, 5) and a.y_test.shape == (5,)
    assert not torch.equal(a.y_train, make_data(n_train=30, n_test=5, seed=2).y_train)


@pytest.mark.parametrize(
    "variant", [{}, {"ratios": (4.0,), "weight_decay": 0.1, "schedule": "linear", "alpha": 4.0}]
)
def test_batched_engine_matches_one_run_per_config(variant):
    """Same loss curves as the plain loop (autograd + torch.optim.AdamW) to 1e-10 in float64."""
    cfg = tiny(widths=(24,), curve_points=12, **variant)
    data = make_data(
        cfg.d, cfg.teacher_width, cfg.teacher_rank, cfg.n_train, cfg.n_test, cfg.data_seed, torch.float64
    )
    cache = ws.build_cache(cfg, data, 24)
    for init in ("init_a", "init_b"):
        a0, b0 = zip(
            *[ws.initial_adapters(cfg, data, cache.frozen[i], init, s)[:2] for i, s in enumerate(cfg.seeds)],
            strict=True,
        )
        chunk = ws.train_chunk(cfg, cache, data, torch.stack(a0), torch.stack(b0), init=init)
        assert chunk.curve.shape == (2, len(cfg.lrs), cfg.steps)  # one window per step
        for si, seed in enumerate(cfg.seeds):
            for li, lr in enumerate(cfg.lrs):
                ref = ws.run_single(cfg, data, 24, init, lr, seed)
                np.testing.assert_allclose(chunk.curve[si, li], ref.losses, rtol=1e-10, atol=1e-12)
                assert chunk.train_loss[si, li] == pytest.approx(ref.train_loss, rel=1e-10)
                assert chunk.test_loss[si, li] == pytest.approx(ref.test_loss, rel=1e-10)


def test_divergence_is_detected_the_same_way():
    cfg = tiny(widths=(16,), lrs=(1e-3, 30.0), seeds=(0,), steps=15)
    orig = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = ws.run_width_study(cfg, None, progress=False)  # runs with 1 thread (config default)
        assert torch.get_num_threads() == 2  # and gives the caller's setting back
    finally:
        torch.set_num_threads(orig)
    chunk = res.chunk(16, "init_a")
    ref = ws.run_single(
        cfg,
        make_data(cfg.d, cfg.teacher_width, cfg.teacher_rank, cfg.n_train, cfg.n_test, 0, torch.float64),
        16,
        "init_a",
        30.0,
        0,
    )
    assert chunk.diverged_step[0, 1] == ref.diverged_step > 0
    assert math.isnan(chunk.train_loss[0, 1]) and math.isfinite(chunk.train_loss[0, 0])


def test_resume_after_interruption_gives_identical_results(tmp_path, monkeypatch):
    cfg = tiny()
    full = ws.run_width_study(cfg, tmp_path / "full", progress=False)

    calls = []
    real = ws.train_chunk

    def interrupted(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while its third chunk trains
        calls.append(kw.get("init"))
        return real(*args, **kw)

    monkeypatch.setattr(ws, "train_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ws.run_width_study(cfg, tmp_path / "resumed", progress=False)
    assert len(list((tmp_path / "resumed" / "chunks").glob("*.json"))) == 2
    assert not list((tmp_path / "resumed" / "chunks").glob(".*tmp"))  # no half-written files

    calls.clear()
    monkeypatch.setattr(ws, "train_chunk", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = ws.run_width_study(cfg, tmp_path / "resumed", progress=False)
    assert len(calls) == 2  # only the two unfinished chunks were trained
    assert resumed.rows() == full.rows()
    loaded = ws.load_results(tmp_path / "resumed")
    assert loaded.rows() == full.rows() and loaded.fits.keys() == full.fits.keys()
    assert (tmp_path / "resumed" / "results.csv").read_text() == (
        tmp_path / "full" / "results.csv"
    ).read_text()


def test_resume_ignores_chunks_of_another_config(tmp_path):
    ws.run_width_study(tiny(steps=6), tmp_path, progress=False)
    res = ws.run_width_study(tiny(steps=8), tmp_path, progress=False)
    assert all(c.curve_steps[-1] == 8 for c in res.chunks.values())
    saved = json.loads((tmp_path / "chunks" / "w16_init_a.json").read_text())
    assert saved["fingerprint"]["steps"] == 8


def test_find_optimum_refines_a_parabola():
    lrs = ws.lr_grid(-10, -4)
    log_lr = np.log(lrs)
    true = math.log(2.0**-6.7)
    loss = np.exp((log_lr - true) ** 2)[None]  # exact parabola in (log lr, log loss)
    chunk = ws.ChunkResult(
        64,
        "init_a",
        list(lrs),
        [0],
        loss,
        loss,
        np.full((1, len(lrs)), -1),
        np.array([1]),
        np.zeros((1, len(lrs), 1)),
        np.array([0]),
        np.zeros((1, len(lrs), 1)),
        np.zeros((1, len(lrs), 1)),
    )
    opt = ws.find_optimum(chunk)
    assert opt.lr == pytest.approx(2.0**-6.7, rel=1e-9)
    assert opt.lr_grid == 2.0**-7 and not opt.at_edge
    edge = ws.find_optimum(
        ws.ChunkResult(**{**chunk.__dict__, "train_loss": np.array([list(range(len(lrs)))])})
    )
    assert edge.at_edge and edge.lr == lrs[0]


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"widths": ()}, "widths"),
        ({"lrs": (1e-3, 1e-4)}, "lrs"),
        ({"steps": 0}, "steps"),
        ({"schedule": "exp"}, "schedule"),
        ({"dtype": "float16"}, "dtype"),
        ({"batch_size": 10_000}, "batch_size"),
    ],
)
def test_config_rejects_bad_values(kw, name):
    with pytest.raises(ValueError, match=name):
        tiny(**kw)


def test_unknown_init_is_rejected_before_work(tmp_path):
    with pytest.raises(ValueError, match="init_a"):  # the message lists the valid schemes
        ws.run_width_study(tiny(inits=("init_a", "no_such_init")), tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_quick_config_is_small_and_overridable():
    q = ws.WidthStudyConfig.quick(seeds=(3,))
    assert q.widths == (128, 512, 2048) and q.seeds == (3,) and q.steps < ws.WidthStudyConfig().steps
    with pytest.raises(ValueError, match="out_dir"):
        ws.load_results("/nonexistent-width-study")


def test_config_round_trips_through_json():
    cfg = tiny(ratios=(2.0,))
    assert ws.WidthStudyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        ws.WidthStudyConfig.from_dict({"widthz": [1]})


def test_cli_writes_results_report_and_figures(tmp_path):
    from typer.testing import CliRunner

    from widelora.cli import app

    out = tmp_path / "study"
    args = [
        "width-study",
        "--out",
        str(out),
        "--widths",
        "2^4..2^6",
        "--lrs",
        "2^-9..2^-5/1",
        "--seeds",
        "0",
        "--steps",
        "10",
        "--batch-size",
        "8",
        "--dtype",
        "float64",
        "--workers",
        "1",
        "--no-progress",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "measured slope" in result.output
    for name in (
        "results.csv",
        "optima.csv",
        "summary.json",
        "report.md",
        "figures/optimal_lr.png",
        "figures/features.png",
        "figures/loss_vs_lr.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "figures/optimal_lr.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["fits"]) == {"init_a", "init_b"}
    bad = CliRunner().invoke(app, ["width-study", "--out", str(out), "--widths", "abc"])
    assert bad.exit_code != 0 and "widths" in bad.output


def test_run_single_can_carry_the_feature_monitor():
    cfg = tiny(widths=(16,), seeds=(0,), steps=6)
    data = make_data(cfg.d, cfg.teacher_width, cfg.teacher_rank, cfg.n_train, cfg.n_test, 0, torch.float64)
    plain = ws.run_single(cfg, data, 16, "init_b", 1e-2, 0)
    run = ws.run_single(cfg, data, 16, "init_b", 1e-2, 0, monitor_every=2)
    np.testing.assert_array_equal(run.losses, plain.losses)  # the hooks do not change training
    assert [r["step"] for r in run.monitor_rows] == [1, 3, 5]
    assert run.monitor_rows[0]["delta1"] is None and run.monitor_rows[-1]["delta2"] > 0
    assert 0.0 < run.monitor_summary["hidden"]["delta2_share"] < 1.0


def test_config_refuses_widths_that_do_not_fit_in_memory():
    """2^24 used to start allocating about a petabyte; now the config refuses, naming the key and limit."""
    from widelora.errors import UserError

    with pytest.raises(UserError, match=r"widths: 16777216 needs about .* PB.*memory_limit_gb"):
        ws.WidthStudyConfig(widths=(128, 2**24))
    big = ws.WidthStudyConfig(widths=(8192,), memory_limit_gb=64.0)  # the default study fits in a few GB
    assert sum(big.memory_bytes(8192).values()) < 4 * 2**30


def test_config_refuses_a_grid_that_does_not_fit_in_memory():
    from widelora.errors import UserError

    kw = {
        "widths": (256,),
        "seeds": tuple(range(16)),
        "ratios": ws.lr_grid(0, 8),
        "lrs": ws.lr_grid(-20, 0, 2),
    }
    with pytest.raises(UserError, match=r"seeds × ratios × lrs: 16 × 9 × 41 configurations"):
        ws.WidthStudyConfig(memory_limit_gb=0.2, **kw)
    assert ws.WidthStudyConfig(memory_limit_gb=2.0, **kw).configs == 9 * 41


def test_ratio_axis_matches_one_run_per_ratio():
    """LoRA+ ratios are a grid axis: each (ratio, lr) of the batched pass equals the plain loop at it."""
    cfg = tiny(widths=(24,), ratios=(1.0, 8.0), lrs=(2.0**-8, 2.0**-6), steps=10, curve_points=10)
    data = make_data(
        cfg.d, cfg.teacher_width, cfg.teacher_rank, cfg.n_train, cfg.n_test, cfg.data_seed, torch.float64
    )
    cache = ws.build_cache(cfg, data, 24)
    a0, b0 = zip(
        *[ws.initial_adapters(cfg, data, cache.frozen[i], "init_a", s)[:2] for i, s in enumerate(cfg.seeds)],
        strict=True,
    )
    chunk = ws.train_chunk(cfg, cache, data, torch.stack(a0), torch.stack(b0), init="init_a")
    curves = chunk.grid(chunk.curve)  # [seed, ratio, lr, step]
    assert curves.shape == (2, 2, 2, 10)
    for si, seed in enumerate(cfg.seeds):
        for ri, ratio in enumerate(cfg.ratios):
            for li, lr in enumerate(cfg.lrs):
                ref = ws.run_single(cfg, data, 24, "init_a", lr, seed, ratio=ratio)
                np.testing.assert_allclose(curves[si, ri, li], ref.losses, rtol=1e-10, atol=1e-12)
    assert not np.allclose(curves[:, 0], curves[:, 1])  # the ratio changed training
    opt8 = ws.find_optimum(chunk, ratio=8.0)
    assert opt8.ratio == 8.0 and opt8.loss == pytest.approx(np.nanmean(chunk.losses(ratio=8.0), 0).min())


def test_losses_at_an_earlier_budget_equal_a_shorter_run():
    cfg = tiny(widths=(16,), steps=12, eval_steps=(5, 8), seeds=(0,))
    short = tiny(widths=(16,), steps=8, seeds=(0,))
    long_run = ws.run_width_study(cfg, None, progress=False).chunk(16, "init_a")
    short_run = ws.run_width_study(short, None, progress=False).chunk(16, "init_a")
    np.testing.assert_allclose(long_run.losses(budget=8), short_run.losses(), rtol=1e-12)
    np.testing.assert_allclose(long_run.losses("test", budget=8), short_run.losses("test"), rtol=1e-12)
    assert ws.find_optimum(long_run, budget=8).lr_grid == ws.find_optimum(short_run).lr_grid
    with pytest.raises(KeyError, match="budget"):
        long_run.losses(budget=7)
    with pytest.raises(ValueError, match="eval_steps"):
        tiny(steps=12, eval_steps=(12,))


def test_calibration_reads_edge_optimum_and_best_ratio_from_a_known_grid():
    from widelora.experiments import ratio_calibration as rc

    lrs, ratios = [2.0**k for k in range(-8, 0)], [1.0, 2.0, 4.0, 8.0]
    log_lr = np.log2(lrs)[None, :]
    log_r = np.log2(ratios)[:, None]
    # loss is smallest at ratio 4 and lr 2^-6 / ratio^0.5; everything at lr >= 2^-2 diverges
    base = 1.0 + (log_r - 2.0) ** 2 + (log_lr + 6.0 + 0.5 * log_r) ** 2
    loss = np.stack([base * (1 + 0.01 * s) for s in range(3)])
    div = np.where(np.array(lrs)[None, None, :] >= 2.0**-2, 40, -1).repeat(3, 0).repeat(4, 1)
    loss = np.where(div > 0, np.nan, loss)
    grid = rc.LossGrid(64, "init_a", [0, 1, 2], ratios, lrs, 100, loss, div)
    best = rc.best_ratio(grid)
    assert best.ratio_grid == 4.0 and best.lr == 2.0**-7 and best.gain > 1 and not best.at_edge
    assert best.per_seed_ratio == pytest.approx([4.0] * 3)
    e = rc.edge_and_optimum(grid, ratio=1.0)
    assert e.per_seed_edge == [2.0**-3] * 3 and not e.edge_censored
    assert e.optimum_grid == 2.0**-6 and e.factor_log2_mean == pytest.approx(3.0)
    assert rc.stability_edge(np.array([False, False]), [1.0, 2.0]) == (2.0, True)  # never diverged: censored
    assert math.isnan(rc.stability_edge(np.array([True, False]), [1.0, 2.0])[0])
    with pytest.raises(KeyError, match="budget"):
        rc.edge_and_optimum(grid, budget=50)


def test_exponent_sensitivity_reads_every_budget_and_sub_grid(tmp_path):
    from widelora.experiments import exponent_sensitivity as es

    cfg = tiny(widths=(16, 32, 64), lrs=ws.lr_grid(-10, -5, 2), seeds=(0,), steps=10, eval_steps=(5,))
    res = ws.run_width_study(cfg, tmp_path, progress=False)
    rows = es.sensitivity(ws.load_results(tmp_path))
    assert {(r["init"], r["budget"], r["grid"]) for r in rows} == {
        (i, b, g)
        for i in cfg.inits
        for b in (5, 10)
        for g in ("full", "every other point (even)", "every other point (odd)")
    }
    full = next(r for r in rows if (r["init"], r["budget"], r["grid"]) == ("init_a", 10, "full"))
    assert full["optima"] == {o.width: o.lr for o in res.optima if o.init == "init_a"}
    sub = es.sub_grid(res.chunk(16, "init_a"), slice(0, None, 2))
    assert sub.lrs == list(cfg.lrs[::2]) and sub.train_loss.shape == (1, len(cfg.lrs[::2]))
    assert es.verdict(-0.8, -0.9, -0.7, "init_b").startswith("excludes")
    assert es.verdict(-0.95, -1.1, -0.8, "init_b") == "consistent with the prediction"
    assert es.verdict(-0.9, -1.5, -0.3, "init_b").startswith("not determined")

"""Claims ledger: the verdict rules on hand-made cells, and the ledger generated from a tiny toy-trial
store."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from widelora.errors import UserError
from widelora.experiments.setup_comparison import Cell, SetupResult
from widelora.report.claims import evaluate, refresh
from widelora.report.claims_render import write_ledger
from widelora.report.claims_spec import load_ledger
from widelora.report.export import load_export, write_export
from widelora.report.summary import load_results
from widelora.report.verdicts import (
    HOLDS,
    IN_PART,
    NOT_HERE,
    NOT_YET,
    Group,
    Part,
    Settings,
    combine,
    compare,
    exponent_part,
    rule_at_least,
    rule_better_and_faster,
    rule_larger_lr_and_better,
    rule_ordering,
)
from widelora.sweep import ResultStore, parse_spec, run_sweep

S = Settings(z=2.0, min_seeds=3, goal="max")


def cell(lr: float | None, *values: float) -> Cell:
    return Cell(lr, by_seed=dict(enumerate(values)))


def group(name: str, *cells: Cell, half: list[Cell] | None = None) -> Group:
    full = SetupResult(name, {c.lr: c for c in cells})
    half_res = None if half is None else SetupResult(name, {c.lr: c for c in half})
    return Group(name, full, half_res, 60 if half is not None else None, len(cells))


# -- verdict rules -------------------------------------------------------------------------------------------
def test_compare_outcomes_follow_the_stated_rule() -> None:
    """Paired differences (0.10, 0.11, 0.09): mean 0.10, s.e. 0.0058 → far beyond 2 s.e."""
    a, b = cell(1e-3, 0.80, 0.81, 0.79), cell(1e-3, 0.70, 0.70, 0.70)
    assert compare(a, b, S)[0] == "holds"
    assert compare(b, a, S)[0] == "contradicted"
    noisy = cell(1e-3, 0.75, 0.65, 0.72)  # differences 0.05, -0.05, 0.02: within noise
    assert compare(noisy, b, S)[0] == "tie"
    assert compare(noisy, b, S, at_least=True)[0] == "holds"  # "at least as good": a tie holds
    outcome, detail = compare(cell(1e-3, 0.9, 0.9), b, S)  # two seeds: preliminary, not counted
    assert outcome == "missing" and "preliminary" in detail
    assert compare(None, b, S)[0] == "missing"
    lower_is_better = Settings(goal="min")
    assert compare(b, a, lower_is_better)[0] == "holds"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=5),
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=5),
)
def test_compare_is_antisymmetric(xs: list[float], ys: list[float]) -> None:
    """Swapping the sides swaps holds and contradicted and keeps a tie a tie."""
    n = min(len(xs), len(ys))
    a, b = cell(1e-3, *xs[:n]), cell(1e-3, *ys[:n])
    flip = {"holds": "contradicted", "contradicted": "holds", "tie": "tie", "missing": "missing"}
    assert compare(b, a, S)[0] == flip[compare(a, b, S)[0]]


def test_combine_maps_parts_to_verdicts() -> None:
    def parts(*outcomes: str) -> list[Part]:
        return [Part(f"p{i}", o) for i, o in enumerate(outcomes)]

    assert combine(parts("holds", "holds")).verdict == HOLDS
    assert combine(parts("holds", "tie")).verdict == IN_PART
    assert combine(parts("tie", "contradicted")).verdict == NOT_HERE
    assert combine(parts("missing", "missing")).verdict == NOT_YET
    v = combine(parts("holds", "missing", "missing"))
    assert v.verdict == HOLDS and v.text() == "holds (2 of 3 parts not yet measured)"


def test_larger_lr_and_better_reads_each_groups_own_best_cell() -> None:
    a = group("A", cell(1e-3, 0.5, 0.5, 0.5), cell(4e-3, 0.90, 0.91, 0.89), cell(1.6e-2, 0.6, 0.6, 0.6))
    b = group("B", cell(2.5e-4, 0.6, 0.6, 0.6), cell(1e-3, 0.80, 0.80, 0.80), cell(4e-3, 0.7, 0.7, 0.7))
    parts = rule_larger_lr_and_better([a, b], S)
    assert [p.outcome for p in parts] == ["holds", "holds"]
    assert "0.004 vs 0.001" in parts[0].detail
    swapped = rule_larger_lr_and_better([b, a], S)
    assert [p.outcome for p in swapped] == ["contradicted", "contradicted"]
    assert "edge" not in parts[0].detail  # both optima have a grid point on each side
    low = group("L", cell(1e-3, 0.9, 0.9, 0.9), cell(2e-3, 0.5, 0.5, 0.5), cell(4e-3, 0.1, 0.1, 0.1))
    assert rule_larger_lr_and_better([a, low], S)[0].detail.endswith("at the grid's edge: L")


def test_ordering_at_least_and_faster_rules() -> None:
    top = group("one", cell(1e-3, 0.9, 0.91, 0.92))
    mid = group("two", cell(1e-3, 0.8, 0.81, 0.82))
    low = group("three", cell(1e-3, 0.8, 0.815, 0.81))
    assert [p.outcome for p in rule_ordering([top, mid, low], S)] == ["holds", "tie"]
    assert [p.outcome for p in rule_at_least([mid, top, low], S)] == ["contradicted", "holds"]
    fast = group("fast", cell(1e-3, 0.9, 0.9, 0.9), half=[cell(1e-3, 0.85, 0.86, 0.84)])
    slow = group("slow", cell(1e-3, 0.85, 0.85, 0.85))
    assert [p.outcome for p in rule_better_and_faster([fast, slow], S)] == ["holds", "holds"]
    no_half = group("fast", cell(1e-3, 0.9, 0.9, 0.9))
    assert rule_better_and_faster([no_half, slow], S)[1].outcome == "missing"
    with pytest.raises(UserError, match="exactly 2 groups"):
        rule_larger_lr_and_better([top], S)


def test_exponent_part_says_when_the_interval_excludes_the_prediction() -> None:
    fit = {"slope": -0.79, "ci_low": -0.97, "ci_high": -0.60, "n_points": 7}
    excluded = exponent_part("Init[B]", fit, (-1.0, -1.0))
    assert excluded.outcome == "contradicted" and "EXCLUDES" in excluded.detail
    assert exponent_part("Init[B]", {**fit, "ci_low": -1.09}, (-1.0, -1.0)).outcome == "holds"
    wide = exponent_part("Init[B]", {"slope": -0.98, "ci_low": -1.27, "ci_high": -0.69}, (-1.0, -1.0))
    assert wide.outcome == "tie" and "not determined" in wide.detail  # contains -1, but 0.58 wide
    assert exponent_part("Init[A]", fit, (-1.0, -0.5)).outcome == "holds"
    assert (
        exponent_part("Init[A]", {"slope": -0.45, "ci_low": -0.6, "ci_high": -0.3}, (-1.0, -0.5)).outcome
        == "tie"
    )


# -- the ledger from a toy store
# ------------------------------------------------------------------------------
TOY_SPEC = """\
name: toy-claims
trial_fn: toy
metric: test_loss
goal: min
base: {steps: 20, width: 16, rank: 2, eval_every: 10}
axes:
  seed: [0, 1, 2]
  setup:
    - {label: "A", init: init_a}
    - {label: "B", init: init_b}
  lr: [0.003, 0.03, 0.3]
"""


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "results.sqlite"
    with ResultStore(path) as store:
        run_sweep(parse_spec(TOY_SPEC), store, workers=0, threads=1)
    return path


def write_claims(folder: Path, store: Path, extra: str = "") -> Path:
    text = (
        textwrap.dedent(f"""\
        title: Toy ledger
        settings: {{z: 2, min_seeds: 3}}
        sources:
          toy: {{kind: sweep, file: toy.json, store: {store}, command: widelora sweep toy.yaml}}
          later: {{kind: sweep, file: later.json, command: widelora sweep later.yaml}}
        claims:
          - id: a-beats-b
            claim: A beats B
            origin: the toy
            rule: better
            figure: metric_vs_lr
            would_change: nothing
            experiments:
              - {{source: toy, title: toy, groups: [{{setup: A}}, {{setup: B}}]}}
          - id: not-run
            claim: B beats A somewhere else
            rule: better
            experiments:
              - {{source: later, groups: [{{setup: B}}, {{setup: A}}]}}
        """)
        + extra
    )
    path = folder / "claims.yaml"
    path.write_text(text)
    return path


def test_export_round_trips_the_results_a_report_reads(toy_store: Path, tmp_path: Path) -> None:
    res = load_results(toy_store)
    back = load_export(write_export(toy_store, tmp_path / "toy.json"))
    assert [t.id for t in back.trials] == [t.id for t in res.trials]
    assert [t.final for t in back.trials] == [t.final for t in res.trials]
    assert all("cpu_s" in t.final for t in back.trials)  # every trial records its CPU time
    assert (back.metric, back.goal) == ("test_loss", "min")
    some = res.trials[0].id
    assert back.curves[some] == {k: v for k, v in res.curves[some].items() if len(v) <= 20}


def test_ledger_from_a_toy_store(toy_store: Path, tmp_path: Path) -> None:
    """Numbers, verdict and CPU time in the ledger are those computed from the store, nothing else."""
    ledger = load_ledger(write_claims(tmp_path, toy_store))
    assert any("exported" in line for line in refresh(ledger))
    results = evaluate(ledger)
    first, second = results
    res = load_results(toy_store)
    best = {}
    for label in ("A", "B"):
        means = {}
        for lr in (0.003, 0.03, 0.3):
            vals = [
                t.final["test_loss"]
                for t in res.trials
                if t.labels["setup"] == label and t.config["lr"] == lr
            ]
            means[lr] = sum(vals) / 3
        best[label] = min(means.items(), key=lambda kv: kv[1])
    a_cell = first.experiments[0].groups[0].best(first.experiments[0].settings)
    assert (a_cell.lr, a_cell.mean) == pytest.approx(best["A"])
    diffs = []
    for seed in range(3):
        pick = {
            lab: next(
                t.final["test_loss"]
                for t in res.trials
                if t.labels["setup"] == lab and t.config["lr"] == best[lab][0] and t.config["seed"] == seed
            )
            for lab in ("A", "B")
        }
        diffs.append(pick["B"] - pick["A"])  # lower loss is better: positive = A better
    mean = sum(diffs) / 3
    se = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5 / 3**0.5
    expected = "holds" if mean > 2 * se else "contradicted" if mean < -2 * se else "tie"
    assert first.verdict.parts[0].outcome == expected
    assert second.verdict.verdict == NOT_YET  # its source file is not there: never invented
    cpu = sum(t.final["cpu_s"] for t in res.trials)
    assert first.cost.seconds == pytest.approx(cpu) and first.cost.runs == 18 and first.cost.wall_only == 0

    out = tmp_path / "docs" / "claims.md"
    written = write_ledger(
        ledger, results, out, tmp_path / "docs" / "fig", tmp_path / "table.md", "widelora claims"
    )
    text = out.read_text()
    assert f"**{first.verdict.text()}**" in text and "**not yet measured**" in text
    assert "(not there yet)" in text and "widelora sweep later.yaml" in text
    assert f"{first.cost.seconds / 60:.1f} CPU-min (18 trials)" in text
    assert any(p.suffix == ".png" for p in written)
    assert "#claim-a-beats-b" in (tmp_path / "table.md").read_text()


def test_claims_file_mistakes_name_the_key_and_the_choices(toy_store: Path, tmp_path: Path) -> None:
    path = write_claims(tmp_path, toy_store)
    text = path.read_text()
    path.write_text(text.replace("rule: better\n    figure", "rule: best\n    figure", 1))
    with pytest.raises(UserError, match=r"rule: 'best' is not a rule; valid: better, at_least"):
        load_ledger(path)
    path.write_text(text.replace("source: later,", "source: nowhere,"))
    with pytest.raises(UserError, match=r"'nowhere' is not a source; valid: toy, later"):
        load_ledger(path)
    path.write_text(text.replace("{setup: A}, {setup: B}", "{setup: A}, {setup: C}"))
    write_export(toy_store, tmp_path / "toy.json")
    with pytest.raises(UserError, match=r"source 'toy' has no setup 'C'; setups: \['A', 'B'\]"):
        evaluate(load_ledger(path))
    path.write_text(text.replace("title: Toy ledger", "title: Toy ledger\nextra: 1"))
    with pytest.raises(UserError, match="unknown key"):
        load_ledger(path)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a sweep export"):
        load_export(tmp_path / "bad.json")


def test_claims_command_writes_the_ledger_and_reports_mistakes_in_one_line(
    toy_store: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from widelora.cli import app

    claims = write_claims(tmp_path, toy_store)
    out, table = tmp_path / "claims.md", tmp_path / "table.md"
    run = CliRunner().invoke(
        app, ["claims", str(claims), "--out", str(out), "--readme-table", str(table), "--refresh"]
    )
    assert run.exit_code == 0, run.output
    assert "a-beats-b" in run.output and "not yet measured" in run.output and out.exists() and table.exists()
    assert "generated by `widelora claims" in out.read_text()
    claims.write_text(claims.read_text().replace("rule: better\n    figure", "rule: best\n    figure", 1))
    bad = CliRunner().invoke(app, ["claims", str(claims), "--out", str(out)])
    assert bad.exit_code == 2 and "'best' is not a rule" in bad.output and "Traceback" not in bad.output


def test_a_claims_cpu_time_counts_a_shared_group_once(toy_store: Path, tmp_path: Path) -> None:
    extra = textwrap.indent(
        textwrap.dedent("""\
            - id: shared
              claim: A beats B twice
              rule: better
              experiments:
                - {source: toy, groups: [{setup: A}, {setup: B}]}
                - {source: toy, groups: [{setup: A}, {setup: B}]}
            """),
        "  ",
    )
    ledger = load_ledger(write_claims(tmp_path, toy_store, extra))
    write_export(toy_store, tmp_path / "toy.json")
    shared = evaluate(ledger)[2]
    assert [e.cost.runs for e in shared.experiments] == [18, 18]
    assert shared.cost.runs == 18 and shared.cost.seconds == pytest.approx(shared.experiments[0].cost.seconds)


def test_feature_growth_reads_z_a_at_each_widths_optimum() -> None:
    from types import SimpleNamespace

    import numpy as np

    from widelora.report.width_claims import feature_growth_part, features_at_optimum

    def chunk(width: int) -> SimpleNamespace:
        z_a = np.zeros((2, 3, 4))  # (seeds, lrs, trace points); the optimum's column grows like sqrt(width)
        z_a[:, 1, -1] = [np.sqrt(width) * 0.9, np.sqrt(width) * 1.1]
        return SimpleNamespace(lrs=[1e-3, 2e-3, 4e-3], ratio_index=lambda r: 0, z_a=z_a, z_b=z_a * 2)

    widths = [128, 512, 2048]
    optima = [{"width": w, "init": "init_a", "lr_grid": 2e-3, "ratio": 1.0} for w in widths]
    features = features_at_optimum(optima, lambda w, init: chunk(w))["init_a"]
    assert features["widths"] == widths and features["z_a"] == pytest.approx([np.sqrt(w) for w in widths])
    grows = feature_growth_part("Init[A]", features)
    assert grows.outcome == "holds" and "n^+0.50" in grows.detail
    shrinks = feature_growth_part("Init[A]", {**features, "z_a": [1 / z for z in features["z_a"]]})
    assert shrinks.outcome == "contradicted"
    flat = feature_growth_part("Init[A]", {"widths": widths * 2, "z_a": [1.0, 1.1, 0.9, 1.1, 0.9, 1.0]})
    assert flat.outcome == "tie"
    assert feature_growth_part("Init[A]", None).outcome == "missing"


def test_fits_by_budget_reads_each_recorded_budgets_optima() -> None:
    """Losses planted with their minimum at lr = 2^-(log2 n) at step 250 and 2^-(log2 n)/2 at the end: the
    exponents at the two budgets come out -1 and -1/2."""
    import numpy as np

    from widelora.experiments.width_results import ChunkResult
    from widelora.report.width_claims import fits_by_budget

    lrs = [2.0**-k for k in range(2, 16)]
    widths = [2**k for k in (7, 9, 11, 13)]

    def bowl(best: float) -> np.ndarray:  # (seeds, lrs) loss with its minimum at `best`
        x = np.log2(np.array(lrs)) - np.log2(best)
        return np.stack([1.0 + x**2, 1.1 + x**2])

    def chunk(width: int) -> ChunkResult:
        final, early = bowl(width**-0.5), bowl(1.0 / width)
        s, c = final.shape
        return ChunkResult(
            width=width, init="init_b", lrs=lrs, seeds=[0, 1], train_loss=final, test_loss=final,
            diverged_step=np.full((s, c), -1), curve_steps=np.array([1000]), curve=final[:, :, None],
            trace_steps=np.array([0, 1000]), z_a=np.ones((s, c, 2)), z_b=np.ones((s, c, 2)),
            eval_steps=np.array([250]), eval_train_loss=early[:, :, None], eval_test_loss=early[:, :, None],
        )  # fmt: skip

    summary = {"config": {"inits": ["init_b"], "widths": widths, "select_by": "train"}}
    out = fits_by_budget(summary, lambda w, init: chunk(w))
    assert list(out) == ["250"]
    assert out["250"]["fits"]["init_b"]["slope"] == pytest.approx(-1.0, abs=1e-6)
    assert [o["lr_grid"] for o in out["250"]["optima"]] == [1.0 / w for w in widths]


def test_delta_split_rule_and_a_claim_mixing_rules(toy_store: Path, tmp_path: Path) -> None:
    from widelora.report.width_claims import delta_split_parts

    widths = [128, 512, 2048, 8192]
    rows = [
        {"init": "init_b", "width": w, "seed": s, "delta2_share": 0.1 * (128 / w) ** 0.5}
        for w in widths
        for s in (0, 1)
    ]
    rows += [{"init": "init_a", "width": w, "seed": 0, "delta2_share": 0.5} for w in widths]
    assert [p.outcome for p in delta_split_parts(rows)] == ["holds", "holds"]
    flipped = [{**r, "delta2_share": 0.9} if r["init"] == "init_b" and r["width"] == 128 else r for r in rows]
    assert delta_split_parts(flipped)[1].outcome == "tie"  # above Init[A] at one width of four
    assert [p.outcome for p in delta_split_parts(None)] == ["missing", "missing"]

    (tmp_path / "delta.json").write_text(json.dumps({"rows": rows, "cpu_seconds": 12.0}))
    extra = textwrap.indent(
        textwrap.dedent("""\
            - id: mixed
              claim: A beats B, and B is undertrained
              rule: better
              experiments:
                - {source: toy, groups: [{setup: A}, {setup: B}]}
                - {source: delta, rule: width_delta_split}
            """),
        "  ",
    )
    claims = write_claims(tmp_path, toy_store, extra)
    claims.write_text(
        claims.read_text().replace("sources:\n", "sources:\n  delta: {kind: delta, file: delta.json}\n")
    )
    write_export(toy_store, tmp_path / "toy.json")
    mixed = evaluate(load_ledger(claims))[2]
    assert [p.outcome for p in mixed.verdict.parts][1:] == ["holds", "holds"]
    assert (
        mixed.experiments[1].cost.seconds == 12.0 and "δ2 share by width" in mixed.experiments[1].measured[0]
    )


def test_cpu_time_of_trials_recorded_before_cpu_s_is_estimated_from_their_protocol() -> None:
    from widelora.report.claims_cost import trial_cost, typical_cpu
    from widelora.sweep.store import TrialRecord

    def trial(i: int, cpu: float | None, steps: int = 120, wall: float = 100.0) -> TrialRecord:
        final = {"accuracy": 0.5} | ({} if cpu is None else {"cpu_s": cpu})
        config = {"model": "m", "steps": steps, "seed": i}
        return TrialRecord(str(i), i, config, {}, "done", None, 1, None, None, 0.0, wall, final)

    measured = [trial(0, 40.0), trial(1, 50.0), trial(2, 60.0)]
    old = [trial(3, None), trial(4, None, steps=999, wall=70.0)]
    typical = typical_cpu(measured + old)
    cost = trial_cost(measured + old, typical)
    assert cost.seconds == pytest.approx(
        150.0 + 50.0 + 70.0
    )  # median 50 for the same protocol; wall otherwise
    assert (cost.runs, cost.estimated, cost.wall_only) == (5, 1, 1)
    assert (
        cost.text().startswith("≈ 4.5 CPU-min (5 trials; 1 estimated")
        and "1 timed by wall clock" in cost.text()
    )


def test_a_part_stays_preliminary_while_a_groups_grid_is_unfinished() -> None:
    """Three seeds at the current best cell are not enough while other learning rates may still win."""
    a = group("A", cell(1e-3, 0.9, 0.91, 0.92))
    b = group("B", cell(1e-3, 0.5, 0.5, 0.5))
    assert [p.outcome for p in rule_larger_lr_and_better([a, b], S)] == ["tie", "holds"]
    b.complete = False
    parts = rule_larger_lr_and_better([a, b], S)
    assert [p.outcome for p in parts] == ["missing", "missing"]
    assert all("grid is not finished" in p.detail for p in parts)

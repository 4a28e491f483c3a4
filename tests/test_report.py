"""Reports: seed statistics, figures and the self-contained HTML page, on a toy sweep run in-process."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from widelora.errors import FileProblem
from widelora.report import build_report, load_results
from widelora.report.summary import Point, choose_metric, find_store, metric_label
from widelora.sweep import ResultStore, parse_spec, run_sweep

SPEC = textwrap.dedent("""\
    name: toy-report
    trial_fn: toy
    metric: test_loss
    goal: min
    base: {steps: 20, width: 16, eval_every: 5}
    axes:
      init: [init_a, init_b]
      lr: [1e-2, 3e-2, 1e4]
      seed: [0, 1]
    """)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rep") / "results.sqlite"
    with ResultStore(path) as store:
        out = run_sweep(parse_spec(SPEC), store, workers=0, threads=1)
    assert out.counts["done"] == 8 and out.counts["diverged"] == 4
    return path


def test_point_statistics() -> None:
    p = Point(lr=1e-3, values=[1.0, 2.0, 3.0])
    assert p.mean == 2.0 and p.n == 3
    assert p.se == pytest.approx(1.0 / math.sqrt(3))
    assert Point(lr=1.0, values=[5.0]).se == 0.0
    assert math.isnan(Point(lr=1.0, values=[]).mean)


def test_groups_best_and_divergence(store_path: Path) -> None:
    res = load_results(store_path)
    assert (res.metric, res.goal) == ("test_loss", "min")
    groups = res.groups()
    assert [g.label for g in groups] == ["Init[A]", "Init[B]"]
    with ResultStore(store_path) as store:
        trials = store.trials()
    for g in groups:
        assert [p.lr for p in g.points] == [1e-2, 3e-2, 1e4]
        huge = g.points[-1]
        assert huge.n == 0 and huge.diverged == 2  # diverged seeds are counted, never averaged
        best = g.best("min")
        init = "init_a" if g.label == "Init[A]" else "init_b"
        vals = {
            lr: [
                t.final["test_loss"]
                for t in trials
                if t.labels["init"] == init and t.labels["lr"] == lr and t.status == "done"
            ]
            for lr in (1e-2, 3e-2)
        }
        expected = min(vals, key=lambda lr: sum(vals[lr]) / 2)
        assert best.lr == expected and best.mean == pytest.approx(sum(vals[expected]) / 2)
        assert g.best("max").lr != best.lr or vals[1e-2] == vals[3e-2]


def test_report_writes_pngs_and_self_contained_html(store_path: Path, tmp_path: Path) -> None:
    page, figures, res = build_report(store_path, tmp_path / "out")
    assert set(figures) == {"metric_vs_lr", "heatmap", "curves"}
    for path in figures.values():
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 3
    assert not re.search(r'src="(?!data:)', text)  # nothing external: the page is the only file needed
    assert "Best configuration per group" in text and "Init[A]" in text and "diverged" in text
    assert res.name in text and str(len(res.trials)) in text
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temp files


def test_report_cli(store_path: Path, tmp_path: Path) -> None:
    from widelora.cli import app

    result = CliRunner().invoke(app, ["report", str(store_path.parent), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "Init[A]" in result.output and "best lr" in result.output
    assert (tmp_path / "r" / "index.html").is_file()
    bad = CliRunner().invoke(app, ["report", str(store_path), "--metric", "bleu"])
    assert bad.exit_code == 2 and "'bleu' is not among the final metrics" in bad.output


def test_inputs_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        find_store(tmp_path / "missing")
    with pytest.raises(FileProblem, match=rf"{tmp_path}: holds no \*.sqlite sweep store"):
        find_store(tmp_path)
    with ResultStore(tmp_path / "empty.sqlite"):
        pass
    with pytest.raises(ValueError, match="holds no trials"):
        load_results(tmp_path / "empty.sqlite")


def test_metric_choice_and_labels() -> None:
    class T:
        def __init__(self, final: dict) -> None:
            self.final = final

    assert choose_metric([T({"train_loss": 1.0, "accuracy": 0.5})], None) == ("accuracy", "max")
    assert choose_metric([T({"perplexity": 9.0, "eval_loss": 2.0})], None) == ("perplexity", "min")
    assert metric_label("accuracy") == "accuracy (%)"


def test_mean_se_says_single_seed_instead_of_a_zero_error():
    from widelora.report.html import mean_se

    assert mean_se(0.656, 0.0, 1, ".3f") == "0.656 (1 seed)"
    assert mean_se(0.744, 0.014, 2, ".3f", ".3f") == "0.744 ± 0.014"


# -- an edited spec, a sweep without lr, divergence marked ---------------------------------------------------
def _toy(axes: str, base: str, name: str = "toy-edit") -> str:
    return textwrap.dedent(f"""\
        name: {name}
        trial_fn: toy
        metric: test_loss
        goal: min
        base: {base}
        axes:
        """) + textwrap.indent(textwrap.dedent(axes), "  ")


def test_edited_base_is_not_averaged_with_old_trials(tmp_path: Path) -> None:
    """Rerunning into the same store after editing `base`: the old trials are not seeds of the new ones."""
    axes = "init: [init_a]\nlr: [1e-2]\nseed: [0, 1]\n"
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as store:
        run_sweep(parse_spec(_toy(axes, "{steps: 20, width: 16}")), store, workers=0, threads=1)
        run_sweep(parse_spec(_toy(axes, "{steps: 3, width: 16}")), store, workers=0, threads=1)
        new = {t.id: t for t in store.trials() if t.config["steps"] == 3}
    assert len(new) == 2
    res = load_results(path)
    (group,) = res.groups()
    (point,) = group.points
    assert point.n == 2 and point.mean == pytest.approx(sum(t.final["test_loss"] for t in new.values()) / 2)
    assert any("earlier version of the spec" in n for n in res.notes)
    everything = load_results(path, all_trials=True)  # kept apart even when shown together
    assert sorted(len(g.points[0].values) for g in everything.groups()) == [2, 2]
    assert sorted(g.label for g in everything.groups()) == ["all trials [steps=20]", "all trials [steps=3]"]
    result = CliRunner().invoke(
        __import__("widelora.cli", fromlist=["app"]).app, ["report", str(path), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    assert "note: 2 trial(s) in the store belong to an earlier version" in result.output
    assert "(2 seed(s))" in result.output


def test_sweep_without_lr_axis_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as store:
        run_sweep(
            parse_spec(
                _toy(
                    "init: [init_a, init_b]\nseed: [0, 1]\n",
                    "{steps: 10, width: 16, eval_every: 2}",
                    name="no-lr",
                )
            ),
            store,
            workers=0,
            threads=1,
        )
    res = load_results(path)
    groups = res.groups()
    assert [g.label for g in groups] == ["Init[A]", "Init[B]"]
    for g in groups:
        best = g.best(res.goal)
        assert best is not None and best.lr is None and best.n == 2 and best.lr_text == "default"
    page, figures, _ = build_report(path, tmp_path / "out")
    assert set(figures) == {"metric_by_group", "heatmap", "curves"}
    assert "no finished trial" not in page.read_text()
    from widelora.cli import app

    result = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "no finished trial" not in result.output and "best lr default" in result.output


def test_partly_diverged_points_are_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell where one seed diverged: its mean uses the finished seed only, and every output says so."""
    from widelora.report import figures as figs

    path = tmp_path / "s.sqlite"
    with ResultStore(path) as store:
        run_sweep(
            parse_spec(_toy("lr: [1e-2, 2e-2]\nseed: [0, 1]\n", "{steps: 10, width: 16}", name="div")),
            store,
            workers=0,
            threads=1,
        )
        victim = next(t for t in store.trials() if t.config["lr"] == 2e-2 and t.config["seed"] == 1)
        store._conn.execute("UPDATE trials SET status = 'diverged' WHERE id = ?", (victim.id,))
    res = load_results(path)
    (group,) = res.groups()
    point = next(p for p in group.points if p.lr == 2e-2)
    assert point.n == 1 and point.diverged == 1 and group.diverged == 1
    assert any("1 trial(s) diverged" in n for n in res.notes)
    rings: list[str] = []
    real_plot = figs.plt.Axes.plot

    def spy(self, *args, **kwargs):
        if kwargs.get("label"):
            rings.append(kwargs["label"])
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(figs.plt.Axes, "plot", spy)
    page, _figures, _ = build_report(path, tmp_path / "out")
    assert "some seeds diverged (ringed)" in rings
    text = page.read_text()
    assert '<span class="st-diverged">1</span>' in text and "1 trial(s) diverged" in text
    from widelora.cli import app

    result = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r")])
    assert "1 diverged" in result.output

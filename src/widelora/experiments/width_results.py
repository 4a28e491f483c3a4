"""What the width study produces, how it is stored and resumed, and how optima and exponents are read from it.

A chunk is everything one (width, init) pass trained: arrays indexed ``[seed, config]``, where the
configuration axis is the (ratio, lr) grid flattened ratio-major (``config = ratio_index · len(lrs) +
lr_index``), so a study with one ratio has arrays ``[seed, lr]``. Each chunk is written atomically as
``chunks/w<n>_<init>.json`` with the fingerprint of the config that made it: an interrupted run resumes by
loading the finished chunks of the same configuration and retraining the rest.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from widelora.errors import FileProblem
from widelora.experiments.width_config import WidthStudyConfig
from widelora.files import atomic_write_text
from widelora.theory import SlopeFit, exponent_table, fit_loglog_slope

_FLOAT_ARRAYS = ("train_loss", "test_loss", "curve", "z_a", "z_b", "eval_train_loss", "eval_test_loss")
_INT_ARRAYS = ("diverged_step", "curve_steps", "trace_steps", "eval_steps")


@dataclass
class ChunkResult:
    """All seeds × (ratio, lr) configurations of one (width, init); arrays are [seed, config] (, point)."""

    width: int
    init: str
    lrs: list[float]
    seeds: list[int]
    train_loss: np.ndarray  # final loss on the full train set, nan if diverged
    test_loss: np.ndarray
    diverged_step: np.ndarray  # -1 if never diverged
    curve_steps: np.ndarray  # (P,) last step of each window
    curve: np.ndarray  # (S, C, P) mean batch loss per window
    trace_steps: np.ndarray  # (R,) steps at which traces were taken (0 = before training)
    z_a: np.ndarray  # (S, C, R) mean over train set of ||A x||
    z_b: np.ndarray  # (S, C, R) mean over train set of ||s B A x||
    seconds: float = 0.0
    fingerprint: dict = field(default_factory=dict)
    ratios: list[float] = field(default_factory=lambda: [1.0])
    eval_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # (E,) earlier budgets
    eval_train_loss: np.ndarray | None = (
        None  # (S, C, E) full train loss at each earlier budget, nan if diverged
    )
    eval_test_loss: np.ndarray | None = None

    def ratio_index(self, ratio: float) -> int:
        try:
            return self.ratios.index(float(ratio))
        except ValueError:
            raise KeyError(f"ratio: {ratio!r} is not in this chunk; its ratios are {self.ratios}") from None

    def grid(self, values: np.ndarray) -> np.ndarray:
        """``[seed, config, ...]`` → ``[seed, ratio, lr, ...]``."""
        return values.reshape(values.shape[0], len(self.ratios), len(self.lrs), *values.shape[2:])

    def losses(
        self, select_by: str = "train", ratio: float | None = None, budget: int | None = None
    ) -> np.ndarray:
        """[seed, lr] final (or at step ``budget``) losses of one ratio (the only one when None)."""
        ri = 0 if ratio is None else self.ratio_index(ratio)
        if budget is None or budget == self.curve_steps[-1]:
            values = self.train_loss if select_by == "train" else self.test_loss
        else:
            if budget not in set(self.eval_steps.tolist()):
                raise KeyError(
                    f"budget: {budget} was not recorded; eval_steps are {self.eval_steps.tolist()}"
                )
            arr = self.eval_train_loss if select_by == "train" else self.eval_test_loss
            values = arr[:, :, list(self.eval_steps).index(budget)]
        return self.grid(values)[:, ri]

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = nan_to_none(v.tolist()) if isinstance(v, np.ndarray) else v
        return out

    @classmethod
    def from_json(cls, d: dict) -> ChunkResult:
        kw = dict(d)
        for k in _FLOAT_ARRAYS:
            if d.get(k) is not None:
                kw[k] = np.array(none_to_nan(d[k]), dtype=float)
        for k in _INT_ARRAYS:
            if k in d:
                kw[k] = np.array(d[k], dtype=int)
        return cls(**kw)


def nan_to_none(v: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(v, dict):
        return {k: nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [nan_to_none(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def none_to_nan(v: Any) -> Any:
    if isinstance(v, list):
        return [none_to_nan(x) for x in v]
    return math.nan if v is None else v


def chunk_path(out_dir: Path, width: int, init: str) -> Path:
    return Path(out_dir) / "chunks" / f"w{width}_{init}.json"


def load_chunk(path: Path, config: WidthStudyConfig) -> ChunkResult | None:
    """A finished chunk written by the same configuration, or None (missing, unreadable or stale)."""
    try:
        chunk = ChunkResult.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return chunk if chunk.fingerprint == config.fingerprint() else None


@dataclass
class Optimum:
    """The optimal learning rate of one (width, init, ratio), read from the seed-mean final loss."""

    width: int
    init: str
    lr_grid: float  # the best grid point
    lr: float  # refined: vertex of a parabola through log-loss at the best point and its neighbours
    loss: float
    at_edge: bool  # best point is the first or last of the grid: the true optimum may lie outside it
    per_seed: list[float]  # best grid point of each seed
    ratio: float = 1.0


def refine_vertex(log_x: np.ndarray, log_y: np.ndarray, i: int) -> float:
    """Vertex of the parabola through (i-1, i, i+1) in log–log; the grid point if not interior or convex."""
    if i == 0 or i == len(log_x) - 1 or not np.isfinite(log_y[i - 1 : i + 2]).all():
        return float(log_x[i])
    x, y = log_x[i - 1 : i + 2], log_y[i - 1 : i + 2]
    a, b_, _ = np.polyfit(x, y, 2)
    if a <= 0:
        return float(log_x[i])
    return float(np.clip(-b_ / (2 * a), x[0], x[2]))


def find_optimum(
    chunk: ChunkResult, select_by: str = "train", ratio: float | None = None, budget: int | None = None
) -> Optimum:
    """Optimal LR of one ratio: argmin of the seed-mean loss (a seed that diverged makes that LR infinite)."""
    loss = chunk.losses(select_by, ratio, budget)
    loss = np.where(np.isfinite(loss), loss, np.inf)
    mean = loss.mean(axis=0)
    lrs = np.asarray(chunk.lrs)
    r = chunk.ratios[0] if ratio is None else float(ratio)
    if not np.isfinite(mean).any():
        return Optimum(
            chunk.width, chunk.init, math.nan, math.nan, math.nan, True, [math.nan] * loss.shape[0], r
        )
    i = int(np.argmin(mean))
    log_lr = refine_vertex(np.log(lrs), np.log(mean), i)
    per_seed = [float(lrs[int(np.argmin(row))]) if np.isfinite(row).any() else math.nan for row in loss]
    return Optimum(
        chunk.width,
        chunk.init,
        float(lrs[i]),
        float(math.exp(log_lr)),
        float(mean[i]),
        i in (0, len(lrs) - 1),
        per_seed,
        r,
    )


def fit_key(init: str, ratio: float, single_ratio: bool) -> str:
    """Name of one slope fit: the init alone in a one-ratio study, else ``init@ratio<r>``."""
    return init if single_ratio else f"{init}@ratio{ratio:g}"


def fit_optima(optima: Sequence[Optimum], confidence: float = 0.95) -> dict[str, SlopeFit]:
    """Log–log slope of the optimal LR vs width per (init, ratio), with a t-interval (needs >= 3 widths)."""
    single = len({o.ratio for o in optima}) <= 1
    fits = {}
    for init, ratio in dict.fromkeys((o.init, o.ratio) for o in optima):
        pts = [(o.width, o.lr) for o in optima if (o.init, o.ratio) == (init, ratio) and math.isfinite(o.lr)]
        if len({w for w, _ in pts}) >= 3:
            fits[fit_key(init, ratio, single)] = fit_loglog_slope(
                [w for w, _ in pts], [v for _, v in pts], confidence=confidence
            )
    return fits


def study_optima(config: WidthStudyConfig, chunks: dict[tuple[int, str], ChunkResult]) -> list[Optimum]:
    return [
        find_optimum(chunks[(w, i)], config.select_by, ratio)
        for i in config.inits
        for ratio in config.ratios
        for w in config.widths
    ]


@dataclass
class WidthStudyResult:
    """Everything the study produced; ``out_dir`` holds the same as files."""

    config: WidthStudyConfig
    chunks: dict[tuple[int, str], ChunkResult]
    optima: list[Optimum]
    fits: dict[str, SlopeFit]  # fit_key -> slope of the refined optima over widths
    seconds: float  # wall time of this call
    out_dir: Path | None = None
    figures: list[Path] = field(default_factory=list)  # filled by whoever draws them (the command)
    loaded: int = 0  # chunks taken from a previous run (resume)

    @property
    def compute_seconds(self) -> float:
        """Sum of the chunks' training times (over workers, so it can exceed the wall time)."""
        return float(sum(c.seconds for c in self.chunks.values()))

    def chunk(self, width: int, init: str) -> ChunkResult:
        return self.chunks[(width, init)]

    def rows(self) -> list[dict]:
        """One row per (width, init, seed, lr) — and ratio when the study varies it: losses and divergence."""
        multi = len(self.config.ratios) > 1
        rows = []
        for (width, init), c in sorted(self.chunks.items()):
            for si, seed in enumerate(c.seeds):
                for ci in range(len(c.ratios) * len(c.lrs)):
                    ratio, lr = c.ratios[ci // len(c.lrs)], c.lrs[ci % len(c.lrs)]
                    row = {"width": width, "init": init, "seed": seed, "lr": lr}
                    row |= {"ratio": ratio} if multi else {}
                    rows.append(
                        row
                        | {
                            "train_loss": float(c.train_loss[si, ci]),
                            "test_loss": float(c.test_loss[si, ci]),
                            "diverged_step": int(c.diverged_step[si, ci]),
                        }
                    )
        return rows

    def exponent_rows(self) -> list[dict]:
        return exponent_table(self.fits)


def write_results(result: WidthStudyResult, out: Path) -> None:
    """results.csv (every run), optima.csv, summary.json (config, optima, fits, timing)."""
    atomic_write_text(out / "results.csv", _csv(result.rows()))
    atomic_write_text(
        out / "optima.csv", _csv([asdict(o) | {"per_seed": json.dumps(o.per_seed)} for o in result.optima])
    )
    summary = {
        "config": result.config.to_dict(),
        "seconds": result.seconds,
        "compute_seconds": result.compute_seconds,
        "chunks_loaded": result.loaded,
        "chunk_seconds": {f"w{w}_{i}": c.seconds for (w, i), c in sorted(result.chunks.items())},
        "optima": [asdict(o) for o in result.optima],
        "fits": {k: v.as_dict() for k, v in result.fits.items()},
        "exponents": result.exponent_rows(),
    }
    text = json.dumps(nan_to_none(json.loads(json.dumps(summary, default=str))), indent=2)
    atomic_write_text(out / "summary.json", text)


def load_results(out_dir: str | os.PathLike) -> WidthStudyResult:
    """A finished study read back from its folder (config.json + chunks), to re-plot or compare studies."""
    out = Path(out_dir)
    try:
        config = WidthStudyConfig.from_dict(json.loads((out / "config.json").read_text()))
    except FileNotFoundError:
        raise FileProblem(
            out,
            "no config.json (out_dir is not a width-study folder)",
            "pass the folder given to `widelora width-study --out`",
        ) from None
    except json.JSONDecodeError as exc:
        raise FileProblem(out / "config.json", f"not valid JSON ({exc})") from None
    chunks = {}
    for w in config.widths:
        for i in config.inits:
            chunk = load_chunk(chunk_path(out, w, i), config)
            if chunk is None:
                raise FileProblem(
                    chunk_path(out, w, i),
                    "missing or from another configuration (out_dir)",
                    "run the study again on this folder to finish it",
                )
            chunks[(w, i)] = chunk
    optima = study_optima(config, chunks)
    return WidthStudyResult(config, chunks, optima, fit_optima(optima), 0.0, out, loaded=len(chunks))


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()

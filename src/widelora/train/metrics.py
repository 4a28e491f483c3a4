"""A run's record: `metrics.jsonl` (one row per line, appended and flushed), `metrics.csv` (rewritten at the
end) and `monitor.jsonl` (per-layer monitor records); only the main process writes them.

Rows have a "kind": train / eval / monitor / status. On resume, rows past the checkpoint are dropped; a torn
last line (a crash or a full disk mid-write) is dropped with a warning instead of blocking the resume forever.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from widelora.errors import FileProblem
from widelora.files import atomic_write_text


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line is dropped (with a warning), a bad middle line is a
    FileProblem naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise TypeError("not a row with an integer 'step'")
        except (ValueError, TypeError) as exc:
            if number == len(lines):
                print(f"widelora: warning: {path}: dropped a torn last line ({line[:40]!r})", file=sys.stderr)
                break
            raise FileProblem(
                path, f"line {number} is not a metrics row ({exc})", "repair or delete the line"
            ) from exc
        rows.append(row)
    return rows


class MetricsLog:
    """metrics.jsonl + metrics.csv + monitor.jsonl of one run (a no-op on processes that do not write)."""

    def __init__(self, run_dir: Path, enabled: bool, keep_until: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.monitor_path = run_dir / "monitor.jsonl"
        self.enabled = enabled
        self.rows: list[dict] = []
        if not enabled:
            return
        if keep_until is None:  # a fresh run
            atomic_write_text(self.path, "")
            self.monitor_path.unlink(missing_ok=True)
            return
        for path, rows in (
            (self.path, self.rows),
            (self.monitor_path, []),
        ):  # resume: drop rows past the checkpoint
            if path.is_file():
                rows.extend(r for r in read_rows(path) if r["step"] <= keep_until)
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._append(self.path, [row])

    def write_monitor(self, records: list[dict]) -> None:
        self._append(self.monitor_path, records)

    def _append(self, path: Path, rows: list[dict]) -> None:
        if self.enabled:
            with open(path, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)

    def write_csv(self) -> None:
        if not self.enabled or not self.rows:
            return
        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        lines = [",".join(keys)] + [
            ",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in self.rows
        ]
        atomic_write_text(self.path.with_suffix(".csv"), "\n".join(lines) + "\n")


def monitor_row(records: list) -> dict[str, float]:
    """Layer-averaged monitor statistics of one recorded step (per-layer rows go to monitor.jsonl)."""

    def mean(key: str) -> float | None:
        vals = [getattr(r, key) for r in records if getattr(r, key) is not None]
        return sum(vals) / len(vals) if vals else None

    row = {k: mean(k) for k in ("z_a", "z_b", "delta1", "delta2", "delta3")}
    row["z_a_max"] = max(r.z_a for r in records)
    row["z_b_max"] = max(r.z_b for r in records)
    row["z_a_ratio"] = sum(r.z_a_ratio for r in records) / len(records)
    if row["delta1"] is not None and row["delta2"] is not None and row["delta1"] + row["delta2"] > 0:
        row["delta2_share"] = row["delta2"] / (row["delta1"] + row["delta2"])
    return row


def monitor_stats(monitor: Any, records: list) -> dict[str, float]:
    """`monitor_row` plus the instability flags summarized across layers: how many layers the monitor flags
    for internal instability (|Z_A| growing while |Z_B| stays bounded) and for output instability (|Z_B| large
    or non-finite), judged on every record so far."""
    row = monitor_row(records)
    summary = monitor.summary()
    row["internal_instability_layers"] = sum(bool(s["internal_instability"]) for s in summary.values())
    row["output_instability_layers"] = sum(bool(s["output_instability"]) for s in summary.values())
    return row


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of every parameter group, as `lr/<group name>` (LoRA+: lr/A and lr/B; a
    classification head: lr/head); unnamed or repeated names get their group index."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        if not group["params"]:
            continue
        name = str(group.get("name") or i)
        key = f"lr/{name}" if f"lr/{name}" not in out else f"lr/{name}.{i}"
        out[key] = float(group["lr"])
    return out

"""Experiment trackers for widelora's own loop (`report_to`): every logged row also goes to TensorBoard.

Why: users compare runs in the tracker they already use; the run folder's metrics.jsonl stays the record of
truth, a tracker gets a copy. Scalars are named by the row's kind: `train/loss`, `train/lr`, `lr/A`, `lr/B`
(every parameter group), `eval/<split>/<metric>`, `monitor/z_a`, `monitor/delta2_share`,
`monitor/internal_instability_layers`, ... Text and missing values are skipped. A new tracker is one class in
`TRACKERS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from widelora.errors import UserError

#: Sub-folder of the run folder that holds the TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None:
        """Record one metrics row (it has "step" and "kind")."""

    def close(self) -> None:
        """Flush and release files."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a row (NaN and inf included: a diverging loss should show), named for a tracker:
    `<kind>/<key>`, `eval/<split>/<key>`; group learning rates keep their `lr/<group>` name."""
    kind = row.get("kind", "train")
    prefix = f"eval/{row.get('split', 'val')}" if kind == "eval" else kind
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in ("step", "kind", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key if key.startswith("lr/") else f"{prefix}/{key}"] = float(value)
    return out


class NoTracker:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files under `run_dir/tensorboard/`; a resumed run purges the events past its checkpoint."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "report_to='tensorboard' needs the tensorboard package: pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(
            str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
        )

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])

    def close(self) -> None:
        self.writer.close()


TRACKERS = {"none": lambda run_dir, start_step: NoTracker(), "tensorboard": TensorBoardTracker}


def open_tracker(name: str, run_dir: Path, start_step: int, enabled: bool) -> Tracker:
    """The tracker `report_to` names (a no-op on processes that do not write)."""
    if name not in TRACKERS:
        raise UserError(f"report_to={name!r} is not valid; valid: {list(TRACKERS)}")
    return TRACKERS[name](run_dir, start_step) if enabled else NoTracker()

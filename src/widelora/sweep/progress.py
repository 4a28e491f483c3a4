"""The sweep's progress display: one tqdm bar over the grid, and one log line per finished trial."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from widelora.sweep.store import TrialRecord

#: ``progress(event, record, finished, total)``; event is "running" or the trial's final status.
ProgressFn = Callable[[str, TrialRecord, int, int], None]


class TrialProgress:
    """A ProgressFn: the bar counts finished trials of the grid (by any driver); finished trials get a line
    with the headline ``metric`` first, so a log of the sweep reads on its own."""

    def __init__(self, metric: str | None = None, file: Any = None, disable: bool | None = None) -> None:
        self.metric = metric
        self._file = file
        self._disable = disable
        self._bar: tqdm | None = None

    def __call__(self, event: str, rec: TrialRecord, finished: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                initial=finished,
                unit="trial",
                desc="sweep",
                file=self._file,
                disable=self._disable,
                dynamic_ncols=True,
            )
        labels = " ".join(f"{k}={v}" for k, v in rec.labels.items())
        if event == "running":
            self._bar.set_postfix_str(f"started {labels}", refresh=False)
        else:
            keys = sorted(rec.final, key=lambda k: k != self.metric)[:4]
            metrics = "  ".join(f"{k}={rec.final[k]:.4g}" for k in keys)
            secs = f"  ({rec.seconds:.1f} s)" if rec.seconds is not None else ""
            err = f"  error: {rec.error.splitlines()[0]}" if rec.error else ""
            self._bar.write(f"{event:<8} {rec.id}  {labels}  {metrics}{secs}{err}", file=self._file)
        self._bar.n = finished
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

"""Sweeps: YAML grid specs → trials with stable ids, a crash-safe SQLite store shared safely by several
drivers, and local, in-process and Ray executors behind one bookkeeping path."""

from widelora.sweep.executors import execute_trial, normalize_result
from widelora.sweep.grid import Trial, expand, trial_id
from widelora.sweep.progress import TrialProgress
from widelora.sweep.registry import get_trial, register_trial, trial_names, unregister_trial
from widelora.sweep.runners import SweepOutcome, run_sweep
from widelora.sweep.spec import SpecError, SweepSpec, load_spec, parse_spec
from widelora.sweep.store import ResultStore, TrialRecord

__all__ = [
    "ResultStore",
    "SpecError",
    "SweepOutcome",
    "SweepSpec",
    "Trial",
    "TrialProgress",
    "TrialRecord",
    "execute_trial",
    "expand",
    "get_trial",
    "load_spec",
    "normalize_result",
    "parse_spec",
    "register_trial",
    "run_sweep",
    "trial_id",
    "trial_names",
    "unregister_trial",
]

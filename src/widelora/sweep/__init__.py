"""Sweeps: YAML grid specs → trials with stable ids, a crash-safe SQLite store, local and Ray runners."""

from widelora.sweep.runners import SweepOutcome, execute_trial, resolve_trial_fn, run_sweep
from widelora.sweep.spec import SpecError, SweepSpec, Trial, load_spec, parse_spec, trial_id
from widelora.sweep.store import ResultStore, TrialRecord

__all__ = [
    "ResultStore", "SpecError", "SweepOutcome", "SweepSpec", "Trial", "TrialRecord", "execute_trial",
    "load_spec", "parse_spec", "resolve_trial_fn", "run_sweep", "trial_id",
]

"""Shared test setup: offline, deterministic and single-threaded. Test doubles live in widelora.testing."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_kept_models(monkeypatch):
    """Each test starts with an empty process-wide start-up cache (`run_trial` keeps models between trials; a
    model one test loaded, or hooked through a monkeypatched loader, must not reach another test)."""
    monkeypatch.setattr("widelora.train.cache._SHARED", None)

"""Every bad input to the core raises an error that names the problem, and the model is left untouched."""

from __future__ import annotations

import pytest
import torch

import widelora as wl
from widelora.methods.init import unregister_init
from widelora.testing.models import TinyMLP, tiny_llama


@pytest.fixture
def scratch_schemes():
    """Register test-only schemes through this fixture: they are unregistered when the test ends."""
    names: list[str] = []

    def register(name: str, **kwargs):
        names.append(name)
        return wl.register_init(name, **kwargs)

    yield register
    for name in names:
        unregister_init(name)
    assert not set(names) & set(wl.available_schemes())


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _untouched(model, snap):
    modules, state, grads = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"targets": ["q_proj"], "rank": 0}, r"rank=0 .*positive integer"),
        ({"targets": ["q_proj"], "rank": -3}, r"rank=-3"),
        ({"targets": ["q_proj"], "rank": 2.5}, r"rank=2.5"),
        ({"targets": ["q_proj"], "rank": 33}, r"rank=33 exceeds min\(out, in\)"),
        ({"targets": ["q_proj"], "alpha": 0}, r"alpha=0 .*positive"),
        ({"targets": ["q_proj"], "alpha": -1.0}, r"alpha=-1.0"),
        ({"targets": ["q_proj"], "alpha": float("inf")}, r"alpha=inf"),
        (
            {"targets": ["q_proj"], "init": "xavier"},
            r"init scheme 'xavier' is unknown; valid schemes: \[.*init_a",
        ),
        ({"targets": ["q_proj"], "scaling": "sqrt"}, r"scaling='sqrt' .*standard.*rslora"),
        ({"targets": ["q_proj"], "dropout": 1.5}, r"dropout=1.5"),
        ({"targets": ["qq_proj"]}, r"match no module; linear module names in this model: \[.*q_proj"),
        ({"targets": ["q_proj", "nope"]}, r"\['nope'\] match no module"),
        ({"targets": r"model\.embed_tokens"}, r"not linear layers"),
        ({"targets": "(unclosed"}, r"not a valid regular expression"),
        ({"targets": []}, r"non-empty list"),
        (
            {"targets": ["q_proj"], "trainable": ["no_such_head"]},
            r"trainable=\['no_such_head'\] match no module",
        ),
    ],
)
def test_attach_rejects_bad_input_without_modifying_the_model(kwargs, pattern):
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises((ValueError, TypeError), match=pattern):
        wl.attach(model, **kwargs)
    _untouched(model, snap)


def test_non_finite_init_is_rejected_and_adapters_are_unchanged(scratch_schemes):
    @scratch_schemes("test_nan_scheme")
    def _nan(pairs, ctx):
        return {
            p.name: wl.InitUpdate(
                A=torch.full((p.rank, p.fan_in), float("nan")), B=torch.zeros(p.fan_out, p.rank)
            )
            for p in pairs
        }

    model = wl.attach(TinyMLP(), ["up", "down"], rank=2, seed=0)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="non-finite values in A"):
        wl.initialize(model, "test_nan_scheme")
    _untouched(model, snap)
    # and attach with such a scheme leaves the original model (no LoRA layers)
    fresh = TinyMLP()
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match="non-finite"):
        wl.attach(fresh, ["up"], rank=2, init="test_nan_scheme")
    _untouched(fresh, snap)


def test_initialize_needs_adapters_and_a_known_scheme():
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        wl.initialize(TinyMLP(), "init_a")
    model = wl.attach(TinyMLP(), ["up"], rank=2)
    with pytest.raises(ValueError, match="valid schemes"):
        wl.initialize(model, "nope")
    with pytest.raises(TypeError, match="seed"):
        wl.initialize(model, "init_a", seed="abc")


def test_data_hungry_scheme_without_data_is_a_clear_error(scratch_schemes):
    @scratch_schemes("test_needs_data", needs_data=True)
    def _needs(pairs, ctx):  # pragma: no cover - never reached
        raise AssertionError

    model = wl.attach(TinyMLP(), ["up"], rank=2)
    with pytest.raises(ValueError, match="needs data"):
        wl.initialize(model, "test_needs_data")
    with pytest.raises(ValueError, match="needs data"):
        wl.attach(TinyMLP(), ["up"], rank=2, init="test_needs_data")


def test_merge_on_a_plain_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no widelora LoRA layers"):
        wl.merge(TinyMLP())

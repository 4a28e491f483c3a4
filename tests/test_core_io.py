"""PEFT-format adapters: widelora -> PEFT, PEFT -> widelora, folded base offsets, and damaged files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import widelora as wl
from widelora.testing.models import tiny_bert_classifier, tiny_gpt2, tiny_llama


def _randomize_b(model: nn.Module, std: float = 0.05) -> None:
    for p in wl.lora_pairs(model):
        nn.init.normal_(p.B, std=std)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_widelora_adapter_loads_in_peft_with_the_same_logits(tmp_path, scaling):
    model = tiny_llama(seed=1)
    base_copy = copy.deepcopy(model)
    wl.attach(model, "all-linear", rank=4, alpha=8, scaling=scaling, seed=0)
    _randomize_b(model)
    x = torch.randint(0, 64, (2, 11))
    ours = model(x).logits
    wl.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(base_copy, tmp_path)
    assert (peft_model(x).logits - ours).abs().max().item() < 1e-5


def test_peft_adapter_loads_in_widelora_with_the_same_logits(tmp_path):
    peft_model = get_peft_model(
        tiny_llama(seed=2), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    _randomize_b(peft_model)
    x = torch.randint(0, 64, (2, 11))
    expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path)
    ours = wl.load_adapter(tiny_llama(seed=2), tmp_path)
    assert len(wl.lora_pairs(ours)) == 6
    assert (ours(x).logits - expected).abs().max().item() < 1e-5


def test_classifier_head_roundtrips_as_modules_to_save(tmp_path):
    model = tiny_bert_classifier(seed=3)
    base_copy = copy.deepcopy(model)
    wl.attach(model, ["query", "value"], rank=4, seed=0, trainable=["classifier"])
    _randomize_b(model)
    nn.init.normal_(model.classifier.weight, std=0.3)
    x = torch.randint(0, 60, (3, 8))
    expected = model(x).logits
    wl.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    assert (
        PeftModel.from_pretrained(copy.deepcopy(base_copy), tmp_path)(x).logits - expected
    ).abs().max() < 1e-5
    assert (wl.load_adapter(base_copy, tmp_path)(x).logits - expected).abs().max() < 1e-5


def test_conv1d_adapter_roundtrips_through_peft(tmp_path):
    model = tiny_gpt2()
    base_copy = copy.deepcopy(model)
    wl.attach(model, ["c_attn"], rank=4, seed=0)
    _randomize_b(model)
    x = torch.randint(0, 64, (2, 7))
    expected = model(x).logits
    wl.save_adapter(model, tmp_path)
    assert (PeftModel.from_pretrained(base_copy, tmp_path)(x).logits - expected).abs().max() < 1e-5


def test_pissa_adapter_is_folded_into_a_portable_rank_2r_adapter(tmp_path):
    model = tiny_llama(seed=4)
    base_copy = copy.deepcopy(model)
    wl.attach(model, ["q_proj", "o_proj"], rank=4, alpha=8, init="pissa")
    with torch.no_grad():  # stand-in for training: move both factors
        for p in wl.lora_pairs(model):
            p.A.add_(0.05 * torch.randn_like(p.A))
            p.B.add_(0.05 * torch.randn_like(p.B))
    x = torch.randint(0, 64, (2, 9))
    expected = model(x).logits
    wl.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16  # rank 2r, same scale
    assert (PeftModel.from_pretrained(base_copy, tmp_path)(x).logits - expected).abs().max() < 1e-4


def test_pair_view_sees_peft_models_and_initialize_works_on_them():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pairs = wl.lora_pairs(model)
    assert [p.name for p in pairs] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(p.kind == "peft" and p.scale == 2.0 and p.A.shape == (4, 32) for p in pairs)
    wl.initialize(model, "init_b", seed=0)
    assert all(p.A.abs().max() == 0 and p.B.abs().max() > 0 for p in wl.lora_pairs(model))


def test_no_temporary_files_are_left_and_a_save_overwrites_cleanly(tmp_path):
    model = wl.attach(tiny_llama(), ["q_proj"], rank=2)
    wl.save_adapter(model, tmp_path)
    wl.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(
        p.stat().st_mode & 0o044 == 0o044 for p in tmp_path.iterdir()
    )  # readable by others, unlike mkstemp


def test_truncated_adapter_file_is_a_clear_error_and_the_model_is_untouched(tmp_path):
    wl.save_adapter(wl.attach(tiny_llama(), ["q_proj"], rank=2), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    target = tiny_llama()
    before = _state(target)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        wl.load_adapter(target, tmp_path)
    _assert_same_state(target, before)


def test_corrupt_config_and_missing_files_are_clear_errors(tmp_path):
    wl.save_adapter(wl.attach(tiny_llama(), ["q_proj"], rank=2), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        wl.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        wl.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_adapter_for_a_different_base_model_is_rejected_untouched(tmp_path):
    wl.save_adapter(wl.attach(tiny_llama(), ["q_proj"], rank=2), tmp_path)
    other = tiny_bert_classifier()
    before = _state(other)
    with pytest.raises(ValueError, match="different base model"):
        wl.load_adapter(other, tmp_path)
    _assert_same_state(other, before)
    # same module names, different widths
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    before = _state(wider)
    with pytest.raises(ValueError, match=r"do not fit.*different base model"):
        wl.load_adapter(wider, tmp_path)
    _assert_same_state(wider, before)

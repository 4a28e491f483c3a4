"""Adapters are never silently wrong (issue 10): each case matches PEFT's logits or raises a clear error."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import widelora as wl
from widelora.errors import FileProblem, UserError
from widelora.testing.models import tiny_bert_classifier, tiny_gpt2, tiny_llama

X = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X).logits


def _move(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _peft_adapter(tmp_path, make=tiny_llama, **config):
    model = get_peft_model(make(), LoraConfig(**config))
    _move(model)
    model.save_pretrained(tmp_path)
    return _logits(model)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- 1. loading into a model whose W was moved by a widelora init
@pytest.mark.parametrize("init", ["pissa", "lora_ga"])
def test_load_into_a_model_with_moved_w_restores_w(tmp_path, init):
    expected = _peft_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = wl.attach(tiny_llama(), ["q_proj", "v_proj"], rank=2, alpha=4, seed=0)
    batches = [{"input_ids": X, "labels": X}]
    wl.initialize(model, init, batches=batches, progress=False)
    assert all(p.base_offset is not None for p in wl.lora_pairs(model))
    wl.load_adapter(model, tmp_path)
    assert (_logits(model) - expected).abs().max() <= 1e-5
    assert all(p.base_offset is None for p in wl.lora_pairs(model))


# -- 2. tied output heads
def test_a_tied_head_made_trainable_gets_its_own_copy_and_round_trips(tmp_path):
    model = tiny_gpt2()
    fresh = copy.deepcopy(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match="tied"):
        wl.attach(model, ["c_attn"], rank=4, seed=0, trainable=["lm_head"])
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.requires_grad and not model.transformer.wte.weight.requires_grad
    embeddings = model.transformer.wte.weight.clone()
    opt = wl.create_optimizer(model, lr=1e-2)
    model.train()
    model(X, labels=X).loss.backward()
    opt.step()
    assert torch.equal(model.transformer.wte.weight, embeddings)  # the input embeddings were not trained
    expected = _logits(model)
    wl.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            _logits(PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path)) - expected
        ).abs().max() <= 1e-5
        assert (_logits(wl.load_adapter(copy.deepcopy(fresh), tmp_path)) - expected).abs().max() <= 1e-5


def test_a_w_moving_init_on_a_tied_head_is_refused_and_changes_nothing():
    model = tiny_gpt2()
    embeddings = model.transformer.wte.weight.clone()
    with pytest.raises(UserError, match="tied"):
        wl.attach(model, ["lm_head"], rank=2, init="pissa")
    assert torch.equal(model.transformer.wte.weight, embeddings)
    assert not wl.lora_pairs(model)


# -- 3. PEFT residual inits
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_residual_inits_rebuild_the_base_weight_like_peft(tmp_path, init):
    expected = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init)
    assert (_logits(wl.load_adapter(tiny_llama(), tmp_path)) - expected).abs().max() <= 1e-5


def test_pissa_niter_is_refused_naming_the_key(tmp_path):
    _peft_adapter(tmp_path, r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_2")
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(FileProblem, match=r"adapter_config\.json: init_lora_weights"):
        wl.load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- 4. save_adapter on a PEFT model that PEFT initialized with a residual init
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_adapter_of_a_peft_residual_model_reloads_exactly(tmp_path, init):
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
    )
    _move(model)
    expected = _logits(model)
    wl.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    assert (_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path)) - expected).abs().max() <= 1e-5
    assert (_logits(wl.load_adapter(tiny_llama(), tmp_path)) - expected).abs().max() <= 1e-5


# -- 5. bias modes
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_bias_adapters_load_into_a_fresh_base_and_their_biases_train(tmp_path, bias):
    expected = _peft_adapter(
        tmp_path, tiny_bert_classifier, r=4, target_modules=["query"], bias=bias, task_type="SEQ_CLS"
    )
    model = wl.load_adapter(tiny_bert_classifier(), tmp_path)
    assert (_logits(model) - expected).abs().max() <= 1e-5
    query_bias = model.bert.encoder.layer[0].attention.self.query.base_layer.bias
    key_bias = model.bert.encoder.layer[0].attention.self.key.bias
    assert query_bias.requires_grad and key_bias.requires_grad == (bias == "all")


# -- 6. the file is not trusted
def _rewrite(folder, tensors=None, **config_changes):
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _assert_refused(folder, pattern):
    model = tiny_llama()
    before = _state(model)
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(FileProblem, match=pattern):
        wl.load_adapter(model, folder)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert grads == [p.requires_grad for p in model.parameters()]


def test_a_tensor_outside_the_config_is_refused_and_the_base_is_untouched(tmp_path):
    _peft_adapter(tmp_path, r=2, target_modules=["q_proj"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)
    _rewrite(tmp_path, tensors)
    _assert_refused(
        tmp_path, r"adapter_model\.safetensors: tensor base_model\.model\.model\.layers\.0\.mlp\.up_proj"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapters_are_refused_naming_the_tensor(tmp_path, bad):
    _peft_adapter(tmp_path, r=2, target_modules=["q_proj"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = bad
    _rewrite(tmp_path, tensors)
    _assert_refused(
        tmp_path, rf"adapter_model\.safetensors: {key.replace('.', '[.]')}: holds NaN or infinite"
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"rank_pattern": {"q_proj(": 2}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
        ({"lora_alpha": "sixteen"}, "lora_alpha"),
        ({"r": -1}, "r"),
        ({"bias": "some"}, "bias"),
    ],
)
def test_bad_config_values_name_the_file_and_the_key(tmp_path, change, key):
    _peft_adapter(tmp_path, r=2, target_modules=["q_proj"])
    _rewrite(tmp_path, **change)
    _assert_refused(tmp_path, rf"adapter_config\.json: {key}")


# -- 8. trainability survives later attach / load calls
def test_a_second_attach_keeps_earlier_adapters_and_the_head_trainable():
    model = wl.attach(tiny_bert_classifier(), ["query"], rank=4, seed=0, trainable=["classifier"])
    wl.attach(model, ["value"], rank=2, seed=0)
    assert all(p.A.requires_grad and p.B.requires_grad for p in wl.lora_pairs(model))
    assert model.classifier.weight.requires_grad
    assert not model.bert.encoder.layer[0].attention.self.query.base_layer.weight.requires_grad


def test_a_mixed_rank_peft_adapter_loads_with_every_rank_group_trainable(tmp_path):
    _peft_adapter(
        tmp_path,
        r=4,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "down_proj": 3},
    )
    model = wl.load_adapter(tiny_llama(), tmp_path)
    pairs = wl.lora_pairs(model)
    assert {p.rank for p in pairs} == {2, 3, 4}
    assert all(p.A.requires_grad and p.B.requires_grad for p in pairs)


def test_load_adapter_refuses_a_peft_model():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="PEFT model"):
        wl.load_adapter(model, "anywhere")

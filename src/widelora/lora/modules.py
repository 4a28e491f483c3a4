"""What kind of module is this: the one home for linear-layer detection and output-head names.

Every part of widelora that asks "can this module carry an adapter?", "which way round is its weight stored?"
or "is this the model's output head?" asks here, so attach, placement, gradient estimation and the training
loop cannot disagree.
"""

from __future__ import annotations

from torch import nn

# Language-model output projections (vocabulary-sized). They are often tied to the input embeddings
# (`tie_word_embeddings`), so adapting or training them silently changes the embeddings too; "all-linear" and
# PLoP leave them alone, as PEFT does for `get_output_embeddings()`. "embed_out" is GPT-NeoX's name,
# "output_layer" ChatGLM's.
LM_HEAD_NAMES = ("lm_head", "embed_out", "output_layer")

# Heads that `AutoModelForSequenceClassification` adds, freshly initialized: they must be trained whole
# (PEFT's
# SEQ_CLS_HEAD_NAMES), so a classification run makes them trainable instead of adapting them.
CLASSIFICATION_HEAD_NAMES = ("classifier", "score")

# Other task heads added on top of a backbone: question answering ("qa_outputs"), BERT's pretraining heads
# ("cls"), and the generic "head" of vision-style models. Like the heads above they are excluded from
# "all-linear" and PLoP: they are new or task-specific, not pretrained features worth a low-rank update.
OTHER_HEAD_NAMES = ("qa_outputs", "cls", "head")

OUTPUT_HEAD_NAMES = LM_HEAD_NAMES + CLASSIFICATION_HEAD_NAMES + OTHER_HEAD_NAMES


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: a linear layer whose weight is stored as (in, out).

    Checked by class name (and its `nf` attribute) so the core does not import transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is a linear layer widelora can adapt: an nn.Linear or a Conv1D with a 2-D weight."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and getattr(weight, "ndim", 0) == 2


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D, whatever the weight's orientation."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return out_f, in_f
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def is_output_head_name(name: str) -> bool:
    """Whether a module path names an output head or lies inside one (leaf or top-level component)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in OUTPUT_HEAD_NAMES or name.startswith(tuple(h + "." for h in OUTPUT_HEAD_NAMES))


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of `model`'s output heads: `get_output_embeddings()` and what `is_output_head_name` names."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return {
        name
        for name, module in model.named_modules()
        if name and (module is head or is_output_head_name(name))
    }

"""Model loading for the CLI: the embedded defaults by name, or any Hugging Face id or local folder.

A model that cannot be loaded raises `ModelError` with one line that says how to provide it
(a local folder from `save_pretrained`, or network access to the hub), never a hub traceback.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slora_kernels.app.defaults import load_minilm_classifier, load_smollm2
from slora_kernels.sensitivity.targets import find_targets

EMBEDDED_MODELS = ("minilm", "smollm2")
# Every nn.Linear inside a numbered transformer block (BERT "layer.3.", Llama "layers.3."): the
# attention and MLP projections, not the pooler, the classifier head or the LM head.
DEFAULT_TARGETS = r".*\.(layers?|h)\.\d+\..*"  # the numbered blocks: BERT, Llama-like, GPT-2 (h)


class ModelError(ValueError):
    """A model that cannot be loaded; the message says how to provide it."""


def load_model(name: str, task: str, num_labels: int | None = None, seed: int = 0):
    """(model, tokenizer) for task "seq-cls" (a fresh head with num_labels) or "causal-lm"."""
    torch.manual_seed(seed)
    if name == "minilm":
        if task != "seq-cls":
            raise ModelError("the embedded MiniLM is an encoder: use it for classification (data with labels)")
        return load_minilm_classifier(num_labels or 2, seed=seed)
    if name == "smollm2":
        if task != "causal-lm":
            raise ModelError("the embedded SmolLM2 is a causal LM: use --task causal-lm")
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise ModelError(f"model folder not found: {name} (pass a folder written by save_pretrained, a hub id, "
                         f"or an embedded default: {', '.join(EMBEDDED_MODELS)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if task == "seq-cls":
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load model {name!r} ({str(err).splitlines()[0]}); pass a local folder with config.json, "
            f"weights and tokenizer (e.g. written by save_pretrained), a hub id with network access, "
            f"or an embedded default: {', '.join(EMBEDDED_MODELS)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def linear_targets(model: nn.Module, pattern: str = DEFAULT_TARGETS) -> list[str]:
    """Full names of the nn.Linear modules whose name fully matches `pattern` (the library's matcher,
    PEFT's rule); a pattern that selects none is a ModelError naming the candidates."""
    try:
        return list(find_targets(model, pattern))
    except ValueError as err:
        raise ModelError(f"--target-modules: {err}") from None

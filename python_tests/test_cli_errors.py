"""Bad input to `slora`: non-zero exit, one clear line on stderr, no traceback unless --debug.

Most cases call `slora_kernels.app.cli.main` (the console script's entry point) in-process, which
saves a torch/transformers import per case; the tests marked slow go through a real subprocess
so the exit code and stderr of the command are checked end to end.
"""
from types import SimpleNamespace

import pytest

from cli_helpers import slora, tiny_csv
from slora_kernels.app.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_csv(tmp_path_factory.mktemp("data") / "tiny.csv", n=24)


@pytest.fixture
def cli(capsys):
    def call(*args):
        code = main([str(a) for a in args])
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    return call


def one_line_error(result, code=2):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.slow
def test_missing_data_file(tmp_path):
    line = one_line_error(slora("analyze", "--data", tmp_path / "nope.csv", "--out", tmp_path / "o"))
    assert line == f"slora analyze: error: data file not found: {tmp_path / 'nope.csv'}"
    assert not (tmp_path / "o").exists(), "a failed run must not leave an empty output folder"


@pytest.mark.slow
def test_model_not_loadable_offline_says_how_to_provide_it(cli, tmp_path, data):
    # a subprocess: HF_HUB_OFFLINE must be set before huggingface_hub is imported
    line = one_line_error(slora("train", "--model", "no-such-org/no-such-model", "--data", data,
                                "--out", tmp_path / "o"))
    assert "cannot load model 'no-such-org/no-such-model'" in line
    assert "pass a local folder with config.json, weights and tokenizer" in line and "minilm, smollm2" in line
    line = one_line_error(cli("analyze", "--model", tmp_path / "missing", "--data", data, "--out", tmp_path / "o"))
    assert f"model folder not found: {tmp_path / 'missing'}" in line


def test_label_column_with_one_class(cli, tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"snippet {i},fresh\n" for i in range(20)))
    line = one_line_error(cli("train", "--data", path, "--out", tmp_path / "o"))
    assert line.endswith("label column 'label' of " f"{path} has only one class ('fresh') in 18 rows; "
                         "classification needs at least two")


def test_wrong_column_lists_the_columns(cli, tmp_path, data):
    line = one_line_error(cli("analyze", "--data", data, "--text-column", "review", "--out", tmp_path / "o"))
    assert line == f"slora analyze: error: column 'review' not in {data}; its columns are: text, label"


@pytest.mark.parametrize("value", ["0", "-2"])
def test_avg_rank_must_be_positive(cli, tmp_path, value):
    line = one_line_error(cli("train", "--avg-rank", value, "--out", tmp_path / "o"))
    assert line == f"slora train: error: --avg-rank must be > 0, got {value}"


def test_existing_output_folder_needs_overwrite(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_line_error(cli("demo", "--quick", "--out", out))
    assert line == f"slora demo: error: output folder {out} exists and is not empty; pass --overwrite to write into it"
    assert (out / "keep.txt").read_text() == "mine"


def test_ranks_must_name_a_method_or_a_report(cli, tmp_path):
    line = one_line_error(cli("train", "--ranks", "lora++", "--out", tmp_path / "o"))
    assert "--ranks must be uniform, sensitivity, adalora, eva or a report file; lora++ is none of them" in line


@pytest.mark.parametrize("args,text", [
    (("--min-rank", "-1"), "--min-rank must be >= 0, got -1"),
    (("--min-rank", "5", "--avg-rank", "4"), "--min-rank 5 is above --avg-rank 4: the parameters of uniform rank 4 "
                                             "cannot give every matrix rank 5"),
])
def test_min_rank_bad_values(cli, tmp_path, args, text):
    for command in ("analyze", "train"):
        line = one_line_error(cli(command, *args, "--out", tmp_path / "o"))
        assert line == f"slora {command}: error: {text}"


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    result = slora("analyze", "--data", tmp_path / "nope.csv", "--out", tmp_path / "o", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "DataError: data file not found" in result.stderr

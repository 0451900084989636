"""`slora analyze` and `slora train` end to end on a tiny slice (a few dozen snippets, one step)."""
import json

import pytest
import torch

from cli_helpers import slora, tiny_csv

pytestmark = pytest.mark.slow
COMMON = ("--max-samples", 32, "--max-eval", 16, "--calib-samples", 16, "--batch-size", 16, "--max-length", 32,
          "--quiet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_csv(tmp_path_factory.mktemp("data") / "tiny.csv", n=48)


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("analyze") / "out"
    result = slora("analyze", "--data", data, "--avg-rank", 4, "--out", out, *COMMON)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_analyze_writes_report_stock_config_and_plot(analyzed):
    from peft import LoraConfig

    out, stdout = analyzed
    config = LoraConfig.from_pretrained(str(out))
    report = json.loads((out / "sensitivity.json").read_text())
    names = [m["name"] for m in report["matrices"]]
    assert len(names) == 36 and sorted(config.target_modules) == sorted(names)
    ranks = {n: r for n in names for key, r in config.rank_pattern.items() if key.strip("^$").replace("\\", "") == n}
    assert len(ranks) == 36 and all(r >= 1 for r in ranks.values())
    shapes = {m["name"]: m["shape"] for m in report["matrices"]}
    spent = sum(r * sum(shapes[n]) for n, r in ranks.items())
    uniform = sum(4 * sum(s) for s in shapes.values())
    assert uniform - 1536 - 384 < spent <= uniform  # equal trainable parameters, within one rank
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert "bert.encoder.layer.5.output.dense" in stdout and "query" in stdout


def test_train_from_report_saves_a_stock_peft_adapter(tmp_path, data, analyzed):
    from peft import PeftModel

    from slora_kernels.app.data import load_dataset
    from slora_kernels.app.defaults import load_minilm_classifier

    out = tmp_path / "run"
    result = slora("train", "--data", data, "--ranks", analyzed[0] / "sensitivity.json", "--max-steps", 1,
                   "--out", out, *COMMON)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "sensitivity" and metrics["steps"] == 1 and metrics["tokens"] > 16
    assert len(metrics["ranks"]) == 36 and metrics["fused"] is True
    base, tokenizer = load_minilm_classifier(2)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    loaded = {n: m.r["default"] for n, m in model.base_model.model.named_modules() if hasattr(m, "r") and m.r}
    assert loaded == metrics["ranks"]
    # The saved adapter, one example at a time with stock PEFT layers, scores what the run reported.
    held_out = load_dataset(str(data)).eval
    correct, losses = 0, []
    with torch.no_grad():
        for text, label in zip(held_out.texts, held_out.labels):
            logits = model(**tokenizer(text, truncation=True, max_length=32, return_tensors="pt")).logits[0]
            correct += int(logits.argmax()) == label
            losses.append(float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([label]))))
    assert metrics["metrics"]["accuracy"] == correct / len(held_out)
    assert metrics["metrics"]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert "accuracy" in result.stdout and "Wrote" in result.stdout


def test_min_rank_zero_leaves_matrices_out_of_the_config_and_the_adapter(tmp_path, data, analyzed):
    from peft import LoraConfig, PeftModel

    from slora_kernels import SensitivityReport
    from slora_kernels.app.defaults import load_minilm_classifier

    report = SensitivityReport.from_json(analyzed[0] / "sensitivity.json")
    ranks = report.ranks(1, budget="params", min_rank=0)
    adapted = {n: r for n, r in ranks.items() if r > 0}
    assert 0 < len(adapted) < 36
    out = tmp_path / "analyze"
    result = slora("analyze", "--data", data, "--avg-rank", 1, "--min-rank", 0, "--out", out, *COMMON)
    assert result.returncode == 0, result.stderr
    assert sorted(LoraConfig.from_pretrained(str(out)).target_modules) == sorted(adapted)
    assert f"{36 - len(adapted)} matrices at rank 0 get no adapter" in result.stdout
    out = tmp_path / "train"
    result = slora("train", "--data", data, "--ranks", analyzed[0] / "sensitivity.json", "--avg-rank", 1,
                   "--min-rank", 0, "--max-steps", 1, "--out", out, *COMMON)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"] == ranks
    cost = {m.name: sum(m.shape) for m in report.matrices}
    spent = sum(cost[n] * r for n, r in adapted.items())
    assert metrics["lora_params"] == spent and sum(cost.values()) - max(cost.values()) < spent <= sum(cost.values())
    model = PeftModel.from_pretrained(load_minilm_classifier(2)[0], str(out / "adapter"))
    loaded = {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
              if hasattr(m, "r") and m.r}
    assert loaded == adapted


@pytest.mark.parametrize("ranks", ["uniform", "adalora", "eva"])
def test_train_uniform_adalora_and_eva(tmp_path, data, ranks):
    out = tmp_path / ranks
    result = slora("train", "--data", data, "--ranks", ranks, "--max-steps", 1, "--out", out, *COMMON)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == ranks and metrics["steps"] == 1 and len(metrics["ranks"]) == 36
    per_rank = 4 * (384 + 384) + 2 * (384 + 1536)  # one rank on q, k, v, attn-out, intermediate, output
    expected = {"uniform": 4 * 6 * per_rank, "adalora": 6 * 6 * per_rank + 6 * 36}  # AdaLoRA: init 6, plus lora_E
    if ranks == "eva":  # its SVD moves rank units between matrices (up to 2 r each) and keeps their sum
        cost = {n: 384 + (1536 if n.endswith(("intermediate.dense", "output.dense")) and "attention" not in n else 384)
                for n in metrics["ranks"]}
        assert sum(metrics["ranks"].values()) == 4 * 36 and max(metrics["ranks"].values()) <= 8
        expected["eva"] = sum(cost[n] * r for n, r in metrics["ranks"].items())
    assert metrics["lora_params"] == expected[ranks]
    assert (out / "adapter" / "adapter_config.json").exists()


def test_train_causal_lm_on_jsonl(tmp_path):
    lines = [json.dumps({"text": f"The film number {i} was a quiet, warm comedy about trains."}) for i in range(12)]
    (tmp_path / "lm.jsonl").write_text("\n".join(lines))
    out = tmp_path / "lm"
    result = slora("train", "--model", "smollm2", "--data", tmp_path / "lm.jsonl", "--ranks", "uniform",
                   "--avg-rank", 2, "--max-steps", 1, "--batch-size", 4, "--max-length", 16, "--quiet", "--out", out)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["steps"] == 1
    assert torch.isfinite(torch.tensor(metrics["metrics"]["loss"])) and metrics["metrics"]["perplexity"] > 1
    assert len(metrics["ranks"]) == 30 * 7

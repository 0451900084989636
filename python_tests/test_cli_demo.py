"""`slora demo --quick`: the embedded default end to end, offline (its time: benchmarks/bench_demo.py)."""
import json

import pytest

from cli_helpers import slora

pytestmark = pytest.mark.slow


def test_demo_quick_compares_at_equal_parameters(tmp_path):
    out = tmp_path / "demo"
    result = slora("demo", "--quick", "--quiet", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "LOAD REPORT" not in result.stdout + result.stderr  # --quiet hides transformers' load chatter
    assert "Loading weights" not in result.stderr
    summary = json.loads((out / "demo.json").read_text())
    uniform, sensitivity = summary["runs"]
    assert (uniform["method"], sensitivity["method"]) == ("uniform", "sensitivity")
    assert set(uniform["ranks"].values()) == {1} and len(sensitivity["ranks"]) == 36
    assert 0 in sensitivity["ranks"].values()  # the demo's tight budget leaves some matrices unadapted
    # equal trainable LoRA parameters: the allocation may leave less than one rank's cost unspent
    assert uniform["lora_params"] - (384 + 1536) < sensitivity["lora_params"] <= uniform["lora_params"]
    assert sensitivity["calib_seconds"] > 0 and uniform["calib_seconds"] == 0
    n_eval = summary["setting"]["eval"]
    for run in summary["runs"]:
        assert run["steps"] == 4 and run["fused"]
        correct = run["metrics"]["accuracy"] * n_eval  # a count of the 128 held-out snippets
        assert abs(correct - round(correct)) < 1e-9 and 0 <= round(correct) <= n_eval
    difference = summary["sensitivity_minus_uniform"]  # paired over the same held-out snippets
    accuracy = [run["metrics"]["accuracy"] for run in summary["runs"]]
    assert difference["points"] == pytest.approx(100 * (accuracy[1] - accuracy[0]))
    low, high = difference["ci95"]
    assert low <= difference["points"] <= high and high - low < 2 * 100 * 1.96 / n_eval ** 0.5
    assert f"Sensitivity-LoRA minus uniform: {difference['points']:+.1f} points, 95% CI [{low:+.1f}, {high:+.1f}]" \
        in result.stdout
    for name in ("ranks.png", "sensitivity.json", "uniform/adapter/adapter_config.json",
                 "sensitivity/adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    lines = result.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("method"))):]
    for row, run in zip(table[2:4], summary["runs"]):
        assert row.split()[:2] == [run["method"], f"{100 * run['metrics']['accuracy']:.1f}%"]

"""The prepared GPU command's --dry-run: its steps (GPU suite LoRA rows, one layer's profile, whole-model steps)
run the same code on CPU at tiny sizes and write their JSON, so the command cannot rot between GPU sessions."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.py"


@pytest.mark.slow
def test_gpu_run_dry_run_completes_every_step(tmp_path):
    proc = subprocess.run([sys.executable, str(RUN), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_run.json").read_text())
    assert [r["step"] for r in record] == ["gpu_suite", "profile", "e2e_eager", "e2e_qlora"]
    qlora_ran = importlib.util.find_spec("bitsandbytes") is not None
    assert record[-1]["status"] == "ok" if qlora_ran else record[-1]["status"].startswith("skipped: bitsandbytes")
    assert all(r["status"] == "ok" for r in record[:-1]), record
    suite = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert suite["checks"] and all(c["passed"] for c in suite["checks"])
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert set(profile["rows"]) == {"base Linear", "public op grouped_lora", "stock PEFT layer", "fused PEFT layer"}
    assert all(row["host-ahead ms"] > 0 and row["synchronised ms"] > 0 for row in profile["rows"].values())
    rows = json.loads((tmp_path / "e2e_eager.json").read_text())
    assert {(r["precision"], r["lora_dropout"]) for r in rows} == {("fp32", 0.0), ("fp32", 0.05)}
    for row in rows:
        assert set(row["ms"]) == {"floor", "stock", "fused"} and all(ms > 0 for ms in row["ms"].values())
        assert row["fused_calls"] == "100%"
        # What autograd keeps for backward: LoRA adds less with the fused layers when there is dropout
        # (no dropped copy, no mask), never more without.
        assert row["saved_ratio"] is not None and row["saved_ratio"] <= (0.5 if row["lora_dropout"] else 1.0)
    if qlora_ran:
        rows = json.loads((tmp_path / "e2e_qlora.json").read_text())
        assert {(r["quant"], r["precision"], r["lora_dropout"]) for r in rows} == {("4bit", "bf16", 0.0),
                                                                                   ("4bit", "bf16", 0.05)}
        assert all(r["fused_calls"] == "100%" and r["saved_ratio"] < 1.0 for r in rows), rows

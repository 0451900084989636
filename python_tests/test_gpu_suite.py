"""The GPU suite's --dry-run: the same checks and timing code on CPU at tiny sizes, so it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
def test_gpu_suite_dry_run_checks_pass_and_times_every_section(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    assert result["checks"] and all(c["passed"] for c in result["checks"])
    checked = {c["check"].split(" ")[0] for c in result["checks"]}
    assert {"pack/unpack", "activation_sq_accumulate", "fisher_diag_accumulate", "grouped_lora"} <= checked
    sections = {row["section"] for row in result["timings"]}
    assert sections == {"linear fwd", "linear fwd+bwd", "group fwd+bwd", "bandwidth", "sensitivity", "gather"}
    assert all(row["ms"] > 0 for row in result["timings"])
    assert "| section" in proc.stdout

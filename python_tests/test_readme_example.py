"""README.md: the two commands at the top, and its Python example run as written on a tiny slice."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = "N_TRAIN, N_CALIB = 4000, 512"


def test_readme_starts_with_the_demo_and_test_commands():
    lines = README.read_text().splitlines()
    assert lines[:5] == ["# slora_kernels", "", "```bash", "bash .ci/install && slora demo",
                         "bash .ci/install && python3 -m pytest python_tests"]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert SIZES in code, "the test shrinks the example through this line; keep it"
    code = code.replace(SIZES, "N_TRAIN, N_CALIB = 32, 32")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bert.encoder.layer.5.output.dense" in result.stdout  # the printed report
    # 36 fused layers, 1 step of the 32-example slice per epoch, 2 epochs; no fallback
    assert "72 of 72 LoRA layer calls fused (100.0%); fallbacks: none" in result.stdout
    config = LoraConfig.from_pretrained(str(tmp_path / "out" / "adapter"))
    assert len(config.rank_pattern) == 36 and config.task_type == "SEQ_CLS"
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").stat().st_size > 100_000

import subprocess
import sys

import torch

import slora_kernels


def test_version_and_extension_loaded():
    assert slora_kernels.__version__.count(".") == 2
    assert slora_kernels.HAS_EXTENSION, "the compiled extension should be built by `pip install -e .`"
    assert hasattr(torch.ops.slora, "pack") and hasattr(torch.ops.slora, "unpack")


def test_cli_prints_version():
    out = subprocess.run([sys.executable, "-m", "slora_kernels", "--version"], capture_output=True, text=True, check=True)
    assert slora_kernels.__version__ in out.stdout

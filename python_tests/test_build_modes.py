"""setup.py's choice of extension: SLORA_BUILD=auto falls back to CPU, with one warning, when torch has CUDA
but the toolkit is unusable; SLORA_BUILD=cuda fails with the reason. Fake toolkits, no CUDA needed."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC_13 = "#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n"


@pytest.fixture(scope="module")
def setup_py():
    """setup.py imported as the module `setup`, which defines its functions and builds nothing."""
    spec = importlib.util.spec_from_file_location("setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_toolkit(root: Path, nvcc: str | None = NVCC_13, headers: bool = True) -> Path:
    if nvcc is not None:
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "nvcc").write_text(nvcc)
        (root / "bin" / "nvcc").chmod(0o755)
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_a_complete_toolkit_of_torch_s_cuda_major_is_usable(setup_py, tmp_path):
    assert setup_py.cuda_toolkit_problem("13.0", str(fake_toolkit(tmp_path))) is None
    assert setup_py.choose_build("auto", "13.0", str(tmp_path)) == ("cuda", None)
    assert setup_py.choose_build("cuda", "13.0", str(tmp_path)) == ("cuda", None)


@pytest.mark.parametrize("case, torch_cuda, reason", [
    ("no toolkit", "13.0", "no CUDA toolkit was found"),
    ("no nvcc", "13.0", "has no nvcc"),
    ("no headers", "13.0", "has no CUDA headers"),
    ("nvcc does not run", "13.0", "bin/nvcc does not run"),
    ("other major", "12.8", "nvcc at .* is CUDA 13 but torch was built with CUDA 12.8"),
])
def test_an_unusable_toolkit_falls_back_to_cpu_under_auto_and_fails_under_cuda(setup_py, tmp_path, case, torch_cuda,
                                                                              reason):
    nvcc = {"no nvcc": None, "nvcc does not run": "not a program"}.get(case, NVCC_13)
    home = None if case == "no toolkit" else str(fake_toolkit(tmp_path, nvcc=nvcc, headers=case != "no headers"))
    kind, warning = setup_py.choose_build("auto", torch_cuda, home)
    assert kind == "cpu"
    assert re.search(reason, warning), warning
    assert "SLORA_BUILD=cuda" in warning and "CUDA_HOME" in warning
    with pytest.raises(SystemExit, match="SLORA_BUILD=cuda but .*" + reason):
        setup_py.choose_build("cuda", torch_cuda, home)


def test_headers_from_cuda_inc_path_count(setup_py, tmp_path, monkeypatch):
    home = fake_toolkit(tmp_path / "cuda", headers=False)
    monkeypatch.setenv("CUDA_INC_PATH", str(fake_toolkit(tmp_path / "elsewhere", nvcc=None) / "include"))
    assert setup_py.cuda_toolkit_problem("13.0", str(home)) is None


def test_cpu_torch_and_cpu_mode_build_the_cpu_extension_silently(setup_py, tmp_path):
    assert setup_py.choose_build("auto", None, None) == ("cpu", None)
    assert setup_py.choose_build("cpu", "13.0", None) == ("cpu", None)
    with pytest.raises(SystemExit, match="SLORA_BUILD=cuda but torch is a CPU-only build"):
        setup_py.choose_build("cuda", None, str(fake_toolkit(tmp_path)))


def _setup_py_with_cuda_torch(cuda_home: Path, mode: str) -> subprocess.CompletedProcess:
    """setup.py --version as pip runs it, with torch made to look like a CUDA 13.0 build."""
    code = ("import runpy, sys, torch, torch.utils.cpp_extension as ext; torch.version.cuda = '13.0'; "
            f"ext.CUDA_HOME = {str(cuda_home)!r}; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLORA_BUILD": mode})


@pytest.mark.slow
def test_setup_py_auto_warns_once_and_goes_on_while_cuda_mode_stops(tmp_path):
    home = fake_toolkit(tmp_path, headers=False)
    auto = _setup_py_with_cuda_torch(home, "auto")
    assert auto.returncode == 0, auto.stderr
    warnings = [line for line in auto.stderr.splitlines() if "CPU-only extension" in line]
    assert len(warnings) == 1 and "has no CUDA headers" in warnings[0] and "SLORA_BUILD=cuda" in warnings[0]
    cuda = _setup_py_with_cuda_torch(home, "cuda")
    assert cuda.returncode != 0
    assert cuda.stderr.strip().splitlines()[-1].startswith("SLORA_BUILD=cuda but the CUDA toolkit at"), cuda.stderr

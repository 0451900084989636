"""The installed package: extension loaded, one version everywhere, a build that says what it needs."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

import slora_kernels

ROOT = Path(__file__).resolve().parents[1]


def _setup_py(*args: str, hide_torch: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run setup.py as pip's build backend does (its module level runs first); hide_torch makes
    `import torch` fail, as in pip's isolated build environment."""
    hide = "sys.modules['torch'] = None; " if hide_torch else ""
    code = f"import runpy, sys; {hide}sys.argv = ['setup.py', *{list(args)!r}]; runpy.run_path('setup.py')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_extension_loaded():
    assert slora_kernels.HAS_EXTENSION, "the compiled extension should be built by `pip install -e .`"
    assert hasattr(torch.ops.slora, "pack") and hasattr(torch.ops.slora, "unpack")


def test_one_version_for_the_package_the_build_and_the_cli():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "slora_kernels._version.__version__"}
    built = _setup_py("--version", SLORA_BUILD="none")
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip().splitlines()[-1] == slora_kernels.__version__
    cli = subprocess.run([sys.executable, "-m", "slora_kernels", "--version"], capture_output=True, text=True,
                         check=True)
    assert cli.stdout.strip() == f"slora_kernels {slora_kernels.__version__}"


def test_build_without_torch_stops_at_once_with_the_command_to_run():
    out = _setup_py("--version", hide_torch=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    assert len(last) == 1 and "pip install --no-build-isolation ." in last[0], out.stderr


def test_build_only_packages_are_not_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = {d.split(";")[0].split(">")[0].split("=")[0].strip() for d in project["project"]["dependencies"]}
    assert runtime.isdisjoint({"pybind11", "ninja", "setuptools", "wheel"})
    assert "ninja" in project["build-system"]["requires"]

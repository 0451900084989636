"""Build the `slora_kernels._C` extension (mixed-rank gather ops).

SLORA_BUILD selects what is built:
  auto (default)  CUDA extension when torch has CUDA and a usable CUDA toolkit is found, else CPU-only
                  (with one warning saying why, when torch has CUDA)
  cuda            CUDA extension, fail if it cannot be built
  cpu             C++ CPU extension only
  none            no extension; the package falls back to its PyTorch path
TORCH_CUDA_ARCH_LIST is honoured; it defaults to "8.0;9.0".

The extension is compiled against the torch already installed, so torch is not a build requirement:
a build in pip's isolated environment (no torch there) stops at once and says what to run.
`import setup` (the tests) only defines the functions; pip, `python setup.py` and runpy run the build.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

from setuptools import setup

BUILD_MODES = ("auto", "cuda", "cpu", "none")


def cuda_toolkit_problem(torch_cuda: str, cuda_home: str | None) -> str | None:
    """Why the CUDA extension cannot be built with this toolkit, or None if it can.

    Checked before building, as torch's build would (nvcc at CUDA_HOME/bin, headers in CUDA_HOME/include
    or CUDA_INC_PATH, same CUDA major), so that auto falls back to CPU instead of failing halfway.
    """
    if not cuda_home:
        return "no CUDA toolkit was found (CUDA_HOME is not set and nvcc is not on PATH)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return f"the CUDA toolkit at {cuda_home} has no nvcc ({nvcc})"
    include_dirs = [os.path.join(cuda_home, "include"), os.environ.get("CUDA_INC_PATH") or ""]
    if not any(os.path.isfile(os.path.join(d, "cuda_runtime.h")) for d in include_dirs if d):
        return f"the CUDA toolkit at {cuda_home} has no CUDA headers (no include/cuda_runtime.h)"
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{nvcc} does not run ({error})"
    release = re.search(r"release (\d+)\.", version)
    if release and release.group(1) != torch_cuda.split(".")[0]:
        return f"nvcc at {nvcc} is CUDA {release.group(1)} but torch was built with CUDA {torch_cuda}"
    return None


def choose_build(mode: str, torch_cuda: str | None, cuda_home: str | None) -> tuple[str, str | None]:
    """("cuda" or "cpu", a warning or None) for SLORA_BUILD=mode; SystemExit when mode=cuda cannot be met."""
    if mode == "cpu":
        return "cpu", None
    if torch_cuda is None:
        if mode == "cuda":
            raise SystemExit("SLORA_BUILD=cuda but torch is a CPU-only build")
        return "cpu", None
    problem = cuda_toolkit_problem(torch_cuda, cuda_home)
    if problem is None:
        return "cuda", None
    if mode == "cuda":
        raise SystemExit(f"SLORA_BUILD=cuda but {problem}")
    return "cpu", (f"slora_kernels: building the CPU-only extension (no CUDA pack/unpack): torch has CUDA "
                   f"{torch_cuda} but {problem}. Point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]} toolkit, or "
                   "set SLORA_BUILD=cuda to make this an error (SLORA_BUILD=cpu silences it).")


def _extensions():
    mode = os.environ.get("SLORA_BUILD", "auto").lower()
    if mode not in BUILD_MODES:
        raise SystemExit(f"SLORA_BUILD={mode!r}: expected one of {', '.join(BUILD_MODES)}")
    if mode == "none":
        return [], {}

    try:
        import torch
    except ImportError:
        raise SystemExit("slora_kernels compiles against your installed torch: run "
                         "`pip install --no-build-isolation .` after installing torch "
                         "(or SLORA_BUILD=none pip install . to skip the extension)") from None
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    kind, warning = choose_build(mode, torch.version.cuda, CUDA_HOME)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)

    cxx_flags = ["-O3", "-fopenmp"]
    sources = ["csrc/slora_ops.cpp", "csrc/dropout.cpp", "csrc/grouped_lora_cpu.cpp"]
    if kind == "cuda":
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "slora_kernels._C",
            sources + ["csrc/pack_cuda_binding.cpp", "csrc/pack_cuda.cu"],
            define_macros=[("SLORA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("slora_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


if __name__ != "setup":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build the `slora_kernels._C` extension (mixed-rank gather ops).

SLORA_BUILD selects what is built:
  auto (default)  CUDA extension when torch has CUDA and CUDA_HOME is set, else CPU-only
  cuda            CUDA extension, fail if it cannot be built
  cpu             C++ CPU extension only
  none            no extension; the package falls back to its PyTorch path
TORCH_CUDA_ARCH_LIST is honoured; it defaults to "8.0;9.0".

The extension is compiled against the torch already installed, so torch is not a build requirement:
a build in pip's isolated environment (no torch there) stops at once and says what to run.
"""
import os

from setuptools import setup

BUILD_MODES = ("auto", "cuda", "cpu", "none")


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

    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "cuda" and not cuda_possible:
        raise SystemExit("SLORA_BUILD=cuda but torch has no CUDA or CUDA_HOME is not set")
    use_cuda = mode == "cuda" or (mode == "auto" and cuda_possible)

    cxx_flags = ["-O3", "-fopenmp"]
    sources = ["csrc/slora_ops.cpp", "csrc/dropout.cpp"]
    if use_cuda:
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

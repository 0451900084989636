"""Loads the compiled `slora_kernels._C` extension, or registers a PyTorch fallback of its ops.

Either way `torch.ops.slora.pack` / `unpack` / `dropout` exist after import, with the same
schemas and results, so every caller (autograd, fake kernels, torch.compile) is written once against them.
SLORA_DISABLE_EXTENSION=1 forces the fallback (to test it, or to rule the extension out).
"""
from __future__ import annotations

import os
import warnings

import torch

from slora_kernels.ops import _hash_dropout

HAS_EXTENSION: bool
WITH_CUDA: bool

try:
    if os.environ.get("SLORA_DISABLE_EXTENSION") == "1":
        raise ImportError("disabled by SLORA_DISABLE_EXTENSION=1")
    from slora_kernels import _C  # noqa: F401  (importing registers the ops)

    HAS_EXTENSION = True
    WITH_CUDA = bool(_C.with_cuda)
except ImportError as error:
    HAS_EXTENSION = False
    WITH_CUDA = False
    warnings.warn(
        f"slora_kernels: compiled extension not available ({error}); using the PyTorch fallback for "
        "pack/unpack/dropout (slower). Reinstall with `pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )

    _fallback_library = torch.library.Library("slora", "DEF")
    _fallback_library.define("pack(Tensor[] tensors, Tensor offsets, SymInt total_rows) -> Tensor")
    _fallback_library.define("unpack(Tensor buffer, Tensor offsets, SymInt[] rows) -> Tensor[]")
    _fallback_library.define("dropout(Tensor x, float p, int seed) -> Tensor")

    def _pack_torch(tensors, offsets, total_rows):
        buffer = tensors[0].new_zeros((total_rows, tensors[0].shape[1]))
        for segment, start in zip(tensors, offsets.tolist()):
            buffer[start : start + segment.shape[0]] = segment
        return buffer

    def _unpack_torch(buffer, offsets, rows):
        return [buffer[start : start + r].clone() for start, r in zip(offsets.tolist(), rows)]

    _fallback_library.impl("pack", _pack_torch, "CompositeExplicitAutograd")
    _fallback_library.impl("unpack", _unpack_torch, "CompositeExplicitAutograd")
    _fallback_library.impl("dropout", _hash_dropout.dropout, "CompositeExplicitAutograd")

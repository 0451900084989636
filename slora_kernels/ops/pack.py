"""Mixed-rank gather: pack K variable-row segments into one padded buffer, and back.

The kernels are `torch.ops.slora.pack` / `torch.ops.slora.unpack` (C++ on CPU, one CUDA launch on
GPU, see csrc/). This module adds the public entry points with argument checks, the fake kernels
torch.compile traces with, and autograd: each op is the other's backward.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from slora_kernels.ops import _extension  # noqa: F401  (registers torch.ops.slora.*)
from slora_kernels.ops.utils import FLOAT_DTYPES, check_int, check_same, check_tensor


def pack_offsets(rows: Sequence[int], align: int = 1) -> list[int]:
    """Row offsets (K+1 entries) of K segments of `rows` rows, each start a multiple of `align`."""
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + -(-r // align) * align)
    return offsets


def pack(tensors: Sequence[torch.Tensor], align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 2-D tensors [r_i, n] into one zero-padded buffer; returns (buffer, offsets).

    Segment i occupies buffer[offsets[i] : offsets[i] + r_i]; offsets[i] is a multiple of `align`
    and the rows between segments are zero. `offsets` is int64 on the buffer's device.
    Differentiable: the gradient of each input is the matching slice of the buffer's gradient.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of 2-D tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("tensors must contain at least one tensor, got an empty list")
    check_int("align", align)
    first = check_tensor("tensors[0]", tensors[0], ndim=2, dtypes=FLOAT_DTYPES)
    for i, t in enumerate(tensors):
        check_tensor(f"tensors[{i}]", t, ndim=2)
        check_same("tensors", i, t, first, "dtype")
        check_same("tensors", i, t, first, "device")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"tensors[{i}] has {t.shape[1]} columns, expected {first.shape[1]} like tensors[0]")
    offsets_list = pack_offsets([t.shape[0] for t in tensors], align)
    offsets = torch.tensor(offsets_list, dtype=torch.int64, device=first.device)
    return torch.ops.slora.pack(list(tensors), offsets, offsets_list[-1]), offsets


def unpack(buffer: torch.Tensor, offsets: torch.Tensor, rows: Sequence[int]) -> list[torch.Tensor]:
    """Inverse of `pack`: the K segments buffer[offsets[i] : offsets[i] + rows[i]] as new tensors."""
    check_tensor("buffer", buffer, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,))
    rows = list(rows)
    if not rows:
        raise ValueError("rows must list at least one segment, got an empty list")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in rows):
        raise ValueError(f"rows must be non-negative ints, got {rows}")
    if offsets.numel() != len(rows) + 1:
        raise ValueError(f"offsets must have len(rows) + 1 = {len(rows) + 1} entries, got {offsets.numel()}")
    if not torch.compiler.is_compiling():
        starts = offsets.tolist()
        for i, r in enumerate(rows):
            if starts[i] < 0 or starts[i] + r > starts[i + 1] or starts[i + 1] > buffer.shape[0]:
                raise ValueError(
                    f"offsets do not match rows: segment {i} spans rows {starts[i]}..{starts[i] + r} but the next "
                    f"segment starts at {starts[i + 1]} and the buffer has {buffer.shape[0]} rows"
                )
    return list(torch.ops.slora.unpack(buffer, offsets.to(buffer.device), rows))


@torch.library.register_fake("slora::pack")
def _pack_fake(tensors, offsets, total_rows):
    return tensors[0].new_empty((total_rows, tensors[0].shape[1]))


@torch.library.register_fake("slora::unpack")
def _unpack_fake(buffer, offsets, rows):
    return [buffer.new_empty((r, buffer.shape[1])) for r in rows]


def _pack_setup_context(ctx, inputs, output):
    tensors, offsets, _ = inputs
    ctx.rows = [t.shape[0] for t in tensors]
    ctx.save_for_backward(offsets)


def _pack_backward(ctx, grad_buffer):
    (offsets,) = ctx.saved_tensors
    return list(torch.ops.slora.unpack(grad_buffer, offsets, ctx.rows)), None, None


def _unpack_setup_context(ctx, inputs, output):
    buffer, offsets, _ = inputs
    ctx.total_rows = buffer.shape[0]
    ctx.save_for_backward(offsets)


def _unpack_backward(ctx, grads):
    (offsets,) = ctx.saved_tensors
    return torch.ops.slora.pack(list(grads), offsets, ctx.total_rows), None, None


torch.library.register_autograd("slora::pack", _pack_backward, setup_context=_pack_setup_context)
torch.library.register_autograd("slora::unpack", _unpack_backward, setup_context=_unpack_setup_context)

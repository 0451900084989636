"""Mixed-rank gather: pack K variable-row segments into one padded buffer, and back.

The kernels are `torch.ops.slora.pack` / `torch.ops.slora.unpack` (C++ on CPU, one CUDA launch on
GPU, see csrc/). This module adds the public entry points with argument checks, the fake kernels
torch.compile traces with, and autograd: each op is the other's backward.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from slora_kernels.ops import _extension  # noqa: F401  (registers torch.ops.slora.*)
from slora_kernels.ops.utils import FLOAT_DTYPES, check_int, check_same, check_tensor

# Host copies of offsets tensors unpack has read, with the tensor's version counter then: unpack checks
# offsets against rows on every call, and reading them from a CUDA tensor each time would wait for the GPU.
_host_offsets_of: WeakIdKeyDictionary = WeakIdKeyDictionary()


def pack_offsets(rows: Sequence[int], align: int = 1) -> list[int]:
    """Row offsets (K+1 entries) of K segments of `rows` rows, each start a multiple of `align`."""
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + -(-r // align) * align)
    return offsets


@functools.lru_cache(maxsize=256)
def _cached_layout(rows: tuple[int, ...], align: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(offsets tensor, total rows, the tensor's version) of a layout, built and copied to the device once: the
    same ranks are packed every step. The host copy is recorded, so unpack never reads the offsets back."""
    host = pack_offsets(rows, align)
    with torch.inference_mode(False):  # a first call under inference mode must not cache an inference tensor
        offsets = torch.tensor(host, dtype=torch.int64, device=device)
    _host_offsets_of[offsets] = (offsets._version, tuple(host))
    return offsets, host[-1], offsets._version


def pack_layout(rows: tuple[int, ...], align: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(offsets on device, total rows) of segments with these row counts, cached (grouped_lora packs A with it)."""
    offsets, total_rows, version = _cached_layout(rows, align, device)
    if offsets._version != version:  # a caller changed the shared tensor in place: build it anew
        _cached_layout.cache_clear()
        offsets, total_rows, _ = _cached_layout(rows, align, device)
    return offsets, total_rows


def _segment_rows(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Row counts of the segments, checked in one tight pass (2-D, the dtype, device and column count of
    tensors[0]); only a segment that fails it goes through the named checks, to say what is wrong."""
    first = check_tensor("tensors[0]", tensors[0], ndim=2, dtypes=FLOAT_DTYPES)
    dtype, device, n = first.dtype, first.device, first.shape[1]
    rows = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            break
        r, c = t.shape
        if c != n or t.dtype != dtype or t.device != device:
            break
        rows.append(r)
    else:
        return tuple(rows)
    i, t = len(rows), tensors[len(rows)]
    check_tensor(f"tensors[{i}]", t, ndim=2)
    check_same("tensors", i, t, first, "dtype")
    check_same("tensors", i, t, first, "device")
    raise ValueError(f"tensors[{i}] has {t.shape[1]} columns, expected {n} like tensors[0]")


def pack(tensors: Sequence[torch.Tensor], align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 2-D tensors [r_i, n] into one zero-padded buffer; returns (buffer, offsets).

    Segment i occupies buffer[offsets[i] : offsets[i] + r_i]; offsets[i] is a multiple of `align`
    and the rows between segments are zero. `offsets` is int64 on the buffer's device, cached and shared
    by every call with the same row counts and align (one changed in place is replaced, not reused).
    Differentiable: the gradient of each input is the matching slice of the buffer's gradient.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of 2-D tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("tensors must contain at least one tensor, got an empty list")
    check_int("align", align)
    rows = _segment_rows(tensors)
    device = tensors[0].device
    if torch.compiler.is_compiling():  # rows may be symbolic: no cache, the offsets become a graph constant
        host = pack_offsets(rows, align)
        offsets, total_rows = torch.tensor(host, dtype=torch.int64, device=device), host[-1]
    else:
        offsets, total_rows = pack_layout(rows, align, device)
    return torch.ops.slora.pack(list(tensors), offsets, total_rows), offsets


def _host_offsets(offsets: torch.Tensor) -> tuple[int, ...]:
    """offsets as ints, read from the tensor only when this tensor (at this version) was not read before."""
    if offsets.is_inference():  # no version counter to tell an in-place change
        return tuple(offsets.tolist())
    known = _host_offsets_of.get(offsets)
    if known is None or known[0] != offsets._version:
        known = (offsets._version, tuple(offsets.tolist()))
        _host_offsets_of[offsets] = known
    return known[1]


@functools.lru_cache(maxsize=256)
def _check_layout(starts: tuple[int, ...], rows: tuple[int, ...], buffer_rows: int) -> None:
    """Raise unless each segment fits before the next one and in the buffer (cached: layouts repeat)."""
    for i, r in enumerate(rows):
        if starts[i] < 0 or starts[i] + r > starts[i + 1] or starts[i + 1] > buffer_rows:
            raise ValueError(
                f"offsets do not match rows: segment {i} spans rows {starts[i]}..{starts[i] + r} but the next "
                f"segment starts at {starts[i + 1]} and the buffer has {buffer_rows} rows"
            )


def unpack(buffer: torch.Tensor, offsets: torch.Tensor, rows: Sequence[int]) -> list[torch.Tensor]:
    """Inverse of `pack`: the K segments buffer[offsets[i] : offsets[i] + rows[i]] as new tensors.

    offsets are checked against rows on the host. Those `pack` returned, or seen before unchanged, are not
    read from the device again, so unpack does not wait for the GPU then.
    """
    check_tensor("buffer", buffer, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,))
    rows = tuple(rows)
    if not rows:
        raise ValueError("rows must list at least one segment, got an empty list")
    plain_ints = set(map(type, rows)) == {int}  # the usual case, checked without a Python loop
    if not (plain_ints or all(isinstance(r, int) and not isinstance(r, bool) for r in rows)) or min(rows) < 0:
        raise ValueError(f"rows must be non-negative ints, got {list(rows)}")
    if offsets.numel() != len(rows) + 1:
        raise ValueError(f"offsets must have len(rows) + 1 = {len(rows) + 1} entries, got {offsets.numel()}")
    if not torch.compiler.is_compiling():
        _check_layout(_host_offsets(offsets), rows, buffer.shape[0])
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

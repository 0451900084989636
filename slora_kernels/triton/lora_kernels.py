"""Segmented variable-rank LoRA kernels for a group of G layers that share one input.

Layout: S [N, R] holds the shrink of every layer side by side (layer i in columns
rank_offset_i .. + r_i, R = sum r_i, no padding), Y [N, D] the outputs side by side (layer i in
columns col_offset_i .. + d_out_i), and the B factors are flattened back to back into one 1-D
buffer (B_i row-major [d_out_i, r_i] from element b_offset_i). A tile table maps every program
to (layer, first output column, first rank); each program loops over the real r_i in chunks of
BLOCK_R = 16, masked, so a layer pads to a multiple of 16 inside its tiles and never to the
group's largest rank.

Dtypes: S and B share the factors' dtype; Y / dY may be another (a bf16 base under float32
factors, PEFT's default). Products run in the factors' dtype (dY cast to it on load, as autograd
casts it for PEFT's mixed-dtype sum), accumulate in float32 (float64 for float64 operands), and
Y is updated with one rounding into its own dtype.

Kernels (launch helpers below, each takes the layout from `segment_layout`):
- expand:  Y[:, cols_i] += s_i * S_i B_i^T          (the LoRA epilogue on the base output)
- dS:      dS_i = s_i * dY_i B_i                     (segmented, output [N, R])
- dB:      dB_i = s_i * dY_i^T S_i                   (segmented, output flat like B)
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_R = 16
BLOCK_M = 32
BLOCK_N = 32


@dataclass(frozen=True)
class SegmentLayout:
    """Per-layer metadata of one group, on the kernels' device (built once per shape, cached)."""

    meta: torch.Tensor          # int64 [G, 5]: col_offset, d_out, rank_offset, rank, b_offset
    expand_tiles: torch.Tensor  # int32 [T, 3]: (layer, first output column, 0)
    rank_tiles: torch.Tensor    # int32 [T, 3]: (layer, 0, first rank)
    grad_b_tiles: torch.Tensor  # int32 [T, 3]: (layer, first output column, first rank)
    total_rank: int
    total_out: int
    b_numel: int


@functools.lru_cache(maxsize=256)
def segment_layout(d_outs: tuple[int, ...], ranks: tuple[int, ...], device: torch.device) -> SegmentLayout:
    """Offsets and tile tables of a group with these output sizes and ranks (cached by shape)."""
    meta, expand, rank_tiles, grad_b = [], [], [], []
    col = rank_off = b_off = 0
    for i, (d_out, r) in enumerate(zip(d_outs, ranks)):
        meta.append((col, d_out, rank_off, r, b_off))
        expand += [(i, n, 0) for n in range(0, d_out, BLOCK_N)]
        rank_tiles += [(i, 0, k) for k in range(0, r, BLOCK_R)]
        grad_b += [(i, n, k) for n in range(0, d_out, BLOCK_N) for k in range(0, r, BLOCK_R)]
        col, rank_off, b_off = col + d_out, rank_off + r, b_off + d_out * r

    def table(rows, dtype):
        return torch.tensor(rows, dtype=dtype, device=device)

    return SegmentLayout(table(meta, torch.int64), table(expand, torch.int32), table(rank_tiles, torch.int32),
                         table(grad_b, torch.int32), rank_off, col, b_off)


@triton.jit
def _tile(tiles_ptr, tile, meta_ptr, scale_ptr):
    """This program's tile: (first column, first rank) and its layer's (col, d_out, rank_off, rank, b_off, scale)."""
    layer, n0, k0 = tl.load(tiles_ptr + 3 * tile), tl.load(tiles_ptr + 3 * tile + 1), tl.load(tiles_ptr + 3 * tile + 2)
    meta = meta_ptr + layer * 5
    return (n0, k0, tl.load(meta), tl.load(meta + 1), tl.load(meta + 2), tl.load(meta + 3), tl.load(meta + 4),
            tl.load(scale_ptr + layer))


@triton.jit
def _load_2d(ptr, rows, row_stride, cols, col_stride, row_ok, col_ok):
    """Masked [rows, cols] tile at ptr[rows * row_stride + cols * col_stride], zeros outside."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def _store_2d(ptr, rows, row_stride, cols, col_stride, row_ok, col_ok, value):
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, value.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_s, stride_y,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    n0, _, col, d_out, rank_off, rank, b_off, scale = _tile(tiles_ptr, tl.program_id(1), meta_ptr, scale_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < n_tokens
    n_ok = offs_n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, rank, BLOCK_R):
        kk = k + offs_r
        k_ok = kk < rank
        s = _load_2d(s_ptr + rank_off, offs_m, stride_s, kk, 1, m_ok, k_ok)
        b_t = _load_2d(b_ptr + b_off, kk, 1, offs_n, rank, k_ok, n_ok)
        acc += tl.dot(s, b_t, input_precision="ieee", out_dtype=ACC)
    y = _load_2d(y_ptr + col, offs_m, stride_y, offs_n, 1, m_ok, n_ok)
    _store_2d(y_ptr + col, offs_m, stride_y, offs_n, 1, m_ok, n_ok, y.to(ACC) + scale * acc)


@triton.jit
def _grad_s_kernel(dy_ptr, b_ptr, ds_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_dy, stride_ds,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    _, k0, col, d_out, rank_off, rank, b_off, scale = _tile(tiles_ptr, tl.program_id(1), meta_ptr, scale_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = k0 + tl.arange(0, BLOCK_R)
    m_ok = offs_m < n_tokens
    k_ok = kk < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for n in range(0, d_out, BLOCK_N):
        nn = n + tl.arange(0, BLOCK_N)
        n_ok = nn < d_out
        dy = _load_2d(dy_ptr + col, offs_m, stride_dy, nn, 1, m_ok, n_ok).to(b_ptr.dtype.element_ty)
        b = _load_2d(b_ptr + b_off, nn, rank, kk, 1, n_ok, k_ok)
        acc += tl.dot(dy, b, input_precision="ieee", out_dtype=ACC)
    _store_2d(ds_ptr + rank_off, offs_m, stride_ds, kk, 1, m_ok, k_ok, scale * acc)


@triton.jit
def _grad_b_kernel(dy_ptr, s_ptr, db_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_dy, stride_s,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    n0, k0, col, d_out, rank_off, rank, b_off, scale = _tile(tiles_ptr, tl.program_id(0), meta_ptr, scale_ptr)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kk = k0 + tl.arange(0, BLOCK_R)
    n_ok = offs_n < d_out
    k_ok = kk < rank
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
    for m in range(0, n_tokens, BLOCK_M):
        mm = m + tl.arange(0, BLOCK_M)
        m_ok = mm < n_tokens
        dy_t = _load_2d(dy_ptr + col, offs_n, 1, mm, stride_dy, n_ok, m_ok).to(s_ptr.dtype.element_ty)
        s = _load_2d(s_ptr + rank_off, mm, stride_s, kk, 1, m_ok, k_ok)
        acc += tl.dot(dy_t, s, input_precision="ieee", out_dtype=ACC)
    _store_2d(db_ptr + b_off, offs_n, rank, kk, 1, n_ok, k_ok, scale * acc)


def _launch(kernel, grid, first, second, out, tiles, layout, scales, strides):
    """Run one segmented kernel on (first, second) into out; first is [N, ...] (token count)."""
    wide = torch.float64 in (first.dtype, second.dtype, out.dtype)
    scale_t = torch.tensor(list(scales), dtype=torch.float64 if wide else torch.float32, device=out.device)
    kernel[grid](first, second, out, layout.meta, scale_t, tiles, first.shape[0], *strides,
                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, ACC=tl.float64 if wide else tl.float32)
    return out


def lora_expand_(y: torch.Tensor, s: torch.Tensor, b_flat: torch.Tensor, scales: Sequence[float],
                 layout: SegmentLayout) -> torch.Tensor:
    """Y[:, cols_i] += scales[i] * S_i B_i^T for every layer, in place; y [N, D], s [N, R] row-major."""
    grid = (triton.cdiv(y.shape[0], BLOCK_M), layout.expand_tiles.shape[0])
    return _launch(_expand_kernel, grid, s, b_flat, y, layout.expand_tiles, layout, scales, (s.stride(0), y.stride(0)))


def lora_grad_s(dy: torch.Tensor, b_flat: torch.Tensor, scales: Sequence[float], layout: SegmentLayout) -> torch.Tensor:
    """dS [N, R] in B's dtype: dS_i = scales[i] * dY_i B_i."""
    ds = b_flat.new_empty((dy.shape[0], layout.total_rank))
    grid = (triton.cdiv(dy.shape[0], BLOCK_M), layout.rank_tiles.shape[0])
    return _launch(_grad_s_kernel, grid, dy, b_flat, ds, layout.rank_tiles, layout, scales, (dy.stride(0), ds.stride(0)))


def lora_grad_b(dy: torch.Tensor, s: torch.Tensor, scales: Sequence[float], layout: SegmentLayout) -> torch.Tensor:
    """dB flat like the packed B, in S's dtype: dB_i = scales[i] * dY_i^T S_i."""
    db = s.new_empty((layout.b_numel,))
    return _launch(_grad_b_kernel, (layout.grad_b_tiles.shape[0],), dy, s, db, layout.grad_b_tiles, layout, scales,
                   (dy.stride(0), s.stride(0)))

"""Segmented variable-rank LoRA kernels for a group of G layers that share one input.

Layout (see DESIGN.md): S [N, R] holds the shrink of every layer side by side (layer i in columns
rank_offset_i .. + r_i, R = sum r_i, no padding), Y [N, D] the outputs side by side (layer i in
columns col_offset_i .. + d_out_i), and the B factors are flattened back to back into one 1-D
buffer (B_i row-major [d_out_i, r_i] from element b_offset_i). A tile table maps every program
to (layer, first output column, first rank); each program loops over the real r_i in chunks of
BLOCK_R = 16, masked, so a layer pads to a multiple of 16 inside its tiles and never to the
group's largest rank.

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
    expand_tiles: torch.Tensor  # int32 [T, 2]: (layer, first output column)
    rank_tiles: torch.Tensor    # int32 [T, 2]: (layer, first rank)
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
        expand += [(i, n) for n in range(0, d_out, BLOCK_N)]
        rank_tiles += [(i, k) for k in range(0, r, BLOCK_R)]
        grad_b += [(i, n, k) for n in range(0, d_out, BLOCK_N) for k in range(0, r, BLOCK_R)]
        col, rank_off, b_off = col + d_out, rank_off + r, b_off + d_out * r

    def table(rows, dtype):
        return torch.tensor(rows, dtype=dtype, device=device)

    return SegmentLayout(table(meta, torch.int64), table(expand, torch.int32), table(rank_tiles, torch.int32),
                         table(grad_b, torch.int32), rank_off, col, b_off)


@triton.jit
def _load_meta(meta_ptr, layer):
    base = meta_ptr + layer * 5
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4)


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_s, stride_y,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    layer = tl.load(tiles_ptr + 2 * tl.program_id(1))
    n0 = tl.load(tiles_ptr + 2 * tl.program_id(1) + 1)
    col, d_out, rank_off, rank, b_off = _load_meta(meta_ptr, layer)
    scale = tl.load(scale_ptr + layer)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < n_tokens
    n_ok = offs_n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, rank, BLOCK_R):
        kk = k + offs_r
        k_ok = kk < rank
        s = tl.load(s_ptr + offs_m[:, None] * stride_s + (rank_off + kk)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + b_off + offs_n[None, :] * rank + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(s, b_t, input_precision="ieee", out_dtype=ACC)
    y_ptrs = y_ptr + offs_m[:, None] * stride_y + (col + offs_n)[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(ACC) + scale * acc).to(y.dtype), mask=y_mask)


@triton.jit
def _grad_s_kernel(dy_ptr, b_ptr, ds_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_dy, stride_ds,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    layer = tl.load(tiles_ptr + 2 * tl.program_id(1))
    k0 = tl.load(tiles_ptr + 2 * tl.program_id(1) + 1)
    col, d_out, rank_off, rank, b_off = _load_meta(meta_ptr, layer)
    scale = tl.load(scale_ptr + layer)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = k0 + tl.arange(0, BLOCK_R)
    m_ok = offs_m < n_tokens
    k_ok = kk < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for n in range(0, d_out, BLOCK_N):
        nn = n + tl.arange(0, BLOCK_N)
        n_ok = nn < d_out
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dy + (col + nn)[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_off + nn[:, None] * rank + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(dy, b, input_precision="ieee", out_dtype=ACC)
    tl.store(ds_ptr + offs_m[:, None] * stride_ds + (rank_off + kk)[None, :], (scale * acc).to(ds_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _grad_b_kernel(dy_ptr, s_ptr, db_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_dy, stride_s,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    tile = tiles_ptr + 3 * tl.program_id(0)
    layer, n0, k0 = tl.load(tile), tl.load(tile + 1), tl.load(tile + 2)
    col, d_out, rank_off, rank, b_off = _load_meta(meta_ptr, layer)
    scale = tl.load(scale_ptr + layer)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kk = k0 + tl.arange(0, BLOCK_R)
    n_ok = offs_n < d_out
    k_ok = kk < rank
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
    for m in range(0, n_tokens, BLOCK_M):
        mm = m + tl.arange(0, BLOCK_M)
        m_ok = mm < n_tokens
        dy = tl.load(dy_ptr + mm[:, None] * stride_dy + (col + offs_n)[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.load(s_ptr + mm[:, None] * stride_s + (rank_off + kk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(dy), s, input_precision="ieee", out_dtype=ACC)
    tl.store(db_ptr + b_off + offs_n[:, None] * rank + kk[None, :], (scale * acc).to(db_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


def _accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _scales(scales: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor(list(scales), dtype=dtype, device=like.device)


def lora_expand_(y: torch.Tensor, s: torch.Tensor, b_flat: torch.Tensor, scales: Sequence[float],
                 layout: SegmentLayout) -> torch.Tensor:
    """Y[:, cols_i] += scales[i] * S_i B_i^T for every layer, in place; y [N, D], s [N, R] row-major."""
    n_tokens = y.shape[0]
    grid = (triton.cdiv(n_tokens, BLOCK_M), layout.expand_tiles.shape[0])
    _expand_kernel[grid](s, b_flat, y, layout.meta, _scales(scales, y), layout.expand_tiles, n_tokens,
                         s.stride(0), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
                         ACC=_accumulator(y.dtype))
    return y


def lora_grad_s(dy: torch.Tensor, b_flat: torch.Tensor, scales: Sequence[float], layout: SegmentLayout) -> torch.Tensor:
    """dS [N, R]: dS_i = scales[i] * dY_i B_i."""
    n_tokens = dy.shape[0]
    ds = dy.new_empty((n_tokens, layout.total_rank))
    grid = (triton.cdiv(n_tokens, BLOCK_M), layout.rank_tiles.shape[0])
    _grad_s_kernel[grid](dy, b_flat, ds, layout.meta, _scales(scales, dy), layout.rank_tiles, n_tokens,
                         dy.stride(0), ds.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
                         ACC=_accumulator(dy.dtype))
    return ds


def lora_grad_b(dy: torch.Tensor, s: torch.Tensor, scales: Sequence[float], layout: SegmentLayout) -> torch.Tensor:
    """dB flat like the packed B: dB_i = scales[i] * dY_i^T S_i."""
    db = dy.new_empty((layout.b_numel,))
    grid = (layout.grad_b_tiles.shape[0],)
    _grad_b_kernel[grid](dy, s, db, layout.meta, _scales(scales, dy), layout.grad_b_tiles, dy.shape[0],
                         dy.stride(0), s.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
                         ACC=_accumulator(dy.dtype))
    return db

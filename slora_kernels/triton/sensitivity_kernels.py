"""Triton kernels that fill the per-matrix sensitivity accumulators (fp32), and their launchers.

- activation_sq: acc[d] += sum over unmasked rows t of x[t, d]^2. Grid (column blocks, row
  splits), about 8 programs per SM when the rows allow; each program adds x^2 element-wise into
  a [BLOCK_ROWS, BLOCK_COLS] fp32 register tile and reduces it across rows once, at the end.
  Split partials go to an fp32 [splits, d] buffer that one more small kernel sums into acc in a
  fixed order: no atomics, the result is deterministic. Masked rows are not loaded.
- fisher_token: acc[o, i] += sum_t g[t, o]^2 x[t, i]^2, a GEMM over tokens with the squares
  taken on load (never stored). Each program owns one output tile: no atomics.
- fisher_sample: acc[o, i] += sum_b (sum_t g[b, t, o] x[b, t, i])^2. Each program owns one
  output tile and walks (sample, token block) steps in one loop, builds that tile of g_b^T x_b
  in registers, squares and adds it after each sample's last step: no per-sample gradient ever
  reaches memory.

Precision of the dots (fp32 accumulation throughout):
- fp32 inputs: input_precision="tf32x3" (three TF32 products on tensor cores: about fp32 accuracy).
- bf16/fp16 inputs, per sample: the operands go to tensor cores as they are; their products are exact.
- bf16/fp16 inputs, per token: each square is taken in fp32 (exact) and rounded once to bf16
  (nearest even), so both operands are bf16 on tensor cores. bf16 keeps fp32's exponent range (fp16
  squares overflow above |x| = 256 and vanish below |x| ~ 2^-12). Each rounding is relative, <= 2^-8,
  so a term g^2 x^2 is off by at most (1 + 2^-8)^2 - 1 < 2^-7 + 2^-16; every term is non-negative, so
  each accumulated entry is within that same relative bound (plus fp32 summation error) of the exact sum.
Addressing: token (row) bases are int64, so N * d >= 2^31 elements works. In the GEMM kernels the
offsets inside one token block are int32 (int64 throughout measured 12% slower on the H200) unless
a row stride reaches 2^24 elements (WIDE=True, a separate compile).
The GEMM kernels pick their tiles with triton.autotune, keyed on (d_out, d_in, token-count bucket)
and the dtypes; under TRITON_INTERPRET=1 only the first config is used (no timing on CPU).

The interpreter mis-simulates two things these kernels use: its bf16 tl.dot multiplies the raw
bits, and its fp32 -> bf16 cast truncates. INTERPRET=True (set by the launchers when interpreting)
rounds on the bits instead and keeps bf16 values in fp32 for the dot (exact), so tests on CPU check
the GPU's arithmetic.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from slora_kernels.triton import INTERPRET

PROGRAMS_PER_SM = 8   # activation_sq: enough resident row-split programs to keep HBM busy
DEFAULT_SMS = 132     # an H200's SM count, so the interpreter runs the GPU's launch geometry
MAX_SPLITS = 512      # activation_sq: the split sum loads all splits of 16+ columns at once (<= 8192 values)
WIDE_ROW_STRIDE = 1 << 24  # GEMM kernels: below it, BLOCK_T (<= 64) rows of a stride stay inside int32
_GROUP_O = tl.constexpr(8)  # GEMM programs walk 8 tile rows at a time, so the operand columns stay in L2

_DOT_CONFIGS = [triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_T": t}, num_warps=w, num_stages=s)
                for o, i, t, w, s in ((128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                      (128, 128, 32, 4, 4))]
if INTERPRET:
    _DOT_CONFIGS = _DOT_CONFIGS[:1]


@triton.jit
def _activation_sq_kernel(out_ptr, x_ptr, mask_ptr, n_rows, n_cols, stride_row, rows_per_split,
                          HAS_MASK: tl.constexpr, ADD_TO_OUT: tl.constexpr,
                          BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    first = tl.program_id(1) * rows_per_split
    last = tl.minimum(first + rows_per_split, n_rows)
    tile = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for start in range(first, last, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < last
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        tile += x * x
    total = tl.sum(tile, axis=0)
    if ADD_TO_OUT:  # a single split owns its columns: add straight into acc
        total += tl.load(out_ptr + cols, mask=col_ok, other=0.0)
        tl.store(out_ptr + cols, total, mask=col_ok)
    else:
        tl.store(out_ptr + tl.program_id(1) * n_cols + cols, total, mask=col_ok)


@triton.jit
def _sum_splits_kernel(acc_ptr, part_ptr, n_splits, n_cols, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # all splits of BLOCK columns in one load (a loop over splits would wait on each load in turn)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    splits = tl.arange(0, SPLITS)
    ok = cols < n_cols
    parts = tl.load(part_ptr + splits[:, None] * n_cols + cols[None, :],
                    mask=(splits < n_splits)[:, None] & ok[None, :], other=0.0)
    tl.store(acc_ptr + cols, tl.load(acc_ptr + cols, mask=ok, other=0.0) + tl.sum(parts, axis=0), mask=ok)


@triton.jit
def _tile_offsets(d_out, d_in, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Output rows and columns of this program's tile (1-D grid, grouped _GROUP_O tile rows at a time)."""
    n_i = tl.cdiv(d_in, BLOCK_I)
    pid = tl.program_id(0)
    per_group = _GROUP_O * n_i
    first = (pid // per_group) * _GROUP_O
    size = tl.minimum(tl.cdiv(d_out, BLOCK_O) - first, _GROUP_O)
    pid_o = first + (pid % per_group) % size
    pid_i = (pid % per_group) // size
    return pid_o * BLOCK_O + tl.arange(0, BLOCK_O), pid_i * BLOCK_I + tl.arange(0, BLOCK_I)


@triton.jit
def _add_tile(acc_ptr, offs_o, offs_i, d_out, d_in, tile):
    ptrs = acc_ptr + offs_o.to(tl.int64)[:, None] * d_in + offs_i[None, :]
    ok = (offs_o < d_out)[:, None] & (offs_i < d_in)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + tile, mask=ok)


@triton.jit
def _bf16_square(v, INTERPRET: tl.constexpr):
    """v^2 (v fp32) rounded to nearest-even bf16; under the interpreter done on the bits and kept in fp32."""
    sq = v * v
    if INTERPRET:
        bits = sq.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return sq.to(tl.bfloat16)


@triton.jit
def _fisher_prologue(d_out, d_in, stride_g, stride_x, WIDE: tl.constexpr,
                     BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    """Both Fisher kernels' tile: output rows and columns with their bounds, the token rows of one block, and
    the offsets of g^T [O, T] and x [T, I] inside one token block."""
    offs_o, offs_i = _tile_offsets(d_out, d_in, BLOCK_O, BLOCK_I)
    rows = tl.arange(0, BLOCK_T)
    if WIDE:
        rows = rows.to(tl.int64)
    g_tile = offs_o[:, None] + rows[None, :] * stride_g
    x_tile = rows[:, None] * stride_x + offs_i[None, :]
    return offs_o, offs_i, offs_o < d_out, offs_i < d_in, rows, g_tile, x_tile


@triton.jit
def _fisher_token_kernel(acc_ptr, x_ptr, g_ptr, n_rows, d_in, d_out, stride_x, stride_g, tokens_bucket,
                         INTERPRET: tl.constexpr, WIDE: tl.constexpr,
                         BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    # tokens_bucket only keys the autotuner
    offs_o, offs_i, o_ok, i_ok, rows, g_tile, x_tile = _fisher_prologue(d_out, d_in, stride_g, stride_x, WIDE,
                                                                         BLOCK_O, BLOCK_I, BLOCK_T)
    tile = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_T):
        r_ok = rows < n_rows - start
        first = tl.cast(start, tl.int64)
        g = tl.load(g_ptr + first * stride_g + g_tile, mask=o_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + first * stride_x + x_tile, mask=r_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        if x_ptr.dtype.element_ty == tl.float32:
            tile = tl.dot(g * g, x * x, tile, input_precision="tf32x3")
        else:
            tile = tl.dot(_bf16_square(g, INTERPRET), _bf16_square(x, INTERPRET), tile)
    _add_tile(acc_ptr, offs_o, offs_i, d_out, d_in, tile)


@triton.jit
def _fisher_sample_kernel(acc_ptr, x_ptr, g_ptr, n_batch, n_tokens, d_in, d_out, sx_b, sx_t, sg_b, sg_t,
                          tokens_bucket, INTERPRET: tl.constexpr, WIDE: tl.constexpr,
                          BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    # tokens_bucket only keys the autotuner
    offs_o, offs_i, o_ok, i_ok, rows, g_tile, x_tile = _fisher_prologue(d_out, d_in, sg_t, sx_t, WIDE,
                                                                         BLOCK_O, BLOCK_I, BLOCK_T)
    steps = tl.cdiv(n_tokens, BLOCK_T)
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for k in range(0, n_batch * steps):
        b = k // steps
        start = (k - b * steps) * BLOCK_T
        r_ok = rows < n_tokens - start
        b, start = tl.cast(b, tl.int64), tl.cast(start, tl.int64)
        g = tl.load(g_ptr + b * sg_b + start * sg_t + g_tile, mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + b * sx_b + start * sx_t + x_tile, mask=r_ok[:, None] & i_ok[None, :], other=0.0)
        if INTERPRET:
            g, x = g.to(tl.float32), x.to(tl.float32)
        grad = tl.dot(g, x, grad, input_precision="tf32x3")  # the precision applies to fp32 operands only
        if k % steps == steps - 1:  # sample b is complete
            total += grad * grad
            grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    _add_tile(acc_ptr, offs_o, offs_i, d_out, d_in, total)


_fisher_token_tuned = triton.autotune(_DOT_CONFIGS, key=["d_out", "d_in", "tokens_bucket"],
                                      restore_value=["acc_ptr"])(_fisher_token_kernel)
_fisher_sample_tuned = triton.autotune(_DOT_CONFIGS, key=["d_out", "d_in", "tokens_bucket"],
                                       restore_value=["acc_ptr"])(_fisher_sample_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS


def activation_sq(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                  block_rows: int = 32, block_cols: int = 128, splits: int | None = None, num_warps: int = 4) -> None:
    """acc[d] += sum of x[t]^2 over rows t with mask[t] != 0; x is [N, d] with unit column stride.

    The defaults were the fastest of a dozen tile / warp / split settings on the H200 (T=16384, d=4096 bf16)."""
    n_rows, n_cols = x.shape
    col_blocks, row_blocks = triton.cdiv(n_cols, block_cols), max(1, triton.cdiv(n_rows, block_rows))
    if splits is None:
        splits = triton.cdiv(PROGRAMS_PER_SM * _sm_count(x.device), col_blocks)
    blocks_per_split = triton.cdiv(row_blocks, min(splits, row_blocks, MAX_SPLITS))
    splits = triton.cdiv(row_blocks, blocks_per_split)  # no empty splits
    out = acc if splits == 1 else torch.empty((splits, n_cols), dtype=torch.float32, device=acc.device)
    _activation_sq_kernel[(col_blocks, splits)](out, x, mask if mask is not None else x, n_rows, n_cols, x.stride(0),
                                                blocks_per_split * block_rows, HAS_MASK=mask is not None,
                                                ADD_TO_OUT=splits == 1, BLOCK_ROWS=block_rows,
                                                BLOCK_COLS=block_cols, num_warps=num_warps)
    if splits > 1:
        tile_splits = triton.next_power_of_2(splits)
        block = max(16, 4096 // tile_splits)
        _sum_splits_kernel[(triton.cdiv(n_cols, block),)](acc, out, splits, n_cols, SPLITS=tile_splits, BLOCK=block)


def _dot_grid(d_out: int, d_in: int, blocks: tuple[int, int, int] | None):
    if blocks is not None:
        return (triton.cdiv(d_out, blocks[0]) * triton.cdiv(d_in, blocks[1]),)
    return lambda meta: (triton.cdiv(d_out, meta["BLOCK_O"]) * triton.cdiv(d_in, meta["BLOCK_I"]),)


def _launch(kernel, tuned, grid, args, blocks: tuple[int, int, int] | None, row_strides: tuple[int, ...]) -> None:
    """Autotuned tiles, or the given (BLOCK_O, BLOCK_I, BLOCK_T) (tests pin small ones)."""
    flags = {"INTERPRET": INTERPRET, "WIDE": max(row_strides) >= WIDE_ROW_STRIDE}
    if blocks is None:
        tuned[grid](*args, **flags)
    else:
        kernel[grid](*args, **flags, BLOCK_O=blocks[0], BLOCK_I=blocks[1], BLOCK_T=blocks[2])


def fisher_token(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor, *,
                 blocks: tuple[int, int, int] | None = None) -> None:
    """acc[o, i] += sum_t g[t, o]^2 x[t, i]^2 for x [N, d_in], g [N, d_out], both unit column stride."""
    d_out, d_in = acc.shape
    n_rows = x.shape[0]
    _launch(_fisher_token_kernel, _fisher_token_tuned, _dot_grid(d_out, d_in, blocks),
            (acc, x, g, n_rows, d_in, d_out, x.stride(0), g.stride(0), triton.next_power_of_2(n_rows)), blocks,
            (x.stride(0), g.stride(0)))


def fisher_sample(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor, *,
                  blocks: tuple[int, int, int] | None = None) -> None:
    """acc[o, i] += sum_b (g_b^T x_b)[o, i]^2 for x [B, T, d_in], g [B, T, d_out], unit column stride."""
    d_out, d_in = acc.shape
    n_batch, n_tokens = x.shape[:2]
    _launch(_fisher_sample_kernel, _fisher_sample_tuned, _dot_grid(d_out, d_in, blocks),
            (acc, x, g, n_batch, n_tokens, d_in, d_out, x.stride(0), x.stride(1), g.stride(0), g.stride(1),
             triton.next_power_of_2(n_batch * n_tokens)), blocks, (x.stride(1), g.stride(1)))

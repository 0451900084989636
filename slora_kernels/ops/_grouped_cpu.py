"""grouped_lora on CPU tensors: plain torch GEMMs, one output tensor per layer.

Eager calls run the extension's C++ op `slora::grouped_lora_cpu` (csrc/grouped_lora_cpu.cpp, `native`):
the same computation as the bodies below, with the whole forward one call from Python and the backward
one C++ autograd node, so no Python runs per GEMM; under autocast over weights that autocast copies anyway
it stacks the copies (`[W; A_cat]`, a block-diagonal B) and runs fewer, larger GEMMs. The fused modules call it
through the extension's `PreparedGroup` (`prepared`): the same computation with its arguments fixed once, so a
call passes x alone. The Python bodies are the fallback without the extension and the bodies of the
torch.compile ops.

Forward: S = drop(x) A_cat^T (one GEMM over the packed A), then per layer y_i = x W_i^T + b_i and
y_i += s_i S_i B_i^T in place. Separate outputs (not column views of one buffer) spare the
backward autograd's copy of the G output gradients into one buffer, and per-layer base GEMMs cost
what one GEMM over the stacked W costs on CPU. Backward: per layer dS_i = s_i dY_i B_i and
dB_i = s_i dY_i^T S_i (the scale rides on the GEMM's alpha), then dA_cat = dS^T drop(x) and the
LoRA part of dx, dS A_cat, as one GEMM each; each dY_i W_i is added into dx in place.

The op count per call is what a host-bound step pays (a tiny model, or a GPU waiting for the host),
so nothing here loops over a tensor's elements in Python or builds what the caller can keep.
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from slora_kernels.ops import _extension  # noqa: F401  (registers torch.ops.slora.dropout)
from slora_kernels.ops.utils import draw_seed

_DROPOUT = torch.ops.slora.dropout.default
HALF_DTYPES = (torch.bfloat16, torch.float16)
NATIVE = _extension.HAS_EXTENSION and hasattr(torch.ops.slora, "grouped_lora_cpu")
_NATIVE_OP = torch.ops.slora.grouped_lora_cpu.default if NATIVE else None
if NATIVE:
    from slora_kernels._C import PreparedGroup


def dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """t with each element kept by the counter-based hash of (seed, index), scaled by 1 / (1 - p)."""
    return t if p == 0.0 else _DROPOUT(t, p, seed)


@functools.lru_cache(maxsize=None)
def column_major_pays(dtype: torch.dtype) -> bool:
    """Whether this CPU's half-precision GEMM runs faster with its right operand copied column-major.

    oneDNN takes a slow path for a row-major bf16/fp16 right operand on CPUs without native half
    GEMMs (7-12x slower on AVX2), while on CPUs with them (AVX512-BF16, AMX) both layouts run at the
    same speed and the copy is pure overhead. Decided once per process and dtype by timing both on a
    GEMM the size of a small layer's backward (a few milliseconds).
    """
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(256, 512, generator=gen).to(dtype)
    w = torch.randn(512, 384, generator=gen).to(dtype)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    row_major = best(lambda: torch.mm(dy, w))
    copied = best(lambda: torch.mm(dy, w.t().contiguous().t()))
    return copied < 0.7 * row_major


@functools.lru_cache(maxsize=None)
def column_major_half(*dtypes: torch.dtype | None) -> bool:
    """Whether a call computing in these dtypes feeds its half-precision right operands column-major."""
    return any(d in HALF_DTYPES and column_major_pays(d) for d in dtypes)


def native(layout, x, operands, seed) -> list[torch.Tensor]:
    """The group's outputs from the extension's C++ op (its backward a C++ autograd node)."""
    return _NATIVE_OP(x, operands.weights, operands.biases, operands.lora_a, operands.lora_b, layout.scales,
                      layout.dropout_p, seed, layout.cast_to,
                      column_major_half(x.dtype, operands.lora_a[0].dtype, layout.cast_to))


def prepared(layout, operands, x_dtype: torch.dtype):
    """`native` for inputs of x_dtype as a callable of x alone: everything else is fixed now in the extension's
    PreparedGroup (no per-call parsing of the op's arguments), the seed drawn per call when there is dropout; and
    the count of backwards its autograd nodes have run."""
    group = PreparedGroup(operands.weights, operands.biases, operands.lora_a, operands.lora_b, list(layout.scales),
                           layout.dropout_p, layout.cast_to,
                           column_major_half(x_dtype, operands.lora_a[0].dtype, layout.cast_to))
    backward_calls = functools.partial(getattr, group, "backward_calls")
    if layout.dropout_p == 0.0:
        return functools.partial(group, seed=0), backward_calls
    return (lambda x: group(x, draw_seed())), backward_calls


def column_major(m: torch.Tensor) -> torch.Tensor:
    """m laid out column-major (a copy unless it already is), for a half-precision GEMM's right operand."""
    return m if m.stride(0) == 1 else m.t().contiguous().t()


def _pack_a(lora_a) -> torch.Tensor:
    """A_cat [R, d_in] (a copy for G > 1: made in the forward and again in the backward rather than kept)."""
    return lora_a[0] if len(lora_a) == 1 else torch.cat(lora_a)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def forward(layout, x, operands, seed):
    """([y_0 .. y_{G-1}], (S,)): outputs [..., d_out_i] shaped like x (not views, so callers may modify them
    in place) in x's dtype; S [N, R] in the factors' dtype, the one tensor the backward needs saved besides x."""
    factor_dtype = operands.lora_a[0].dtype
    flat = _flat(x)
    xf = flat if flat.dtype == factor_dtype else flat.to(factor_dtype)
    a_cat = _pack_a(operands.lora_a)
    s = F.linear(dropout(xf, layout.dropout_p, seed), a_cat)
    s_parts = (s,) if len(layout.ranks) == 1 else s.split_with_sizes(layout.ranks, 1)
    if not operands.weights:  # the LoRA terms alone, in the factors' dtype (F.linear on the leading dims: not views)
        lead = x.shape[:-1]
        return [F.linear(s_i.view(*lead, s_i.shape[1]), b_i).mul_(scale)
                for s_i, b_i, scale in zip(s_parts, operands.lora_b, layout.scales)], (s,)
    ys = []
    layers = zip(operands.weights, operands.biases, s_parts, operands.lora_b,
                 layout.scales)
    for w, b, s_i, b_i, scale in layers:
        w_t, b_t = w.t(), b_i.t()
        if x.dim() == 2:
            y = torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)
        else:  # matmul folds the leading dims itself and returns a tensor, not a view of one
            y = torch.matmul(x, w_t) if b is None else torch.matmul(x, w_t).add_(b)
        y_flat = _flat(y)
        if y.dtype == factor_dtype:
            y_flat.addmm_(s_i, b_t, alpha=scale)
        else:  # PEFT's mixed-dtype sum: computed in the wider dtype, rounded once into y's
            y_flat.add_(torch.mm(s_i, b_t), alpha=scale)
        ys.append(y)
    return ys, (s,)


def backward(layout, grads, x, weights, has_bias, lora_a, lora_b, saved, seed, need_x, need_weight, need_bias):
    """(dx, [dW_i], [db_i], [dA_i], [dB_i]) from one output gradient per layer (each shaped like its
    output); None where not needed (and for a layer without a bias). saved: (S,)."""
    (s,) = saved
    factor_dtype = s.dtype
    flat = _flat(x)
    grads = [_flat(g) for g in grads]
    reorder = column_major_half(factor_dtype)
    s_parts = (s,) if len(grads) == 1 else s.split_with_sizes(layout.ranks, 1)
    ds_parts, grad_b = [], []
    for dy, b_i, s_i, scale in zip(grads, lora_b, s_parts, layout.scales):
        dy = dy if dy.dtype == factor_dtype else dy.to(factor_dtype)
        # beta=0: the GEMM writes alpha * (a @ b) and ignores its addend (here a tensor of the result's shape).
        ds_parts.append(torch.addmm(s_i, dy, column_major(b_i) if reorder else b_i, beta=0, alpha=scale))
        grad_b.append(torch.addmm(b_i, dy.t(), s_i, beta=0, alpha=scale))
    ds = ds_parts[0] if len(ds_parts) == 1 else torch.cat(ds_parts, 1)
    xf = flat if flat.dtype == factor_dtype else flat.to(factor_dtype)
    grad_a = torch.mm(ds.t(), dropout(xf, layout.dropout_p, seed))
    grad_a = (grad_a,) if len(grads) == 1 else grad_a.split_with_sizes(layout.ranks)
    grad_x = None
    if need_x:
        a_cat = _pack_a(lora_a)
        grad_x = dropout(torch.mm(ds, column_major(a_cat) if reorder else a_cat), layout.dropout_p, seed)
        grad_x = grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)
        reorder_base = column_major_half(x.dtype)
        for dy, w in zip(grads, weights):
            grad_x.addmm_(dy, column_major(w) if reorder_base else w)
        grad_x = grad_x.view(x.shape)
    grad_w = grad_bias = None
    if need_weight:
        grad_w = [torch.mm(dy.t(), flat) for dy in grads]
    if need_bias:
        grad_bias = [dy.sum(0) if has else None for dy, has in zip(grads, has_bias)]
    return grad_x, grad_w, grad_bias, grad_a, grad_b

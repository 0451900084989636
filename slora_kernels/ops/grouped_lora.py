"""grouped_lora: G linear layers that share one input, each with a LoRA adapter of its own rank.

Output i = x W_i^T + b_i + scales[i] * drop(x) A_i^T B_i^T, which is what PEFT's LoRA Linear
computes, but for the whole group at once: one dropout mask, the shrink S = drop(x) A_cat^T as
one GEMM over the packed A, and the expand added straight into each base output (no temporaries
for the LoRA branch, no per-layer mask). That is what saves time over PEFT's per-module path.

Devices: CUDA tensors take the segmented Triton kernels of `slora_kernels.triton.lora_kernels`
and cuBLAS: the expand writes the LoRA term (and bias) of every layer side by side into one
[N, sum d_out] buffer, which one cuBLAS GEMM over the stacked W takes as its addend (`addmm`), so
Y is written once and never re-read; the outputs are column views of it. CPU tensors take plain
torch: a base GEMM per layer on row slices of the stacked W (as fast as one GEMM there) into
separate outputs, each then `addmm_`-ed with its expand, so the backward receives separate
output gradients.

Backward: dB_i = s_i dY_i^T S_i, dS_i = s_i dY_i B_i (on CUDA both from one read of dY),
dA_cat = dS^T drop(x) (one GEMM), dx = dY W_cat + drop(dS A_cat) (on CUDA one cuBLAS GEMM with
the LoRA part as addend). S is saved; drop(x) is not: the mask is a function of `seed` and
is drawn again, bit for bit, in the backward, and no mask tensor is stored: each element's keep bit
is a hash of (seed, index), computed by the extension's `slora::dropout` on CPU (parallel, ~8x
faster than torch's serial CPU Bernoulli) and by the same hash in Triton on CUDA, so CPU and GPU
runs drop the same elements.

Dtypes follow PEFT's LoRA Linear: x, W and b share the base dtype; the factors share one dtype of
their own (PEFT keeps them in float32 under a bf16/fp16 base by default). The LoRA branch runs in
the factors' dtype on x cast to it, and is added to the base output with one rounding into the
base dtype; gradients reach the factors in their dtype and x in its own. Under torch.autocast the
op casts every floating input to the autocast dtype first, as autocast does for `F.linear`.

Both halves are `torch.library.custom_op`s with fake kernels, registered autograd and autocast, so
torch.compile traces a module that calls `grouped_lora` without graph breaks (when `seed` is
given or dropout_p == 0; drawing a seed from torch's global RNG is a `.item()`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from slora_kernels.ops import _extension  # noqa: F401  (registers torch.ops.slora.pack)
from slora_kernels.ops import utils
from slora_kernels.ops.pack import pack_layout
from slora_kernels.ops.utils import FLOAT_DTYPES, check_same, check_tensor

SEED_BOUND = 2**62


def grouped_lora(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scales: Sequence[float], *,
                 dropout_p: float = 0.0, seed: int | None = None) -> list[torch.Tensor]:
    """Outputs of G LoRA linears sharing input x [..., d_in]: a list of G tensors [..., d_out_i].

    weights[i] [d_out_i, d_in], biases[i] [d_out_i] or None (x's dtype), lora_a[i] [r_i, d_in]
    (r_i >= 1), lora_b[i] [d_out_i, r_i] (all factors of one float dtype, x's or another, e.g.
    float32 factors under a bf16 x), scales[i] a float. Dropout with probability dropout_p is applied to
    the LoRA branch's input (one mask shared by the group); `seed` fixes the mask (None: drawn
    from torch's global RNG, so torch.manual_seed makes runs repeat). Differentiable in x, the
    LoRA factors, and W and b when they require grad. On CUDA the outputs are column views of one
    buffer, on CPU separate tensors.
    """
    _check_group(x, weights, biases, lora_a, lora_b, scales, dropout_p, seed)
    return grouped_lora_unchecked(x, list(weights), stack_biases(weights, biases), lora_a, lora_b, scales,
                                  dropout_p=dropout_p, seed=seed)


def stack_biases(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The group's biases as one [sum d_out] vector (zeros for layers without one), or None if none has one."""
    if all(b is None for b in biases):
        return None
    if len(biases) == 1:
        return biases[0]
    return torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])


def grouped_lora_unchecked(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                           lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scales: Sequence[float], *,
                           dropout_p: float = 0.0, seed: int | None = None) -> list[torch.Tensor]:
    """`grouped_lora` without argument checks, bias already stacked [sum d_out]; weights one per
    layer or [W_cat] already stacked [sum d_out, d_in]. The fused modules call this with a W_cat
    they cache across steps on CUDA (the frozen base weights are not re-concatenated every step).
    """
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(SEED_BOUND, (1,)).item())
    flat = x.reshape(-1, x.shape[-1])
    *ys, _ = _run_forward(flat, weights, bias, list(lora_a), list(lora_b), [float(s) for s in scales],
                          float(dropout_p), seed or 0)
    if len(ys) < len(lora_b):  # the Triton path's one [N, sum d_out] buffer
        ys = ys[0].split([b.shape[0] for b in lora_b], dim=-1)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def _check_group(x, weights, biases, lora_a, lora_b, scales, dropout_p, seed) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last (feature) dimension, got shape {tuple(x.shape)}")
    d_in = x.shape[-1]
    lists = {"weights": weights, "biases": biases, "lora_a": lora_a, "lora_b": lora_b, "scales": scales}
    for name, value in lists.items():
        if isinstance(value, (torch.Tensor, str)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    groups = len(weights)
    if groups == 0:
        raise ValueError("weights must hold at least one weight, got an empty list")
    for name, value in lists.items():
        if len(value) != groups:
            raise ValueError(f"{name} must have one entry per layer ({groups} like weights), got {len(value)}")
    check_tensor("lora_a[0]", lora_a[0], dtypes=FLOAT_DTYPES)
    # Under autocast the op casts its inputs to one dtype first (as for F.linear): any mix is fine.
    check_dtypes = not torch.is_autocast_enabled(x.device.type)
    for i in range(groups):
        w = check_tensor(f"weights[{i}]", weights[i], ndim=2)
        a = check_tensor(f"lora_a[{i}]", lora_a[i], ndim=2)
        b = check_tensor(f"lora_b[{i}]", lora_b[i], ndim=2)
        for name, t in (("weights", w), ("lora_a", a), ("lora_b", b)):
            check_same(name, i, t, x, "device", "x")
        if check_dtypes:
            check_same("weights", i, w, x, "dtype", "x")
            for name, t in (("lora_a", a), ("lora_b", b)):
                check_same(name, i, t, lora_a[0], "dtype", "lora_a[0]")
        d_out, rank = w.shape[0], a.shape[0]
        if w.shape[1] != d_in:
            raise ValueError(f"weights[{i}] must be [d_out, d_in={d_in}] like x's last dim, got {tuple(w.shape)}")
        if rank < 1:
            raise ValueError(f"lora_a[{i}] must have rank >= 1 rows, got shape {tuple(a.shape)}")
        if a.shape[1] != d_in:
            raise ValueError(f"lora_a[{i}] must be [r, d_in={d_in}], got {tuple(a.shape)}")
        if tuple(b.shape) != (d_out, rank):
            raise ValueError(f"lora_b[{i}] must be [d_out={d_out}, r={rank}] to match weights[{i}] and "
                             f"lora_a[{i}], got {tuple(b.shape)}")
        if biases[i] is not None:
            bias = check_tensor(f"biases[{i}]", biases[i], ndim=1)
            for attr in ("dtype", "device") if check_dtypes else ("device",):
                check_same("biases", i, bias, x, attr, "x")
            if bias.shape[0] != d_out:
                raise ValueError(f"biases[{i}] must be [d_out={d_out}] or None, got {tuple(bias.shape)}")
        scale = scales[i]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scales[{i}] must be a float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scales[{i}] must be finite, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")


# ----------------------------------------------------------------------------- the two custom ops


def _blocks(grad_ys: list[torch.Tensor], weights: list[torch.Tensor], d_outs: Sequence[int]):
    """(dY block, W block) pairs with sum_j dY_j W_j = dY W_cat, splitting whichever side is whole
    (no copy of W or dY): per layer, or the one stacked pair."""
    if len(grad_ys) == len(weights):
        return list(zip(grad_ys, weights))
    if len(weights) == 1:
        return list(zip(grad_ys, weights[0].split(d_outs)))
    return list(zip(grad_ys[0].split(d_outs, dim=1), weights))


def _pack_a(lora_a: list[torch.Tensor]) -> torch.Tensor:
    """A_cat [R, d_in]: torch.cat on CPU (measured 6x faster than the C++ gather at these sizes), the
    mixed-rank gather on CUDA (one launch; offsets cached per rank tuple)."""
    if len(lora_a) == 1:
        return lora_a[0]
    if not lora_a[0].is_cuda:
        return torch.cat(lora_a)
    offsets, total_rows = pack_layout(tuple(a.shape[0] for a in lora_a), 1, lora_a[0].device)
    return torch.ops.slora.pack(lora_a, offsets, total_rows)


def _dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """t * mask / (1 - p), each element's keep bit a hash of (seed, its index): the same on every
    call and on every device (the CPU op and the Triton kernel compute the same bits)."""
    if p == 0.0:
        return t
    if utils.triton_path(t):
        from slora_kernels.triton.dropout_kernels import hash_dropout

        return hash_dropout(t, p, seed)
    return torch.ops.slora.dropout(t, p, seed)


def _right_operand(m: torch.Tensor) -> torch.Tensor:
    """m as the right operand of a GEMM, column-major for bf16/fp16 on CPU: oneDNN's path for a
    row-major one is 7-12x slower on CPUs without native bf16 (benchmarks/RESULTS.md), and the
    transposed copy costs a few percent of the GEMM. Unchanged elsewhere."""
    if m.is_cuda or m.dtype not in (torch.bfloat16, torch.float16) or m.stride(0) == 1:
        return m
    return m.t().contiguous().t()


def _as_factor_dtype(x: torch.Tensor, lora_a: list[torch.Tensor]) -> torch.Tensor:
    """x in the factors' dtype: the LoRA branch's input, as PEFT casts it."""
    return x.to(lora_a[0].dtype)


def _ranks_and_outs(lora_b: list[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(b.shape[1] for b in lora_b), tuple(b.shape[0] for b in lora_b)


def _cuda_layout(lora_b: list[torch.Tensor], scales: Sequence[float]):
    from slora_kernels.triton.lora_kernels import segment_layout

    ranks, d_outs = _ranks_and_outs(lora_b)
    return segment_layout(d_outs, ranks, tuple(scales), lora_b[0].device)


def _stacked_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    """W_cat [sum d_out, d_in]: the one given, or the layers' weights concatenated (a copy per call:
    the fused modules pass a W_cat they cache, so training does not pay it)."""
    return weights[0] if len(weights) == 1 else torch.cat(weights)


def _flat_b(lora_b: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.reshape(-1) for b in lora_b])


def stacks_outputs(x: torch.Tensor) -> bool:
    """Whether the forward returns the layers side by side in one buffer (Triton) or one tensor each (CPU).

    One tensor per layer on CPU spares the backward the copy of the G output gradients into one
    [N, sum d_out] buffer that autograd makes for column views (a `split`'s backward is a `cat`);
    on CPU per-layer base GEMMs cost the same as one GEMM over the stacked W.
    """
    return utils.triton_path(x)


def _forward_impl(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                  lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scales: list[float], dropout_p: float,
                  seed: int) -> list[torch.Tensor]:
    """[Y, S] with Y [N, sum d_out] on the Triton path, [Y_0, .., Y_{G-1}, S] on CPU; S = drop(x) A_cat^T.

    weights: one [d_out_i, d_in] per layer, or the group's [sum d_out, d_in] stack as one tensor.
    Y in x's dtype, S in the factors' dtype.
    """
    s = torch.mm(_dropout(_as_factor_dtype(x, lora_a), dropout_p, seed), _pack_a(lora_a).t())
    if stacks_outputs(x):
        from slora_kernels.triton.lora_kernels import lora_expand

        # The LoRA term (and bias) is written once and read by cuBLAS as the base GEMM's addend:
        # Y is never read back and rewritten.
        lora_term = lora_expand(s, _flat_b(lora_b), bias, _cuda_layout(lora_b, scales), x.dtype)
        return [torch.addmm(lora_term, x, _stacked_weight(weights).t()), s]
    ranks, d_outs = _ranks_and_outs(lora_b)
    layer_biases = [None] * len(lora_b) if bias is None else bias.split(d_outs)
    ys = []
    layer_weights = weights if len(weights) == len(lora_b) else weights[0].split(d_outs)
    layers = zip(layer_weights, layer_biases, s.split(ranks, dim=1), lora_b, scales)
    for w, b, s_i, lora_b_i, scale in layers:
        y = torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())
        if y.dtype == s.dtype:
            ys.append(y.addmm_(s_i, lora_b_i.t(), alpha=scale))
        else:  # PEFT's mixed-dtype sum: computed in the wider dtype, rounded once into y's
            ys.append(y.add_(torch.mm(s_i, lora_b_i.t()), alpha=scale))
    return [*ys, s]


@torch.library.custom_op("slora::grouped_lora_forward", mutates_args=())
def _grouped_forward(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                     lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scales: list[float], dropout_p: float,
                     seed: int) -> list[torch.Tensor]:
    return _forward_impl(x, weights, bias, lora_a, lora_b, scales, dropout_p, seed)


@_grouped_forward.register_fake
def _grouped_forward_fake(x, weights, bias, lora_a, lora_b, scales, dropout_p, seed):
    s = lora_a[0].new_empty((x.shape[0], sum(a.shape[0] for a in lora_a)))
    d_outs = [b.shape[0] for b in lora_b]
    d_outs = [sum(d_outs)] if stacks_outputs(x) else d_outs
    return [*(x.new_empty((x.shape[0], d)) for d in d_outs), s]


def _backward_impl(grad_ys: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                   lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], s: torch.Tensor, scales: list[float],
                   dropout_p: float, seed: int, need_x: bool, need_weight: bool) -> list[torch.Tensor]:
    """[dx, dW_cat, dA_0.., dB_0..] from the forward's output gradients (one, or one per layer);
    dx / dW_cat are empty when not needed. The factors' gradients are taken in their dtype (dY cast
    to it, as autograd does through PEFT's mixed-dtype sum), dx in x's."""
    ranks, d_outs = _ranks_and_outs(lora_b)
    if stacks_outputs(x) and not torch.are_deterministic_algorithms_enabled():
        from slora_kernels.triton.lora_kernels import lora_grad_sb

        (grad_y,) = grad_ys
        ds, db = lora_grad_sb(grad_y, s, _flat_b(lora_b), _cuda_layout(lora_b, scales))
        ds = ds.to(s.dtype)
        grad_b = [g.view_as(b).to(b.dtype, copy=True) for g, b in zip(db.split([b.numel() for b in lora_b]), lora_b)]
    else:
        dy_parts = grad_ys if len(grad_ys) == len(lora_b) else grad_ys[0].split(d_outs, dim=1)
        grad_b, ds_parts = [], []
        for dy, b, s_i, scale in zip(dy_parts, lora_b, s.split(ranks, dim=1), scales):
            dy = dy.to(s.dtype)
            ds_parts.append(torch.mm(dy, _right_operand(b * scale)))
            grad_b.append(torch.mm(dy.t(), s_i).mul_(scale))
        ds = ds_parts[0] if len(ds_parts) == 1 else torch.cat(ds_parts, dim=1)
    grad_a = torch.mm(ds.t(), _dropout(_as_factor_dtype(x, lora_a), dropout_p, seed))
    blocks = _blocks(grad_ys, weights, d_outs)
    if not need_x:
        grad_x = x.new_empty(0)
    elif stacks_outputs(x):  # one cuBLAS GEMM with the LoRA part as its addend: dx is written once
        lora_part = _dropout(torch.mm(ds, _pack_a(lora_a)), dropout_p, seed).to(x.dtype)
        grad_x = torch.addmm(lora_part, grad_ys[0], _stacked_weight(weights))
    else:
        grad_x = _dropout(torch.mm(ds, _right_operand(_pack_a(lora_a))), dropout_p, seed).to(x.dtype)
        for dy, w in blocks:
            grad_x.addmm_(dy, _right_operand(w))
    grad_weight = torch.cat([torch.mm(dy.t(), x) for dy, _ in blocks]) if need_weight else x.new_empty(0)
    return [grad_x, grad_weight, *[g.clone() for g in grad_a.split(ranks)], *grad_b]


@torch.library.custom_op("slora::grouped_lora_backward", mutates_args=())
def _grouped_backward(grad_ys: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                      lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], s: torch.Tensor, scales: list[float],
                      dropout_p: float, seed: int, need_x: bool, need_weight: bool) -> list[torch.Tensor]:
    return _backward_impl(grad_ys, x, weights, lora_a, lora_b, s, scales, dropout_p, seed, need_x, need_weight)


@_grouped_backward.register_fake
def _grouped_backward_fake(grad_ys, x, weights, lora_a, lora_b, s, scales, dropout_p, seed, need_x, need_weight):
    w_cat = (sum(b.shape[0] for b in lora_b), x.shape[1])
    return [x.new_empty(x.shape if need_x else (0,)), x.new_empty(w_cat if need_weight else (0,)),
            *[a.new_empty(a.shape) for a in lora_a], *[b.new_empty(b.shape) for b in lora_b]]


def _setup_context(ctx, inputs, output):
    x, weights, bias, lora_a, lora_b, scales, dropout_p, seed = inputs
    ctx.sizes = (len(weights), len(lora_a))
    ctx.args = (scales, dropout_p, seed)
    ctx.need = (x.requires_grad, any(w.requires_grad for w in weights), bias is not None and bias.requires_grad)
    ctx.save_for_backward(x, output[-1], *weights, *lora_a, *lora_b)


def _input_grads(ctx, grads, run_backward):
    """(dx, [dW_i], db, [dA_i], [dB_i]) from the output gradients, computed by run_backward (the
    backward op, or its body on the eager path); None where no gradient is needed."""
    x, s, *saved = ctx.saved_tensors
    (n_weights, groups), (need_x, need_weight, need_bias) = ctx.sizes, ctx.need
    weights, lora_a, lora_b = saved[:n_weights], saved[n_weights:n_weights + groups], saved[n_weights + groups:]
    grad_ys = [g.contiguous() for g in grads[:-1]]  # the last output, S, is internal: its gradient is zero
    grads = run_backward(grad_ys, x, list(weights), list(lora_a), list(lora_b), s, *ctx.args, need_x, need_weight)
    grad_weights = list(grads[1].split([w.shape[0] for w in weights])) if need_weight else [None] * n_weights
    grad_bias = torch.cat([g.sum(0) for g in grad_ys]) if need_bias else None
    return grads[0] if need_x else None, grad_weights, grad_bias, grads[2:2 + groups], grads[2 + groups:]


def _backward(ctx, grads):
    return (*_input_grads(ctx, grads, torch.ops.slora.grouped_lora_backward), None, None, None)


_grouped_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupedLora(torch.autograd.Function):
    """The eager path: the same forward and backward bodies as the custom ops, without torch.library's
    per-call wrapping (pytree flattening, redispatch, a dynamo-disable frame per op), which costs more
    host time than a GPU needs for a whole layer at a few thousand tokens. The custom ops stay for
    torch.compile (traced) and autocast (their registered casts)."""

    @staticmethod
    def forward(ctx, spec, x, *tensors):
        n_weights, has_bias, groups, scales, dropout_p, seed = spec
        weights = list(tensors[:n_weights])
        bias = tensors[n_weights] if has_bias else None
        lora_a = list(tensors[n_weights + has_bias:n_weights + has_bias + groups])
        lora_b = list(tensors[n_weights + has_bias + groups:])
        outputs = _forward_impl(x, weights, bias, lora_a, lora_b, scales, dropout_p, seed)
        _setup_context(ctx, (x, weights, bias, lora_a, lora_b, scales, dropout_p, seed), outputs)
        ctx.has_bias = has_bias
        ctx.mark_non_differentiable(outputs[-1])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        grad_x, grad_weights, grad_bias, grad_a, grad_b = _input_grads(ctx, grads, _backward_impl)
        return (None, grad_x, *grad_weights, *([grad_bias] if ctx.has_bias else []), *grad_a, *grad_b)


def _run_forward(x, weights, bias, lora_a, lora_b, scales, dropout_p, seed) -> list[torch.Tensor]:
    """The forward op through the custom op when compiling or under autocast, else the eager Function."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return torch.ops.slora.grouped_lora_forward(x, weights, bias, lora_a, lora_b, scales, dropout_p, seed)
    spec = (len(weights), bias is not None, len(lora_a), scales, dropout_p, seed)
    optional_bias = [bias] if bias is not None else []
    return list(_EagerGroupedLora.apply(spec, x, *weights, *optional_bias, *lora_a, *lora_b))


# ----------------------------------------------------------------------------- autocast
# torch.library.register_autocast fixes one dtype at registration; users pick bf16 or fp16 per
# region, so these kernels read the region's dtype and cast as autocast casts F.linear's inputs.
_AUTOCAST_LIBRARY = torch.library.Library("slora", "IMPL")


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, list):
        return [_autocast_cast(v, device_type, dtype) for v in value]
    return value


def _register_autocast(op: torch._ops.OpOverload, device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*(_autocast_cast(a, device_type, dtype) for a in args))

    _AUTOCAST_LIBRARY.impl(op.__name__.split(".")[0], kernel, key_name, with_keyset=True)


def _register_autocast_rules() -> None:
    for op in (torch.ops.slora.grouped_lora_forward.default, torch.ops.slora.grouped_lora_backward.default):
        for device_type in ("cpu", "cuda"):
            _register_autocast(op, device_type)


_register_autocast_rules()

"""Segmented LoRA Triton kernels (expand, one-pass dS/dB) against float64 references, in the interpreter on CPU.

Random groups: G 1..4, ranks among 1, 3, 16, 17, 64, 130, odd d_out / token counts, narrow column
tiles and forced token splits so every loop and mask of the kernels runs. The interpreter is slow,
so shapes stay small; the same tests run on the GPU where there is one.
"""
import copy
import random

import pytest
import torch
from lora_helpers import (assert_mixed_dtype_group_matches_float64, batch, random_group, reference, seeded_keep,
                          tiny_fused_bert)

from slora_kernels import unfuse
from slora_kernels.nn.fused import FusedLoraLinear
from slora_kernels.ops import grouped_lora, utils
from slora_kernels.triton import lora_kernels
from slora_kernels.triton.lora_kernels import lora_expand, lora_grad_sb, segment_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}
RANKS = (1, 3, 16, 17, 64, 130)


@pytest.fixture(autouse=True)
def token_splits_of_sixteen(monkeypatch):
    """Split the backward's tokens finely, so small test shapes run several splits (and their atomics)."""
    monkeypatch.setattr(lora_kernels, "MIN_SPLIT_TOKENS", 16)
    monkeypatch.setattr(lora_kernels, "PROGRAMS_PER_SM", 1000)


def test_small_shapes_get_several_token_splits():
    layout = segment_layout((45,), (3,), (1.0,), torch.device(DEVICE), block_n=16)
    assert lora_kernels.token_splits(101, layout, torch.device(DEVICE)) == 7


def random_segments(rng: random.Random, dtype):
    groups = rng.randint(1, 4)
    d_outs = tuple(rng.choice([1, 17, 45, 70]) for _ in range(groups))
    ranks = tuple(rng.choice(RANKS) for _ in range(groups))
    tokens = rng.choice([1, 37, 101])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)

    lora_b = [rand(d, r) for d, r in zip(d_outs, ranks)]
    scales = tuple(rng.uniform(-2.0, 2.0) for _ in range(groups))
    return d_outs, ranks, rand(tokens, sum(ranks)), lora_b, rand(tokens, sum(d_outs)), scales


def columns(t, sizes):
    return t.double().split(list(sizes), dim=1)


def expected_grads(dy, s, lora_b, scales, d_outs, ranks):
    dy_parts, s_parts = columns(dy, d_outs), columns(s, ranks)
    ds = torch.cat([c * g @ b.double() for g, b, c in zip(dy_parts, lora_b, scales)], dim=1)
    db = torch.cat([(c * g.T @ s_i).reshape(-1) for g, s_i, c in zip(dy_parts, s_parts, scales)])
    return ds, db


BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.cuda)  # the interpreter mis-simulates bf16 tl.dot


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, BF16])
@pytest.mark.parametrize("block_n", [16, 128])
@pytest.mark.parametrize("case", range(3))
def test_kernels_match_float64_reference(dtype, block_n, case):
    rng = random.Random(case + 10 * len(str(dtype)) + block_n)
    d_outs, ranks, s, lora_b, dy, scales = random_segments(rng, dtype)
    layout = segment_layout(d_outs, ranks, scales, s.device, block_n=block_n)
    b_flat = torch.cat([b.reshape(-1) for b in lora_b])
    bias = torch.randn(sum(d_outs), dtype=torch.float64).to(dtype).to(DEVICE)
    tol = TOLERANCE[dtype]

    lora_terms = [c * s_i @ b.double().T for s_i, b, c in zip(columns(s, ranks), lora_b, scales)]
    torch.testing.assert_close(lora_expand(s, b_flat, None, layout, dtype).double(), torch.cat(lora_terms, dim=1),
                               rtol=tol, atol=tol * 10)
    torch.testing.assert_close(lora_expand(s, b_flat, bias, layout, dtype).double(),
                               torch.cat(lora_terms, dim=1) + bias.double(), rtol=tol, atol=tol * 10)

    want_ds, want_db = expected_grads(dy, s, lora_b, scales, d_outs, ranks)
    ds, db = lora_grad_sb(dy, s, b_flat, layout)
    assert ds.dtype == db.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ds.double(), want_ds, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(db.double(), want_db, rtol=tol, atol=tol * 10)


def assert_within_one_rounding(got, exact, dtype):
    """got (in dtype) is exact rounded once: within one ulp of dtype at exact's magnitude. One ulp, not
    half: the interpreter converts float32 to bf16 by truncation (checked), the GPU to nearest."""
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert got.dtype == dtype
    assert ((got.double() - exact).abs() <= ulp * 1.01 + 1e-6).all()


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(3))
def test_kernels_mixed_dtypes_float32_factors_half_outputs(out_dtype, case):
    """PEFT's default under a half-precision base: S and B float32, C / dY bf16 or fp16. dY is cast to
    float32 on load (exact), products accumulate in float32, C takes one rounding. (tl.dot itself runs
    on float32 here, so the interpreter simulates it; bf16 only enters through loads and stores.)"""
    rng = random.Random(300 + case)
    d_outs, ranks, s, lora_b, dy, scales = random_segments(rng, torch.float32)
    dy = dy.to(out_dtype)
    layout = segment_layout(d_outs, ranks, scales, s.device, block_n=16)
    b_flat = torch.cat([b.reshape(-1) for b in lora_b])
    expected = torch.cat([c * s_i @ b.double().T for s_i, b, c in zip(columns(s, ranks), lora_b, scales)], dim=1)
    assert_within_one_rounding(lora_expand(s, b_flat, None, layout, out_dtype), expected, out_dtype)

    want_ds, want_db = expected_grads(dy, s, lora_b, scales, d_outs, ranks)
    ds, db = lora_grad_sb(dy, s, b_flat, layout)
    assert ds.dtype == db.dtype == torch.float32
    torch.testing.assert_close(ds.double(), want_ds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-5)


def test_layout_pads_each_rank_to_its_chunk_not_to_the_group_max():
    layout = segment_layout((40, 8), (1, 70), (2.0, 0.5), torch.device("cpu"), block_n=16)
    assert layout.meta.tolist() == [[0, 40, 0, 1, 0], [40, 8, 1, 70, 40]]
    assert layout.scales.tolist() == [2.0, 0.5] and layout.scales64.dtype == torch.float64
    assert layout.total_rank == 71 and layout.total_out == 48 and layout.b_numel == 40 + 8 * 70
    assert layout.block_r == 32  # the largest rank is over 16
    assert layout.column_tiles.tolist() == [[0, 0, 0], [0, 16, 0], [0, 32, 0], [1, 0, 0]]
    # one rank chunk for r = 1 per column tile; ceil(70 / 32) = 3 for r = 70 (not padded to the group max).
    assert layout.grad_tiles.tolist() == [[0, n, 0] for n in (0, 16, 32)] + [[1, 0, k] for k in (0, 32, 64)]


@pytest.fixture
def triton_path(monkeypatch):
    """Route the op through its Triton (CUDA) path; on CPU the kernels run in the interpreter."""
    monkeypatch.setattr(utils, "triton_path", lambda x: True)


@pytest.mark.parametrize("case", range(4))
def test_op_on_triton_path_forward_and_all_gradients(triton_path, case):
    rng = random.Random(200 + case)
    p = 0.2 if case % 2 else 0.0
    x, weights, biases, lora_a, lora_b, scales = random_group(rng, max_rank=70)
    x, weights, lora_a, lora_b = x.to(DEVICE), [w.to(DEVICE) for w in weights], [a.to(DEVICE) for a in lora_a], [
        b.to(DEVICE) for b in lora_b]
    biases = [None if b is None else b.to(DEVICE) for b in biases]
    leaves = [x, *weights, *[b for b in biases if b is not None], *lora_a, *lora_b]
    for t in leaves:
        t.requires_grad_(True)
    ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=p, seed=9)
    refs = reference(x, weights, biases, lora_a, lora_b, scales, seeded_keep(x, p, 9) if p else None)
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r, rtol=1e-12, atol=1e-12)
    cotangents = [torch.randn_like(y) for y in ys]
    for got, want in zip(torch.autograd.grad(ys, leaves, cotangents), torch.autograd.grad(refs, leaves, cotangents)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(2))
def test_op_on_triton_path_half_base_with_float32_factors(triton_path, base_dtype, case):
    assert_mixed_dtype_group_matches_float64(random.Random(500 + case), base_dtype, DEVICE, dropout_p=0.2 * case)


def test_fused_model_on_triton_path_matches_stock_peft_and_sees_weight_changes(triton_path):
    """The fused modules' Triton-path route (one GEMM per layer into its columns of the group's output): PEFT's
    logits and LoRA gradients, a frozen weight changed in place (through `.data` too, which no version counter
    sees), and a base bias that starts to train gets its gradient."""
    fused = tiny_fused_bert().to(DEVICE)
    stock = unfuse(copy.deepcopy(fused))
    ids, labels = batch()
    inputs = {"input_ids": ids.to(DEVICE), "labels": labels.to(DEVICE)}

    def logits_and_grads(model):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        return out.logits, {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    for _ in range(2):
        (got, got_grads), (want, want_grads) = logits_and_grads(fused), logits_and_grads(stock)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    key = "base_model.model.bert.encoder.layer.0.attention.self.key.base_layer"
    for write in (lambda w: w.mul_(-2.0), lambda w: w.data.add_(0.5)):
        with torch.no_grad():
            for model in (fused, stock):
                write(model.get_submodule(key).weight)
        torch.testing.assert_close(logits_and_grads(fused)[0], logits_and_grads(stock)[0], rtol=1e-5, atol=1e-6)
    for model in (fused, stock):
        model.get_submodule(key).bias.requires_grad_(True)
    (got, _), (want, _) = logits_and_grads(fused), logits_and_grads(stock)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_bias, want_bias = (model.get_submodule(key).bias.grad for model in (fused, stock))
    assert want_bias is not None and want_bias.abs().sum() > 0
    torch.testing.assert_close(got_bias, want_bias, rtol=1e-5, atol=1e-6)


def _group_on_device(seed: int, dtype=torch.float64):
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(seed), dtype, max_rank=40)
    move = lambda ts: [None if t is None else t.to(DEVICE) for t in ts]  # noqa: E731
    x, weights, biases, lora_a, lora_b = x.to(DEVICE), move(weights), move(biases), move(lora_a), move(lora_b)
    for t in [x, *lora_a, *lora_b]:
        t.requires_grad_(True)
    return x, weights, biases, lora_a, lora_b, scales


def _forward_backward(group, dropout_p=0.0):
    x, weights, biases, lora_a, lora_b, scales = group
    ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=dropout_p, seed=3)
    return torch.autograd.grad(ys, [x, *lora_a, *lora_b], [torch.ones_like(y) for y in ys])


def test_deterministic_mode_takes_the_per_layer_gemms(triton_path, monkeypatch):
    """The one-pass kernel's atomics are order-dependent in the last bits; deterministic mode must not use it."""
    group = _group_on_device(41)
    expected = _forward_backward(group)

    def refuse(*args, **kwargs):
        raise AssertionError("lora_grad_sb ran under torch.use_deterministic_algorithms")

    monkeypatch.setattr(lora_kernels, "lora_grad_sb", refuse)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = _forward_backward(group)
    finally:
        torch.use_deterministic_algorithms(previous)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_launch_path_reads_nothing_back_from_the_device(triton_path, monkeypatch, dropout_p):
    """After the first call (layouts cached, kernels compiled), a forward + backward on the Triton path
    converts no tensor to a Python value: no .item(), .tolist(), bool(), int() or float() - each of
    which is a device-to-host sync on CUDA."""
    group = _group_on_device(42)
    _forward_backward(group, dropout_p)

    def sync(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} on the launch path")
        return refuse

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync(name))
    assert all(g is not None for g in _forward_backward(group, dropout_p))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_backward_never_synchronizes(dtype):
    group = _group_on_device(43, dtype)
    _forward_backward(group, 0.1)  # compiles and autotunes (which synchronizes), builds the layouts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
    try:
        grads = _forward_backward(group, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)

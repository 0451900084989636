"""Segmented LoRA Triton kernels (expand, dS, dB) against float64 references, in the interpreter on CPU.

Random groups: G 1..7, ranks 1..70, odd d_in / d_out / token counts. The interpreter is slow, so
shapes stay small; the same tests run on the GPU where there is one.
"""
import copy
import random

import pytest
import torch
from lora_helpers import (assert_mixed_dtype_group_matches_float64, batch, random_group, reference, seeded_keep,
                          tiny_fused_bert)

from slora_kernels import unfuse
from slora_kernels.ops import grouped_lora, utils
from slora_kernels.triton.lora_kernels import BLOCK_R, lora_expand_, lora_grad_b, lora_grad_s, segment_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def random_segments(rng: random.Random, dtype):
    groups = rng.randint(1, 7)
    d_outs = tuple(rng.choice([1, 3, 17, 33, 45]) for _ in range(groups))
    ranks = tuple(rng.randint(1, 70) for _ in range(groups))
    tokens = rng.choice([1, 5, 37])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)

    lora_b = [rand(d, r) for d, r in zip(d_outs, ranks)]
    scales = [rng.uniform(-2.0, 2.0) for _ in range(groups)]
    return d_outs, ranks, rand(tokens, sum(ranks)), lora_b, rand(tokens, sum(d_outs)), scales


def columns(t, sizes):
    return t.double().split(list(sizes), dim=1)


BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.cuda)  # the interpreter mis-simulates bf16 tl.dot


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, BF16])
@pytest.mark.parametrize("case", range(4))
def test_kernels_match_float64_reference(dtype, case):
    rng = random.Random(case + 10 * len(str(dtype)))
    d_outs, ranks, s, lora_b, y, scales = random_segments(rng, dtype)
    layout = segment_layout(d_outs, ranks, s.device)
    b_flat = torch.cat([b.reshape(-1) for b in lora_b])
    tol = TOLERANCE[dtype]
    s_parts, dy_parts = columns(s, ranks), columns(y, d_outs)

    expected = torch.cat([y_i + c * s_i @ b.double().T
                          for y_i, s_i, b, c in zip(columns(y, d_outs), s_parts, lora_b, scales)], dim=1)
    got = lora_expand_(y.clone(), s, b_flat, scales, layout)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * 10)

    dy = y  # any [N, D] tensor serves as the output gradient
    expected_ds = torch.cat([c * g @ b.double() for g, b, c in zip(dy_parts, lora_b, scales)], dim=1)
    torch.testing.assert_close(lora_grad_s(dy, b_flat, scales, layout).double(), expected_ds, rtol=tol, atol=tol * 10)

    expected_db = torch.cat([(c * g.T @ s_i).reshape(-1) for g, s_i, c in zip(dy_parts, s_parts, scales)])
    torch.testing.assert_close(lora_grad_b(dy, s, scales, layout).double(), expected_db, rtol=tol, atol=tol * 10)


def assert_within_one_rounding(got, exact, dtype):
    """got (in dtype) is exact rounded once: within one ulp of dtype at exact's magnitude. One ulp, not
    half: the interpreter converts float32 to bf16 by truncation (checked), the GPU to nearest."""
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert got.dtype == dtype
    assert ((got.double() - exact).abs() <= ulp * 1.01 + 1e-6).all()


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(3))
def test_kernels_mixed_dtypes_float32_factors_half_outputs(out_dtype, case):
    """PEFT's default under a half-precision base: S and B float32, Y / dY bf16 or fp16. dY is cast to
    float32 on load (exact), products accumulate in float32, Y takes one rounding. (tl.dot itself runs
    on float32 here, so the interpreter simulates it; bf16 only enters through loads and stores.)"""
    rng = random.Random(300 + case)
    d_outs, ranks, s, lora_b, y, scales = random_segments(rng, torch.float32)
    y = y.to(out_dtype)
    layout = segment_layout(d_outs, ranks, s.device)
    b_flat = torch.cat([b.reshape(-1) for b in lora_b])
    s_parts, dy_parts = columns(s, ranks), columns(y, d_outs)

    expected = torch.cat([y_i + c * s_i @ b.double().T for y_i, s_i, b, c in zip(dy_parts, s_parts, lora_b, scales)],
                         dim=1)
    assert_within_one_rounding(lora_expand_(y.clone(), s, b_flat, scales, layout), expected, out_dtype)

    expected_ds = torch.cat([c * g @ b.double() for g, b, c in zip(dy_parts, lora_b, scales)], dim=1)
    ds = lora_grad_s(y, b_flat, scales, layout)
    assert ds.dtype == torch.float32
    torch.testing.assert_close(ds.double(), expected_ds, rtol=1e-5, atol=1e-5)
    expected_db = torch.cat([(c * g.T @ s_i).reshape(-1) for g, s_i, c in zip(dy_parts, s_parts, scales)])
    db = lora_grad_b(y, s, scales, layout)
    assert db.dtype == torch.float32
    torch.testing.assert_close(db.double(), expected_db, rtol=1e-5, atol=1e-5)


def test_layout_pads_each_rank_to_sixteen_not_to_the_group_max():
    layout = segment_layout((40, 8), (1, 70), torch.device("cpu"))
    assert layout.meta.tolist() == [[0, 40, 0, 1, 0], [40, 8, 1, 70, 40]]
    assert layout.total_rank == 71 and layout.total_out == 48 and layout.b_numel == 40 + 8 * 70
    # rank tiles: one 16-wide chunk for r = 1, ceil(70 / 16) = 5 for r = 70 (not 5 + 5).
    assert layout.rank_tiles.tolist() == [[0, 0, 0]] + [[1, 0, k] for k in range(0, 70, BLOCK_R)]


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
    """The fused modules' Triton-path route: base weights stacked once into W_cat (cached), PEFT's
    logits and LoRA gradients, and a cache that follows an in-place change of a frozen weight."""
    fused = tiny_fused_bert().to(DEVICE)
    stock = unfuse(copy.deepcopy(fused))
    ids, labels = batch()
    inputs = {"input_ids": ids.to(DEVICE), "labels": labels.to(DEVICE)}

    def logits_and_grads(model):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        return out.logits, {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    for _ in range(2):  # the second step runs on the cached W_cat
        (got, got_grads), (want, want_grads) = logits_and_grads(fused), logits_and_grads(stock)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for model in (fused, stock):
            model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.key.base_layer").weight.mul_(-2.0)
    torch.testing.assert_close(logits_and_grads(fused)[0], logits_and_grads(stock)[0], rtol=1e-5, atol=1e-6)

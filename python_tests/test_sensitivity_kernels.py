"""Accumulation kernels against float64 references: Triton launchers (interpreter on CPU), the CPU path, checks."""
import pytest
import torch

from slora_kernels.ops import activation_sq_accumulate, fisher_diag_accumulate
from slora_kernels.triton import sensitivity_kernels as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)
RTOL = 1e-5  # low-precision inputs and products are exact in fp32, so fp32 summation error is all there is
SQUARE_RTOL = 2.0 ** -7 + 2.0 ** -16  # per-token 16-bit path: both squares rounded once to bf16 (2^-8 each)


def ref_activation(acc, x, mask):
    x64 = x.double().reshape(-1, x.shape[-1])
    keep = torch.ones(x64.shape[0], dtype=torch.float64) if mask is None else (mask.reshape(-1) != 0).double()
    return acc.double() + (x64.square() * keep[:, None]).sum(0)


def ref_fisher(acc, x, g, per_sample, bf16_squares=False):
    """float64 reference; bf16_squares: the squares rounded to bf16 first, as the per-token kernel does."""
    x64, g64 = x.cpu().double(), g.cpu().double()
    acc64 = acc.cpu().double()
    if per_sample:
        return acc64 + torch.bmm(g64.transpose(1, 2), x64).square().sum(0)
    gsq, xsq = g64.reshape(-1, g.shape[-1]).square(), x64.reshape(-1, x.shape[-1]).square()
    if bf16_squares:
        gsq, xsq = gsq.float().bfloat16().double(), xsq.float().bfloat16().double()
    return acc64 + gsq.T @ xsq


def assert_matches(got, want, rtol=RTOL):
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=1e-6 * want.abs().max().item())


def assert_fisher(acc, x, g, acc0, per_sample):
    """Exact products where the kernel has them; the per-token 16-bit path is held to the kernel's
    arithmetic (squares rounded to bf16, fp32 sums) and to the documented bound on the exact sum."""
    if per_sample or x.dtype == torch.float32:
        assert_matches(acc, ref_fisher(acc0, x, g, per_sample))
    else:
        assert_matches(acc, ref_fisher(acc0, x, g, False, bf16_squares=True))
        assert_matches(acc, ref_fisher(acc0, x, g, False), rtol=SQUARE_RTOL + RTOL)


def rand(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * 1.5).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,splits", [(77, 45, 3), (5, 130, 1), (129, 16, None), (300, 67, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_activation_sq(dtype, n, d, splits, masked, seeded):
    x = rand((n, d), dtype, seeded)
    mask = (torch.rand(n, generator=seeded) > 0.3).to(torch.int8).to(DEVICE) if masked else None
    acc = torch.rand(d, generator=seeded).to(DEVICE)
    want = ref_activation(acc.cpu(), x.cpu(), None if mask is None else mask.cpu())
    kernels.activation_sq(acc, x, mask, block_rows=16, block_cols=32, splits=splits, num_warps=4)
    assert_matches(acc, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_activation_sq_default_launch(dtype, seeded):
    # the GPU tiles and split count (about 8 programs per SM): several splits, each summed in order
    x = rand((1100, 129), dtype, seeded)
    mask = (torch.rand(1100, generator=seeded) > 0.5).to(torch.int8).to(DEVICE)
    acc = torch.rand(129, generator=seeded).to(DEVICE)
    want = ref_activation(acc.cpu(), x.cpu(), mask.cpu())
    kernels.activation_sq(acc, x, mask)
    assert_matches(acc, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,d_in,d_out", [(3, 11, 37, 19), (1, 40, 16, 33), (4, 1, 20, 48), (2, 37, 67, 29)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_triton_fisher(dtype, b, t, d_in, d_out, per_sample, seeded):
    x, g = rand((b, t, d_in), dtype, seeded), rand((b, t, d_out), dtype, seeded)
    acc = torch.rand(d_out, d_in, generator=seeded).to(DEVICE)
    acc0 = acc.clone()
    if per_sample:
        kernels.fisher_sample(acc, x, g, blocks=(16, 16, 16))
    else:
        kernels.fisher_token(acc, x.reshape(-1, d_in), g.reshape(-1, d_out), blocks=(16, 16, 16))
    assert_fisher(acc, x, g, acc0, per_sample)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_triton_fisher_autotuned(dtype, per_sample, seeded):
    # the autotuned launch (the first config only, in the interpreter): token counts and dims off the tile sizes
    x, g = rand((3, 37, 129), dtype, seeded), rand((3, 37, 67), dtype, seeded)
    acc = torch.rand(67, 129, generator=seeded).to(DEVICE)
    acc0 = acc.clone()
    if per_sample:
        kernels.fisher_sample(acc, x, g)
    else:
        kernels.fisher_token(acc, x.reshape(-1, 129), g.reshape(-1, 67))
    assert_fisher(acc, x, g, acc0, per_sample)


@pytest.mark.parametrize("dtype", HALF)
def test_triton_fisher_token_bf16_squares_bound(dtype, seeded):
    """Inputs over a wide range (fp16 up to 1000, whose squares overflow fp16): each entry stays within
    SQUARE_RTOL of the exact sum, and the kernel rounds each square once, to nearest (the emulated reference)."""
    log_high = 6.9 if dtype == torch.float16 else 13.8  # |x| up to 1000 or 1e6, down to e^-9

    def wide(shape):
        mags = torch.exp(torch.empty(shape).uniform_(-9.0, log_high, generator=seeded))
        return (mags * torch.sign(torch.randn(shape, generator=seeded))).to(dtype).to(DEVICE)
    x, g = wide((2, 45, 37)), wide((2, 45, 21))
    acc = torch.zeros(21, 37, device=DEVICE)
    kernels.fisher_token(acc, x.reshape(-1, 37), g.reshape(-1, 21), blocks=(16, 16, 16))
    assert torch.isfinite(acc).all()
    exact = ref_fisher(torch.zeros(21, 37), x, g, False)
    assert ((acc.cpu().double() - exact).abs() <= (SQUARE_RTOL + RTOL) * exact).all()
    assert_matches(acc, ref_fisher(torch.zeros(21, 37), x, g, False, bf16_squares=True))


def test_triton_fisher_sample_strided_inputs(seeded):
    # x a slice of a wider tensor (row stride != d_in): the launcher's strides must be honoured
    wide = rand((2, 9, 50), torch.float32, seeded)
    x, g = wide[..., 3:30], rand((2, 9, 17), torch.float32, seeded)
    acc = torch.zeros(17, 27, device=DEVICE)
    kernels.fisher_sample(acc, x, g, blocks=(16, 16, 16))
    assert_matches(acc, ref_fisher(torch.zeros(17, 27), x, g, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 45), (29, 64), (45,)])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_activation(dtype, shape, masked, seeded):
    x = rand(shape, dtype, seeded).cpu()
    mask = (torch.rand(shape[:-1], generator=seeded) > 0.4) if masked else None
    acc = torch.rand(shape[-1], generator=seeded)
    want = ref_activation(acc, x, mask)
    assert activation_sq_accumulate(acc, x, mask) is acc
    assert_matches(acc, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_cpu_fisher(dtype, per_sample, seeded, monkeypatch):
    import slora_kernels.ops.sensitivity as ops

    monkeypatch.setattr(ops, "SAMPLE_CHUNK_ELEMENTS", 2 * 31 * 23)  # force several per-sample chunks
    x, g = rand((5, 13, 23), dtype, seeded).cpu(), rand((5, 13, 31), dtype, seeded).cpu()
    acc = torch.rand(31, 23, generator=seeded)
    want = ref_fisher(acc, x, g, per_sample)
    assert fisher_diag_accumulate(acc, x, g, per_sample=per_sample) is acc
    assert_matches(acc, want)


def test_cpu_non_contiguous_inputs(seeded):
    x = rand((6, 4, 10), torch.float32, seeded).cpu().transpose(0, 1)  # [4, 6, 10], not contiguous
    acc = torch.zeros(10)
    assert_matches(activation_sq_accumulate(acc, x), ref_activation(torch.zeros(10), x, None))
    g = rand((4, 6, 8), torch.float32, seeded).cpu()
    acc = torch.zeros(8, 10)
    assert_matches(fisher_diag_accumulate(acc, x, g), ref_fisher(torch.zeros(8, 10), x, g, False))


def test_empty_inputs_leave_acc_unchanged():
    acc = torch.ones(4)
    assert torch.equal(activation_sq_accumulate(acc, torch.empty(0, 4)), torch.ones(4))
    acc2 = torch.ones(3, 4)
    assert torch.equal(fisher_diag_accumulate(acc2, torch.empty(0, 5, 4), torch.empty(0, 5, 3)), torch.ones(3, 4))


def _act(acc, x, mask=None):
    return lambda: activation_sq_accumulate(acc, x, mask)


def _fisher(acc, x, g, **kwargs):
    return lambda: fisher_diag_accumulate(acc, x, g, **kwargs)


@pytest.mark.parametrize("call,error,text", [
    (_act(torch.zeros(4, dtype=torch.float64), torch.ones(2, 4)), TypeError, "acc must have dtype"),
    (_act(torch.zeros(4), torch.ones(2, 5)), ValueError, "x must have last dimension d_in=4"),
    (_act(torch.zeros(4), torch.ones(2, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    (_act(torch.zeros(4), torch.ones(2, 3, 4), torch.ones(3, 2)), ValueError, r"mask must have shape \(2, 3\)"),
    (_act(torch.zeros(8)[::2], torch.ones(2, 4)), ValueError, "acc must be contiguous"),
    (_act(torch.zeros(4), "x"), TypeError, "x must be a torch.Tensor"),
    (_fisher(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 5, 2)), ValueError,
     "g must have last dimension d_out=3"),
    (_fisher(torch.zeros(3, 4), torch.ones(2, 5, 5), torch.ones(2, 5, 3)), ValueError,
     "x must have last dimension d_in=4"),
    (_fisher(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 6, 3)), ValueError,
     "g must have the batch and token"),
    (_fisher(torch.zeros(3, 4), torch.ones(10, 4), torch.ones(10, 3)), ValueError, "x must be 3-D"),
    (_fisher(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 5, 3, dtype=torch.half)), TypeError,
     "g must have the dtype of x"),
    (_fisher(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 5, 3), per_sample=1), TypeError,
     "per_sample must be a bool"),
])
def test_bad_arguments(call, error, text):
    with pytest.raises(error, match=text):
        call()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dispatch_matches_reference(dtype, seeded):
    # fp32: tf32x3 dots (about fp32 accuracy); 16-bit: exact products, per-token squares rounded to bf16
    x, g = rand((4, 33, 96), dtype, seeded), rand((4, 33, 80), dtype, seeded)
    mask = (torch.rand(4, 33, generator=seeded) > 0.3).cuda()
    acc = torch.rand(96, generator=seeded).cuda()
    want = ref_activation(acc.cpu(), x.cpu(), mask.cpu())
    assert_matches(activation_sq_accumulate(acc, x, mask), want)
    for per_sample in (False, True):
        acc = torch.rand(80, 96, generator=seeded).cuda()
        acc0 = acc.clone()
        assert_fisher(fisher_diag_accumulate(acc, x, g, per_sample=per_sample), x, g, acc0, per_sample)


@pytest.mark.cuda
def test_cuda_offsets_past_2_to_the_31():
    """Row offsets rows * stride beyond int32 (views into a 4.4 GB buffer): row bases are int64."""
    stride, n = (1 << 23) + 64, 260
    buffer = torch.zeros(n * stride, dtype=torch.bfloat16, device="cuda")
    x = buffer.as_strided((n, 40), (stride, 1))
    x.copy_(torch.arange(1, n + 1, device="cuda", dtype=torch.bfloat16)[:, None].expand(n, 40) / 8)
    acc = torch.zeros(40, device="cuda")
    kernels.activation_sq(acc, x)
    assert_matches(acc, ref_activation(torch.zeros(40), x.cpu(), None))
    g = torch.ones(n, 24, dtype=torch.bfloat16, device="cuda")
    acc = torch.zeros(24, 40, device="cuda")
    kernels.fisher_token(acc, x, g)
    assert_fisher(acc, x[None], g[None], torch.zeros(24, 40), False)
    acc = torch.zeros(24, 40, device="cuda")
    kernels.fisher_sample(acc, x.as_strided((2, n // 2, 40), (n // 2 * stride, stride, 1)), g.view(2, n // 2, 24))
    assert_fisher(acc, x.cpu().reshape(2, n // 2, 40), g.view(2, n // 2, 24), torch.zeros(24, 40), True)


@pytest.mark.parametrize("per_sample", [False, True])
def test_triton_fisher_wide_row_strides(per_sample, seeded):
    # a row stride of 2^24 + 16 elements takes the WIDE compile (int64 offsets inside a token block too)
    stride = (1 << 24) + 16
    buffer = torch.empty(5 * stride, dtype=torch.bfloat16, device=DEVICE)
    x = buffer.as_strided((1, 5, 19), (5 * stride, stride, 1))
    x.copy_(rand((1, 5, 19), torch.bfloat16, seeded))
    g = rand((1, 5, 11), torch.bfloat16, seeded)
    acc = torch.zeros(11, 19, device=DEVICE)
    if per_sample:
        kernels.fisher_sample(acc, x, g, blocks=(16, 16, 16))
    else:
        kernels.fisher_token(acc, x[0], g[0], blocks=(16, 16, 16))
    assert_fisher(acc, x, g, torch.zeros(11, 19), per_sample)

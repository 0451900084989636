"""Accumulation kernels against float64 references: Triton launchers in the interpreter, the public CPU path, checks."""
import pytest
import torch

from slora_kernels.ops import activation_sq_accumulate, fisher_diag_accumulate
from slora_kernels.triton import sensitivity_kernels as kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = 1e-5  # low-precision inputs are exact in fp32, so every dtype is held to fp32 summation error


def ref_activation(acc, x, mask):
    x64 = x.double().reshape(-1, x.shape[-1])
    keep = torch.ones(x64.shape[0], dtype=torch.float64) if mask is None else (mask.reshape(-1) != 0).double()
    return acc.double() + (x64.square() * keep[:, None]).sum(0)


def ref_fisher(acc, x, g, per_sample):
    x64, g64 = x.double(), g.double()
    if per_sample:
        return acc.double() + torch.bmm(g64.transpose(1, 2), x64).square().sum(0)
    return acc.double() + g64.reshape(-1, g.shape[-1]).square().T @ x64.reshape(-1, x.shape[-1]).square()


def assert_matches(got, want):
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=1e-6 * want.abs().max().item())


def rand(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * 1.5).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,splits", [(77, 45, 3), (5, 130, 1), (129, 16, None)])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_activation_sq(dtype, n, d, splits, masked, seeded):
    x = rand((n, d), dtype, seeded)
    mask = (torch.rand(n, generator=seeded) > 0.3).to(torch.int8) if masked else None
    acc = torch.rand(d, generator=seeded)
    want = ref_activation(acc, x, mask)
    kernels.activation_sq(acc, x, mask, block_rows=16, block_cols=32, splits=splits)
    assert_matches(acc, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,d_in,d_out", [(3, 11, 37, 19), (1, 40, 16, 33), (4, 1, 20, 48)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_triton_fisher(dtype, b, t, d_in, d_out, per_sample, seeded):
    x, g = rand((b, t, d_in), dtype, seeded), rand((b, t, d_out), dtype, seeded)
    acc = torch.rand(d_out, d_in, generator=seeded)
    want = ref_fisher(acc, x, g, per_sample)
    blocks = {"block_o": 16, "block_i": 16, "block_t": 16}
    if per_sample:
        kernels.fisher_sample(acc, x, g, **blocks)
    else:
        kernels.fisher_token(acc, x.reshape(-1, d_in), g.reshape(-1, d_out), **blocks)
    assert_matches(acc, want)


def test_triton_fisher_sample_strided_inputs(seeded):
    # x a slice of a wider tensor (row stride != d_in): the launcher's strides must be honoured
    wide = rand((2, 9, 50), torch.float32, seeded)
    x, g = wide[..., 3:30], rand((2, 9, 17), torch.float32, seeded)
    acc = torch.zeros(17, 27)
    kernels.fisher_sample(acc, x, g, block_o=16, block_i=16, block_t=16)
    assert_matches(acc, ref_fisher(torch.zeros(17, 27), x, g, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 45), (29, 64), (45,)])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_activation(dtype, shape, masked, seeded):
    x = rand(shape, dtype, seeded)
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
    x, g = rand((5, 13, 23), dtype, seeded), rand((5, 13, 31), dtype, seeded)
    acc = torch.rand(31, 23, generator=seeded)
    want = ref_fisher(acc, x, g, per_sample)
    assert fisher_diag_accumulate(acc, x, g, per_sample=per_sample) is acc
    assert_matches(acc, want)


def test_cpu_non_contiguous_inputs(seeded):
    x = rand((6, 4, 10), torch.float32, seeded).transpose(0, 1)  # [4, 6, 10], not contiguous
    acc = torch.zeros(10)
    assert_matches(activation_sq_accumulate(acc, x), ref_activation(torch.zeros(10), x, None))
    g = rand((4, 6, 8), torch.float32, seeded)
    acc = torch.zeros(8, 10)
    assert_matches(fisher_diag_accumulate(acc, x, g), ref_fisher(torch.zeros(8, 10), x, g, False))


def test_empty_inputs_leave_acc_unchanged():
    acc = torch.ones(4)
    assert torch.equal(activation_sq_accumulate(acc, torch.empty(0, 4)), torch.ones(4))
    acc2 = torch.ones(3, 4)
    assert torch.equal(fisher_diag_accumulate(acc2, torch.empty(0, 5, 4), torch.empty(0, 5, 3)), torch.ones(3, 4))


@pytest.mark.parametrize("call,error,text", [
    (lambda: activation_sq_accumulate(torch.zeros(4, dtype=torch.float64), torch.ones(2, 4)), TypeError, "acc must have dtype"),
    (lambda: activation_sq_accumulate(torch.zeros(4), torch.ones(2, 5)), ValueError, "x must have last dimension d_in=4"),
    (lambda: activation_sq_accumulate(torch.zeros(4), torch.ones(2, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    (lambda: activation_sq_accumulate(torch.zeros(4), torch.ones(2, 3, 4), torch.ones(3, 2)), ValueError, r"mask must have shape \(2, 3\)"),
    (lambda: activation_sq_accumulate(torch.zeros(8)[::2], torch.ones(2, 4)), ValueError, "acc must be contiguous"),
    (lambda: activation_sq_accumulate(torch.zeros(4), "x"), TypeError, "x must be a torch.Tensor"),
    (lambda: fisher_diag_accumulate(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 5, 2)), ValueError, "g must have last dimension d_out=3"),
    (lambda: fisher_diag_accumulate(torch.zeros(3, 4), torch.ones(2, 5, 5), torch.ones(2, 5, 3)), ValueError, "x must have last dimension d_in=4"),
    (lambda: fisher_diag_accumulate(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 6, 3)), ValueError, "g must have the batch and token"),
    (lambda: fisher_diag_accumulate(torch.zeros(3, 4), torch.ones(10, 4), torch.ones(10, 3)), ValueError, "x must be 3-D"),
    (lambda: fisher_diag_accumulate(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 5, 3, dtype=torch.half)), TypeError, "g must have the dtype of x"),
    (lambda: fisher_diag_accumulate(torch.zeros(3, 4), torch.ones(2, 5, 4), torch.ones(2, 5, 3), per_sample=1), TypeError, "per_sample must be a bool"),
])
def test_bad_arguments(call, error, text):
    with pytest.raises(error, match=text):
        call()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dispatch_matches_reference(dtype, seeded):
    x, g = rand((4, 33, 96), dtype, seeded).cuda(), rand((4, 33, 80), dtype, seeded).cuda()
    mask = (torch.rand(4, 33, generator=seeded) > 0.3).cuda()
    acc = torch.rand(96, generator=seeded).cuda()
    want = ref_activation(acc.cpu(), x.cpu(), mask.cpu())
    assert_matches(activation_sq_accumulate(acc, x, mask).cpu(), want)
    for per_sample in (False, True):
        acc = torch.rand(80, 96, generator=seeded).cuda()
        want = ref_fisher(acc.cpu(), x.cpu(), g.cpu(), per_sample)
        got = fisher_diag_accumulate(acc, x, g, per_sample=per_sample).cpu().double()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4 * want.abs().max().item())  # TF32 dots

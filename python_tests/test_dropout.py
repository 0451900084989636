"""slora::dropout, the counter-based CPU dropout behind grouped_lora: bit-exact against its plain-torch
definition (slora_kernels/ops/_hash_dropout.py), nn.Dropout's distribution, repeatable from the seed alone."""
import math
import os
import subprocess
import sys

import pytest
import torch

from slora_kernels.ops import _hash_dropout as hash_dropout

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 5), (33, 1, 17), (1001,), (257, 129)])
def test_kernel_equals_torch_definition_bit_for_bit(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(math.prod(shape)), dtype=torch.float64).to(dtype)
    for p, seed in ((0.05, 1), (0.3, 2**62 - 1), (0.9, 12345)):
        got = torch.ops.slora.dropout(x, p, seed)
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got, hash_dropout.dropout(x, p, seed))


def test_kept_values_are_scaled_like_nn_dropout():
    x = torch.randn(4000, dtype=torch.float64) + 3.0  # no zeros in x: every zero out is a dropped element
    p = 0.25
    y = torch.ops.slora.dropout(x, p, 5)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)


def test_non_contiguous_input_uses_logical_order():
    x = torch.randn(40, 31, dtype=torch.float32)
    assert torch.equal(torch.ops.slora.dropout(x.t(), 0.4, 9), torch.ops.slora.dropout(x.t().contiguous(), 0.4, 9))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_fraction_matches_p(p):
    n = 1_000_000
    dropped = (torch.ops.slora.dropout(torch.ones(n), p, 17) == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma


def test_neighbours_and_pair_halves_are_independent():
    """Both elements of a hash pair, and elements of neighbouring pairs, drop together with probability p^2."""
    n, p = 2_000_000, 0.5
    dropped = (torch.ops.slora.dropout(torch.ones(n), p, 23) == 0).double()
    sigma = math.sqrt(p * p * (1 - p * p) / (n // 2))
    assert abs((dropped[0::2] * dropped[1::2]).mean().item() - p * p) < 5 * sigma  # same 64-bit hash
    assert abs((dropped[1:-1:2] * dropped[2::2]).mean().item() - p * p) < 5 * sigma  # consecutive hashes


def test_seed_determines_mask_and_thread_count_does_not():
    x = torch.randn(300_001)
    first = torch.ops.slora.dropout(x, 0.3, 42)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.slora.dropout(x, 0.3, 42)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    other = torch.ops.slora.dropout(x, 0.3, 43)
    assert not torch.equal(first, other)
    agree = ((first == 0) == (other == 0)).double().mean().item()
    assert abs(agree - (0.3**2 + 0.7**2)) < 0.01  # two seeds: independent masks


@pytest.mark.parametrize("p, error", [(1.0, "p must be in"), (-0.1, "p must be in")])
def test_bad_p_is_refused(p, error):
    with pytest.raises(RuntimeError, match=error):
        torch.ops.slora.dropout(torch.ones(3), p, 0)
    with pytest.raises(ValueError, match=error):
        hash_dropout.dropout(torch.ones(3), p, 0)


def test_integer_input_is_refused():
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.slora.dropout(torch.ones(3, dtype=torch.int64), 0.1, 0)


def splitmix_keep(numel: int, p: float, seed: int) -> torch.Tensor:
    """The documented keep bits, in Python integers (no torch int64 wrap-around involved)."""
    full = (1 << 64) - 1
    keep = []
    for i in range(numel):
        z = (seed + (i // 2 + 1) * 0x9E3779B97F4A7C15) & full
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & full
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & full
        z ^= z >> 31
        half = z & 0xFFFFFFFF if i % 2 == 0 else z >> 32
        keep.append((half >> 8) < math.floor((1 - p) * 2**24))
    return torch.tensor(keep)


@pytest.mark.parametrize("seed", [77, -12345])
def test_kernel_and_fallback_keep_the_documented_bits(tmp_path, seed):
    # The fallback runs in a process without the extension; both are checked against splitmix_keep.
    p, x = 0.2, torch.arange(1.0, 1002.0)
    script = (
        "import torch, slora_kernels\n"
        "assert not slora_kernels.HAS_EXTENSION\n"
        f"torch.save(torch.ops.slora.dropout(torch.arange(1.0, 1002.0), {p}, {seed}), {str(tmp_path / 'out.pt')!r})\n"
    )
    env = dict(os.environ, SLORA_DISABLE_EXTENSION="1")
    subprocess.run([sys.executable, "-W", "ignore", "-c", script], check=True, env=env)
    keep = splitmix_keep(x.numel(), p, seed)
    assert 0.7 < keep.double().mean() < 0.9
    expected = torch.where(keep, x / (1 - p), torch.zeros(()))
    for got in (torch.load(tmp_path / "out.pt"), torch.ops.slora.dropout(x, p, seed)):
        assert torch.equal(got != 0, keep)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 1, 17), (2049,)])
def test_triton_kernel_drops_the_same_elements_as_the_cpu_op(dtype, shape):
    """The GPU's dropout (Triton; here in the interpreter, on the GPU where there is one) is the CPU
    op's function bit for bit, so a CPU and a GPU run with one seed drop the same elements."""
    from slora_kernels.triton.dropout_kernels import hash_dropout as triton_dropout

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    for p, seed in ((0.05, 1), (0.3, 2**62 - 1), (0.9, 12345)):
        got, want = triton_dropout(x.to(device), p, seed).cpu(), hash_dropout.dropout(x, p, seed)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got != 0, want != 0)
        if dtype == torch.bfloat16 and device == "cpu":  # the interpreter rounds float32 -> bf16 by truncation
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
        else:
            assert torch.equal(got, want)

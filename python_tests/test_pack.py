"""slora::pack / slora::unpack: the mixed-rank gather against a float64-free exact reference.

pack is a pure copy, so the reference is exact for every dtype: torch.zeros + slice assignment.
"""
import random
import sys

import pytest
import torch

from slora_kernels.ops import pack, unpack
from slora_kernels.ops.pack import pack_offsets

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def reference_pack(tensors, align):
    """Buffer and offsets written out: each segment starts at the first multiple of align after the last."""
    offsets, rows = [0], []
    for t in tensors:
        rows.extend(t)
        while len(rows) % align:
            rows.append(torch.zeros_like(t[0]))
        offsets.append(len(rows))
    return torch.stack(rows), offsets


def test_offsets_by_hand():
    assert pack_offsets([3, 1, 6], 1) == [0, 3, 4, 10]
    assert pack_offsets([3, 1, 6], 8) == [0, 8, 16, 24]
    assert pack_offsets([16, 17, 1], 16) == [0, 16, 48, 64]


def random_segments(rng: random.Random, dtype, max_segments=300, max_rank=97, max_n=1000):
    k = rng.randint(1, max_segments)
    n = rng.randint(1, max_n)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    return [(torch.rand(rng.randint(1, max_rank), n, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
            for _ in range(k)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("align", [1, 8, 16])
@pytest.mark.parametrize("case", range(3))
def test_pack_matches_reference_and_round_trips(dtype, align, case):
    rng = random.Random(hash((str(dtype), align, case)) & 0xFFFF)
    # Keep the element count bounded: many segments get a narrow n and vice versa.
    segments = random_segments(rng, dtype, max_n=1000 if case == 0 else 64)
    buffer, offsets = pack(segments, align=align)
    expected, expected_offsets = reference_pack(segments, align)
    assert offsets.dtype == torch.int64 and offsets.tolist() == expected_offsets
    assert all(o % align == 0 for o in offsets.tolist())
    assert torch.equal(buffer, expected)
    padding = torch.ones(buffer.shape[0], dtype=torch.bool)
    for t, start in zip(segments, offsets.tolist()):
        padding[start : start + t.shape[0]] = False
    assert torch.count_nonzero(buffer[padding]) == 0
    restored = unpack(buffer, offsets, [t.shape[0] for t in segments])
    assert len(restored) == len(segments)
    assert all(torch.equal(a, b) for a, b in zip(restored, segments))


def test_non_contiguous_inputs():
    base = torch.randn(40, 30, dtype=torch.float64)
    segments = [base[:7, ::2], base.t()[:5, :20], base[10:13, 1:21]]
    segments = [segments[0][:, :15], segments[1][:, :15], segments[2][:, :15]]
    assert not all(s.is_contiguous() for s in segments)
    buffer, offsets = pack(segments, align=4)
    expected, _ = reference_pack([s.contiguous() for s in segments], 4)
    assert torch.equal(buffer, expected)
    non_contiguous_buffer = buffer.t().contiguous().t()
    assert not non_contiguous_buffer.is_contiguous()
    restored = unpack(non_contiguous_buffer, offsets, [7, 5, 3])
    assert all(torch.equal(a, b) for a, b in zip(restored, segments))


def test_pack_gradcheck():
    segments = [torch.randn(r, 6, dtype=torch.float64, requires_grad=True) for r in (3, 1, 5)]
    assert torch.autograd.gradcheck(lambda *ts: pack(list(ts), align=4)[0], segments)


def test_unpack_gradcheck():
    buffer, offsets = pack([torch.randn(r, 5, dtype=torch.float64) for r in (2, 4, 1)], align=8)
    buffer.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: tuple(unpack(b, offsets, [2, 4, 1])), (buffer,))


def test_gradient_reaches_each_segment():
    segments = [torch.randn(r, 4, requires_grad=True) for r in (2, 3)]
    buffer, _ = pack(segments, align=8)
    weights = torch.arange(buffer.numel(), dtype=torch.float32).reshape(buffer.shape)
    (buffer * weights).sum().backward()
    assert torch.equal(segments[0].grad, weights[0:2])
    assert torch.equal(segments[1].grad, weights[8:11])


def test_opcheck():
    segments = [torch.randn(r, 7) for r in (3, 1, 6)]
    offsets = torch.tensor(pack_offsets([3, 1, 6], 8))
    torch.library.opcheck(torch.ops.slora.pack.default, (segments, offsets, int(offsets[-1])))
    buffer, _ = pack(segments, align=8)
    torch.library.opcheck(torch.ops.slora.unpack.default, (buffer, offsets, [3, 1, 6]))


def test_torch_compile_of_a_function_calling_pack():
    def packed_sum(a, b, c):
        buffer, _ = pack([a, b, c], align=16)
        return (buffer * 2).sum(dim=0)

    inputs = [torch.randn(r, 9) for r in (5, 2, 11)]
    compiled = torch.compile(packed_sum, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(*inputs), packed_sum(*inputs))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: pack([]), ValueError, "tensors must contain at least one"),
        (lambda: pack(torch.randn(3, 4)), TypeError, "tensors must be a list"),
        (lambda: pack([torch.randn(3)]), ValueError, r"tensors\[0\] must be 2-D"),
        (lambda: pack([torch.randn(2, 4), torch.randn(2, 3)]), ValueError, r"tensors\[1\] has 3 columns"),
        (lambda: pack([torch.randn(2, 4), torch.randn(2, 4).double()]), TypeError, r"tensors\[1\] has dtype"),
        (lambda: pack([torch.randn(2, 4), torch.randn(2, 4, device="meta")]), ValueError, r"tensors\[1\] has device"),
        (lambda: pack([torch.randn(2, 4)], align=0), ValueError, "align must be >= 1"),
        (lambda: pack([torch.randn(2, 4)], align=2.0), TypeError, "align must be an int"),
        (lambda: pack([torch.randint(0, 3, (2, 4))]), TypeError, r"tensors\[0\] must have dtype"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0, 4, 8]), [4]), ValueError, "offsets must have len"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0, 2, 8]), [3, 2]), ValueError, "offsets do not match rows"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0, 4, 9]), [3, 5]), ValueError, "offsets do not match rows"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0.0, 8.0]), [3]), TypeError, "offsets must have dtype"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0, 8]), []), ValueError, "rows must list"),
        # A bad segment after good ones: the one-pass check finds it, the named checks say what is wrong.
        (lambda: pack([torch.randn(2, 4)] * 3 + ["x"]), TypeError, r"tensors\[3\] must be a torch.Tensor, got str"),
        (lambda: pack([torch.randn(2, 4)] * 5 + [torch.randn(2, 4, 1)]), ValueError, r"tensors\[5\] must be 2-D"),
        (lambda: pack([torch.randn(2, 4)] * 2 + [torch.randn(2, 5)]), ValueError,
         r"tensors\[2\] has 5 columns, expected 4 like tensors\[0\]"),
        (lambda: pack([torch.randn(2, 4)] * 4 + [torch.randn(2, 4).half()]), TypeError,
         r"tensors\[4\] has dtype torch.float16, expected torch.float32 like tensors\[0\]"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0, 4, 8]), [4, True]), ValueError, "rows must be non-neg"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0, 4, 8]), [4, -1]), ValueError, "rows must be non-negative"),
        (lambda: unpack(torch.randn(8, 4), torch.tensor([0, 4, 8]), [4, 2.0]), ValueError, "rows must be non-negative"),
        (lambda: unpack(torch.randn(6, 4), torch.tensor([0, 4, 8]), [4, 4]), ValueError, "the buffer has 6 rows"),
    ],
)
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_offsets_are_cached_per_layout_and_fit_any_segments_of_those_rows():
    """Two lists of the same row counts share one offsets tensor; each buffer still holds its own list."""
    first, second = ([torch.randn(r, 6) for r in (3, 1, 5)] for _ in range(2))
    buffer_a, offsets_a = pack(first, align=4)
    buffer_b, offsets_b = pack(second, align=4)
    assert offsets_b is offsets_a and offsets_a.tolist() == [0, 4, 8, 16]
    assert torch.equal(buffer_a, reference_pack(first, 4)[0]) and torch.equal(buffer_b, reference_pack(second, 4)[0])
    assert pack(first, align=8)[1].tolist() == [0, 8, 16, 24]
    assert pack([torch.randn(r, 6) for r in (3, 2, 5)], align=4)[1].tolist() == [0, 4, 8, 16]
    assert pack([torch.randn(r, 6) for r in (3, 1, 5)], align=4)[1] is offsets_a
    offsets_a += 1  # a caller's in-place change does not leak into later calls
    buffer_c, offsets_c = pack(first, align=4)
    assert offsets_c is not offsets_a and offsets_c.tolist() == [0, 4, 8, 16]
    assert torch.equal(buffer_c, buffer_a)


def test_offsets_cached_under_inference_mode_still_serve_autograd():
    with torch.inference_mode():
        _, offsets = pack([torch.randn(r, 3) for r in (7, 2)], align=16)
    assert not offsets.is_inference()
    segments = [torch.randn(r, 3, requires_grad=True) for r in (7, 2)]
    buffer, again = pack(segments, align=16)
    assert again is offsets
    buffer.sum().backward()
    assert all(torch.equal(s.grad, torch.ones_like(s)) for s in segments)


def test_unpack_reads_offsets_from_the_tensor_only_when_new_or_changed(monkeypatch):
    """pack's offsets are never read back (on CUDA each read waits for the GPU); other offsets once per version."""
    reads, tolist = [], torch.Tensor.tolist

    def counted_tolist(self):  # counts unpack's own reads (the PyTorch fallback op reads offsets too)
        if sys._getframe(1).f_globals["__name__"] == "slora_kernels.ops.pack":
            reads.append(1)
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    segments = [torch.randn(r, 5) for r in (4, 4)]
    buffer, offsets = pack(segments, align=1)
    assert all(torch.equal(a, b) for a, b in zip(unpack(buffer, offsets, [4, 4]), segments)) and not reads
    mine = torch.tensor([0, 4, 8])
    unpack(buffer, mine, [4, 4])
    unpack(buffer, mine, [4, 4])
    assert len(reads) == 1
    mine[1] = 2  # an in-place change bumps the version: read again, and checked again
    with pytest.raises(ValueError, match="segment 0 spans rows 0..4 but the next segment starts at 2"):
        unpack(buffer, mine, [4, 4])
    assert len(reads) == 2


def test_fallback_without_extension_warns_and_matches(tmp_path):
    """With the compiled extension unavailable, the package warns once and packs the same."""
    import os
    import subprocess

    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import slora_kernels\n"
        "    from slora_kernels.ops import pack, unpack\n"
        "assert not slora_kernels.HAS_EXTENSION\n"
        "assert any('PyTorch fallback' in str(w.message) for w in caught)\n"
        "segs = [torch.randn(r, 5, dtype=torch.float64) for r in (3, 1, 4)]\n"
        "buf, offs = pack(segs, align=4)\n"
        "torch.save((segs, buf, offs, unpack(buf, offs, [3, 1, 4])), %r)\n" % str(tmp_path / "out.pt")
    )
    env = dict(os.environ, SLORA_DISABLE_EXTENSION="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    segs, buf, offs, restored = torch.load(tmp_path / "out.pt")
    expected, expected_offsets = reference_pack(segs, 4)
    assert torch.equal(buf, expected) and offs.tolist() == expected_offsets
    assert all(torch.equal(a, b) for a, b in zip(restored, segs))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_pack_matches_cpu(dtype):
    rng = random.Random(7)
    segments = random_segments(rng, dtype, max_segments=50, max_n=300)
    buffer, offsets = pack([s.cuda() for s in segments], align=16)
    expected, expected_offsets = reference_pack(segments, 16)
    assert offsets.is_cuda and offsets.tolist() == expected_offsets
    assert torch.equal(buffer.cpu(), expected)
    restored = unpack(buffer, offsets, [s.shape[0] for s in segments])
    assert all(torch.equal(a.cpu(), b) for a, b in zip(restored, segments))


@pytest.mark.cuda
def test_cuda_segment_tables_follow_moved_and_changed_segments():
    """The binding reuses the device table of an identical call: same addresses reuse it (and see new values),
    other segments of the same rows get their own, and tables on another stream are not shared."""
    segments = [torch.randn(r, 33, device="cuda") for r in (5, 1, 9)]
    for _ in range(2):
        buffer, _ = pack(segments, align=8)
        assert torch.equal(buffer.cpu(), reference_pack([s.cpu() for s in segments], 8)[0])
        segments[1].mul_(2)  # same address, new values
    moved = [s.clone() + 1 for s in segments]
    assert torch.equal(pack(moved, align=8)[0].cpu(), reference_pack([s.cpu() for s in moved], 8)[0])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        buffer, offsets = pack(segments, align=8)
        restored = unpack(buffer, offsets, [5, 1, 9])
    side.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(restored, segments))

"""Pack of 200 variable-rank segments (ranks 1..64, n = 4096, float32) on CPU: the C++ op against
the best torch-only equivalents. Medians of interleaved repetitions, so both see the same noise.

    python benchmarks/bench_pack.py [--repeats 30] [--align 16]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from slora_kernels.ops import pack
from slora_kernels.ops.pack import pack_offsets


def torch_cat_with_padding(segments, align):
    return torch.cat([F.pad(s, (0, 0, 0, -s.shape[0] % align)) for s in segments])


def torch_zeros_and_copy(segments, align):
    offsets = pack_offsets([s.shape[0] for s in segments], align)
    buffer = segments[0].new_zeros(offsets[-1], segments[0].shape[1])
    for s, start in zip(segments, offsets):
        buffer[start : start + s.shape[0]] = s
    return buffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--align", type=int, default=16)
    parser.add_argument("--segments", type=int, default=200)
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()

    rng = random.Random(0)
    segments = [torch.randn(rng.randint(1, 64), args.n) for _ in range(args.segments)]
    candidates = {
        "slora pack (C++ op)": lambda: pack(segments, align=args.align)[0],
        "torch.cat + F.pad": lambda: torch_cat_with_padding(segments, args.align),
        "torch.zeros + slice copies": lambda: torch_zeros_and_copy(segments, args.align),
    }
    reference = candidates["torch.cat + F.pad"]()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for name, fn in candidates.items():
        assert torch.equal(fn(), reference), name
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    mb = reference.numel() * reference.element_size() / 1e6
    ours = statistics.median(times["slora pack (C++ op)"])
    print(f"{args.segments} segments, ranks 1..64, n={args.n}, float32, align={args.align}: {mb:.0f} MB out, "
          f"torch threads={torch.get_num_threads()}, {args.repeats} interleaved repeats")
    print(f"| {'method':28} | median ms | GB/s written | time / C++ op |")
    print(f"|{'-' * 30}|-----------|--------------|---------------|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name:28} | {median * 1e3:9.2f} | {mb / 1e3 / median:12.2f} | {median / ours:13.2f} |")


if __name__ == "__main__":
    main()

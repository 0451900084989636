"""Where one fused LoRA forward + backward spends its time: host (Python, launches) against device.

On a CUDA machine: `python benchmarks/profile_fused_step.py [--tokens 4096] [--dim 4096] [--rank 16]`.
Prints the wall time per step with and without a device synchronisation per step (their
difference is how far the host runs ahead), and torch.profiler's top operators by host time. A step
whose wall time equals its host time is host-bound: the GPU waits for launches.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    from slora_kernels.ops import grouped_lora

    device, dtype = "cuda", torch.bfloat16
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(args.dim, args.dim, device=device, dtype=dtype) * args.dim ** -0.5
    a = (torch.randn(args.rank, args.dim, device=device, dtype=dtype) * args.dim ** -0.5).requires_grad_(True)
    b = (torch.randn(args.dim, args.rank, device=device, dtype=dtype) * 0.01).requires_grad_(True)
    dy = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)

    def step():
        (y,) = grouped_lora(x, [w], [None], [a], [b], [2.0])
        y.backward(dy)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    for synchronize in (False, True):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
            if synchronize:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        label = "synchronised per step" if synchronize else "host runs ahead"
        print(f"{label}: {(time.perf_counter() - start) / args.steps * 1e3:.3f} ms per step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()

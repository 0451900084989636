"""Where one LoRA layer's forward + backward spends its time: host (Python, launches) against device.

On a CUDA machine: `python benchmarks/profile_fused_step.py [--tokens 4096] [--dim 4096] [--rank 16] [--out f.json]`.
Three ways to run the same layer: the public op `grouped_lora` (argument checks on every call), a fused PEFT
layer (`slora_kernels.fuse`: the lean path training takes) and stock PEFT's LoRA Linear, plus the frozen base
Linear alone. For each: the wall time per step with and without a device synchronisation per step (their
difference is how far the host runs ahead; a step whose wall time equals its host time is host-bound: the
GPU waits for launches), then torch.profiler's top operators of the fused layer by host time.
`--dry-run` runs the same code on CPU at tiny sizes (the test suite does).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def layers(dim: int, rank: int, device: str, dtype: torch.dtype):
    """(base Linear, stock PEFT LoRA layer, fused PEFT LoRA layer), same weights, random B."""
    import copy

    from peft import LoraConfig, get_peft_model

    from slora_kernels import fuse

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(dim, dim, bias=False)).to(device, dtype)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"])
    stock = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    fused = fuse(copy.deepcopy(stock), example_inputs={"input": torch.zeros(1, dim, device=device, dtype=dtype)})
    return base.requires_grad_(False), stock, fused


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, help="write the timings as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.tokens, args.dim, args.rank, args.steps = 16, 24, 4, 3
    from slora_kernels.ops import grouped_lora

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    base, stock, fused = layers(args.dim, args.rank, device, dtype)
    w = base[0].weight
    a = (torch.randn(args.rank, args.dim, device=device, dtype=dtype) * args.dim ** -0.5).requires_grad_(True)
    b = (torch.randn(args.dim, args.rank, device=device, dtype=dtype) * 0.01).requires_grad_(True)

    def public_op():
        (y,) = grouped_lora(x, [w], [None], [a], [b], [2.0])
        y.backward(dy)

    def module_step(model):
        def step():
            model(x).backward(dy)
        return step

    steps = {"base Linear": module_step(base), "public op grouped_lora": public_op,
             "stock PEFT layer": module_step(stock), "fused PEFT layer": module_step(fused)}
    results = {"device": device, "tokens": args.tokens, "dim": args.dim, "rank": args.rank, "rows": {}}
    for name, step in steps.items():
        for _ in range(5):
            step()
        sync()
        row = {}
        for synchronize in (False, True):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
                if synchronize:
                    sync()
            sync()
            row["synchronised ms" if synchronize else "host-ahead ms"] = (time.perf_counter() - start) / args.steps * 1e3
        results["rows"][name] = row
        print(f"{name:24s} host runs ahead: {row['host-ahead ms']:.3f} ms/step   "
              f"synchronised per step: {row['synchronised ms']:.3f} ms/step", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda"
                                                          else [])
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(5):
            steps["fused PEFT layer"]()
        sync()
    table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(table)
    results["fused layer profile"] = table
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

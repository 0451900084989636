"""Training step (forward + backward + AdamW) of a fused model vs stock PEFT, same random rank_pattern.

MiniLM (BERT classifier) at batch 32 x 64 tokens and SmolLM2-135M (Llama causal LM) at batch
4 x 128 tokens, LoRA on every attention and MLP Linear with ranks drawn from 1..16. Both models
start from the same weights; their steps alternate, so both see the same machine noise; medians.
Precisions: fp32; bf16-base (base weights bf16, LoRA factors float32: PEFT's default for a bf16
model); bf16 (factors cast down too); autocast-bf16 (fp32 model, steps under torch.autocast, as
`Trainer(bf16=True)` runs). --compile compiles both models with torch.compile (inductor) first.

    python benchmarks/bench_training.py [--repeats 15] [--models minilm smollm2] [--lora-dropout 0.05]
                                        [--precision fp32 bf16-base bf16 autocast-bf16] [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from slora_kernels import fuse, fusion_stats
from slora_kernels.app.defaults import load_minilm_classifier, load_smollm2

SETUPS = {
    # name: (loader, target modules, batch, tokens)
    "minilm": (load_minilm_classifier, ["query", "key", "value", "dense"], 32, 64),
    "smollm2": (load_smollm2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 128),
}


def rank_pattern(model, targets, seed=0):
    rng = random.Random(seed)
    return {n: rng.randint(1, 16) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


PRECISIONS = ("fp32", "bf16-base", "bf16", "autocast-bf16")


def make_step(model, batch, precision):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast-bf16" else contextlib.nullcontext()
        with autocast:
            out = model(**batch)
            loss = out.loss if out.loss is not None else out.logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()

    return step


def bench(name: str, repeats: int, lora_dropout: float, precision: str, compile_models: bool,
          warmup: int = 2) -> dict:
    loader, targets, batch_size, tokens = SETUPS[name]
    base, _ = loader()
    if precision in ("bf16-base", "bf16"):
        base = base.to(torch.bfloat16)
    ranks = rank_pattern(base, targets)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, rank_pattern=ranks, lora_dropout=lora_dropout,
                        modules_to_save=["classifier"] if name == "minilm" else None)
    cast_down = precision == "bf16"  # PEFT keeps factors in float32 unless told otherwise
    stock = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=not cast_down).train()
    fused = fuse(get_peft_model(base, config, autocast_adapter_dtype=not cast_down).train())
    if compile_models:
        stock, fused = torch.compile(stock), torch.compile(fused)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (batch_size, tokens), generator=gen)
    batch = {"input_ids": ids, "labels": ids if name == "smollm2" else torch.randint(0, 2, (batch_size,), generator=gen)}
    steps = {"stock PEFT": make_step(stock, batch, precision), "fused": make_step(fused, batch, precision)}
    times = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for label, step in (steps.items() if i % 2 else reversed(steps.items())):
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    # Compiled calls are not counted (see slora_kernels.nn.stats); the graph holds the fused ops.
    fused_calls = "compiled" if compile_models else f"{100 * fusion_stats(fused).fused_fraction:.0f}%"
    return {"model": name, "precision": precision, "fused calls": fused_calls, "batch": f"{batch_size} x {tokens}", "ranks": f"{min(ranks.values())}..{max(ranks.values())}",
            "layers": len(ranks), **medians, "ratio": medians["fused"] / medians["stock PEFT"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", choices=sorted(SETUPS), default=["minilm", "smollm2"])
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="PEFT's lora_dropout for both models")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (inductor)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats, "
          f"lora_dropout {args.lora_dropout}{', torch.compile' if args.compile else ''}")
    print("| model | precision | batch x tokens | LoRA layers (ranks) | stock PEFT ms | fused ms | fused / stock "
          "| fused calls |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for precision in args.precision:
            r = bench(name, args.repeats, args.lora_dropout, precision, args.compile)
            print(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['layers']} ({r['ranks']}) | "
                  f"{r['stock PEFT']:.1f} | {r['fused']:.1f} | {r['ratio']:.3f} | {r['fused calls']} |", flush=True)


if __name__ == "__main__":
    main()

"""Training step (forward + backward + AdamW) of a fused model vs stock PEFT, same random rank_pattern.

MiniLM (BERT classifier) at batch 32 x 64 tokens and SmolLM2-135M (Llama causal LM) at batch
4 x 128 tokens, LoRA on every attention and MLP Linear with ranks drawn from 1..16. Both models
start from the same weights; their steps alternate, so both see the same machine noise; medians.

    python benchmarks/bench_training.py [--repeats 15] [--models minilm smollm2] [--lora-dropout 0.05]
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from slora_kernels import fuse
from slora_kernels.defaults import load_minilm_classifier, load_smollm2

SETUPS = {
    # name: (loader, target modules, batch, tokens)
    "minilm": (load_minilm_classifier, ["query", "key", "value", "dense"], 32, 64),
    "smollm2": (load_smollm2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 128),
}


def rank_pattern(model, targets, seed=0):
    rng = random.Random(seed)
    return {n: rng.randint(1, 16) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


def make_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(**batch)
        loss = out.loss if out.loss is not None else out.logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()

    return step


def bench(name: str, repeats: int, lora_dropout: float, warmup: int = 2) -> dict:
    loader, targets, batch_size, tokens = SETUPS[name]
    base, _ = loader()
    ranks = rank_pattern(base, targets)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, rank_pattern=ranks, lora_dropout=lora_dropout,
                        modules_to_save=["classifier"] if name == "minilm" else None)
    stock = get_peft_model(copy.deepcopy(base), config).train()
    fused = fuse(get_peft_model(base, config).train())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (batch_size, tokens), generator=gen)
    batch = {"input_ids": ids, "labels": ids if name == "smollm2" else torch.randint(0, 2, (batch_size,), generator=gen)}
    steps = {"stock PEFT": make_step(stock, batch), "fused": make_step(fused, batch)}
    times = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for label, step in (steps.items() if i % 2 else reversed(steps.items())):
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": name, "batch": f"{batch_size} x {tokens}", "ranks": f"{min(ranks.values())}..{max(ranks.values())}",
            "layers": len(ranks), **medians, "ratio": medians["fused"] / medians["stock PEFT"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", choices=sorted(SETUPS), default=["minilm", "smollm2"])
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="PEFT's lora_dropout for both models")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats, "
          f"lora_dropout {args.lora_dropout}")
    print("| model | batch x tokens | LoRA layers (ranks) | stock PEFT ms | fused ms | fused / stock |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, args.repeats, args.lora_dropout)
        print(f"| {r['model']} | {r['batch']} | {r['layers']} ({r['ranks']}) | {r['stock PEFT']:.1f} | "
              f"{r['fused']:.1f} | {r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""CPU benchmark of issue 3: estimator overhead on MiniLM + Rotten Tomatoes, and allocation speed.

Ratios (medians over --repeats runs, each run alternating the two sides so load from other
processes hits both alike):
  activation estimator / plain forward passes over the same batches   (target <= 1.15)
  per-token Fisher      / forward + backward over the same batches     (target <= 1.5)
  allocate_ranks on 1,000 matrices, milliseconds                        (target < 50)

    python benchmarks/bench_sensitivity.py --snippets 512 --repeats 5
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from slora_kernels import allocate_ranks, estimate_sensitivity
from slora_kernels.app.data import rotten_tomatoes
from slora_kernels.app.defaults import load_minilm_classifier
from slora_kernels.app.training import batches as tokenised_batches

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def calibration_batches(tokenizer, snippets: int, batch_size: int, max_length: int) -> list[dict]:
    train, _ = rotten_tomatoes()
    return list(tokenised_batches(tokenizer, train.head(snippets), batch_size, max_length))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_only(model, batches) -> None:
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)


def forward_backward(model, batches) -> None:
    """The baseline Fisher is compared with: frozen weights, gradients flowing to every activation."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for b in batches:
        inputs = model.get_input_embeddings()(b["input_ids"]).requires_grad_()
        out = model(inputs_embeds=inputs, attention_mask=b["attention_mask"], labels=b["labels"])
        (out.loss * b["input_ids"].shape[0]).backward()


def allocation_ms(n: int = 1000) -> float:
    rng = random.Random(0)
    theta = {f"model.layers.{i // 7}.mlp.proj{i % 7}": rng.random() for i in range(n)}
    max_rank = {k: rng.choice([64, 384]) for k in theta}
    return 1e3 * timed(lambda: allocate_ranks(theta, 8 * n, max_rank=max_rank))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snippets", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_minilm_classifier()
    batches = calibration_batches(tokenizer, args.snippets, args.batch_size, args.max_length)

    def estimate(estimator):
        return lambda: estimate_sensitivity(model, batches, target_modules=TARGETS, estimator=estimator, progress=False)

    forward_only(model, batches[:2])  # warm-up
    pairs = {"activation / forward": (estimate("activation"), lambda: forward_only(model, batches)),
             "fisher (per token) / forward+backward": (estimate("fisher"), lambda: forward_backward(model, batches))}
    print(f"MiniLM, {args.snippets} snippets, batch {args.batch_size}, max_length {args.max_length}, "
          f"{args.threads} threads, {args.repeats} repeats (medians)")
    for label, (ours, baseline) in pairs.items():
        t_ours, t_base = [], []
        for _ in range(args.repeats):
            t_base.append(timed(baseline))
            t_ours.append(timed(ours))
        med_ours, med_base = statistics.median(t_ours), statistics.median(t_base)
        print(f"{label:40s} {med_ours:7.2f} s / {med_base:7.2f} s = {med_ours / med_base:5.2f}")
    ms = statistics.median(allocation_ms() for _ in range(max(args.repeats, 5)))
    print(f"{'allocate_ranks, 1,000 matrices':40s} {ms:7.2f} ms")


if __name__ == "__main__":
    main()

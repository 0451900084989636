"""A plain training and evaluation loop for sequence classification and causal LM.

Plain torch (AdamW, linear decay) rather than transformers.Trainer so the CLI controls the
progress bar (loss, tokens/s), counts real (non-padding) tokens, and can call AdaLoRA's
`update_and_allocate` at the right point of each step. Batches are padded per batch, not to
max_length, which matters for short texts on CPU.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from slora_kernels.app.data import Examples


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-4
    max_length: int = 128
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    progress: bool = True

    def steps(self, n_examples: int) -> int:
        per_epoch = math.ceil(n_examples / self.batch_size)
        total = per_epoch * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)


@dataclass(frozen=True)
class TrainStats:
    steps: int
    tokens: int
    seconds: float
    final_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def batch_order(examples: Examples, shuffle_seed: int | None = None, by_length: bool = False) -> list[int]:
    """The example indices in the order `batches` visits them."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    elif by_length:
        order.sort(key=lambda i: len(examples.texts[i]))
    return order


def batches(tokenizer, examples: Examples, batch_size: int, max_length: int, shuffle_seed: int | None = None,
            by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches for `model(**batch)`; labels are the classes, or the tokens for causal LM.

    by_length sorts the texts by length first (evaluation: about half the padding of a random
    order on short texts, and sums over the whole split do not depend on the order).
    """
    order = batch_order(examples, shuffle_seed, by_length)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = dict(tokenizer([examples.texts[i] for i in idx], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt"))
        if examples.labels is not None:
            batch["labels"] = torch.tensor([examples.labels[i] for i in idx])
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        yield batch


def train(model: nn.Module, tokenizer, examples: Examples, config: TrainConfig,
          after_step: Callable[[int], None] | None = None) -> TrainStats:
    """Fine-tune the parameters that require grad.

    `after_step(i)` runs after the i-th optimizer step (0-based, gradients still there): PEFT's
    convention for AdaLoRA's `update_and_allocate`.
    """
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    total = config.steps(len(examples))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    model.train()
    step, tokens, loss_ema = 0, 0, float("nan")
    bar = tqdm(total=total, desc="train", unit="step", disable=not config.progress, dynamic_ncols=True)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        for batch in batches(tokenizer, examples, config.batch_size, config.max_length,
                             shuffle_seed=config.seed * 1000 + epoch):
            if step == total:
                break
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            loss_ema = loss.item() if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss.item()
            bar.set_postfix(loss=f"{loss_ema:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
            bar.update()
    bar.close()
    return TrainStats(step, tokens, time.perf_counter() - start, loss_ema)


@dataclass(frozen=True)
class Evaluation:
    scores: dict[str, float]
    correct: list[bool] | None  # classification: per example, in the examples' order (paired comparisons)


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, examples: Examples, batch_size: int = 64,
             max_length: int = 128, progress: bool = True) -> Evaluation:
    """Accuracy and mean loss (classification) or mean token loss and perplexity (causal LM)."""
    model.eval()
    hits: list[bool] = []
    loss_sum, weight = 0.0, 0
    for batch in tqdm(batches(tokenizer, examples, batch_size, max_length, by_length=True), desc="eval",
                      unit="batch", total=math.ceil(len(examples) / batch_size), disable=not progress,
                      dynamic_ncols=True):
        out = model(**batch)
        if examples.labels is not None:
            n = len(batch["labels"])
            hits += (out.logits.argmax(-1) == batch["labels"]).tolist()
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())  # causal LM: the shifted targets
        loss_sum += out.loss.item() * n
        weight += n
    model.train()
    loss = loss_sum / max(weight, 1)
    if examples.labels is None:
        return Evaluation({"loss": loss, "perplexity": math.exp(min(loss, 50.0))}, None)
    correct = [False] * len(examples)
    for index, hit in zip(batch_order(examples, by_length=True), hits):
        correct[index] = hit
    return Evaluation({"accuracy": sum(correct) / len(examples), "loss": loss}, correct)

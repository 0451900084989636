"""A fused model under DistributedDataParallel (gloo, 2 CPU processes) gets the gradients of one
process on the whole batch."""
import random

import pytest
import torch
from gloo_workers import spawn_gloo
from peft import LoraConfig, get_peft_model

from slora_kernels import fuse

WORLD = 2
BATCH, TOKENS = 4, 9


def tiny_fused_bert():
    """A 2-layer BERT built from a config (no download), LoRA with random ranks, fused."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(config)
    rng = random.Random(0)
    ranks = {n: rng.randint(1, 16) for n, m in base.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("query", "key", "value", "dense")}
    model = get_peft_model(base, LoraConfig(target_modules=["query", "key", "value", "dense"], rank_pattern=ranks,
                                            modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return fuse(model).train()


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 120, (BATCH, TOKENS), generator=gen), torch.randint(0, 2, (BATCH,), generator=gen)


def lora_grads(model):
    return {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def worker(rank, world, out_path):
    model = torch.nn.parallel.DistributedDataParallel(tiny_fused_bert())
    ids, labels = batch()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model(input_ids=ids[shard], labels=labels[shard]).loss.backward()
    if rank == 0:
        torch.save(lora_grads(model), out_path)


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "ddp_grads.pt"
    spawn_gloo(worker, WORLD, str(out))
    model = tiny_fused_bert()
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    expected, got = lora_grads(model), torch.load(out)
    assert got.keys() == expected.keys() and len(expected) == 2 * (2 * 6 + 1)  # A and B: 6 per layer + pooler
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)

"""A fused model sharded with FSDP2 (`fully_shard` per encoder layer, then the root; gloo, 2 CPU processes)
gets the loss and LoRA gradients of one process on the whole batch, after an optimizer step.

Both processes and the reference take the fused layers' Triton route (CUDA's, run by the interpreter), whose
base GEMMs read the weights FSDP unshards for the forward. Both orders of `fuse` and `fully_shard` are checked,
and `fully_shard` on each LoRA layer, where the layers run PEFT's forward (a layer's group-mates are FSDP units
of their own, still sharded when it runs), with the same results.
"""
import pytest
import torch
import torch.distributed as dist
from gloo_workers import spawn_gloo
from lora_helpers import batch, batch_rows, lora_grads, tiny_fused_bert, tiny_lora_bert
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from slora_kernels import fuse, fusion_stats
from slora_kernels.nn.fused import FusedLoraLinear
from slora_kernels.ops import utils

WORLD = 2
SETUPS = ("fuse, then shard blocks", "shard blocks, then fuse", "fuse, then shard each LoRA layer")
LAYER_CALLS = 2 * (2 * 6 + 1)  # two forwards of 6 LoRA layers per encoder layer and the pooler


def sharded_model(setup: str):
    model = tiny_lora_bert()
    if setup != SETUPS[1]:
        fuse(model)
    blocks = model.base_model.model.bert.encoder.layer
    for unit in blocks if setup != SETUPS[2] else [m for m in model.modules() if isinstance(m, FusedLoraLinear)]:
        fully_shard(unit)
    fully_shard(model)
    return fuse(model) if setup == SETUPS[1] else model


def loss_and_grads_after_a_step(model, rows):
    """One SGD step on rows of the batch, then the loss and LoRA gradients of the next forward/backward."""
    ids, labels = batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for step in range(2):
        optimizer.zero_grad()
        loss = model(input_ids=ids[rows], labels=labels[rows]).loss
        loss.backward()
        if step == 0:
            optimizer.step()
    return loss.detach(), lora_grads(model)


def worker(rank, world, out_dir):
    utils.triton_path = lambda x: True  # the test's monkeypatch does not reach spawned processes
    for i, setup in enumerate(SETUPS):
        model = sharded_model(setup)
        loss, grads = loss_and_grads_after_a_step(model, batch_rows(rank, world))
        dist.all_reduce(loss)
        base_weights = [m.base_layer.weight for m in model.modules() if isinstance(m, FusedLoraLinear)]
        facts = {"loss": loss / world, "grads": grads, "stats": fusion_stats(model),
                 "sharded": all(isinstance(w, DTensor) and w.to_local().numel() < w.numel() for w in base_weights)}
        if rank == 0:
            torch.save(facts, f"{out_dir}/{i}.pt")


@pytest.mark.slow
def test_fsdp2_matches_single_process(tmp_path, monkeypatch):
    spawn_gloo(worker, WORLD, str(tmp_path))
    monkeypatch.setattr(utils, "triton_path", lambda x: True)
    model = tiny_fused_bert()
    want_loss, want_grads = loss_and_grads_after_a_step(model, slice(None))
    for i, setup in enumerate(SETUPS):
        got = torch.load(tmp_path / f"{i}.pt", weights_only=False)
        stats = (got["stats"].fused, got["stats"].fallback)
        assert stats == ((0, {"hooks": LAYER_CALLS}) if setup == SETUPS[2] else (LAYER_CALLS, {})), setup
        assert got["sharded"], setup
        torch.testing.assert_close(got["loss"], want_loss, rtol=1e-5, atol=1e-7, msg=setup)
        assert got["grads"].keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"{setup}: {name}")

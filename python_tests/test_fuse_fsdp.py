"""A fused model sharded with FSDP2 (`fully_shard` per encoder layer, then the root; gloo, 2 CPU processes)
gets the loss and LoRA gradients of one process on the whole batch, after an optimizer step, and its
groups keep no unsharded copy of the base weights between steps.

Both processes and the reference take the fused layers' Triton route (CUDA's, run by the interpreter): it
is the route that stacks a group's frozen base weights into one W_cat and caches it, which would pin the
unsharded weights FSDP frees after each forward. Both orders of `fuse` and `fully_shard` are checked, and
`fully_shard` on each LoRA layer, where the layers run PEFT's forward (a layer's group-mates are FSDP units of
their own, still sharded when it runs), with the same results.
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


def unsharded_copies(model) -> list[tuple]:
    """Shapes of the copies of base weights the fused groups keep between steps (the stacked W_cat their plans
    cache on the Triton path) that have a full shape: the group's stacked [sum d_out, d_in] or a layer's
    [d_out, d_in] (a DTensor's shape is the global one)."""
    groups = {id(m._slora_group): m._slora_group for m in model.modules() if isinstance(m, FusedLoraLinear)}
    found = []
    for group in groups.values():
        shapes = [tuple(m.base_layer.weight.shape) for m in group.members]
        full = set(shapes) | {(sum(s[0] for s in shapes), shapes[0][1])}
        batches = group._plan.batches.values() if group._plan is not None else ()
        kept = [t for batch in batches if batch.stacked is not None for t in batch.stacked.weights]
        found += [tuple(t.shape) for t in kept if tuple(t.shape) in full]
    return found


def worker(rank, world, out_dir):
    utils.triton_path = lambda x: True  # the test's monkeypatch does not reach spawned processes
    for i, setup in enumerate(SETUPS):
        model = sharded_model(setup)
        loss, grads = loss_and_grads_after_a_step(model, batch_rows(rank, world))
        dist.all_reduce(loss)
        base_weights = [m.base_layer.weight for m in model.modules() if isinstance(m, FusedLoraLinear)]
        facts = {"loss": loss / world, "grads": grads, "stats": fusion_stats(model), "cached": unsharded_copies(model),
                 "sharded": all(isinstance(w, DTensor) and w.to_local().numel() < w.numel() for w in base_weights)}
        if rank == 0:
            torch.save(facts, f"{out_dir}/{i}.pt")


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_keeps_no_unsharded_weights(tmp_path, monkeypatch):
    spawn_gloo(worker, WORLD, str(tmp_path))
    monkeypatch.setattr(utils, "triton_path", lambda x: True)
    model = tiny_fused_bert()
    want_loss, want_grads = loss_and_grads_after_a_step(model, slice(None))
    assert unsharded_copies(model)  # unsharded, the groups do cache W_cat: the check below can see one
    for i, setup in enumerate(SETUPS):
        got = torch.load(tmp_path / f"{i}.pt", weights_only=False)
        stats = (got["stats"].fused, got["stats"].fallback)
        assert stats == ((0, {"hooks": LAYER_CALLS}) if setup == SETUPS[2] else (LAYER_CALLS, {})), setup
        assert got["sharded"] and got["cached"] == [], setup
        torch.testing.assert_close(got["loss"], want_loss, rtol=1e-5, atol=1e-7, msg=setup)
        assert got["grads"].keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"{setup}: {name}")

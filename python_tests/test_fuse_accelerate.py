"""A fused model trained through accelerate's `Accelerator.prepare` (model, optimizer and DataLoader; 2 CPU
processes, gloo) follows one process on the whole batch step by step, and every LoRA layer call is fused."""
import os

import pytest
import torch
from accelerate import Accelerator  # a dependency of peft's
from gloo_workers import spawn_gloo
from lora_helpers import BATCH, batch, tiny_fused_bert
from torch.utils.data import DataLoader, TensorDataset

from slora_kernels import fusion_stats

WORLD, STEPS = 2, 3
LAYER_CALLS = STEPS * (2 * 6 + 1)  # 6 LoRA layers per encoder layer and the pooler, per forward


def train(model, loader, optimizer, backward):
    """STEPS epochs over the loader (one batch each: the same data every step); the losses."""
    losses = []
    for _ in range(STEPS):
        for ids, labels in loader:
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            backward(loss)
            optimizer.step()
            losses.append(loss.detach())
    return losses


def worker(rank, world, out_path):
    # What `accelerate launch` sets; the process group is already up, so accelerate joins it.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    model = tiny_fused_bert()
    loader = DataLoader(TensorDataset(*batch()), batch_size=BATCH // world)  # prepared: one half per rank
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0), loader)
    losses = [accelerator.gather(loss).mean() for loss in train(model, loader, optimizer, accelerator.backward)]
    if rank == 0:
        torch.save({"losses": torch.stack(losses), "stats": fusion_stats(model)}, out_path)


@pytest.mark.slow
def test_accelerate_two_processes_match_one(tmp_path):
    spawn_gloo(worker, WORLD, str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    model = tiny_fused_bert()
    loader = DataLoader(TensorDataset(*batch()), batch_size=BATCH)
    want = torch.stack(train(model, loader, torch.optim.SGD(model.parameters(), lr=1.0), torch.Tensor.backward))
    assert got["stats"].fused == LAYER_CALLS and not got["stats"].fallback
    assert bool((want.diff() < 0).all()), want  # training: the loss on the same data falls
    torch.testing.assert_close(got["losses"], want, rtol=1e-5, atol=1e-7)

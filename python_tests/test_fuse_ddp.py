"""A fused model under DistributedDataParallel (gloo, 2 CPU processes) gets the gradients of one
process on the whole batch."""
import pytest
import torch
from gloo_workers import spawn_gloo
from lora_helpers import batch, batch_rows, lora_grads, tiny_fused_bert

WORLD = 2


def worker(rank, world, out_path):
    model = torch.nn.parallel.DistributedDataParallel(tiny_fused_bert())
    ids, labels = batch()
    rows = batch_rows(rank, world)
    model(input_ids=ids[rows], labels=labels[rows]).loss.backward()
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

"""Test set-up: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before any kernel
module is imported; pytest imports this file first.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def seeded():
    """A seeded torch.Generator for reproducible random inputs."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def one_thread():
    """Toy-sized ops: a second OpenMP thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Step 2 metrics: hand-computed values, the exact repeat layout against a materialised reference, bad input."""
import math

import pytest
import torch

from slora_kernels import metrics


def materialised(diag: torch.Tensor, repeat: int, topk_fraction: float, alpha: float):
    """Reference: build the repeated sequence and apply the method's formulas (README) literally."""
    lam = torch.sort(diag.double().reshape(-1).repeat_interleave(repeat), descending=True).values
    k = max(1, math.floor(topk_fraction * lam.numel()))
    ratios = torch.cumsum(lam, 0) / lam.sum()
    eff = int(torch.nonzero(ratios >= alpha - 1e-12)[0].item()) + 1
    return lam.sum().item(), lam[:k].mean().item(), eff


def test_hand_computed():
    m = metrics(torch.tensor([1.0, 4.0, 2.0, 3.0]))
    assert m.trace == 10.0
    assert m.topk == 3.5          # k = 2: (4 + 3) / 2
    assert m.eff_rank == 3.0      # 4, 7, 9 >= 8.5
    m = metrics(torch.tensor([1.0, 4.0, 2.0, 3.0]), repeat=3, topk_fraction=0.25, alpha=0.5)
    assert m.trace == 30.0
    assert m.topk == 4.0          # k = 3: 4, 4, 4
    assert m.eff_rank == 4.0      # 4, 8, 12, 15 >= 15


def test_hand_computed_partial_group():
    # sequence 5,5,5,1,1,1 (repeat 3): k = floor(0.7 * 6) = 4 -> (15 + 1) / 4; 0.9 * 18 = 16.2 -> 5 entries
    m = metrics(torch.tensor([1.0, 5.0]), repeat=3, topk_fraction=0.7, alpha=0.9)
    assert m.topk == pytest.approx(4.0)
    assert m.eff_rank == 5.0


@pytest.mark.parametrize("shape", [(7,), (5, 3), (33,)])
@pytest.mark.parametrize("repeat", [1, 2, 7, 384])
@pytest.mark.parametrize("topk_fraction,alpha", [(0.5, 0.85), (1 / 3, 0.8), (0.9, 0.99), (0.01, 0.1)])
def test_repeat_matches_materialised(shape, repeat, topk_fraction, alpha, seeded):
    diag = torch.rand(shape, generator=seeded, dtype=torch.float64) ** 3
    got = metrics(diag, repeat=repeat, topk_fraction=topk_fraction, alpha=alpha)
    trace, topk, eff = materialised(diag, repeat, topk_fraction, alpha)
    assert got.trace == pytest.approx(trace, rel=1e-12)
    assert got.topk == pytest.approx(topk, rel=1e-12)
    assert got.eff_rank == eff


def test_integer_and_low_precision_input(seeded):
    diag = torch.randint(0, 9, (40,), generator=seeded)
    ref = materialised(diag, 5, 0.5, 0.85)
    got = metrics(diag, repeat=5)
    assert (got.trace, got.eff_rank) == (ref[0], ref[2]) and got.topk == pytest.approx(ref[1])
    half = torch.rand(30, generator=seeded).half()
    assert metrics(half).trace == pytest.approx(half.double().sum().item())


def test_all_zero_has_zero_effective_rank():
    m = metrics(torch.zeros(6), repeat=4)
    assert (m.trace, m.topk, m.eff_rank) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("bad,error,text", [
    (torch.tensor([1.0, -0.5]), ValueError, "diag must be non-negative"),
    (torch.tensor([1.0, float("nan")]), ValueError, "diag must contain only finite"),
    (torch.tensor([float("inf")]), ValueError, "diag must contain only finite"),
    (torch.empty(0), ValueError, "diag must have at least one entry"),
    (torch.ones(2, 2, 2), ValueError, "diag must be 1-D or 2-D"),
    ([1.0, 2.0], TypeError, "diag must be a torch.Tensor"),
    (torch.tensor([True, False]), TypeError, "diag must be a real"),
])
def test_bad_diag(bad, error, text):
    with pytest.raises(error, match=text):
        metrics(bad)


@pytest.mark.parametrize("kwargs,error,text", [
    ({"repeat": 0}, ValueError, "repeat must be >= 1"),
    ({"repeat": 1.5}, TypeError, "repeat must be an int"),
    ({"topk_fraction": 0.0}, ValueError, "topk_fraction must be in"),
    ({"alpha": 1.5}, ValueError, "alpha must be in"),
    ({"alpha": "x"}, TypeError, "alpha must be a float"),
])
def test_bad_options(kwargs, error, text):
    with pytest.raises(error, match=text):
        metrics(torch.ones(3), **kwargs)


@pytest.mark.cuda
def test_cuda_diag_matches_cpu(seeded):
    diag = torch.rand(5, 40, generator=seeded)
    assert metrics(diag.cuda(), repeat=3) == metrics(diag, repeat=3)

"""Step 4: SRA by largest remainder, clamping, PRA tiers, parameter budgets, infeasible budgets, speed."""
import random
import time

import pytest

from slora_kernels import allocate_ranks


def test_sra_proportional_when_exact():
    assert allocate_ranks({"a": 1.0, "b": 2.0, "c": 5.0}, 16) == {"a": 2, "b": 4, "c": 10}


def test_largest_remainder_and_ties_by_name():
    # 10 * (1/3 each) = 3.33: one extra rank, the tie goes to the first name
    assert allocate_ranks({"c": 1.0, "b": 1.0, "a": 1.0}, 10) == {"c": 3, "b": 3, "a": 4}
    # quotas 1.4, 2.6, 6.0 -> floors 1, 2, 6 and the extra rank to the largest remainder (b)
    assert allocate_ranks({"a": 1.4, "b": 2.6, "c": 6.0}, 10) == {"a": 1, "b": 3, "c": 6}


@pytest.mark.parametrize("n,avg", [(7, 4), (36, 8), (200, 3), (1000, 16)])
def test_exact_budget_and_bounds_random(n, avg):
    rng = random.Random(n)
    theta = {f"m{i:04d}": rng.random() ** 4 for i in range(n)}
    max_rank = {name: rng.choice([8, 16, 64, 384]) for name in theta}
    ranks = allocate_ranks(theta, n * avg, min_rank=2, max_rank=max_rank)
    assert sum(ranks.values()) == n * avg
    assert all(2 <= ranks[k] <= max_rank[k] for k in theta)
    assert all(isinstance(r, int) for r in ranks.values())
    # monotone in theta among matrices that were not clamped at either end
    free = sorted((k for k in theta if 2 < ranks[k] < max_rank[k]), key=theta.get)
    assert all(ranks[a] <= ranks[b] for a, b in zip(free, free[1:]))


def test_clamping_redistributes():
    ranks = allocate_ranks({"big": 100.0, "b": 1.0, "c": 3.0}, 20, max_rank=8, min_rank=2)
    # big is capped at 8; the 12 left split 1:3 between b and c -> 3, 9 clamps c to 8 and b takes 4
    assert ranks == {"big": 8, "b": 4, "c": 8}
    ranks = allocate_ranks({"a": 1.0, "tiny": 1e-6, "zero": 0.0}, 12, min_rank=3)
    assert ranks == {"a": 6, "tiny": 3, "zero": 3}
    # zero-theta matrices take what the others cannot hold
    assert allocate_ranks({"a": 1.0, "b": 0.0}, 6, max_rank=4) == {"a": 4, "b": 2}


def test_pra_paper_example():
    theta = {"m1": 0.9, "m2": 0.8, "m3": 0.5, "m4": 0.4, "m5": 0.2, "m6": 0.1}
    assert allocate_ranks(theta, 30, strategy="pra") == {"m1": 6, "m2": 6, "m3": 5, "m4": 5, "m5": 4, "m6": 4}
    shuffled = dict(reversed(list(theta.items())))
    assert allocate_ranks(shuffled, 30, strategy="pra") == {"m6": 4, "m5": 4, "m4": 5, "m3": 5, "m2": 6, "m1": 6}


def test_pra_uneven_tiers_exact_sum():
    theta = {f"m{i}": float(i) for i in range(7)}
    ranks = allocate_ranks(theta, 35, strategy="pra", tiers=3)
    assert sum(ranks.values()) == 35
    assert ranks["m6"] >= ranks["m3"] >= ranks["m0"] and ranks["m6"] > ranks["m0"]


def test_parameter_budget():
    theta = {"attn": 1.0, "ffn": 1.0}
    cost = {"attn": 384 + 384, "ffn": 384 + 1536}
    budget = 8 * sum(cost.values())  # uniform LoRA r=8 on both
    ranks = allocate_ranks(theta, budget, cost=cost)
    assert ranks == {"attn": 8, "ffn": 8}
    theta = {"a": 3.0, "b": 1.0, "c": 2.0}
    cost = {"a": 768, "b": 1920, "c": 1000}
    ranks = allocate_ranks(theta, 20000, cost=cost)
    spent = sum(cost[k] * ranks[k] for k in theta)
    assert spent <= 20000
    # nothing rounded down could still take one more rank
    cont = 20000 / sum(theta[k] * cost[k] for k in theta)
    assert all(ranks[k] >= int(cont * theta[k]) for k in theta)
    assert all(20000 - spent < cost[k] for k in theta if ranks[k] == int(cont * theta[k]))


@pytest.mark.parametrize("kwargs,text", [
    ({"total_rank": 5, "min_rank": 2}, r"total_rank=5 is infeasible for 3 matrices: it must lie in \[6, inf\]"),
    ({"total_rank": 13, "max_rank": 4}, r"must lie in \[3, 12\]"),
    ({"total_rank": 10, "max_rank": {"a": 2, "b": 2, "c": 2}}, r"\[3, 6\]"),
    ({"total_rank": 50, "cost": {"a": 10, "b": 20, "c": 30}}, r"parameter budget=50 is infeasible .* \[60, inf\]"),
])
def test_infeasible_budgets(kwargs, text):
    with pytest.raises(ValueError, match=text):
        allocate_ranks({"a": 1.0, "b": 2.0, "c": 3.0}, **kwargs)


@pytest.mark.parametrize("theta,kwargs,error,text", [
    ({}, {}, ValueError, "at least one matrix"),
    ({"a": -1.0}, {}, ValueError, r"theta_by_name\['a'\] must be a finite number >= 0"),
    ({"a": float("nan")}, {}, ValueError, "finite number"),
    ({"a": 1.0}, {"strategy": "greedy"}, ValueError, "strategy must be"),
    ({"a": 1.0}, {"max_rank": {"b": 3}}, ValueError, r"max_rank has no entry for \['a'\]"),
    ({"a": 1.0}, {"max_rank": 2.5}, TypeError, "max_rank must be an int"),
    ({"a": 1.0}, {"min_rank": 5, "max_rank": 3}, ValueError, "max_rank is below min_rank"),
])
def test_bad_input(theta, kwargs, error, text):
    with pytest.raises(error, match=text):
        allocate_ranks(theta, 8, **kwargs)
    with pytest.raises(TypeError, match="total_rank must be an int"):
        allocate_ranks({"a": 1.0}, 8.0)


def test_thousand_matrices_under_50ms():
    rng = random.Random(0)
    theta = {f"model.layers.{i // 7}.proj{i % 7}": rng.random() for i in range(1000)}
    max_rank = {k: rng.choice([64, 384]) for k in theta}
    cost = {k: rng.choice([768, 1920]) for k in theta}
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        ranks = allocate_ranks(theta, 8000, max_rank=max_rank)
        allocate_ranks(theta, 8 * sum(cost.values()), max_rank=max_rank, cost=cost)
        best = min(best, (time.perf_counter() - start) / 2)
    assert sum(ranks.values()) == 8000
    assert best < 0.05


def test_min_rank_zero_leaves_low_theta_matrices_out():
    # quotas 0, 0.25, 9.75 -> floors 0, 0, 9 and the extra rank to c; zero theta stays at 0
    assert allocate_ranks({"a": 0.0, "b": 1.0, "c": 39.0}, 10, min_rank=0) == {"a": 0, "b": 0, "c": 10}
    rng = random.Random(7)
    theta = {f"m{i:02d}": rng.random() ** 6 for i in range(36)}
    cost = {n: rng.choice([768, 1920]) for n in theta}
    for avg in (1, 2, 4, 8):
        budget = avg * sum(cost.values())
        ranks = allocate_ranks(theta, budget, min_rank=0, cost=cost)
        spent = sum(cost[n] * r for n, r in ranks.items())  # rank-0 matrices cost nothing
        assert spent <= budget < spent + max(cost.values())
        assert min(ranks.values()) == 0 < max(ranks.values())  # skewed theta: some matrices get none


@pytest.mark.parametrize("total,cost,text", [
    (5, {"a": 10, "b": 20, "c": 30}, r"parameter budget=5 leaves every matrix at rank 0: .* costs 10"),
    (9, {"a": 10, "b": 20, "c": 30}, r"leaves every matrix at rank 0"),
])
def test_min_rank_zero_budget_below_one_rank(total, cost, text):
    with pytest.raises(ValueError, match=text):
        allocate_ranks({"a": 1.0, "b": 2.0, "c": 3.0}, total, min_rank=0, cost=cost)
    assert allocate_ranks({"a": 1.0, "b": 2.0, "c": 3.0}, 10, min_rank=0, cost=cost) == {"a": 1, "b": 0, "c": 0}
    with pytest.raises(ValueError, match="min_rank must be >= 0, got -1"):
        allocate_ranks({"a": 1.0}, 8, min_rank=-1)

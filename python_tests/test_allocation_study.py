"""benchmarks/allocation_study.py without training: splits, budgets, the permutation control, the queue and
resume logic, and the statistics of the table on synthetic JSONL rows."""
import json
import math
import random
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
from scipy import stats

from slora_kernels import Metrics, SensitivityReport
from slora_kernels.sensitivity.report import MatrixSensitivity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import allocation_study as study  # noqa: E402

PROTOCOL = study.Protocol()


def minilm_report(seed: int = 0) -> SensitivityReport:
    """MiniLM's 36 encoder matrices (shapes as nn.Linear stores them) with random, skewed theta."""
    rng = random.Random(seed)
    shapes = {"attention.self.query": (384, 384), "attention.self.key": (384, 384),
              "attention.self.value": (384, 384), "attention.output.dense": (384, 384),
              "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
    flat = Metrics(1.0, 1.0, 1.0)
    return SensitivityReport([MatrixSensitivity(f"bert.encoder.layer.{i}.{n}", s, 10, flat, rng.random() ** 3)
                              for i in range(6) for n, s in shapes.items()])


@pytest.mark.parametrize("budget", study.BUDGETS)
def test_equal_parameter_budgets_are_exact_and_the_control_keeps_them(budget):
    report = minilm_report()
    cost = {m.name: sum(m.shape) for m in report.matrices}
    uniform = budget * sum(cost.values())
    ranks = report.ranks(budget, budget="params", min_rank=study.min_rank(budget))
    spent = sum(cost[n] * r for n, r in ranks.items())
    assert spent <= uniform < spent + max(cost.values())
    assert (min(ranks.values()) == 0) == (budget == 1)  # rank 0 only where the study allows it
    for seed in range(5):
        permuted = study.permute_within_cost(ranks, cost, seed)
        assert list(permuted) == list(ranks)
        assert Counter(permuted.values()) == Counter(ranks.values())  # the same multiset ...
        for unit in set(cost.values()):  # ... within every cost class, so the same parameters
            assert (Counter(r for n, r in permuted.items() if cost[n] == unit)
                    == Counter(r for n, r in ranks.items() if cost[n] == unit))
        assert sum(cost[n] * r for n, r in permuted.items()) == spent
    assert study.permute_within_cost(ranks, cost, 3) == study.permute_within_cost(ranks, cost, 3)
    assert study.permute_within_cost(ranks, cost, 3) != ranks


def test_rotten_tomatoes_splits():
    splits = study.rotten_tomatoes_splits()
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (5752, 1000, 6000)
    texts = [set(s.texts) for s in (splits.train, splits.dev, splits.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert splits.label_names == ["rotten", "fresh"] and set(splits.test.labels) == {0, 1}


def test_convention_party_splits_hold_out_whole_speeches():
    splits = study.convention_party_splits()
    assert len(splits.test) >= 3000 and len(splits.dev) >= 1000 and len(splits.train) >= 3000
    texts = [set(s.texts) for s in (splits.train, splits.dev, splits.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert splits.label_names == ["democrat", "republican"]
    for part in (splits.train, splits.dev, splits.test):
        assert 0.3 < sum(part.labels) / len(part) < 0.7  # both parties in every split
        assert min(len(t.split()) for t in part.texts) >= 6
    assert study.convention_party_splits().test == splits.test  # fixed: every run sees the same split


def row(split, method, budget, seed, lr, accuracy, protocol=PROTOCOL, cpu=100.0, params=1000):
    return {"split": split, "method": method, "avg_rank": budget, "seed": seed, "lr": lr,
            "metrics": {"accuracy": accuracy}, "protocol": asdict(protocol), "cpu_seconds": cpu,
            "lora_params": params}


def grid_rows():
    """Every grid run but two of AdaLoRA's; 1e-3 is best on dev."""
    return [row("dev", name, study.GRID_BUDGET, study.GRID_SEED, lr, 0.8 if lr == 1e-3 else 0.7)
            for name, method in study.METHODS.items() for lr in method.lrs[:1 if name == "adalora" else None]]


def test_queue_runs_the_grids_first_then_budgets_1_and_4_seed_by_seed():
    methods, seeds = list(study.METHODS), [0, 1, 2, 3, 4]
    first = list(study.queue([], None, "accuracy", methods, list(study.BUDGETS), seeds))
    assert {j.split for j in first} == {"dev"} and len(first) == sum(len(m.lrs) for m in study.METHODS.values())
    rows = grid_rows()  # adalora's grid is incomplete: no test run of it yet
    jobs = list(study.queue(rows, None, "accuracy", methods, list(study.BUDGETS), seeds))
    assert [j.split for j in jobs[:2]] == ["dev", "dev"] and {j.method for j in jobs[:2]} == {"adalora"}
    test = jobs[2:]
    assert "adalora" not in {j.method for j in test} and {j.lr for j in test} == {1e-3}
    assert [(j.avg_rank, j.seed) for j in test[:12]] == [(1, 0)] * 6 + [(4, 0)] * 6
    assert [j.method for j in test[:6]][-1] == "uniform-2x-steps"  # no grid: uniform's learning rate
    order = [(j.avg_rank, j.seed) for j in test]
    assert order.index((2, 0)) == 60 and order[-1] == (8, 4) and len(test) == 6 * 4 * 5
    # resume: a finished run is skipped, the rest keeps its order
    done = rows + [row("test", "uniform", 1, 0, 1e-3, 0.7)]
    resumed = list(study.queue(done, None, "accuracy", methods, list(study.BUDGETS), seeds))
    assert [study.key(j) for j in resumed] == [study.key(j) for j in jobs if j.method != "uniform" or
                                               (j.split, j.avg_rank, j.seed) != ("test", 1, 0)]


def test_finished_reads_only_its_protocol_and_the_shards_split_the_jobs(tmp_path):
    path = tmp_path / "study.jsonl"
    lines = [row("test", "uniform", 1, 0, 1e-3, 0.7), row("test", "eva", 1, 0, 1e-3, 0.7, protocol=study.SMOKE)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert study.finished(path, PROTOCOL) == lines[:1]
    assert study.finished(path, study.SMOKE) == lines[1:]
    assert study.finished(tmp_path / "none.jsonl", PROTOCOL) == []
    jobs = list(study.queue(grid_rows(), None, "accuracy", list(study.METHODS), list(study.BUDGETS),
                            [0, 1, 2, 3, 4]))
    shares = [[j for j in jobs if study.in_shard(j, (i, 2))] for i in range(2)]
    assert sorted(map(study.key, shares[0] + shares[1])) == sorted(map(study.key, jobs)) and all(shares)
    assert study.shard_arg("1/2") == (1, 2)
    with pytest.raises(Exception, match="expected I/N"):
        study.shard_arg("2/2")


def test_a_task_with_borrowed_learning_rates_runs_no_grid():
    lrs = {"uniform": 2e-3, "eva": 1e-3}
    jobs = list(study.queue([], lrs, "accuracy", list(study.METHODS), [1], [0, 1]))
    assert [(j.split, j.method, j.avg_rank, j.seed, j.lr) for j in jobs] == [
        ("test", "uniform", 1, 0, 2e-3), ("test", "eva", 1, 0, 1e-3),
        ("test", "uniform", 1, 1, 2e-3), ("test", "eva", 1, 1, 1e-3)]
    party = study.Protocol(task="convention-party")
    text = study.report([row("test", "uniform", 1, 0, 2e-3, 0.6, protocol=party)], party, list(study.METHODS), [1])
    assert "chosen on rotten-tomatoes's dev grid" in text and "| uniform | 1 | 60.00 |" in text


def test_chosen_learning_rate_is_the_best_on_dev_ties_to_the_smaller():
    rows = [row("dev", "uniform", 4, 0, lr, acc) for lr, acc in zip(study.LORA_LRS, (0.7, 0.8, 0.8))]
    assert study.chosen_lrs(rows, "accuracy", ["uniform", "eva", "uniform-2x-steps"]) == {
        "uniform": study.LORA_LRS[1], "uniform-2x-steps": study.LORA_LRS[1]}
    assert study.chosen_lrs(rows[:2], "accuracy", ["uniform-2x-steps"]) == {}  # uniform's grid unfinished
    table = study.grid_table(rows, "accuracy", ["uniform", "uniform-2x-steps"], None)
    assert f"- uniform-2x-steps: uniform's ({study.LORA_LRS[1]:g})" in table


def test_paired_statistics_and_the_table():
    uniform = [78.0, 79.0, 80.0, 77.5, 78.5]
    diffs = [0.5, 1.0, 0.2, 0.8, 0.4]
    mean, half, p = study.paired(diffs)
    assert mean == pytest.approx(0.58)
    lo, hi = stats.t.interval(0.95, 4, loc=0.58, scale=stats.sem(diffs))
    assert (mean - half, mean + half) == pytest.approx((lo, hi))
    assert p == pytest.approx(0.0625)  # 5 positive pairs: the smallest two-sided Wilcoxon p there is
    assert study.paired([0.0, 0.0, 0.0]) == (0.0, 0.0, 1.0)
    assert math.isnan(study.paired([1.0])[1])
    rows = [row("test", "uniform", 1, s, 1e-3, a / 100, cpu=200.0, params=41472) for s, a in enumerate(uniform)]
    rows += [row("test", "sensitivity-activation", 1, s, 1e-3, (a + d) / 100, cpu=210.0, params=41472)
             for s, (a, d) in enumerate(zip(uniform, diffs))]
    rows += [row("test", "eva", 1, 0, 1e-3, 0.79, params=48384)]
    table = study.budget_table(rows, "accuracy", 1, ["uniform", "sensitivity-activation", "eva", "adalora"])
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert lines["uniform"] == f"| uniform | 5 | 78.60 | {stats.tstd(uniform):.2f} | - | - | - | 41,472 | 200 |"
    assert lines["sensitivity-activation"] == (f"| sensitivity-activation | 5 | 79.18 | "
                                               f"{stats.tstd([a + d for a, d in zip(uniform, diffs)]):.2f} | "
                                               f"+0.58 (n=5) | [{lo:+.2f}, {hi:+.2f}] | 0.062 | 41,472 | 210 |")
    assert lines["eva"].startswith("| eva | 1 | 79.00 | - | +1.00 (n=1) | - | - | 48,384 |")
    assert lines["adalora"] == "| adalora | 0 | - | - | - | - | - | - | - |"
    text = study.report(rows + grid_rows(), PROTOCOL, list(study.METHODS), [1, 4])
    assert "Average rank 1 (min_rank 0)" in text and "Average rank 4 (min_rank 1)" in text
    assert "- uniform: **0.001: 80.00**, 0.002: 70.00, 0.004: 70.00" in text
    assert "- adalora: 0.002: 70.00" in text and "- eva: **0.001: 80.00**" in text
    summary = study.summary_table(rows, "accuracy", [1, 4], ["uniform", "sensitivity-activation", "eva", "adalora"])
    assert summary.splitlines()[:2] == [
        "| method | average rank 1 (rank 0 allowed) | average rank 4 | LoRA params (rank 1 / 4) |", "|---" * 4 + "|"]
    assert f"| sensitivity-activation | +0.6 [{lo:+.1f}, {hi:+.1f}] (5) | - | 41,472 / - |" in summary
    assert "| uniform | 78.6% (5) | - | 41,472 / - |" in summary
    assert "| eva | +1.0 (1) | - | 48,384 / - |" in summary and "| adalora | - | - | - / - |" in summary

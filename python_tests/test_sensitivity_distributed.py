"""Two CPU processes (gloo), each with half the batches (dealt round-robin), get the report of one process on
all of them: for hutchinson too, whose probes follow the global batch index (`HutchinsonCollector`)."""
import pytest
import torch
from gloo_workers import spawn_gloo
from sensitivity_toy import Toy, toy_batches

from slora_kernels import SensitivityReport, estimate_sensitivity

TARGETS = ["query", "key", "value", "up", "down", "head"]
ESTIMATORS = [("activation", {}), ("fisher", {}), ("fisher", {"per_sample": True}), ("hutchinson", {"probes": 3})]


def worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    mine = toy_batches(n_batches=6)[rank::world]
    for i, (estimator, kwargs) in enumerate(ESTIMATORS):
        report = estimate_sensitivity(Toy(), mine, target_modules=TARGETS, estimator=estimator, progress=False,
                                      **kwargs)
        report.to_json(f"{out_dir}/rank{rank}_{i}.json")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    spawn_gloo(worker, 2, str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (estimator, kwargs) in enumerate(ESTIMATORS):
            single = estimate_sensitivity(Toy(), toy_batches(n_batches=6), target_modules=TARGETS,
                                          estimator=estimator, progress=False, **kwargs)
            ranks = [SensitivityReport.from_json(tmp_path / f"rank{r}_{i}.json") for r in range(2)]
            assert ranks[0].matrices == ranks[1].matrices  # every rank holds the same report
            got = ranks[0]
            assert got.settings == single.settings
            assert [m.tokens for m in got.matrices] == [m.tokens for m in single.matrices]
            for a, b in zip(got.matrices, single.matrices):
                assert a.metrics.trace == pytest.approx(b.metrics.trace, rel=1e-5)
                assert a.metrics.topk == pytest.approx(b.metrics.topk, rel=1e-5)
                assert abs(a.metrics.eff_rank - b.metrics.eff_rank) <= 1
                assert a.theta == pytest.approx(b.theta, rel=1e-4)
            assert got.ranks(4) == single.ranks(4)
    finally:
        torch.set_num_threads(threads)

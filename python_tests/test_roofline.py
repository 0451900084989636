"""The roofline model of the GPU suite: it covers every row the suite times at the GPU shapes, and its
arithmetic is the roofline's. No kernel runs and nothing is timed: the suite's timing functions run
on meta tensors with the benchmark clock stubbed out, which yields its row keys, baselines and targets."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_suite  # noqa: E402
import roofline  # noqa: E402

GPU_CONFIG = gpu_suite.Config.for_run(False)


class MetaSuite(gpu_suite.Suite):
    """The suite's timing code at the GPU shapes on meta tensors: shapes and names, no data, no kernels."""

    def randn(self, *shape, dtype=None, scale=1.0):
        return torch.empty(*shape, dtype=dtype or torch.float32, device="meta")


@pytest.fixture(scope="module")
def suite_rows():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_suite, "bench", lambda torch, fn, device: 1.0)
        patch.setattr(gpu_suite, "peft_linear", lambda *args: None)  # the layer is only called inside timed lambdas
        suite = MetaSuite(torch, dataclasses.replace(GPU_CONFIG, device="meta"))
        for step in (gpu_suite.time_linear, gpu_suite.time_groups, gpu_suite.time_statistics):
            step(suite)
    return suite.rows


def test_model_covers_every_suite_row_with_its_baseline_and_target(suite_rows):
    models = {row.key: row for row in roofline.suite_rows(GPU_CONFIG)}
    suite_keys = [roofline.row_key(r.section, r.case) for r in suite_rows]
    assert len(set(suite_keys)) == len(suite_keys) == len(models)
    assert suite_keys == list(models)  # same rows, same order
    for row in suite_rows:
        model = models[roofline.row_key(row.section, row.case)]
        assert model.target == row.target
        if row.baseline == "copy bandwidth":
            assert model.baseline[1].startswith("copy ") and model.suite_bytes > 0
        else:
            assert (model.baseline[1] if model.baseline else "") == row.baseline
        assert (row.ratio is not None) == (model.baseline is not None)


def test_suite_attaches_a_prediction_to_every_row_with_a_ratio(suite_rows):
    gpu_suite.attach_predictions(suite_rows, GPU_CONFIG)
    assert all((r.predicted_ratio is not None) == (r.ratio is not None) for r in suite_rows)
    assert all(r.predicted_ratio > 0 for r in suite_rows if r.ratio is not None)


def test_a_copy_is_bytes_over_bandwidth():
    copy = next(r for r in roofline.statistics_rows(GPU_CONFIG) if r.section == "bandwidth")
    nbytes = GPU_CONFIG.stats_tokens * GPU_CONFIG.stats_dim * roofline.BF16  # read once, written once
    for device in roofline.DEVICES:
        assert copy.seconds(device) == pytest.approx(2 * nbytes / device.bandwidth + roofline.LAUNCH_OVERHEAD_S)


def test_a_large_gemm_is_flops_over_peak():
    m, n, k = 16384, 14336, 4096
    launch = roofline.gemm("big", m, n, k)
    assert launch.bytes == roofline.BF16 * (m * k + k * n + m * n)
    for device in roofline.DEVICES:
        assert launch.bytes / device.bandwidth < launch.flops / device.flops["bf16"]
        expected = 2 * m * n * k / device.flops["bf16"] + roofline.LAUNCH_OVERHEAD_S
        assert device.seconds(launch) == pytest.approx(expected)


def test_ratios_follow_the_suite_definitions():
    rows = {row.key: row for row in roofline.suite_rows(GPU_CONFIG)}
    device = roofline.H200
    act = next(r for r in rows.values() if r.case.startswith("activation_sq"))
    copy = rows[act.baseline]
    # the suite: (bytes read / t) against the copy's (read + write bytes / t_copy)
    expected = (act.suite_bytes / act.seconds(device)) / (2 * act.suite_bytes / copy.seconds(device))
    assert roofline.ratio(act, copy, device) == pytest.approx(expected)
    fused = rows[("linear fwd", "fused r=16 4096x4096 T=4096")]
    base = rows[fused.baseline]
    assert roofline.ratio(fused, base, device) == pytest.approx(fused.seconds(device) / base.seconds(device))
    assert roofline.ratio(fused, base, device) > 1.0


def test_the_mixed_rank_backward_rereads_dy_per_rank_chunk():
    t, d_out = 4096, 1024
    uniform = roofline.grad_sb(t, [d_out] * 2, [16, 16])
    skewed = roofline.grad_sb(t, [d_out] * 2, [128, 4])   # chunks of 32: 4 + 1 reads of dY columns
    dy_bytes = roofline.BF16 * t * d_out
    assert skewed.bytes - uniform.bytes > 2 * dy_bytes


def test_pack_is_host_bound_when_host_work_exceeds_the_device_time():
    pack = next(r for r in roofline.statistics_rows(GPU_CONFIG) if r.section == "gather")
    device_s = sum(roofline.H200.seconds(launch) for launch in pack.launches)
    assert pack.seconds(roofline.H200) == max(pack.host_s, device_s) == pack.host_s  # 22 us of host work
    assert pack.host_s == pytest.approx(GPU_CONFIG.pack_segments * roofline.HOST_S_PER_SEGMENT)


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert roofline.main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["rows"]) == len(roofline.suite_rows(GPU_CONFIG)) == printed.count("\n") - 2
    assert {d["name"] for d in result["devices"]} == {"H200", "H100 SXM"}
    missing = [r for r in result["rows"] if "misses" in r["verdict"].values()]
    assert missing and all(r["reason"] for r in missing)

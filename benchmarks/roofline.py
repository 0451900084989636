"""Roofline model of every row benchmarks/gpu_suite.py times, for the v2 kernels as designed.

Each row is a list of kernel launches (FLOPs, bytes moved, precision). A launch takes
max(FLOPs / rate, bytes / bandwidth) + any CUDA-core work it cannot overlap + a fixed launch
overhead, and launches add up (no overlap between them): the time a perfect implementation of that
launch sequence could reach, so a row predicted to miss its target misses it by design, not by
tuning. Bytes count each operand once (tiles re-read from L2 are free), so the model is optimistic
for memory-bound launches. The launch lists follow the CUDA path of slora_kernels/ops/grouped_lora.py
(including its small cats, casts and clones) and what autograd adds to the suite's timed step (the
`cat` behind a `split`'s backward, `.grad` accumulation: the suite resets x.grad only).

Rows are built from the suite's Config (suite_config.py) with its case strings; python_tests/test_roofline.py checks
them against the rows the suite's timing code produces, so the two cannot drift apart silently.

    python benchmarks/roofline.py                      # the table: H200 and H100 SXM
    python benchmarks/roofline.py --json roofline.json --measured benchmarks/results/gpu_suite_h200_v1.json
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from suite_config import Config

BF16, FP32 = 2, 4                 # bytes per element
LAUNCH_OVERHEAD_S = 3e-6          # per launch: gap between back-to-back kernels on one stream, small grids' ramp
GEMM_EFFICIENCY = 0.9             # of the tensor-core peak: the v1 run's cuBLAS GEMMs reached 688-732 TFLOP/s
ATOMIC_BYTES = 8                  # one fp32 atomic add at L2, counted as a 4-byte read + write at HBM rate (rough)
HOST_S_PER_SEGMENT = 0.1e-6       # pack(): host work per segment (argument checks, offsets) in v2's launcher
SQUARE_OPS = 4                    # CUDA-core ops per squared operand element: widen, multiply, round, store to smem
FISHER_TILE = 128                 # output tile edge of the Fisher GEMM kernels
SMS = 132                         # SMs of an H200 and an H100 SXM
# The one-pass backward's geometry, as slora_kernels/triton/lora_kernels.py sets it:
BLOCK_N, PROGRAMS_PER_SM, MIN_SPLIT_TOKENS = 128, 4, 128
# activation_sq's row splits (slora_kernels/triton/sensitivity_kernels.py): fp32 partials, summed by a 2nd kernel
ACT_PROGRAMS_PER_SM, ACT_BLOCK_COLS = 8, 256
PACK_ALIGN = 16                   # the suite packs with align=16


@dataclass(frozen=True)
class Launch:
    """One kernel launch: FLOPs at `precision`'s rate, bytes to and from HBM, and CUDA-core work
    (alu_flops, fp32 rate) that runs between its tensor-core steps and is not hidden behind them."""

    name: str
    flops: float
    bytes: float
    precision: str = "bf16"
    alu_flops: float = 0.0


@dataclass(frozen=True)
class Device:
    name: str
    flops: dict[str, float]   # reachable FLOP/s per precision
    bandwidth: float          # bytes/s, reads and writes together (what a copy reaches)

    def compute_s(self, launch: Launch) -> float:
        return launch.flops / self.flops[launch.precision]

    def seconds(self, launch: Launch) -> float:
        return (max(self.compute_s(launch), launch.bytes / self.bandwidth) + launch.alu_flops / self.flops["fp32"]
                + LAUNCH_OVERHEAD_S)


# bf16 peak: the large-GEMM figure measured on an H200 (790 TFLOP/s), times GEMM_EFFICIENCY for the
# suite's GEMMs (4096-16384 on a side, where v1 measured 688-732). H100 SXM: same chip and clocks.
_RATES = {"bf16": GEMM_EFFICIENCY * 790e12, "tf32": GEMM_EFFICIENCY * 400e12, "fp32": 60e12}
H200 = Device("H200", _RATES, 4.3e12)        # copy measured 3.9-4.3 TB/s
H100 = Device("H100 SXM", _RATES, 2.9e12)    # 3.35 TB/s nominal, ~2.9 reachable
DEVICES = (H200, H100)


@dataclass
class RowModel:
    """One suite row: its launches, and the baseline and target the suite judges it by."""

    section: str
    case: str
    launches: list[Launch]
    baseline: tuple[str, str] | None = None   # key of the row the suite divides by
    target: str = ""
    limit: float | None = None
    higher_is_better: bool = False
    suite_bytes: float = 0.0                  # GB/s rows: the bytes the suite divides the time into
    host_s: float = 0.0                       # host work per call: the row takes max(host, device)
    fix: str = ""                             # what meeting the target would take

    @property
    def key(self) -> tuple[str, str]:
        return row_key(self.section, self.case)

    def device_seconds(self, device: Device) -> float:
        return sum(device.seconds(launch) for launch in self.launches)

    def seconds(self, device: Device) -> float:
        return max(self.host_s, self.device_seconds(device))


def row_key(section: str, case: str) -> tuple[str, str]:
    """(section, case) without the pack row's mean rank, which the suite draws at run time."""
    return section, re.sub(r" mean r=[0-9.]+", "", case)


# ----------------------------------------------------------------------------- launch builders


def gemm(name: str, m: int, n: int, k: int, addend: bool = False) -> Launch:
    """bf16 [m, k] x [k, n] -> [m, n]; with addend, cuBLAS beta=1 also reads C in its epilogue."""
    return Launch(name, 2 * m * n * k, BF16 * (m * k + k * n + m * n * (2 if addend else 1)))


def pointwise(name: str, elements: float, reads: float, writes: float, elem: int = BF16) -> Launch:
    """A memory-bound pass over `elements` (reads / writes: tensors of that size read and written)."""
    return Launch(name, elements, elem * elements * (reads + writes), "fp32")


def unfused_layer(t: int, d_in: int, d_out: int, r: int, backward: bool) -> list[Launch]:
    """PEFT's LoRA Linear (and the per-module loop): base(x) + B(A(x)) * s, and roughly autograd's backward
    of those ops, one launch per op (x's gradient contributions and .grad accumulation: grad_accumulation)."""
    launches = [gemm("base GEMM", t, d_out, d_in), gemm("shrink x A^T", t, r, d_in), gemm("expand S B^T", t, d_out, r),
                pointwise("scale mul", t * d_out, 1, 1), pointwise("add", t * d_out, 2, 1)]
    if backward:
        launches += [pointwise("scale mul backward", t * d_out, 1, 1), gemm("dS = dE B", t, r, d_out),
                     gemm("dB = dE^T S", r, d_out, t), gemm("dx_lora = dS A", t, d_in, r),
                     gemm("dA = dS^T x", r, d_in, t), gemm("dX = dY W", t, d_in, d_out)]
    return launches


def grad_accumulation(t: int, d_in: int, contributions: int, factor_sizes: list[int]) -> list[Launch]:
    """autograd's sums of x's gradient contributions, and AccumulateGrad into each factor's .grad."""
    return ([pointwise("x grad sum", t * d_in, 2, 1)] * (contributions - 1)
            + [pointwise(".grad += (factor)", n, 2, 1) for n in factor_sizes])


def block_r(ranks: list[int]) -> int:
    return 16 if max(ranks) <= 16 else 32


def grad_sb(t: int, d_outs: list[int], ranks: list[int]) -> Launch:
    """The one-pass backward: dS and dB from dY, a layer's dY columns read once per rank chunk,
    fp32 atomics for dS (every token block of every column tile) and dB (once per token split)."""
    br = block_r(ranks)
    chunks = [math.ceil(r / br) for r in ranks]
    col_tiles = [math.ceil(d / BLOCK_N) for d in d_outs]
    tiles = sum(c * k for c, k in zip(col_tiles, chunks))
    splits = max(1, min(math.ceil(PROGRAMS_PER_SM * SMS / tiles), math.ceil(t / MIN_SPLIT_TOKENS)))
    dy_reads = t * sum(d * k for d, k in zip(d_outs, chunks))
    atomics = t * sum(r * c for r, c in zip(ranks, col_tiles)) + splits * sum(d * r for d, r in zip(d_outs, ranks))
    b_numel = sum(d * r for d, r in zip(d_outs, ranks))
    return Launch("one-pass dS/dB (dY read per rank chunk, atomics)", 4 * dy_reads * br,
                  BF16 * (dy_reads + t * sum(ranks) + b_numel) + ATOMIC_BYTES * atomics)


def fused(t: int, d_in: int, d_outs: list[int], ranks: list[int], backward: bool) -> list[Launch]:
    """grouped_lora on CUDA, launch by launch. The suite passes G > 1 layers as lists: A_cat is packed per call (in
    the forward and again in the backward) and each layer's base GEMM adds into its columns of the output (and of
    dx, over its columns of dY); one layer's tensors are used as they are."""
    g, big_r, big_d = len(ranks), sum(ranks), sum(d_outs)
    br = block_r(ranks)
    b_numel = sum(d * r for d, r in zip(d_outs, ranks))
    padded = sum(d * math.ceil(r / br) * br for d, r in zip(d_outs, ranks))
    pack_a = [pointwise("pack A_cat", big_r * d_in, 1, 1)] if g > 1 else []
    base = [gemm("Y_i += x W_i^T (its columns)", t, d, d_in, addend=True) for d in d_outs] if g > 1 else [
        gemm("Y = addmm(C, x, W^T)", t, big_d, d_in, addend=True)]
    base_dx = [gemm("dX += dY_i W_i", t, d_in, d, addend=True) for d in d_outs] if g > 1 else [
        gemm("dX = addmm(tmp, dY, W)", t, d_in, big_d, addend=True)]
    flat_b = pointwise("torch.cat flat B", b_numel, 1, 1)
    launches = pack_a + [gemm("shrink S = x A_cat^T", t, big_r, d_in), flat_b,
                         Launch("expand-store C", 2 * t * padded, BF16 * (t * big_r + b_numel + t * big_d))]
    launches += base
    if not backward:
        return launches
    if g > 1:
        launches.append(pointwise("cat of G output grads (split backward)", t * big_d, 1, 1))
    launches += [flat_b, pointwise("zero dS", t * big_r, 0, 1, FP32), pointwise("zero dB", b_numel, 0, 1, FP32),
                 grad_sb(t, d_outs, ranks), pointwise("dS fp32 -> bf16", t * big_r, 2, 1),
                 *[pointwise("dB_i fp32 -> bf16", d * r, 2, 1) for d, r in zip(d_outs, ranks)],
                 gemm("dA = dS^T x", big_r, d_in, t), *[pointwise("dA_i clone", r * d_in, 1, 1) for r in ranks],
                 *pack_a, gemm("tmp = dS A_cat", t, d_in, big_r), *base_dx]
    return launches + grad_accumulation(t, d_in, 1, [r * d_in for r in ranks] + [d * r for d, r in zip(d_outs, ranks)])


def padded_bmm(t: int, d_in: int, d_out: int, ranks: list[int]) -> list[Launch]:
    """gpu_suite.padded_bmm_forward and its autograd backward (roughly: einsum as one GEMM, no layout copies
    in the forward, one in the backward)."""
    g, r_max = len(ranks), max(ranks)
    launches = [Launch("pad A_i", 0, BF16 * (r + r_max) * d_in, "fp32") for r in ranks]
    launches += [pointwise("stack A", g * r_max * d_in, 1, 1)]
    launches += [Launch("pad B_i", 0, BF16 * (r + r_max) * d_out, "fp32") for r in ranks]
    launches += [pointwise("stack B", g * r_max * d_out, 1, 1), gemm("einsum shrink", t, g * r_max, d_in),
                 Launch("bmm expand", 2 * g * t * d_out * r_max, BF16 * g * (t * r_max + d_out * r_max + t * d_out))]
    for _ in ranks:
        launches += [gemm("base GEMM", t, d_out, d_in), pointwise("scale mul", t * d_out, 1, 1),
                     pointwise("add", t * d_out, 2, 1)]
    for _ in ranks:
        launches += [pointwise("scale mul backward", t * d_out, 1, 1), gemm("dX_i = dY_i W_i", t, d_in, d_out)]
    bmm_grad = 2 * g * t * d_out * r_max
    launches += [pointwise("stack of G expand grads (unbind backward)", g * t * d_out, 1, 1),
                 Launch("bmm backward dShrink", bmm_grad, BF16 * g * (t * d_out + d_out * r_max + t * r_max)),
                 Launch("bmm backward dB_pad", bmm_grad, BF16 * g * (t * r_max + t * d_out + r_max * d_out)),
                 pointwise("dShrink permute copy", g * t * r_max, 1, 1),
                 gemm("einsum backward dx", t, d_in, g * r_max), gemm("einsum backward dA_pad", g * r_max, d_in, t)]
    return launches + grad_accumulation(t, d_in, g + 1, [r * d_in for r in ranks] + [d_out * r for r in ranks])


# ----------------------------------------------------------------------------- the suite's sections


FUSED_FWD_FIX = ("<= 1.05 needs C never written (Y = [x | S] [W^T; s B^T]: the expand as R extra K-steps of the base "
                 "GEMM) and the shrink reading x from L2 (the same kernel computing S for its row block first)")
FUSED_STEP_FIX = ("<= 1.08 needs the forward's fusion and the same in the backward: dX = [dY | dS] [W_cat; A_cat] as "
                  "one GEMM (no tmp written and read back), dY and x each read from HBM once (dS/dB, dA from L2)")


def linear_rows(cfg: Config) -> list[RowModel]:
    """gpu_suite.time_linear: one layer, base / fused / PEFT, forward and forward+backward."""
    rows = []
    for d_in, d_out in cfg.linear_shapes:
        for t in cfg.token_counts:
            shape = f"{d_in}x{d_out} T={t}"
            base_fwd = RowModel("linear fwd", f"base {shape}", [gemm("base GEMM", t, d_out, d_in)])
            base_step = RowModel("linear fwd+bwd", f"base {shape}",
                                 [gemm("base GEMM", t, d_out, d_in), gemm("dX = dY W", t, d_in, d_out)])
            rows += [base_fwd, base_step]
            for r in cfg.uniform_ranks:
                case, limited = f"r={r} {shape}", r <= 32
                peft_step = (unfused_layer(t, d_in, d_out, r, True)
                             + grad_accumulation(t, d_in, 2, [r * d_in, d_out * r]))
                rows += [
                    RowModel("linear fwd", f"fused {case}", fused(t, d_in, [d_out], [r], False), base_fwd.key,
                             "<= 1.05x base (r <= 32, T >= 4096)", 1.05 if limited else None, fix=FUSED_FWD_FIX),
                    RowModel("linear fwd", f"peft {case}", unfused_layer(t, d_in, d_out, r, False), base_fwd.key,
                             "reference (roofline >= 1.25x)"),
                    RowModel("linear fwd+bwd", f"fused {case}", fused(t, d_in, [d_out], [r], True), base_step.key,
                             "<= 1.08x base step", 1.08 if limited else None, fix=FUSED_STEP_FIX),
                    RowModel("linear fwd+bwd", f"peft {case}", peft_step, base_step.key, "reference"),
                ]
    return rows


def group_rows(cfg: Config) -> list[RowModel]:
    """gpu_suite.time_groups: G layers sharing x, skewed ranks against uniform and the naive ways."""
    skewed = list(cfg.skewed_ranks)
    mean_rank = round(sum(skewed) / len(skewed))
    g, d_in, d_out = len(skewed), cfg.group_d_in, cfg.group_d_out
    loop_fix = (f"the suite passes the {g} weights as a list: one base GEMM per layer each way (the fused nn.Modules "
                "stack a small group's frozen weights once, at most 1 MiB); beyond that the expand / dS / tmp passes "
                "must fold into the base GEMMs as for the linear rows")
    rows = []
    for t in cfg.token_counts:
        tag = f"G={g} {d_in}->{d_out} T={t}"
        base = RowModel("group fwd+bwd", f"base (one GEMM) {tag}",
                        [gemm("base GEMM", t, g * d_out, d_in), gemm("dX = dY W_cat", t, d_in, g * d_out)])
        uniform = RowModel("group fwd+bwd", f"fused uniform r={mean_rank} {tag}",
                           fused(t, d_in, [d_out] * g, [mean_rank] * g, True), base.key, "reference")
        skew = RowModel("group fwd+bwd", f"fused skewed {tag}", fused(t, d_in, [d_out] * g, skewed, True), uniform.key,
                        "<= 1.10x uniform", 1.10,
                        fix="<= 1.10 needs the rank-128 layer's dY columns read once (64-wide chunks for it alone)")
        loop = [launch for r in skewed for launch in unfused_layer(t, d_in, d_out, r, True)]
        loop += grad_accumulation(t, d_in, 2 * g, [r * d_in for r in skewed] + [d_out * r for r in skewed])
        rows += [base, uniform, skew,
                 RowModel("group fwd+bwd", f"per-module loop skewed {tag}", loop, skew.key, ">= 1.5x fused skewed",
                          1.5, True, fix=loop_fix),
                 RowModel("group fwd+bwd", f"pad-to-max bmm skewed {tag}", padded_bmm(t, d_in, d_out, skewed), skew.key,
                          ">= 1.5x fused skewed", 1.5, True, fix=loop_fix)]
    return rows


def statistics_rows(cfg: Config) -> list[RowModel]:
    """gpu_suite.time_statistics: a copy, the sensitivity kernels against it or a GEMM, and pack."""
    t, d = cfg.stats_tokens, cfg.stats_dim
    nbytes = BF16 * t * d
    copy = RowModel("bandwidth", f"copy {nbytes / 1e6:.0f} MB (read+write)",
                    [pointwise("clone", t * d, 1, 1)], suite_bytes=2 * nbytes)
    splits = math.ceil(ACT_PROGRAMS_PER_SM * SMS / math.ceil(d / ACT_BLOCK_COLS))
    act = RowModel("sensitivity", f"activation_sq_accumulate T={t} d={d}",
                   [Launch("activation_sq (read x once)", 2 * t * d, nbytes + FP32 * splits * d, "fp32"),
                    pointwise("sum row-split partials", splits * d, 1, 0, FP32)],
                   copy.key, ">= 0.80 of copy GB/s", 0.80, True, suite_bytes=nbytes,
                   fix=">= 0.80 needs one launch (atomics instead of the partials pass)")

    b, seq = cfg.fisher_batch, cfg.fisher_seq
    d_in, d_out = cfg.fisher_dims
    n = b * seq
    flops = 2 * n * d_in * d_out
    operands_and_acc = BF16 * n * (d_in + d_out) + 2 * FP32 * d_in * d_out
    squares = n * d_in * d_out * 2 / FISHER_TILE   # each output tile squares its [tile, n] operand slices
    gemm_row = RowModel("sensitivity", f"bf16 GEMM g^T x [{d_out}x{n}]x[{n}x{d_in}]",
                        [gemm("cuBLAS GEMM", d_out, d_in, n)])
    token = RowModel("sensitivity", "fisher per-token",
                     [Launch("fisher per-token (squares on load)", flops, operands_and_acc, "bf16",
                             SQUARE_OPS * squares)],
                     gemm_row.key, "<= 1.2x GEMM", 1.2,
                     fix=("<= 1.2 needs the squaring hidden behind the MMAs (producer warps square while consumer "
                          "warps run wgmma) or x^2, g^2 written once as bf16 (+31 us) and fed to a plain GEMM"))
    sample = RowModel("sensitivity", "fisher per-sample",
                      [Launch("fisher per-sample (square per sample)", flops, operands_and_acc, "bf16",
                              2 * b * d_in * d_out)],
                      gemm_row.key, "<= 2x GEMM", 2.0)

    k, cols, m = cfg.pack_segments, cfg.pack_n, cfg.pack_mean_rank
    ranks = range(4, 2 * m - 3)   # the suite's torch.randint(4, 2 * mean - 3): the model takes the expectation
    rows_read = k * sum(ranks) / len(ranks)
    rows_written = k * sum(math.ceil(r / PACK_ALIGN) * PACK_ALIGN for r in ranks) / len(ranks)
    pack = RowModel("gather", f"pack {k} segments mean r={rows_read / k:.1f} n={cols}",
                    [Launch("pack (reads segments, writes padded buffer)", 0, BF16 * cols * (rows_read + rows_written),
                            "fp32")],
                    copy.key, ">= 0.70 of copy GB/s", 0.70, True, suite_bytes=2 * BF16 * cols * rows_written,
                    host_s=k * HOST_S_PER_SEGMENT, fix=">= 0.70 needs the host work per call under the device time")
    return [copy, act, gemm_row, token, sample, pack]


def suite_rows(cfg: Config) -> list[RowModel]:
    """Every row the suite times for this config, in its order."""
    return linear_rows(cfg) + group_rows(cfg) + statistics_rows(cfg)


# ----------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    section: str
    case: str
    baseline: str
    target: str
    ms: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float | None] = field(default_factory=dict)
    verdict: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def ratio(row: RowModel, base: RowModel, device: Device) -> float:
    """The suite's ratio: time over the baseline's, or for GB/s rows GB/s over the copy's GB/s."""
    t, t_base = row.seconds(device), base.seconds(device)
    if row.suite_bytes:
        return (row.suite_bytes / t) / (base.suite_bytes / t_base)
    return t / t_base


def costs_beyond_flops(row: RowModel, device: Device) -> str:
    """The row's launches by the time they take beyond their FLOPs (memory, CUDA-core work, overhead), top 3."""
    totals, counts = Counter(), Counter()
    for launch in row.launches:
        totals[launch.name] += device.seconds(launch) - device.compute_s(launch)
        counts[launch.name] += 1
    return ", ".join(f"{name}{f' x{counts[name]}' if counts[name] > 1 else ''} {s * 1e6:.0f} us"
                     for name, s in totals.most_common(3))


def reason(row: RowModel, base: RowModel, device: Device) -> str:
    """One line: how far the row is from its target on this device, where its time goes, what it would take."""
    t, t_base = row.seconds(device), base.seconds(device)
    if row.suite_bytes:
        device_s = row.device_seconds(device)
        lead = (f"{'host' if row.host_s > device_s else 'device'}-bound: host {row.host_s * 1e6:.0f} us, device "
                f"{device_s * 1e6:.0f} us ({costs_beyond_flops(row, device)})")
    elif row.higher_is_better:
        lead = (f"{row.case.split(' skewed')[0]} {t * 1e3:.2f} ms vs fused {t_base * 1e3:.2f} ms; needs fused <= "
                f"{t / row.limit * 1e3:.2f} ms; fused's costs beyond FLOPs: {costs_beyond_flops(base, device)}")
    else:
        lead = (f"+{(t - t_base) * 1e6:.0f} us over the baseline ({t / t_base - 1:.0%}), target allows "
                f"{(row.limit - 1) * t_base * 1e6:.0f} us; largest: {costs_beyond_flops(row, device)}")
    return f"{lead}; {row.fix}" if row.fix else lead


def predict(cfg: Config) -> list[Prediction]:
    rows = suite_rows(cfg)
    by_key = {row.key: row for row in rows}
    predictions = []
    for row in rows:
        base = by_key[row.baseline] if row.baseline else None
        p = Prediction(row.section, row.case, base.case if base else "", row.target)
        for device in DEVICES:
            p.ms[device.name] = row.seconds(device) * 1e3
            p.ratio[device.name] = ratio(row, base, device) if base else None
            met = None if row.limit is None else (p.ratio[device.name] >= row.limit if row.higher_is_better
                                                  else p.ratio[device.name] <= row.limit)
            p.verdict[device.name] = {None: "-", True: "meets", False: "misses"}[met]
            if met is False and not p.reason:
                p.reason = f"{device.name}: {reason(row, base, device)}"
        predictions.append(p)
    return predictions


def predicted_ratios(cfg: Config, device: Device = H200) -> dict[tuple[str, str], float | None]:
    """Row key -> predicted ratio on `device` (None for baseline rows): what gpu_suite prints beside its ratio."""
    return {row_key(p.section, p.case): p.ratio[device.name] for p in predict(cfg)}


def format_table(predictions: list[Prediction], measured: dict | None = None) -> str:
    v1 = " v1 ms | v1 ratio |" if measured else ""
    lines = [f"| section | case | H200 ms | H200 ratio | H100 ratio |{v1} target | verdict H200 / H100 | reason |",
             "|---|---|---|---|---|" + ("---|---|" if measured else "") + "---|---|---|"]
    for p in predictions:
        ratios = [f"{p.ratio[d.name]:.3f}" if p.ratio[d.name] is not None else "" for d in DEVICES]
        cells = [p.section, p.case, f"{p.ms[H200.name]:.3f}", *ratios]
        if measured:
            ms, r = measured.get(row_key(p.section, p.case), (None, None))
            cells += [f"{ms:.3f}" if ms is not None else "", f"{r:.3f}" if r is not None else ""]
        verdict = " / ".join(p.verdict[d.name] for d in DEVICES)
        cells += [p.target, verdict if verdict != "- / -" else "", p.reason]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_measured(path: str) -> dict[tuple[str, str], tuple[float, float | None]]:
    """Row key -> (ms, ratio) from a gpu_suite --out JSON."""
    timings = json.loads(Path(path).read_text())["timings"]
    return {row_key(r["section"], r["case"]): (r["ms"], r["ratio"]) for r in timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the predictions (and the model's constants) to this path")
    parser.add_argument("--measured", help="a gpu_suite --out JSON: print its ms and ratio beside the predictions")
    args = parser.parse_args(argv)
    predictions = predict(Config.for_run(False))
    measured = load_measured(args.measured) if args.measured else None
    print(format_table(predictions, measured))
    if args.json:
        constants = {name: value for name, value in globals().items()
                     if name.isupper() and isinstance(value, (int, float))}
        Path(args.json).write_text(json.dumps({"constants": constants, "devices": [asdict(d) for d in DEVICES],
                                               "rows": [asdict(p) for p in predictions]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

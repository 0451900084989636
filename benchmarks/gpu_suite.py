"""GPU suite: install, check every CUDA/Triton op against float64 references, time, one table.

On an H200 machine (torch, triton, peft, transformers present, no internet), from the repo root:

    python3 benchmarks/gpu_suite.py --out $OUT/gpu_suite.json      # installs, checks, times

`--dry-run` runs the same code paths on CPU at tiny sizes, with the public ops routed through
their Triton kernels in the interpreter (float32 only: the interpreter has no bf16 dot), so the
script cannot rot: the test suite runs it. Every check draws fresh random inputs and poisons fresh memory with NaN
first, so an output element that no kernel wrote shows up as NaN. Timings are medians
(`triton.testing.do_bench` on GPU). Targets are those of issue 6; the table says which are met.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import roofline
from suite_config import Config

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 1e-2, "float64": 1e-10}


@dataclass
class Row:
    section: str
    case: str
    ms: float
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    extra: dict = field(default_factory=dict)
    predicted_ratio: float | None = None  # the v2 design's H200 roofline (benchmarks/roofline.py), GPU runs only


# ----------------------------------------------------------------------------- harness


def poison_allocator(torch, device: str) -> None:
    """Fill a large block with NaN and free it: the CUDA caching allocator hands it out next."""
    if device == "cuda":
        block = torch.empty(64 << 20, dtype=torch.float32, device=device).fill_(float("nan"))
        del block


def rel_err(torch, out, ref) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def bench(torch, fn, device: str) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class Suite:
    def __init__(self, torch, config: Config):
        self.torch = torch
        self.cfg = config
        self.generator = torch.Generator(device="cpu").manual_seed(0)
        self.checks: list[dict] = []
        self.rows: list[Row] = []

    def randn(self, *shape, dtype=None, scale=1.0):
        """Fresh random data (never zeros), made on CPU for reproducibility, moved to the device."""
        t = self.torch.randn(*shape, generator=self.generator, dtype=self.torch.float64) * scale
        return t.to(device=self.cfg.device, dtype=dtype or self.torch.float32)

    def check(self, name: str, dtype_name: str, pairs) -> None:
        """Record the worst relative error over (output, float64 reference) pairs."""
        errors = [rel_err(self.torch, out, ref) for out, ref in pairs]
        worst = max(errors)
        tolerance = TOLERANCE[dtype_name]
        self.checks.append({"check": name, "dtype": dtype_name, "rel_err": worst, "tolerance": tolerance,
                            "passed": worst <= tolerance})

    def time(self, section, case, fn, *, baseline_row: Row | None = None, target: str = "", limit=None,
             higher_is_better=False, **extra) -> Row:
        row = Row(section, case, bench(self.torch, fn, self.cfg.device), extra=extra)
        if baseline_row is not None:
            row.baseline = baseline_row.case
            row.ratio = row.ms / baseline_row.ms
            row.target = target
            if limit is not None and self.cfg.device == "cuda":  # targets mean nothing at dry-run sizes
                row.met = row.ratio >= limit if higher_is_better else row.ratio <= limit
        self.rows.append(row)
        return row

    def dtype(self, name: str):
        return getattr(self.torch, name)


# ----------------------------------------------------------------------------- references (float64)


def ref_linear_lora(torch, x, weights, biases, lora_a, lora_b, scales, keep=None, p=0.0):
    """float64 outputs; `keep` (bool, x's shape) is the dropout mask of the LoRA branch's input."""
    x64 = x.double()
    dropped = x64 if keep is None else x64 * keep.to(x.device) / (1.0 - p)
    outs = []
    for w, b, a, bb, s in zip(weights, biases, lora_a, lora_b, scales):
        y = x64 @ w.double().T + s * (dropped @ a.double().T) @ bb.double().T
        outs.append(y + b.double() if b is not None else y)
    return outs


# ----------------------------------------------------------------------------- checks


def check_pack(suite: Suite) -> None:
    from slora_kernels.ops import pack, unpack

    torch = suite.torch
    for dtype_name in suite.cfg.dtype_names + ("float64",):
        ranks = [int(r) for r in torch.randint(1, 97, (37,), generator=suite.generator)]
        segments = [suite.randn(r, 129, dtype=suite.dtype(dtype_name)) for r in ranks]
        poison_allocator(torch, suite.cfg.device)
        buffer, offsets = pack(segments, align=16)
        expected = torch.zeros_like(buffer)
        for seg, start in zip(segments, offsets.tolist()):
            expected[start : start + seg.shape[0]] = seg
        restored = unpack(buffer, offsets, ranks)
        exact = torch.equal(buffer, expected) and all(torch.equal(a, b) for a, b in zip(restored, segments))
        suite.checks.append({"check": "pack/unpack round trip (exact)", "dtype": dtype_name,
                             "rel_err": 0.0 if exact else float("inf"), "tolerance": 0.0, "passed": exact})


def check_activation_sq(suite: Suite) -> None:
    from slora_kernels.ops import activation_sq_accumulate

    torch = suite.torch
    for dtype_name in suite.cfg.dtype_names:
        x = suite.randn(3, 37, 67, dtype=suite.dtype(dtype_name))
        mask = torch.rand(3, 37, generator=suite.generator) > 0.3
        acc = suite.randn(67).abs()
        ref = acc.double() + (x.double() ** 2 * mask.to(x.device).double()[..., None]).sum(dim=(0, 1))
        activation_sq_accumulate(acc, x, mask.to(x.device))
        suite.check("activation_sq_accumulate (masked)", dtype_name, [(acc, ref)])


def check_fisher(suite: Suite) -> None:
    from slora_kernels.ops import fisher_diag_accumulate

    torch = suite.torch
    for dtype_name in suite.cfg.dtype_names:
        x = suite.randn(3, 29, 45, dtype=suite.dtype(dtype_name))
        g = suite.randn(3, 29, 38, dtype=suite.dtype(dtype_name))
        x64, g64 = x.double(), g.double()
        for per_sample in (False, True):
            acc = suite.randn(38, 45).abs()
            if per_sample:
                ref = acc.double() + (torch.einsum("bto,bti->boi", g64, x64) ** 2).sum(0)
            else:
                ref = acc.double() + torch.einsum("bto,bti->oi", g64 ** 2, x64 ** 2)
            fisher_diag_accumulate(acc, x, g, per_sample=per_sample)
            suite.check(f"fisher_diag_accumulate per_{'sample' if per_sample else 'token'}", dtype_name, [(acc, ref)])


def check_grouped_lora(suite: Suite) -> None:
    from slora_kernels.ops import grouped_lora

    torch = suite.torch
    from slora_kernels.ops._hash_dropout import keep_mask

    # Ranks 1..130 (one and several rank chunks, one layer over 128), token count and widths not
    # multiples of any tile, dropout drawn in the kernel: checked against the CPU hash's mask.
    ranks, d_in, d_outs, scales, p = (5, 1, 17, 130, 3), 67, (45, 23, 31, 150, 9), [2.0, 0.5, 1.0, -0.7, 1.5], 0.2
    for dtype_name in suite.cfg.dtype_names:
        dtype = suite.dtype(dtype_name)
        x = suite.randn(3, 67, d_in, dtype=dtype).requires_grad_(True)
        weights = [suite.randn(o, d_in, dtype=dtype, scale=0.1) for o in d_outs]
        biases = [suite.randn(o, dtype=dtype) if i % 2 == 0 else None for i, o in enumerate(d_outs)]
        lora_a = [suite.randn(r, d_in, dtype=dtype, scale=0.1).requires_grad_(True) for r in ranks]
        lora_b = [suite.randn(o, r, dtype=dtype, scale=0.1).requires_grad_(True) for o, r in zip(d_outs, ranks)]
        poison_allocator(torch, suite.cfg.device)
        outs = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=p, seed=11)
        grads = [suite.randn(*o.shape, dtype=dtype) for o in outs]
        torch.autograd.backward(outs, grads)

        leaves64 = [t.detach().double().requires_grad_(True) for t in [x, *lora_a, *lora_b]]
        x64, a64, b64 = leaves64[0], leaves64[1 : 1 + len(ranks)], leaves64[1 + len(ranks) :]
        keep = keep_mask(x.numel(), p, 11).view(x.shape)
        refs = ref_linear_lora(torch, x64, weights, biases, a64, b64, scales, keep, p)
        torch.autograd.backward(refs, [g.double() for g in grads])
        pairs = list(zip(outs, refs)) + [(t.grad, r.grad) for t, r in zip([x, *lora_a, *lora_b], leaves64)]
        suite.check("grouped_lora forward + all gradients (dropout 0.2)", dtype_name, pairs)


# ----------------------------------------------------------------------------- timings


def peft_linear(torch, weight, rank, scale_alpha):
    """Stock PEFT LoRA Linear around a frozen nn.Linear with the given weight."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    base.weight.data.copy_(weight)
    base.weight.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=scale_alpha)
    layer = LoraLinear(base, "default", config=config, r=rank, lora_alpha=scale_alpha)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return layer.to(device=weight.device, dtype=weight.dtype)


def fwd_bwd(torch, forward, x, grad_outputs):
    def step():
        x.grad = None
        outs = forward()
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        torch.autograd.backward(outs, grad_outputs)

    return step


def time_linear(suite: Suite) -> None:
    """One linear layer: base GEMM (the floor), fused LoRA, PEFT's LoRA Linear; forward and fwd+bwd."""
    from slora_kernels.ops import grouped_lora

    torch, cfg = suite.torch, suite.cfg
    dtype = torch.bfloat16
    for d_in, d_out in cfg.linear_shapes:
        weight = suite.randn(d_out, d_in, dtype=dtype, scale=d_in ** -0.5)
        for tokens in cfg.token_counts:
            x = suite.randn(tokens, d_in, dtype=dtype)
            dy = suite.randn(tokens, d_out, dtype=dtype)
            base_fwd = suite.time("linear fwd", f"base {d_in}x{d_out} T={tokens}",
                                  lambda: torch.nn.functional.linear(x, weight))
            xg = x.clone().requires_grad_(True)
            base_step = suite.time("linear fwd+bwd", f"base {d_in}x{d_out} T={tokens}",
                                   fwd_bwd(torch, lambda: torch.nn.functional.linear(xg, weight), xg, [dy]))
            for rank in cfg.uniform_ranks:
                a = suite.randn(rank, d_in, dtype=dtype, scale=d_in ** -0.5).requires_grad_(True)
                b = suite.randn(d_out, rank, dtype=dtype, scale=0.01).requires_grad_(True)
                fused = lambda: grouped_lora(x, [weight], [None], [a], [b], [2.0])[0]  # noqa: E731
                fused_g = lambda: grouped_lora(xg, [weight], [None], [a], [b], [2.0])  # noqa: E731
                layer = peft_linear(torch, weight, rank, 2 * rank)
                case = f"r={rank} {d_in}x{d_out} T={tokens}"
                with torch.no_grad():
                    suite.time("linear fwd", f"fused {case}", fused, baseline_row=base_fwd,
                               target="<= 1.05x base (r <= 32, T >= 4096)", limit=1.05 if rank <= 32 else None)
                    suite.time("linear fwd", f"peft {case}", lambda: layer(x), baseline_row=base_fwd,
                               target="reference (roofline >= 1.25x)")
                suite.time("linear fwd+bwd", f"fused {case}", fwd_bwd(torch, fused_g, xg, [dy]),
                           baseline_row=base_step, target="<= 1.08x base step", limit=1.08 if rank <= 32 else None)
                suite.time("linear fwd+bwd", f"peft {case}", fwd_bwd(torch, lambda: layer(xg), xg, [dy]),
                           baseline_row=base_step, target="reference")


def padded_bmm_forward(torch, x, weights, lora_a, lora_b, scales):
    """Pad every factor to the group's max rank and run one bmm per side (the naive batched way)."""
    r_max = max(a.shape[0] for a in lora_a)
    a_pad = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in lora_a])
    b_pad = torch.stack([torch.nn.functional.pad(b, (0, r_max - b.shape[1])) for b in lora_b])
    shrink = torch.einsum("ti,gri->gtr", x, a_pad)
    expand = torch.bmm(shrink, b_pad.transpose(1, 2))
    return [torch.nn.functional.linear(x, w) + s * e for w, e, s in zip(weights, expand, scales)]


def per_module_forward(torch, x, weights, lora_a, lora_b, scales):
    """What PEFT does: each module on its own, shrink then expand."""
    return [torch.nn.functional.linear(x, w) + s * ((x @ a.T) @ b.T)
            for w, a, b, s in zip(weights, lora_a, lora_b, scales)]


def time_groups(suite: Suite) -> None:
    """Layers sharing one input: skewed mixed ranks against uniform at the mean rank and the naive ways."""
    from slora_kernels.ops import grouped_lora

    torch, cfg = suite.torch, suite.cfg
    dtype = torch.bfloat16
    skewed = list(cfg.skewed_ranks)
    mean_rank = round(sum(skewed) / len(skewed))
    g, d_in, d_out = len(skewed), cfg.group_d_in, cfg.group_d_out
    weights = [suite.randn(d_out, d_in, dtype=dtype, scale=d_in ** -0.5) for _ in range(g)]
    w_cat = torch.cat(weights)
    scales = [2.0] * g

    def factors(ranks):
        a = [suite.randn(r, d_in, dtype=dtype, scale=d_in ** -0.5).requires_grad_(True) for r in ranks]
        b = [suite.randn(d_out, r, dtype=dtype, scale=0.01).requires_grad_(True) for r in ranks]
        return a, b

    a_skew, b_skew = factors(skewed)
    a_uni, b_uni = factors([mean_rank] * g)
    for tokens in cfg.token_counts:
        x = suite.randn(tokens, d_in, dtype=dtype).requires_grad_(True)
        dys = [suite.randn(tokens, d_out, dtype=dtype) for _ in range(g)]
        tag = f"G={g} {d_in}->{d_out} T={tokens}"
        base = suite.time("group fwd+bwd", f"base (one GEMM) {tag}",
                          fwd_bwd(torch, lambda: torch.nn.functional.linear(x, w_cat), x, [torch.cat(dys, -1)]))
        uniform = suite.time("group fwd+bwd", f"fused uniform r={mean_rank} {tag}",
                             fwd_bwd(torch, lambda: grouped_lora(x, weights, [None] * g, a_uni, b_uni, scales), x, dys),
                             baseline_row=base, target="reference")
        skew_row = suite.time("group fwd+bwd", f"fused skewed {tag}",
                              fwd_bwd(torch, lambda: grouped_lora(x, weights, [None] * g, a_skew, b_skew, scales), x, dys),
                              baseline_row=uniform, target="<= 1.10x uniform", limit=1.10)
        for name, impl in (("per-module loop", per_module_forward), ("pad-to-max bmm", padded_bmm_forward)):
            row = suite.time("group fwd+bwd", f"{name} skewed {tag}",
                             fwd_bwd(torch, lambda impl=impl: impl(torch, x, weights, a_skew, b_skew, scales), x, dys),
                             baseline_row=skew_row, target=">= 1.5x fused skewed", limit=1.5, higher_is_better=True)
            row.extra["speedup_of_fused"] = row.ratio


def time_statistics(suite: Suite) -> None:
    """Sensitivity kernels against a copy (bandwidth) and a GEMM of the same shape."""
    from slora_kernels.ops import activation_sq_accumulate, fisher_diag_accumulate, pack

    torch, cfg = suite.torch, suite.cfg
    dtype = torch.bfloat16
    x = suite.randn(cfg.stats_tokens, cfg.stats_dim, dtype=dtype)
    nbytes = x.numel() * x.element_size()
    copy = suite.time("bandwidth", f"copy {nbytes / 1e6:.0f} MB (read+write)", lambda: x.clone())
    copy_gbs = 2 * nbytes / copy.ms / 1e6
    acc = torch.zeros(cfg.stats_dim, device=cfg.device)
    row = suite.time("sensitivity", f"activation_sq_accumulate T={cfg.stats_tokens} d={cfg.stats_dim}",
                     lambda: activation_sq_accumulate(acc, x))
    row.extra["GB/s"] = nbytes / row.ms / 1e6
    row.baseline, row.ratio = "copy bandwidth", row.extra["GB/s"] / copy_gbs
    row.target = ">= 0.80 of copy GB/s"
    row.met = row.ratio >= 0.80 if cfg.device == "cuda" else None

    b, t = cfg.fisher_batch, cfg.fisher_seq
    d_in, d_out = cfg.fisher_dims
    xs = suite.randn(b, t, d_in, dtype=dtype)
    gs = suite.randn(b, t, d_out, dtype=dtype)
    gemm = suite.time("sensitivity", f"bf16 GEMM g^T x [{d_out}x{b * t}]x[{b * t}x{d_in}]",
                      lambda: gs.reshape(-1, d_out).T @ xs.reshape(-1, d_in))
    fisher_acc = torch.zeros(d_out, d_in, device=cfg.device)
    suite.time("sensitivity", "fisher per-token", lambda: fisher_diag_accumulate(fisher_acc, xs, gs),
               baseline_row=gemm, target="<= 1.2x GEMM", limit=1.2)
    suite.time("sensitivity", "fisher per-sample", lambda: fisher_diag_accumulate(fisher_acc, xs, gs, per_sample=True),
               baseline_row=gemm, target="<= 2x GEMM", limit=2.0)

    ranks = torch.randint(4, 2 * cfg.pack_mean_rank - 3, (cfg.pack_segments,), generator=suite.generator).tolist()
    segments = [suite.randn(r, cfg.pack_n, dtype=dtype) for r in ranks]
    packed = pack(segments, align=16)[0]
    pack_bytes = 2 * packed.numel() * packed.element_size()
    row = suite.time("gather", f"pack {len(ranks)} segments mean r={sum(ranks) / len(ranks):.1f} n={cfg.pack_n}",
                     lambda: pack(segments, align=16))
    row.extra["GB/s"] = pack_bytes / row.ms / 1e6
    row.baseline, row.ratio = "copy bandwidth", row.extra["GB/s"] / copy_gbs
    row.target = ">= 0.70 of copy GB/s"
    row.met = row.ratio >= 0.70 if cfg.device == "cuda" else None


# ----------------------------------------------------------------------------- main


def print_table(checks: list[dict], rows: list[Row]) -> None:
    print("\nCorrectness (rel. error against float64, fresh random inputs, NaN-poisoned memory)")
    for c in checks:
        print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']:45} {c['dtype']:9} "
              f"rel_err={c['rel_err']:.2e} (tol {c['tolerance']:.0e})")
    print(f"\n| {'section':15} | {'case':52} | {'median ms':>9} | {'ratio':>6} | {'pred.':>6} | target | met |")
    print(f"|{'-' * 17}|{'-' * 54}|{'-' * 11}|{'-' * 8}|{'-' * 8}|--------|-----|")
    for r in rows:
        ratio, predicted = (f"{v:6.3f}" if v is not None else "      " for v in (r.ratio, r.predicted_ratio))
        met = {True: "yes", False: "NO", None: ""}[r.met]
        print(f"| {r.section:15} | {r.case:52} | {r.ms:9.3f} | {ratio} | {predicted} | {r.target} | {met} |")


def attach_predictions(rows: list[Row], config: Config) -> None:
    """Each row's predicted H200 ratio from the roofline of the v2 design, matched by section and case, so
    the table shows how far a measured ratio is from what the design allows."""
    predicted = roofline.predicted_ratios(config)
    for row in rows:
        row.predicted_ratio = predicted.get(roofline.row_key(row.section, row.case))


def run_step(suite: Suite, step) -> None:
    """Run one check or timing step; an exception fails that step alone, the rest still run and time."""
    try:
        step(suite)
    except Exception as error:  # noqa: BLE001 - reported as a failed check, with its message
        traceback.print_exc()
        suite.checks.append({"check": f"{step.__name__} raised {type(error).__name__}: {error}"[:200],
                             "dtype": "-", "rel_err": float("inf"), "tolerance": 0.0, "passed": False})


def route_cpu_through_triton() -> None:
    """Dry run: make the ops take their Triton path on CPU tensors (run by the interpreter)."""
    from slora_kernels.ops import utils

    utils.triton_path = lambda tensor: True


def run(args) -> int:
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.dry_run:
        route_cpu_through_triton()

    config = Config.for_run(args.dry_run)
    if config.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    suite = Suite(torch, config)
    started = time.time()
    for step in STEPS:
        if args.only is None or step.__name__ in args.only:
            run_step(suite, step)
    failed = [c for c in suite.checks if not c["passed"]]
    if config.device == "cuda":  # the model is of the GPU shapes; at dry-run sizes it would mean nothing
        attach_predictions(suite.rows, config)
    print_table(suite.checks, suite.rows)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": torch.cuda.get_device_name() if config.device == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "dry_run": args.dry_run,
        "seconds": time.time() - started,
        "checks": suite.checks,
        "timings": [asdict(r) for r in suite.rows],
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{len(suite.checks) - len(failed)}/{len(suite.checks)} checks passed in {result['seconds']:.0f} s")
    return 1 if failed else 0


STEPS = (check_pack, check_activation_sq, check_fisher, check_grouped_lora, time_linear, time_groups, time_statistics)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: same code paths, no GPU")
    parser.add_argument("--no-install", action="store_true", help="skip `pip install -e .` (already installed)")
    parser.add_argument("--only", nargs="+", choices=[step.__name__ for step in STEPS],
                        help="run these steps alone (a rerun that must fit a short GPU lease)")
    args = parser.parse_args()
    if not args.dry_run and not args.no_install:
        start = time.time()
        env = dict(os.environ, SLORA_BUILD="cuda")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(REPO)],
                       check=True, env=env)
        print(f"installed slora_kernels (CUDA build) in {time.time() - start:.0f} s", flush=True)
        # A fresh interpreter sees the new editable install.
        return subprocess.run([sys.executable, __file__, "--no-install", *sys.argv[1:]]).returncode
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

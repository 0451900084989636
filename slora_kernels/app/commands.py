"""What `slora analyze`, `slora train`, `slora demo` and `slora export` do, given parsed and checked arguments.

cli.py owns parsing and how errors are shown; this module only does the work.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from slora_kernels.app import RANK_CHOICES
from slora_kernels.app.adapters import sensitivity_config
from slora_kernels.app.data import Dataset, load_dataset
from slora_kernels.app.models import linear_targets, load_model
from slora_kernels.app.plotting import plot_ranks, rank_grid, short_labels
from slora_kernels.app.runs import RunResult, calibrate, run
from slora_kernels.app.training import TrainConfig
from slora_kernels.export import export_adapter

# The demo: seed 0 of the allocation study (benchmarks/allocation_study.py: its protocol and learning rate,
# the first 1,000 of its test snippets), and a slice of it that runs in well under 2 minutes. Average rank 1
# with rank 0 allowed: the tight budget, where the choice is which matrices get any rank at all.
DEMO_FULL = {"train": 2000, "eval": 1000, "epochs": 1, "calib": 512, "max_length": 64, "batch_size": 16, "lr": 2e-3}
DEMO_QUICK = {"train": 128, "eval": 128, "epochs": 1, "calib": 32, "max_length": 32, "batch_size": 32, "lr": 2e-3}
DEMO_AVG_RANK = 1
DEMO_MIN_RANK = 0


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _dataset(args: argparse.Namespace) -> tuple[Dataset, str]:
    """The data, cut to --max-samples/--max-eval, and the task it implies."""
    full = load_dataset(args.data, text_column=args.text_column, label_column=args.label_column, task=args.task,
                        eval_data=args.eval_data, eval_fraction=args.eval_fraction, seed=args.seed)
    dataset = Dataset(full.train.head(args.max_samples), full.eval.head(args.max_eval), full.label_names)
    return dataset, "seq-cls" if dataset.label_names is not None else "causal-lm"


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                       seed=args.seed, max_steps=args.max_steps, progress=not args.quiet)


def _print_ranks(ranks: dict[str, int]) -> None:
    """The plot's numbers as text: one row per layer, one column per module type."""
    rows, cols, grid = rank_grid(ranks)
    short = short_labels(cols)
    print("layer " + "".join(f"  {s}" for s in short))
    for row, values in zip(rows, grid):
        print(f"{row:<6}" + "".join(f"  {'-' if v is None else v:>{len(s)}}" for s, v in zip(short, values)))


def analyze(args: argparse.Namespace) -> None:
    dataset, task = _dataset(args)
    model, tokenizer = load_model(args.model, task, dataset.num_labels, seed=args.seed)
    targets = linear_targets(model, args.target_modules)
    start = time.perf_counter()
    report = calibrate(model, tokenizer, dataset.train.head(args.calib_samples), targets, args.estimator,
                       args.batch_size, args.max_length, progress=not args.quiet)
    seconds = time.perf_counter() - start
    ranks = report.ranks(args.avg_rank, budget="params", min_rank=args.min_rank)
    config = sensitivity_config(report, args.avg_rank, task, args.min_rank)
    config.base_model_name_or_path = model.name_or_path
    config.save_pretrained(str(args.out))
    report.to_json(args.out / "sensitivity.json", overwrite=args.overwrite)
    plot_ranks(ranks, args.out / "ranks.png", title=f"Sensitivity-LoRA ranks, {args.estimator}")
    print(report)
    print(f"\nRanks at the parameter budget of uniform rank {args.avg_rank} ({len(ranks)} matrices, "
          f"calibration {seconds:.1f} s):")
    _print_ranks(ranks)
    unadapted = sum(r == 0 for r in ranks.values())
    if unadapted:
        print(f"{unadapted} matrices at rank 0 get no adapter (left out of the config's target_modules)")
    print(f"\nWrote {args.out}/sensitivity.json, adapter_config.json (stock PEFT LoraConfig), ranks.png")


def train(args: argparse.Namespace) -> None:
    dataset, task = _dataset(args)
    report, method = None, args.ranks
    if method not in RANK_CHOICES:
        from slora_kernels.sensitivity import SensitivityReport

        report, method = SensitivityReport.from_json(args.ranks), "sensitivity"
    model, tokenizer = load_model(args.model, task, dataset.num_labels, seed=args.seed)
    targets = linear_targets(model, args.target_modules)
    _, result = run(model, tokenizer, dataset, method=method, avg_rank=args.avg_rank, targets=targets,
                    config=_config(args), task=task, estimator=args.estimator, calib_samples=args.calib_samples,
                    report=report, min_rank=args.min_rank, fused=not args.no_fuse, out_dir=args.out)
    if method == "sensitivity":
        plot_ranks(result.ranks, args.out / "ranks.png")
    _write_json(args.out / "metrics.json", {"model": args.model, "data": args.data, "task": task,
                                            "avg_rank": args.avg_rank, **result.to_dict()})
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"{result.method}: {scores} on {len(dataset.eval)} held-out examples; {result.lora_params:,} trainable "
          f"LoRA parameters; {result.train_seconds:.0f} s training")
    print(f"Wrote {args.out}/adapter (stock PEFT adapter), metrics.json")


def paired_difference(base: list[bool], other: list[bool]) -> tuple[float, float]:
    """Accuracy of `other` minus `base` on the same examples, in points, and the half-width of its 95% normal
    interval over those examples. It says how far test-set sampling alone could move the difference; a
    different seed moves it too, which only repeated runs show."""
    if len(base) != len(other) or len(base) < 2:
        raise ValueError(f"need two equally long per-example results (at least 2), got {len(base)} and {len(other)}")
    diffs = [int(o) - int(b) for b, o in zip(base, other)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return 100 * mean, 100 * 1.96 * math.sqrt(var / len(diffs))


def _demo_table(results: list[RunResult]) -> str:
    head = f"{'method':<18}{'accuracy':>10}{'LoRA params':>13}{'calibration s':>15}{'training s':>12}"
    rows = [f"{r.method:<18}{100 * r.metrics['accuracy']:>9.1f}%{r.lora_params:>13,}{r.calib_seconds:>15.1f}"
            f"{r.train_seconds:>12.1f}" for r in results]
    return "\n".join([head, "-" * len(head), *rows])


def demo(args: argparse.Namespace) -> None:
    """Analyze MiniLM on Rotten Tomatoes, plot, then uniform LoRA vs Sensitivity-LoRA at equal parameters."""
    setting = DEMO_QUICK if args.quick else DEMO_FULL
    start = time.perf_counter()
    full = load_dataset("rotten_tomatoes")
    dataset = Dataset(full.train.head(setting["train"]), full.eval.head(setting["eval"]), full.label_names)
    config = TrainConfig(epochs=setting["epochs"], batch_size=setting["batch_size"], lr=setting["lr"],
                         max_length=setting["max_length"], progress=not args.quiet)
    print(f"Demo{' (quick)' if args.quick else ''}: MiniLM on Rotten Tomatoes, {len(dataset.train)} training and "
          f"{len(dataset.eval)} test snippets, {config.epochs} epoch(s), average rank {DEMO_AVG_RANK} "
          f"(rank 0 allowed: matrices may get no adapter)")
    model, tokenizer = load_model("minilm", "seq-cls", 2)
    targets = linear_targets(model)
    calib_start = time.perf_counter()
    report = calibrate(model, tokenizer, dataset.train.head(setting["calib"]), targets, "activation",
                       config.batch_size, config.max_length, progress=config.progress)
    calib_seconds = time.perf_counter() - calib_start
    report.to_json(args.out / "sensitivity.json", overwrite=args.overwrite)
    ranks = report.ranks(DEMO_AVG_RANK, budget="params", min_rank=DEMO_MIN_RANK)
    plot_ranks(ranks, args.out / "ranks.png", title="Sensitivity-LoRA ranks, MiniLM")
    _print_ranks(ranks)
    results = []
    for method in ("uniform", "sensitivity"):
        print(f"\n== {method} ==")
        model, tokenizer = load_model("minilm", "seq-cls", 2)
        folder = args.out / method
        folder.mkdir(exist_ok=True)
        _, result = run(model, tokenizer, dataset, method=method, avg_rank=DEMO_AVG_RANK, targets=targets,
                        config=config, task="seq-cls", report=report, min_rank=DEMO_MIN_RANK, out_dir=folder)
        if method == "sensitivity":
            result.calib_seconds += calib_seconds
        results.append(result)
    table = _demo_table(results)
    diff, half = paired_difference(results[0].correct, results[1].correct)
    total = time.perf_counter() - start
    _write_json(args.out / "demo.json", {"quick": args.quick, "setting": setting, "total_seconds": total,
                                         "sensitivity_minus_uniform": {"points": diff,
                                                                       "ci95": [diff - half, diff + half]},
                                         "runs": [r.to_dict() for r in results]})
    print(f"\n{table}\n\nSensitivity-LoRA minus uniform: {diff:+.1f} points, 95% CI [{diff - half:+.1f}, "
          f"{diff + half:+.1f}] over these {len(dataset.eval)} test snippets (one seed; "
          f"benchmarks/RESULTS.md has the 5-seed study).")
    print(f"\nTotal {total:.0f} s. Wrote {args.out}/ranks.png, sensitivity.json, demo.json, "
          f"uniform/adapter, sensitivity/adapter")


def export(args: argparse.Namespace) -> None:
    """The adapter at one rank, and what the padding cost."""
    print(export_adapter(args.adapter_dir, args.out, rank=args.rank, force=args.force))

"""Accuracy study (issue 5): MiniLM on Rotten Tomatoes, uniform LoRA vs Sensitivity-LoRA vs AdaLoRA.

Fixed 1,000-snippet test split, 4,000 training snippets, 2 epochs, batch 32, lr 5e-4, all 36
linear layers of the encoder, average rank 4 (Sensitivity-LoRA at the same trainable LoRA
parameters as uniform rank 4; AdaLoRA 6 -> 4 in rank units; the head alone as the floor). Each
finished run is appended to a JSONL file, and a restart skips the (method, seed) pairs already
there, so the ~45 minutes of 2-core CPU can be spread over several sittings.

    python benchmarks/accuracy_minilm.py                      # run what is missing, then print the table
    python benchmarks/accuracy_minilm.py --table-only         # print the table of what has finished
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from slora_kernels.app.data import Dataset, load_dataset
from slora_kernels.app.models import linear_targets, load_model
from slora_kernels.app.runs import RunResult, run
from slora_kernels.app.training import TrainConfig, evaluate, train

METHODS = {  # name -> (rank choice, estimator)
    "uniform": ("uniform", "activation"),
    "sensitivity-activation": ("sensitivity", "activation"),
    "sensitivity-fisher": ("sensitivity", "fisher"),
    "adalora": ("adalora", "activation"),
    "head-only": (None, None),  # the floor: only the classification head trains, no adapter
}
JSONL = Path(__file__).with_name("accuracy_minilm.jsonl")


def finished(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_run(name: str, seed: int, args: argparse.Namespace) -> dict:
    method, estimator = METHODS[name]
    full = load_dataset("rotten_tomatoes")
    dataset = Dataset(full.train.head(args.train), full.eval, full.label_names)
    model, tokenizer = load_model("minilm", "seq-cls", num_labels=2, seed=seed)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                         seed=seed, progress=args.progress)
    if method is None:
        return {"name": name, "seed": seed, **head_only(model, tokenizer, dataset, config).to_dict()}
    _, result = run(model, tokenizer, dataset, method=method, avg_rank=args.avg_rank, targets=linear_targets(model),
                    config=config, task="seq-cls", estimator=estimator, calib_samples=args.calib_samples,
                    fused=not args.no_fuse)
    return {"name": name, "seed": seed, **result.to_dict()}


def head_only(model, tokenizer, dataset: Dataset, config: TrainConfig) -> RunResult:
    """Train the classification head alone: what any adapter has to beat."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("classifier.")
    stats = train(model, tokenizer, dataset.train, config)
    scores = evaluate(model, tokenizer, dataset.eval, max_length=config.max_length, progress=config.progress)
    return RunResult("head-only", scores, 0, 0.0, stats.seconds, stats.steps, stats.tokens, fused=False)


def table(rows: list[dict], methods: list[str], seeds: list[int]) -> str:
    """Markdown: accuracy mean and population std over seeds, median seconds (robust to a run on a
    loaded machine); the missing (method, seed) pairs are named."""
    lines = ["| method | runs | accuracy mean | accuracy std | trainable LoRA params | calibration s (median) | training s (median) |",
             "|---|---|---|---|---|---|---|"]
    missing = []
    for name in methods:
        done = [r for r in rows if r["name"] == name]
        missing += [f"{name} seed {s}" for s in seeds if s not in {r['seed'] for r in done}]
        if not done:
            lines.append(f"| {name} | 0 | - | - | - | - | - |")
            continue
        acc = [100 * r["metrics"]["accuracy"] for r in done]
        median = lambda key: statistics.median(r[key] for r in done)  # noqa: E731
        std = f"{statistics.pstdev(acc):.2f}" if len(acc) > 1 else "- (1 run)"
        lines.append(f"| {name} | {len(done)} | {statistics.fmean(acc):.2f} | {std} | "
                     f"{round(median('lora_params')):,} | {median('calib_seconds'):.1f} | {median('train_seconds'):.0f} |")
    per_seed = ["", "Per seed (accuracy %): " + "; ".join(
        f"{r['name']} s{r['seed']} {100 * r['metrics']['accuracy']:.1f}{' (stock PEFT layers)' if r['name'] == 'adalora' else ''}"
        for r in sorted(rows, key=lambda r: (methods.index(r["name"]) if r["name"] in methods else 99, r["seed"])))]
    return "\n".join(lines + per_seed + ([f"\nMissing runs: {', '.join(missing)}."] if missing else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--avg-rank", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--no-fuse", action="store_true", help="stock PEFT LoRA layers instead of the fused ones")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--jsonl", type=Path, default=JSONL)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        for seed in args.seeds:
            for name in args.methods:
                if any(r["name"] == name and r["seed"] == seed for r in finished(args.jsonl)):
                    continue
                row = one_run(name, seed, args)
                with args.jsonl.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"{name} seed {seed}: accuracy {row['metrics']['accuracy']:.4f}, "
                      f"train {row['train_seconds']:.0f} s", flush=True)
    print(table(finished(args.jsonl), list(METHODS), args.seeds))


if __name__ == "__main__":
    main()

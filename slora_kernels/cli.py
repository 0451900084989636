"""The `slora` command (also `python -m slora_kernels`)."""
from __future__ import annotations

import argparse

from slora_kernels._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora", description="Sensitivity-LoRA: sensitivity-based LoRA rank allocation.")
    parser.add_argument("--version", action="version", version=f"slora_kernels {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0

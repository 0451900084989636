"""How long the README's first command takes: `slora demo` (and `--quick`) end to end in a fresh process.

Reports wall and CPU seconds (the child's user + system time; on a shared machine wall time also measures the
neighbours, CPU time does not) per run and their medians. The README quotes these figures ("about 3 minutes on
2 CPU cores; --quick under 2").

    python benchmarks/bench_demo.py [--repeats 3] [--modes quick full]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(quick: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `slora demo --quiet` in a fresh process and a fresh output folder."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "slora_kernels", "demo", "--quiet", "--out", str(Path(folder) / "demo")]
        if quick:
            command.append("--quick")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=["quick", "full"], default=["quick", "full"])
    args = parser.parse_args()
    print(f"{'mode':6} {'wall s (median)':>16} {'CPU s (median)':>15}  runs (wall/CPU)")
    for mode in args.modes:
        runs = [run_demo(quick=mode == "quick") for _ in range(args.repeats)]
        walls, cpus = zip(*runs)
        listed = ", ".join(f"{w:.0f}/{c:.0f}" for w, c in runs)
        print(f"{mode:6} {statistics.median(walls):16.0f} {statistics.median(cpus):15.0f}  {listed}", flush=True)


if __name__ == "__main__":
    main()

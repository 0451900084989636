"""The fused path's GPU measurement as one command: build, the LoRA rows of the GPU suite, one layer's host and
device time, and whole-model training steps, each step within a share of one time budget, JSON under --out.

    python3 benchmarks/gpu_run.py --out $OUT             # on the H200 machine: under 8 minutes
    python3 benchmarks/gpu_run.py --dry-run --out DIR    # CPU, tiny shapes, seconds (the test suite runs it)

Steps (a step that would overrun the budget is cut off and recorded so; the others still run):
  install     pip install -e . with the CUDA extension (SLORA_BUILD=cuda)
  gpu_suite   check_grouped_lora, time_linear, time_groups of benchmarks/gpu_suite.py
  profile     benchmarks/profile_fused_step.py at 4096 tokens, 4096 x 4096, r 16
  e2e_eager   benchmarks/bench_e2e.py: Llama-3-8B blocks and Llama-3.2-1B, 1 x 1024 and 4 x 4096 tokens, bf16,
              lora_dropout 0 and 0.05
  e2e_amp     the same under autocast bf16 (fp32 models), Llama-3.2-1B at 4 x 4096
  e2e_qlora   QLoRA: two Llama-3-8B blocks in bitsandbytes 4-bit nf4 (bf16 compute), 1 x 1024 tokens, lora_dropout
              0 and 0.05; recorded as skipped where bitsandbytes is not installed
  e2e_compile Llama-3-8B blocks at 4 x 4096, bf16, every model torch.compiled
Each step's output is in <out>/<step>.log and its JSON beside it; <out>/gpu_run.json lists the steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def steps(out: Path, dry_run: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds it may take) in order."""
    qlora = ["--quant", "4bit", "--precision", "bf16", "--lora-dropout", "0", "0.05", "--out", str(out / "e2e_qlora.json")]
    py = sys.executable
    e2e = [py, str(BENCH / "bench_e2e.py")]
    if dry_run:
        return [("gpu_suite", [py, str(BENCH / "gpu_suite.py"), "--dry-run", "--only", "check_grouped_lora",
                               "time_linear", "time_groups", "--out", str(out / "gpu_suite.json")], 300),
                ("profile", [py, str(BENCH / "profile_fused_step.py"), "--dry-run", "--out",
                             str(out / "profile.json")], 120),
                ("e2e_eager", [*e2e, "--dry-run", "--precision", "fp32", "--out", str(out / "e2e_eager.json")], 120),
                ("e2e_qlora", [*e2e, "--dry-run", *qlora], 120)]
    return [("install", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(REPO)], 150),
            ("gpu_suite", [py, str(BENCH / "gpu_suite.py"), "--no-install", "--only", "check_grouped_lora",
                           "time_linear", "time_groups", "--out", str(out / "gpu_suite.json")], 110),
            ("profile", [py, str(BENCH / "profile_fused_step.py"), "--out", str(out / "profile.json")], 40),
            ("e2e_eager", [*e2e, "--models", "llama3-8b-blocks", "llama3.2-1b", "--tokens", "1x1024", "4x4096",
                           "--precision", "bf16", "--lora-dropout", "0", "0.05", "--repeats", "10",
                           "--out", str(out / "e2e_eager.json")], 120),
            ("e2e_amp", [*e2e, "--models", "llama3.2-1b", "--tokens", "4x4096", "--precision", "autocast-bf16",
                         "--lora-dropout", "0", "0.05", "--repeats", "10", "--out", str(out / "e2e_amp.json")], 45),
            ("e2e_qlora", [*e2e, "--models", "llama3-8b-blocks", "--config", "num_hidden_layers=2", "--tokens", "1x1024",
                           "--repeats", "5", *qlora], 60),
            ("e2e_compile", [*e2e, "--models", "llama3-8b-blocks", "--tokens", "4x4096", "--precision", "bf16",
                             "--lora-dropout", "0", "--compile", "on", "--repeats", "8",
                             "--out", str(out / "e2e_compile.json")], 120)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all steps together")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    env = dict(os.environ, SLORA_BUILD="cuda") if not args.dry_run else dict(os.environ)
    record = []
    for name, command, seconds in steps(args.out, args.dry_run):
        if "--quant" in command and importlib.util.find_spec("bitsandbytes") is None:
            record.append({"step": name, "status": "skipped: bitsandbytes is not installed (no internet on the GPU "
                                                  "machine: carry its wheel and pip install it first)"})
            print(f"[gpu_run] {name}: skipped, bitsandbytes is not installed", flush=True)
            continue
        left = deadline - time.monotonic()
        if left < 10:
            record.append({"step": name, "status": "skipped: no time left in the budget"})
            print(f"[gpu_run] {name}: skipped, no time left", flush=True)
            continue
        start = time.monotonic()
        log = args.out / f"{name}.log"
        try:
            with open(log, "w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                      timeout=min(seconds, left)).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"cut off after {min(seconds, left):.0f} s"
        record.append({"step": name, "status": status, "seconds": round(time.monotonic() - start, 1),
                       "log": log.name})
        print(f"[gpu_run] {name}: {status} in {time.monotonic() - start:.0f} s", flush=True)
        print(log.read_text()[-4000:], flush=True)
    (args.out / "gpu_run.json").write_text(json.dumps(record, indent=1))
    return 0 if all(r["status"] == "ok" for r in record) else 1


if __name__ == "__main__":
    sys.exit(main())

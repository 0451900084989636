"""Peak memory and time of estimate_sensitivity (activation) on SmolLM2-135M, per way of holding the model.

Modes, each in a fresh subprocess so that its peak RSS is its own:
  in_memory        from_pretrained on CPU, plain run
  cpu_offload      from_pretrained on CPU, then accelerate.cpu_offload(execution_device=cpu)
  disk_offload     from_pretrained(device_map={"": "disk"}, offload_folder=...): weights read from the checkpoint
  sequential       from_pretrained on CPU, offload="sequential" (device=cpu)
  sequential_disk  the disk_offload model, offload="sequential"

The model is saved once as safetensors in a temporary folder (from the embedded GGUF file), so the disk modes
load without materialising the weights. Each worker reads /proc/self/status: VmHWM (the kernel's peak RSS,
file-backed pages included, e.g. mapped checkpoint pages) and RssAnon (anonymous memory: tensors), the
latter sampled every 2 ms by a thread; both are reported minus their value right after the imports.
Calibration batches are random token ids with random right padding (seeded).

    python benchmarks/calibration_memory.py --batches 8 --batch-size 4 --length 128
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ("in_memory", "cpu_offload", "disk_offload", "sequential", "sequential_disk")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results" / "calibration_memory.json"
MIB = 2**20


def status_kib(field: str) -> int:
    """A `field:  N kB` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


class AnonPeak:
    """The highest RssAnon seen by a sampling thread (the kernel keeps no peak of it)."""

    def __init__(self, interval_s: float = 0.002):
        self.peak, self.interval_s = status_kib("RssAnon"), interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, status_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_kib("RssAnon"))


def calibration(batches: int, batch_size: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
        lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": (torch.arange(length)[None] < lengths[:, None]).long()})
    return out


def load(mode: str, folder: str, offload_folder: str):
    import torch
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    if mode in ("disk_offload", "sequential_disk"):
        return AutoModelForCausalLM.from_pretrained(folder, device_map={"": "disk"}, offload_folder=offload_folder,
                                                    dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return cpu_offload(model, execution_device=torch.device("cpu")) if mode == "cpu_offload" else model


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process: returns its measurements (printed as one JSON line)."""
    import accelerate  # noqa: F401  (imported before the baseline: imports are not the mode's memory)
    import torch
    import transformers  # noqa: F401

    from slora_kernels import estimate_sensitivity

    rss0, anon0 = status_kib("VmRSS"), status_kib("RssAnon")
    anon = AnonPeak()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as offload_folder:
        model = load(args.worker, args.folder, offload_folder)
        loaded = time.perf_counter()
        batches = calibration(args.batches, args.batch_size, args.length, model.config.vocab_size)
        report = estimate_sensitivity(model, batches, target_modules=TARGETS, progress=False,
                                      offload="sequential" if args.worker.startswith("sequential") else None)
        done = time.perf_counter()
    weights = sum(f.stat().st_size for f in Path(args.folder).glob("*.safetensors"))  # tied weights once
    return {"mode": args.worker, "peak_rss_mib": (status_kib("VmHWM") - rss0) / 1024,
            "peak_anon_mib": (anon.stop() - anon0) / 1024, "rss_after_imports_mib": rss0 / 1024,
            "weights_mib": weights / MIB, "load_s": loaded - start, "calibration_s": done - loaded,
            "threads": torch.get_num_threads(), "theta": report.theta}


def save_model(folder: Path) -> None:
    from slora_kernels.app.defaults import load_smollm2

    model, _ = load_smollm2()
    # dequantised to fp32 when loaded from GGUF, but still flagged as quantised, which save_pretrained refuses
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)


def run_mode(mode: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--folder", str(folder), "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--length", str(args.length)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mode {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rows: list[dict]) -> None:
    """Adds each row's calibration time ratio and largest theta difference against in_memory."""
    base = next(r for r in rows if r["mode"] == "in_memory")
    for r in rows:
        r["time_vs_in_memory"] = r["calibration_s"] / base["calibration_s"]
        r["max_theta_rel_diff"] = max(abs(r["theta"][n] - t) / abs(t) for n, t in base["theta"].items())


def table(rows: list[dict]) -> str:
    lines = ["| mode | peak RSS - after imports (MiB) | peak RssAnon - after imports (MiB) | weights (MiB) "
             "| load (s) | calibration (s) | calibration time vs in_memory | max theta rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} | {r['weights_mib']:.0f} "
                     f"| {r['load_s']:.1f} | {r['calibration_s']:.1f} | {r['time_vs_in_memory']:.2f}x "
                     f"| {r['max_theta_rel_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if "in_memory" not in args.modes:
        parser.error("--modes must include in_memory (the reference of the time ratio and theta)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        save_model(folder)
        rows = [run_mode(mode, folder, args) for mode in args.modes]
    compare(rows)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
              "settings": {"batches": args.batches, "batch_size": args.batch_size, "length": args.length},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "rows": [{k: v for k, v in r.items() if k != "theta"} for r in rows]}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

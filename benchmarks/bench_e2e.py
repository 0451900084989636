"""A whole model's training step (forward + backward + optimizer): the frozen floor, stock PEFT and fused.

Each row trains one model three ways from the same weights and batch, their steps interleaved (every
round runs each once, in a rotating order), and reports medians:
- floor: the frozen model without adapters, its input embeddings' output made to require grad (transformers'
  `enable_input_require_grads`) so that backward still runs through every layer: what LoRA adds to (training
  the embeddings instead would also train a tied lm_head, SmolLM2's, and cost more than LoRA);
- stock PEFT: `get_peft_model` with PEFT's defaults (fp32 adapters under a bf16 base);
- fused: the same PEFT model after `slora_kernels.fuse`.
Per row: step ms and tokens/s of each, LoRA's added time over the floor (stock, fused, fused / stock), the
fused / stock step ratio, and memory: the bytes autograd saves for backward (saved-tensor hooks over one
step, unique storages, the model's parameters excluded: the activations each way keeps), and on CUDA the
peak allocated memory of a step. Axes: precision (fp32; bf16 = a bf16 base with PEFT's fp32 adapters;
autocast-bf16 = an fp32 model stepped under torch.autocast, what Trainer(bf16=True) runs), lora_dropout,
ranks (uniform r, or a Sensitivity-LoRA pattern from the activation estimator at the same parameter count),
gradient checkpointing, torch.compile, and QLoRA (--quant 4bit / 8bit: bitsandbytes' nf4 or int8 base, loaded
three times from a saved checkpoint; compute and the other layers in the precision's dtype).

Models: `tiny` (a 16-layer Llama of width 64, random weights: a host-bound step, almost all Python and
dispatch work - the regime of a GPU whose kernels finish before the host issues the next), `smollm2` (the
embedded SmolLM2-135M, CPU), `llama3-8b-blocks` (Llama-3-8B's block shapes, few layers) and `llama3.2-1b`
(its shapes, whole) for CUDA, all from transformers configs with random weights (no download); --config
overrides or adds LlamaConfig fields (key=value).

    python benchmarks/bench_e2e.py --models tiny --threads 1                  # host-bound rows
    python benchmarks/bench_e2e.py --models smollm2 --precision fp32 bf16 autocast-bf16
    python benchmarks/bench_e2e.py --models smollm2 --quant 4bit --precision bf16     # QLoRA
    python benchmarks/bench_e2e.py --device cuda --models llama3-8b-blocks llama3.2-1b --compile off on
    python benchmarks/bench_e2e.py --dry-run                                  # seconds; in the test suite

--python-path runs the fused layers on the pure-Python op instead of the C++ one on CPU: the per-call work
the CUDA path does on its host (its bodies launch Triton kernels from Python).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {  # LlamaConfig fields; batch shapes as (batch, tokens)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "llama3-8b-blocks": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "dry-run": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64),
}
DEFAULT_TOKENS = {"tiny": ["2x16"], "smollm2": ["4x64"], "llama3-8b-blocks": ["1x1024", "4x4096"],
                  "llama3.2-1b": ["1x1024", "4x4096"], "dry-run": ["2x8"]}
PRECISIONS = ("fp32", "bf16", "autocast-bf16")
VARIANTS = ("floor", "stock", "fused")


@dataclass
class Row:
    model: str
    device: str
    precision: str
    lora_dropout: float
    ranks: str
    quant: str
    checkpointing: bool
    compiled: bool
    batch: str
    ms: dict = field(default_factory=dict)            # median step ms per variant
    tokens_per_s: dict = field(default_factory=dict)
    saved_mb: dict = field(default_factory=dict)      # bytes saved for backward (activations), MB
    peak_mb: dict = field(default_factory=dict)       # CUDA peak allocated, MB
    fused_calls: str = ""

    @property
    def added_ratio(self) -> float:
        """LoRA's added step time, fused / stock."""
        return (self.ms["fused"] - self.ms["floor"]) / (self.ms["stock"] - self.ms["floor"])

    @property
    def step_ratio(self) -> float:
        return self.ms["fused"] / self.ms["stock"]

    @property
    def saved_ratio(self) -> float | None:
        """LoRA's added bytes saved for backward, fused / stock (None when stock adds none)."""
        added = {v: self.saved_mb[v] - self.saved_mb["floor"] for v in ("stock", "fused")}
        return added["fused"] / added["stock"] if added["stock"] > 0 else None


_LOADED: dict[str, torch.nn.Module] = {}


def build_model(name: str, overrides: dict, device: str):
    if name == "smollm2":  # loaded once (~15 s), copied per row
        from slora_kernels.app.defaults import load_smollm2

        if name not in _LOADED:
            _LOADED[name] = load_smollm2()[0]
        return copy.deepcopy(_LOADED[name]).to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**{**CONFIGS[name], **overrides}))


def lora_config(base, ranks: str, rank: int, lora_dropout: float, batches: list[dict]):
    """PEFT's config: uniform rank, or a Sensitivity-LoRA pattern (activation estimator) at its parameters."""
    from peft import LoraConfig

    if ranks == "uniform":
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=lora_dropout)
    from slora_kernels import estimate_sensitivity

    report = estimate_sensitivity(base, batches, target_modules=TARGETS, progress=False)
    return report.lora_config(rank, budget="params", lora_alpha=2 * rank, lora_dropout=lora_dropout)


def copies(base, name: str, precision: str, quant: str, device: str, scratch: Path):
    """A function making a fresh copy of the row's base model (three per row): a deepcopy, or for QLoRA a new
    load of a checkpoint saved under `scratch`, quantized while loading (a deepcopy of a bitsandbytes model is
    not faithful)."""
    if quant == "none":
        base = base.to(torch.bfloat16) if precision == "bf16" else base
        return lambda: copy.deepcopy(base)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slora_kernels.app.defaults import save_smollm2_checkpoint

    folder = scratch / "checkpoint"
    if name == "smollm2":
        save_smollm2_checkpoint(folder)
    else:
        base.save_pretrained(folder)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                 bnb_4bit_use_double_quant=True) if quant == "4bit"
              else BitsAndBytesConfig(load_in_8bit=True))
    return lambda: AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                        device_map=device)


def three_models(make, config, checkpointing: bool, example: dict):
    """(floor, stock PEFT, fused), each a fresh copy from make(); training mode."""
    from peft import get_peft_model

    from slora_kernels import fuse

    floor = make()
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    stock = get_peft_model(make(), config)
    fused = fuse(get_peft_model(make(), config), example_inputs=example)
    models = {"floor": floor, "stock": stock, "fused": fused}
    for model in models.values():
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return models


def make_step(model, batch: dict, precision: str, device: str, optimizer: str):
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: transformers.Trainer's default optimizer ("adamw_torch_fused", torch >= 2.8), on CPU too.
    opt = (torch.optim.AdamW(params, lr=1e-4, fused=True) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-4, foreach=True)) if params else None
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "autocast-bf16" else None

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with autocast or contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        if opt is not None:  # the floor trains nothing
            opt.step()

    return step


def saved_bytes(model, step) -> int:
    """Bytes of the distinct storages autograd saves during one step, the model's parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def peak_bytes(step, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_row(args, model_name: str, precision: str, dropout: float, ranks: str, quant: str, checkpointing: bool,
            compiled: bool, batch_shape: str) -> Row:
    from slora_kernels import fusion_stats

    device = args.device
    batch_size, tokens = (int(n) for n in batch_shape.split("x"))
    base = build_model(model_name, args.config, device)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, tokens), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}
    calibration = [{"input_ids": torch.randint(0, vocab, (batch_size, tokens), generator=gen).to(device)}
                   for _ in range(2)]
    config = lora_config(base, ranks, args.rank, dropout, calibration)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as scratch:  # QLoRA's checkpoint, gone once loaded
        models = three_models(copies(base, model_name, precision, quant, device, Path(scratch)), config,
                              checkpointing, {"input_ids": ids[:1, :8]})
    del base
    if compiled:
        models = {name: torch.compile(model) for name, model in models.items()}
    steps = {name: make_step(model, batch, precision, device, args.optimizer) for name, model in models.items()}
    row = Row(model_name, device, precision, dropout, ranks, quant, checkpointing, compiled, batch_shape)
    for name, step in steps.items():
        row.saved_mb[name] = saved_bytes(models[name], step) / 2**20  # also a warm-up step
        peak = peak_bytes(step, device)
        if peak is not None:
            row.peak_mb[name] = peak / 2**20
    times = {name: [] for name in steps}
    order = list(steps)
    for i in range(args.warmup + args.repeats):
        for name in order[i % 3:] + order[:i % 3]:  # rotate who goes first: the same noise for each
            elapsed = timed(steps[name], device)
            if i >= args.warmup:
                times[name].append(elapsed)
    row.ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    row.tokens_per_s = {name: batch_size * tokens / (ms / 1e3) for name, ms in row.ms.items()}
    row.fused_calls = "compiled" if compiled else f"{100 * fusion_stats(models['fused']).fused_fraction:.0f}%"
    return row


def print_header() -> None:
    print("| model | precision | dropout | ranks | quant | ckpt | compile | batch | floor ms | stock ms | fused ms "
          "| fused/stock step | LoRA-added fused/stock | tokens/s stock / fused | saved MB floor / stock / fused "
          "| LoRA-added saved fused/stock | peak MB floor / stock / fused | fused calls |")
    print("|" + "---|" * 18)


def print_row(r: Row) -> None:
    saved = " / ".join(f"{r.saved_mb[v]:.2f}" for v in VARIANTS)
    peak = " / ".join(f"{r.peak_mb[v]:.0f}" for v in VARIANTS) if r.peak_mb else "-"
    saved_ratio = "-" if r.saved_ratio is None else f"{r.saved_ratio:.2f}"
    print(f"| {r.model} | {r.precision} | {r.lora_dropout:g} | {r.ranks} | {r.quant} "
          f"| {'on' if r.checkpointing else 'off'} | {'on' if r.compiled else 'off'} | {r.batch} "
          f"| {r.ms['floor']:.2f} | {r.ms['stock']:.2f} "
          f"| {r.ms['fused']:.2f} | {r.step_ratio:.3f} | **{r.added_ratio:.2f}** "
          f"| {r.tokens_per_s['stock']:.0f} / {r.tokens_per_s['fused']:.0f} | {saved} | {saved_ratio} | {peak} "
          f"| {r.fused_calls} |", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None, help=f"{', '.join(CONFIGS)} or smollm2")
    parser.add_argument("--config", nargs="*", default=[], help="LlamaConfig overrides, key=value (ints)")
    parser.add_argument("--tokens", nargs="+", default=None, help="batch shapes BxT (default per model)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--lora-dropout", nargs="+", type=float, default=[0.0, 0.05])
    parser.add_argument("--ranks", nargs="+", choices=("uniform", "sensitivity"), default=["uniform"])
    parser.add_argument("--rank", type=int, default=8, help="uniform rank (the sensitivity pattern's budget)")
    parser.add_argument("--quant", nargs="+", choices=("none", "4bit", "8bit"), default=["none"],
                        help="QLoRA: a bitsandbytes base (needs bitsandbytes; fp32 or bf16 precision)")
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--python-path", action="store_true", help="CPU: the pure-Python op, not the C++ one")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, two rounds: seconds")
    args = parser.parse_args(argv)
    args.config = {k: int(v) for k, v in (item.split("=", 1) for item in args.config)}
    if args.dry_run:
        args.models, args.repeats, args.warmup = ["dry-run"], 2, 1
    args.models = args.models or (["llama3-8b-blocks", "llama3.2-1b"] if args.device == "cuda" else ["tiny"])
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.python_path:
        from slora_kernels.ops import _grouped_cpu

        _grouped_cpu.NATIVE = False
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {args.optimizer}, "
          f"{args.repeats} interleaved rounds{', pure-Python op' if args.python_path else ''}")
    print_header()
    rows = []
    for model_name in args.models:
        grid = itertools.product(args.precision, args.lora_dropout, args.ranks, args.quant, args.checkpointing,
                                 args.compile, args.tokens or DEFAULT_TOKENS.get(model_name, ["2x64"]))
        for precision, dropout, ranks, quant, ckpt, compiled, shape in grid:
            if quant != "none" and precision == "autocast-bf16":
                continue  # QLoRA's compute dtype is its own setting: bf16 or fp32 rows
            row = run_row(args, model_name, precision, dropout, ranks, quant, ckpt == "on", compiled == "on", shape)
            print_row(row)
            rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([{**asdict(r), "added_ratio": r.added_ratio, "step_ratio": r.step_ratio,
                                         "saved_ratio": r.saved_ratio} for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

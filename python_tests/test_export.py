"""export_adapter and `slora export`: a variable-rank PEFT adapter written at one rank, each module's
scale folded into its B, so that stock PEFT and a loader that reads only r, lora_alpha and use_rslora
(vLLM's rule) both compute the original adapter's output.

Logits are compared by max |got - want| / max |want|. The exactness claims are checked on the stored fp32
values computed in float64: stock PEFT's own fp32 forward is ~1e-6 from that (summation order), which would
drown a scale error of that size; the fp32 forward of the export is checked against it separately.
"""
import copy
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
from lora_helpers import (MINILM_TARGETS, SMOLLM2_TARGETS, batch, random_pattern, randomize_lora_b,
                          tiny_lora_bert)
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import EvaConfig, LoraLayer, initialize_lora_eva_weights
from safetensors.torch import load_file

from slora_kernels import export_adapter
from slora_kernels.app.cli import main
from slora_kernels.app.defaults import load_minilm_classifier, load_smollm2
from slora_kernels.sensitivity import lora_config_for_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

AVG_RANK = 4
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def logits64(model, inputs) -> torch.Tensor:
    """The logits the model's stored values define, computed in float64 (no fp32 summation noise)."""
    return logits(copy.deepcopy(model).double(), inputs)


def load(base, adapter_dir):
    """Stock PEFT's loader on a fresh copy of the base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()


def sensitivity_adapter(base, targets, *, alpha_pattern: bool, rslora: bool, seed: int = 0, **lora_kwargs):
    """A Sensitivity-LoRA-like PEFT model over `base`: random ranks 1..16 with about a quarter of the modules at
    rank 0 (no adapter), the config `lora_config_for_ranks` writes (alpha_pattern keeping alpha/r constant),
    then its alpha_pattern dropped and/or rsLoRA switched on; random B and a perturbed modules_to_save copy so
    that every saved tensor matters. Returns the model and each target's rank (0: no adapter)."""
    ranks, _ = random_pattern(base, targets, seed)
    rng = random.Random(seed)
    ranks = {name: 0 if rng.random() < 0.25 else rank for name, rank in ranks.items()}
    config = lora_config_for_ranks(ranks, AVG_RANK, lora_alpha=2 * AVG_RANK, **lora_kwargs)
    config.use_rslora = rslora
    if not alpha_pattern:
        config.alpha_pattern = {}
    model = get_peft_model(base, config)
    randomize_lora_b(model, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval(), ranks


def lora_ranks(model) -> dict[str, int]:
    return {name.removeprefix("base_model.model."): module.r["default"] for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.r}


def assert_one_rank_config(folder: Path, rank: int) -> dict:
    config = json.loads((folder / CONFIG).read_text())
    assert config["r"] == rank and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    return config


def assert_exports_exactly(base, inputs, tmp_path, *, alpha_pattern, rslora, targets, **lora_kwargs):
    """Save the fp32 adapter, export it, load the export with stock PEFT: the same logits (to the rounding of
    the folded B into fp32, ~3e-8), one rank everywhere, the same modules adapted (rank 0: still none)."""
    model, ranks = sensitivity_adapter(copy.deepcopy(base), targets, alpha_pattern=alpha_pattern, rslora=rslora,
                                       **lora_kwargs)
    adapted = {name for name, rank in ranks.items() if rank}
    assert 0 < len(adapted) < len(ranks)
    truth = logits64(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    report = export_adapter(tmp_path / "adapter", tmp_path / "export")
    assert report.rank == max(lora_ranks(model).values()) and report.ranks == lora_ranks(model)
    loaded = load(base, tmp_path / "export")
    assert lora_ranks(loaded) == dict.fromkeys(adapted, report.rank)
    assert max_rel_diff(logits64(loaded, inputs), truth) <= 1e-6
    # In fp32 the export is as accurate as stock PEFT on the original: both within float32 rounding of the truth.
    # Logits here come through 6 (MiniLM) to 30 (SmolLM2) blocks of rounded sums over <= 1536 terms; 64 ulps of
    # their scale bounds that (measured: stock ~1e-6, the export up to ~2.3e-6, summation orders differ).
    fp32_bound = 64 * torch.finfo(torch.float32).eps
    assert max_rel_diff(logits(model, inputs).double(), truth) <= fp32_bound
    assert max_rel_diff(logits(loaded, inputs).double(), truth) <= fp32_bound
    config = assert_one_rank_config(tmp_path / "export", report.rank)
    assert config["use_rslora"] == rslora and config["lora_alpha"] == 2 * AVG_RANK
    return model


@pytest.fixture(scope="module")
def minilm():
    base, tokenizer = load_minilm_classifier(num_labels=2)
    inputs = tokenizer(["a quiet triumph of a film", "nothing in it works, and it knows it"], padding=True,
                       return_tensors="pt")
    return base.eval(), inputs


@pytest.mark.parametrize("alpha_pattern", [True, False], ids=["alpha_pattern", "no_alpha_pattern"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_minilm_export_loads_in_stock_peft_with_the_same_logits(minilm, tmp_path, alpha_pattern, rslora):
    base, inputs = minilm
    assert_exports_exactly(base, inputs, tmp_path, alpha_pattern=alpha_pattern, rslora=rslora,
                           targets=MINILM_TARGETS, modules_to_save=["classifier"])
    carried = {k: v for k, v in load_file(tmp_path / "export" / WEIGHTS).items() if "classifier" in k}
    assert carried and all(torch.equal(v, load_file(tmp_path / "adapter" / WEIGHTS)[k]) for k, v in carried.items())


@pytest.fixture(scope="module")
def smollm2():
    base, tokenizer = load_smollm2()
    inputs = tokenizer(["The film is a quiet triumph of", "Nothing in it works"], padding=True, return_tensors="pt")
    return base.eval(), inputs


@pytest.mark.slow
@pytest.mark.parametrize(("alpha_pattern", "rslora"), [(True, False), (False, True)],
                         ids=["alpha_pattern", "rslora"])
def test_smollm2_export_loads_in_stock_peft_with_the_same_logits(smollm2, tmp_path, alpha_pattern, rslora):
    base, inputs = smollm2
    assert_exports_exactly(base, inputs, tmp_path, alpha_pattern=alpha_pattern, rslora=rslora,
                           targets=SMOLLM2_TARGETS)


def single_scale_logits(base, adapter_dir: Path, inputs) -> torch.Tensor:
    """What a loader that reads only r, lora_alpha and use_rslora from the config computes (vLLM's rule):
    every module's B A times one scale, lora_alpha / r or lora_alpha / sqrt(r), added to the base weights;
    the other tensors (the classifier) loaded as they are. In float64, like `logits64`."""
    config = json.loads((adapter_dir / CONFIG).read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    model = copy.deepcopy(base).double()
    params = dict(model.named_parameters())
    tensors = {k.removeprefix("base_model.model."): v.double() for k, v in load_file(adapter_dir / WEIGHTS).items()}
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                params[module + ".weight"].add_(scale * tensors[module + ".lora_B.weight"] @ a)
            elif ".lora_" not in key:
                params[key].copy_(a)
    return logits(model, inputs)


@pytest.mark.parametrize(("alpha_pattern", "rslora", "single_scale_is_right"),
                         [(False, False, False), (True, True, False), (True, False, True)],
                         ids=["no_alpha_pattern", "rslora_alpha_pattern", "alpha_pattern"])
def test_single_scale_loader_on_the_original_and_on_the_export(minilm, tmp_path, alpha_pattern, rslora,
                                                               single_scale_is_right):
    """On the original adapter the one scale is wrong unless alpha_pattern keeps alpha_i / r_i equal to
    lora_alpha / r (lora_config_for_ranks' default, without rsLoRA); on the export it is always right."""
    base, inputs = minilm
    model = assert_exports_exactly(base, inputs, tmp_path, alpha_pattern=alpha_pattern, rslora=rslora,
                                   targets=MINILM_TARGETS, modules_to_save=["classifier"])
    peft_logits = logits64(model, inputs)
    original = max_rel_diff(single_scale_logits(base, tmp_path / "adapter", inputs), peft_logits)
    assert original <= 1e-6 if single_scale_is_right else original > 1e-2
    assert max_rel_diff(single_scale_logits(base, tmp_path / "export", inputs), peft_logits) <= 1e-6


# --- tiny BERT: PEFT's pattern matching, .bin input, EVA, padding above the largest rank, bf16 ---

@pytest.fixture
def tiny_bert():
    """tiny_lora_bert's base model: a 2-layer BERT (hidden 32) built from a config, seeded."""
    return tiny_lora_bert().unload().eval()


def tiny_inputs() -> dict:
    ids, _ = batch()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / WEIGHTS).items() if ".lora_" in k}


def test_pattern_keys_resolve_as_in_peft_and_rank_pads_above_the_largest(tiny_bert, tmp_path):
    """Suffix and regex keys in rank_pattern / alpha_pattern (PEFT's matching), rsLoRA, an embedding
    (lora_embedding_A/B), an adapter saved as adapter_model.bin, and a rank above the largest: every factor
    padded to it."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[*MINILM_TARGETS, "word_embeddings"], use_rslora=True,
                        rank_pattern={"query": 6, r"layer\.1\..*dense": 12, "layer.0.attention.output.dense": 2},
                        alpha_pattern={"value": 3, "dense": 20})
    model = get_peft_model(copy.deepcopy(tiny_bert), config)
    randomize_lora_b(model, seed=1)
    truth = logits64(model.eval(), tiny_inputs())
    model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert not (tmp_path / "adapter" / WEIGHTS).exists()
    report = export_adapter(tmp_path / "adapter", tmp_path / "export", rank=32)
    assert report.ranks == lora_ranks(model) and set(report.ranks.values()) == {2, 4, 6, 12}
    exported = lora_tensors(tmp_path / "export")
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in exported
    assert all(t.shape[0 if "_A" in k else 1] == 32 for k, t in exported.items())
    loaded = load(tiny_bert, tmp_path / "export")
    assert set(lora_ranks(loaded).values()) == {32}
    assert max_rel_diff(logits64(loaded, tiny_inputs()), truth) <= 1e-6


def test_eva_adapter_exports_exactly(tiny_bert, tmp_path):
    """PEFT's EVA rewrites rank_pattern / alpha_pattern itself (unanchored names, alpha scaled with the rank)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*layer\.\d+\..*(query|key|value|dense)",
                        init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, use_label_mask=False))
    model = get_peft_model(copy.deepcopy(tiny_bert), config)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 120, (8, 16), generator=gen),
                "attention_mask": torch.ones(8, 16, dtype=torch.long)} for _ in range(8)]
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    assert model.peft_config["default"].rank_pattern, "EVA should have redistributed the ranks"
    randomize_lora_b(model, seed=2)
    truth = logits64(model.eval(), tiny_inputs())
    model.save_pretrained(tmp_path / "adapter")
    report = export_adapter(tmp_path / "adapter", tmp_path / "export")
    assert report.ranks == lora_ranks(model) and len(set(report.ranks.values())) > 1
    assert max_rel_diff(logits64(load(tiny_bert, tmp_path / "export"), tiny_inputs()), truth) <= 1e-6


def test_bf16_adapter_stays_bf16_with_each_scale_folded_into_b(tmp_path):
    model = tiny_lora_bert().to(torch.bfloat16)
    scales = {name: module.scaling["default"] for name, module in model.named_modules()
              if isinstance(module, LoraLayer)}
    model.save_pretrained(tmp_path / "adapter")
    report = export_adapter(tmp_path / "adapter", tmp_path / "export", rank=24)
    original, exported = load_file(tmp_path / "adapter" / WEIGHTS), load_file(tmp_path / "export" / WEIGHTS)
    assert exported.keys() == original.keys() and {t.dtype for t in exported.values()} == {torch.bfloat16}
    export_scale = 8 / 24  # the config's lora_alpha (PEFT's default 8) over the exported rank
    assert report.scale == export_scale
    for key, tensor in original.items():
        module = key.rsplit(".lora_", 1)[0]
        if ".lora_A." in key:
            rank = tensor.shape[0]
            assert exported[key].shape == (24, tensor.shape[1])
            assert torch.equal(exported[key][:rank], tensor) and not exported[key][rank:].any()
        elif ".lora_B." in key:
            rank = tensor.shape[1]
            folded = (tensor.double() * (scales[module] / export_scale)).to(torch.bfloat16)
            assert exported[key].shape == (tensor.shape[0], 24)
            assert torch.equal(exported[key][:, :rank], folded) and not exported[key][:, rank:].any()
        else:  # the classifier (modules_to_save)
            assert torch.equal(exported[key], tensor)
    assert report.lora_params == sum(t.numel() for k, t in original.items() if ".lora_" in k)
    assert report.padded_params == sum(t.numel() for k, t in exported.items() if ".lora_" in k)
    assert report.file_bytes == (tmp_path / "export" / WEIGHTS).stat().st_size


# --- bad input: refused with one clear message, nothing written ---

def save_tiny(folder: Path, config) -> Path:
    """tiny BERT with `config` (LoRA or another PEFT method), saved by PEFT."""
    model = get_peft_model(tiny_lora_bert().unload(), config)
    model.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> Path:
    path = folder / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def copy_of(folder: Path, to: Path, *names: str) -> Path:
    to.mkdir()
    for name in names:
        (to / name).write_bytes((folder / name).read_bytes())
    return to


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A tiny Sensitivity-LoRA-like adapter (ranks 2..16, modules_to_save), largest rank 16."""
    folder = tmp_path_factory.mktemp("adapter")
    tiny_lora_bert().save_pretrained(folder)
    return folder


def contents(path: Path):
    """Everything under path (None if absent), to show that a refused export wrote nothing."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def lora_config(**options) -> LoraConfig:
    return LoraConfig(target_modules=MINILM_TARGETS, **options)


# Each case: (adapter_dir, out_dir, keyword arguments) from (the good adapter, a scratch folder); the
# exception expected; a regular expression its message must match.
BAD_INPUTS = {
    "adapter_dir missing": (lambda good, tmp: (tmp / "nope", tmp / "out", {}),
                            FileNotFoundError, r"adapter_dir .*nope not found; expected a folder written by PEFT"),
    "adapter_dir a file": (lambda good, tmp: (good / CONFIG, tmp / "out", {}),
                           ValueError, r"adapter_dir .* is not a folder"),
    "no adapter_config.json": (lambda good, tmp: (copy_of(good, tmp / "a", WEIGHTS), tmp / "out", {}),
                               FileNotFoundError, r"adapter_dir .* has no adapter_config.json"),
    "no weights": (lambda good, tmp: (copy_of(good, tmp / "a", CONFIG), tmp / "out", {}),
                   FileNotFoundError, r"has neither adapter_model.safetensors nor adapter_model.bin"),
    "IA3": (lambda good, tmp: (save_tiny(tmp / "a", IA3Config(target_modules=["key", "value", "output.dense"],
                                                              feedforward_modules=["output.dense"])), tmp / "out", {}),
            ValueError, r"adapter_dir .* has peft_type IA3; expected a LoRA adapter \(peft_type LORA, EVA"),
    "AdaLoRA": (lambda good, tmp: (save_tiny(tmp / "a", AdaLoraConfig(target_modules=MINILM_TARGETS, total_step=10)),
                                   tmp / "out", {}),
                ValueError, r"peft_type ADALORA; expected a LoRA adapter .* AdaLoRA is refused"),
    "DoRA": (lambda good, tmp: (save_tiny(tmp / "a", lora_config(use_dora=True)), tmp / "out", {}),
             ValueError, r"use_dora=True selects a LoRA variant; only plain LoRA \(A, B and one scale per module\)"),
    "lora_bias": (lambda good, tmp: (save_tiny(tmp / "a", lora_config(lora_bias=True)), tmp / "out", {}),
                  ValueError, r"lora_bias=True: B has a bias; only plain LoRA"),
    "PiSSA": (lambda good, tmp: (edit_config(copy_of(good, tmp / "a", CONFIG, WEIGHTS), init_lora_weights="pissa"),
                                 tmp / "out", {}),
              ValueError, r"init_lora_weights='pissa' changes the base weights along with the adapter"),
    "an option this peft does not know": (
        lambda good, tmp: (edit_config(copy_of(good, tmp / "a", CONFIG, WEIGHTS), use_new_variant=True),
                           tmp / "out", {}),
        ValueError, r"adapter_config.json sets use_new_variant, unknown to the installed peft"),
    "config rank differs from the factors": (
        lambda good, tmp: (edit_config(copy_of(good, tmp / "a", CONFIG, WEIGHTS), rank_pattern={}), tmp / "out", {}),
        ValueError, r"has rank 8 in adapter_config.json but factors of shapes"),
    "rank below the largest": (lambda good, tmp: (good, tmp / "out", {"rank": 15}),
                               ValueError, r"rank must be >= the adapter's largest rank, 16 \(module .*\), got 15"),
    "rank 0": (lambda good, tmp: (good, tmp / "out", {"rank": 0}), ValueError, r"rank must be >= 1, got 0"),
    "out_dir not empty": (lambda good, tmp: (good, copy_of(good, tmp / "out", CONFIG), {}),
                          ValueError, r"out_dir .* exists and is not empty; pass force=True"),
    "out_dir is adapter_dir": (lambda good, tmp: (good, good / ".." / good.name, {"force": True}),
                               ValueError, r"out_dir .* is adapter_dir: the export would replace the adapter it reads"),
    "out_dir a file": (lambda good, tmp: (good, good / CONFIG, {"force": True}),
                       ValueError, r"out_dir .* exists and is not a folder"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_and_nothing_is_written(adapter, tmp_path, case):
    prepare, error, message = BAD_INPUTS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter_dir, out_dir, kwargs = prepare(adapter, tmp_path)
    before = contents(adapter_dir), contents(out_dir)
    with pytest.raises(error, match=message) as raised:
        export_adapter(adapter_dir, out_dir, **kwargs)
    assert "\n" not in str(raised.value)
    assert (contents(adapter_dir), contents(out_dir)) == before


def test_force_writes_into_a_non_empty_folder_and_keeps_its_other_files(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / CONFIG).write_text("{}")
    report = export_adapter(adapter, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert_one_rank_config(out, report.rank)


# --- the command ---

def run_cli(capsys, *args):
    code = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_the_size_report(adapter, tmp_path, capsys):
    code, out, err = run_cli(capsys, adapter, "--out", tmp_path / "export", "--rank", 32)
    assert code == 0, err
    before = sum(t.numel() for t in lora_tensors(adapter).values())
    after = sum(t.numel() for t in lora_tensors(tmp_path / "export").values())
    ranks = [t.shape[0] for k, t in lora_tensors(adapter).items() if ".lora_A." in k]
    size = (tmp_path / "export" / WEIGHTS).stat().st_size
    assert f"Exported {len(ranks)} LoRA modules at rank 32 (original ranks {min(ranks)}-{max(ranks)})" in out
    assert f"LoRA parameters: {before:,} -> {after:,} after padding ({after / before:.2f}x)" in out
    assert "Other tensors (modules_to_save, ...) copied unchanged: 66 parameters" in out  # classifier 2x32 + 2
    assert f"adapter_model.safetensors: {size:,} bytes (the original's weights: " \
           f"{(adapter / WEIGHTS).stat().st_size:,})" in out
    assert "lora_alpha/r = 8/32 = 0.25" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--rank", "15"], "slora export: error: rank must be >= the adapter's largest rank, 16"),
    (["--rank", "0"], "slora export: error: --rank must be > 0, got 0"),
])
def test_cli_bad_rank_is_one_line_and_writes_nothing(adapter, tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, adapter, "--out", tmp_path / "export", *args)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("flag", ["--force", "--overwrite"])  # --overwrite as the demo and train commands spell it
def test_cli_non_empty_out_needs_force(adapter, tmp_path, capsys, flag):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, adapter, "--out", out)
    assert code == 2 and "exists and is not empty" in err and "--force" in err and "Traceback" not in err
    assert contents(out) == {"notes.txt": b"mine"}
    code, _, err = run_cli(capsys, adapter, "--out", out, flag)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / WEIGHTS).is_file()


def test_cli_missing_adapter_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope", "--out", tmp_path / "export")
    assert code == 2 and err.strip() == (f"slora export: error: adapter_dir {tmp_path / 'nope'} not found; "
                                         "expected a folder written by PEFT's save_pretrained")
    assert not (tmp_path / "export").exists()

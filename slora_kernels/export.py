"""Export a variable-rank LoRA adapter at one rank, for loaders that read only `r` and `lora_alpha`.

PEFT gives each module its own rank and alpha (`rank_pattern`, `alpha_pattern`) and scales its
output by alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA). Serving engines such as vLLM read one
`r`, one `lora_alpha` and `use_rslora`, and scale every module alike, so a module trained at another
rank would be served at the wrong scale. The export zero-pads every module to one rank R (the
output is unchanged: the added rows of A and columns of B are zero) and folds each module's own
scale into its B, so that the one scale of the exported config reproduces the adapter exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from slora_kernels.ops.utils import check_int

# A LoRA factor's key as PEFT saves it (adapter name removed): lora_A/lora_B of Linear and conv layers
# (rank on dim 0 of A, dim 1 of B), lora_embedding_A/B of embeddings (same layout, no ".weight").
FACTOR_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?:embedding_)?(?P<side>[AB])(?:\.weight)?")
# init_lora_weights values that only initialise A and B; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)
# also change the base weights, from the adapter at its own rank.
PLAIN_INITS = ("gaussian", "eva", "orthogonal")
# Options that make a module's output more than scale * B A x.
NOT_PLAIN = {"use_qalora": "QA-LoRA pools the input before A",
             "lora_bias": "B has a bias",
             "target_parameters": "LoRA on nn.Parameter targets (MoE experts) stores its factors in another layout",
             "ensure_weight_tying": "a tied module takes its factors from the embedding's, so its scale cannot go "
                                    "into a B of its own"}


class ExportError(ValueError):
    """Input that cannot be exported; the message names the argument and what was expected."""


@dataclass(frozen=True)
class ExportReport:
    """What `export_adapter` wrote, and what the padding cost."""

    out_dir: Path
    ranks: dict[str, int]  # each adapted module's rank in the original adapter (full module name)
    rank: int              # the one rank every module has in the export
    lora_alpha: float      # the exported config's lora_alpha (the original's, kept)
    use_rslora: bool
    lora_params: int       # parameters of the LoRA factors as the original stores them
    padded_params: int     # the same after padding every module to `rank`
    carried_params: int    # other tensors (modules_to_save, ...), copied unchanged
    file_bytes: int        # size of the written adapter_model.safetensors
    source_bytes: int      # size of the original adapter's weights file

    @property
    def scale(self) -> float:
        """The one scale every module gets from the exported config."""
        return peft_scale(self.lora_alpha, self.rank, self.use_rslora)

    @property
    def ratio(self) -> float:
        return self.padded_params / self.lora_params

    def __str__(self) -> str:
        low, high = min(self.ranks.values()), max(self.ranks.values())
        rule = f"{self.lora_alpha:g}/sqrt({self.rank})" if self.use_rslora else f"{self.lora_alpha:g}/{self.rank}"
        lines = [f"Exported {len(self.ranks)} LoRA modules at rank {self.rank} (original ranks {low}-{high}) "
                 f"to {self.out_dir}",
                 f"LoRA parameters: {self.lora_params:,} -> {self.padded_params:,} after padding "
                 f"({self.ratio:.2f}x)"]
        if self.carried_params:
            lines.append(f"Other tensors (modules_to_save, ...) copied unchanged: {self.carried_params:,} parameters")
        lines += [f"{SAFETENSORS_WEIGHTS_NAME}: {self.file_bytes:,} bytes (the original's weights: "
                  f"{self.source_bytes:,})",
                  f"One scale for every module, lora_alpha/{'sqrt(r)' if self.use_rslora else 'r'} = {rule} = "
                  f"{self.scale:.6g}; each module's own PEFT scale is folded into its lora_B"]
        return "\n".join(lines)


def peft_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scale (LoraLayer.update_layer): alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, *, rank: int | None = None,
                   force: bool = False) -> ExportReport:
    """Write the PEFT LoRA adapter in `adapter_dir` to `out_dir` with one rank for every module.

    Each A is zero-padded to `rank` rows and each B to `rank` columns, and each module's PEFT scale
    (its rank and alpha from rank_pattern / alpha_pattern, use_rslora) is folded into its B as
    B * scale_i / scale, in float64 and rounded once into the adapter's dtype. The exported config
    keeps the original `lora_alpha` and `use_rslora` (so scale = lora_alpha / rank, or / sqrt(rank)),
    sets `r = rank` and empties `rank_pattern` and `alpha_pattern`; its other fields, and tensors
    other than LoRA factors (modules_to_save), are kept as they are. Modules without an adapter stay
    without one. `rank` defaults to the largest rank and may be raised to a serving engine's slot
    size. Bad input raises before anything is written; a non-empty `out_dir` needs `force=True`,
    which replaces the two adapter files there and leaves other files alone.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights_file = _check_folders(adapter_dir, out_dir, force)
    if rank is not None:
        check_int("rank", rank)
    config, raw_config = _read_config(adapter_dir)
    tensors = load_file(weights_file) if weights_file.suffix == ".safetensors" else _load_bin(weights_file)
    factors, carried = _split_factors(tensors, adapter_dir)
    ranks = _module_ranks(factors, tensors, config, adapter_dir)
    largest = max(ranks.values())
    rank = largest if rank is None else rank
    if rank < largest:
        widest = max(ranks, key=ranks.get)
        raise ExportError(f"rank must be >= the adapter's largest rank, {largest} (module {widest}), got {rank}: "
                          "padding cannot shrink a module")
    scale = peft_scale(config.lora_alpha, rank, config.use_rslora)
    if scale == 0:
        raise ExportError(f"adapter_dir {adapter_dir}: lora_alpha is 0, so one scale cannot carry the modules' "
                          f"own scales; expected a non-zero lora_alpha in {CONFIG_NAME}")
    exported = {**carried, **_fold_and_pad(tensors, factors, ranks, config, rank)}
    raw_config.update(r=rank, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora, rank_pattern={},
                      alpha_pattern={})

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(exported, out_dir / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})  # as PEFT saves
    (out_dir / CONFIG_NAME).write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
    lora_keys = [key for pair in factors.values() for key in pair]
    return ExportReport(out_dir=out_dir, ranks=ranks, rank=rank, lora_alpha=config.lora_alpha,
                        use_rslora=config.use_rslora, lora_params=sum(tensors[k].numel() for k in lora_keys),
                        padded_params=sum(exported[k].numel() for k in lora_keys),
                        carried_params=sum(t.numel() for t in carried.values()),
                        file_bytes=(out_dir / SAFETENSORS_WEIGHTS_NAME).stat().st_size,
                        source_bytes=weights_file.stat().st_size)


def _check_folders(adapter_dir: Path, out_dir: Path, force: bool) -> Path:
    """The adapter's weights file, once both folders are usable; raises before anything is written."""
    saved_by_peft = "expected a folder written by PEFT's save_pretrained"
    if not adapter_dir.exists():
        raise FileNotFoundError(f"adapter_dir {adapter_dir} not found; {saved_by_peft}")
    if not adapter_dir.is_dir():
        raise ExportError(f"adapter_dir {adapter_dir} is not a folder; {saved_by_peft}")
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"adapter_dir {adapter_dir} has no {CONFIG_NAME}; {saved_by_peft}")
    weights = [adapter_dir / name for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
               if (adapter_dir / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"adapter_dir {adapter_dir} has neither {SAFETENSORS_WEIGHTS_NAME} nor "
                                f"{WEIGHTS_NAME}; {saved_by_peft}")
    if out_dir.resolve() == adapter_dir.resolve():
        raise ExportError(f"out_dir {out_dir} is adapter_dir: the export would replace the adapter it reads; "
                          "expected another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"out_dir {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"out_dir {out_dir} exists and is not empty; pass force=True (slora export --force) "
                          "to write into it")
    return weights[0]  # safetensors first, as PEFT loads it


def _read_config(adapter_dir: Path) -> tuple[LoraConfig, dict]:
    """The adapter's LoraConfig (PEFT's defaults filled in) and its JSON as saved; refuses anything that is
    not plain LoRA, whose output is scale * B A x on every module."""
    path = adapter_dir / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"adapter_dir {adapter_dir}: {CONFIG_NAME} is not valid JSON ({err})") from None
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        adalora = (" AdaLoRA is refused: its pruned ranks and scale are not converted here; merge it with "
                   "merge_and_unload() instead." if peft_type == "ADALORA" else "")
        raise ExportError(f"adapter_dir {adapter_dir} has peft_type {peft_type}; expected a LoRA adapter "
                          f"(peft_type LORA, EVA-initialised ones included).{adalora}")
    fields = {field.name: field for field in dataclasses.fields(LoraConfig)}
    unknown = sorted(key for key, value in raw.items() if key not in fields and value not in (None, False, [], {}))
    if unknown:
        raise ExportError(f"adapter_dir {adapter_dir}: {CONFIG_NAME} sets {', '.join(unknown)}, unknown to the "
                          "installed peft; expected an adapter saved by this peft version or older (upgrade peft)")
    try:
        config = LoraConfig(**{key: value for key, value in raw.items() if key in fields})
    except (TypeError, ValueError) as err:
        raise ExportError(f"adapter_dir {adapter_dir}: PEFT rejects its {CONFIG_NAME}: {err}") from None
    reason = _not_plain(config, fields)
    if reason:
        raise ExportError(f"adapter_dir {adapter_dir}: {reason}; only plain LoRA (A, B and one scale per module) "
                          "can be exported; merge_and_unload() serves it without an adapter")
    return config, raw


def _not_plain(config: LoraConfig, fields: dict[str, dataclasses.Field]) -> str | None:
    """Why the modules of this config compute more than scale * B A x (None: they do not)."""
    for name, field in fields.items():
        if field.metadata.get("is_lora_variant") and getattr(config, name):
            return f"{name}={getattr(config, name)!r} selects a LoRA variant"
    for name, why in NOT_PLAIN.items():
        if getattr(config, name, None):  # an older peft may lack the option
            return f"{name}={getattr(config, name)!r}: {why}"
    init = config.init_lora_weights
    if isinstance(init, str) and init in fields["init_lora_weights"].metadata.get("lora_variants", ()):
        return f"init_lora_weights={init!r} selects a LoRA variant"
    if isinstance(init, str) and init not in PLAIN_INITS:
        return f"init_lora_weights={init!r} changes the base weights along with the adapter"
    return None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # torch.save keeps tensors that share storage (tied weights) shared, which safetensors refuses to write.
    return {key: tensor.clone() for key, tensor in torch.load(path, map_location="cpu", weights_only=True).items()}


def _split_factors(tensors: dict[str, torch.Tensor], adapter_dir: Path
                   ) -> tuple[dict[str, tuple[str, str]], dict[str, torch.Tensor]]:
    """{module: (A key, B key)} and the other tensors, which are carried over as they are."""
    sides: dict[str, dict[str, str]] = {}
    carried = {}
    for key, tensor in tensors.items():
        match = FACTOR_KEY.fullmatch(key)
        if match:
            sides.setdefault(match["module"], {})[match["side"]] = key
        elif ".lora_" in key:
            raise ExportError(f"adapter_dir {adapter_dir}: tensor {key} is not a LoRA A or B factor; expected "
                              "plain LoRA factors only (no DoRA magnitude, no LoRA bias)")
        else:
            carried[key] = tensor
    if not sides:
        raise ExportError(f"adapter_dir {adapter_dir}: no LoRA factors (lora_A / lora_B) in its weights")
    for module, pair in sides.items():
        if len(pair) < 2:
            raise ExportError(f"adapter_dir {adapter_dir}: module {module} has lora_{next(iter(pair))} but not "
                              f"lora_{'B' if 'A' in pair else 'A'}; expected both factors of every module")
    return {module: (pair["A"], pair["B"]) for module, pair in sorted(sides.items())}, carried


def _module_ranks(factors: dict[str, tuple[str, str]], tensors: dict[str, torch.Tensor], config: LoraConfig,
                  adapter_dir: Path) -> dict[str, int]:
    """Each module's rank as PEFT gives it (rank_pattern, else r), checked against its factors' shapes."""
    ranks = {}
    for module, (a_key, b_key) in factors.items():
        rank = _pattern_value(config.rank_pattern, module, config.r)
        a, b = tensors[a_key], tensors[b_key]
        if a.dim() < 2 or b.dim() < 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ExportError(f"adapter_dir {adapter_dir}: module {module} has rank {rank} in {CONFIG_NAME} but "
                              f"factors of shapes {tuple(a.shape)} (A) and {tuple(b.shape)} (B); expected A with "
                              f"{rank} rows and B with {rank} columns")
        ranks[module] = rank
    return ranks


def _fold_and_pad(tensors: dict[str, torch.Tensor], factors: dict[str, tuple[str, str]], ranks: dict[str, int],
                  config: LoraConfig, rank: int) -> dict[str, torch.Tensor]:
    """Every module's A and B at `rank`, its own scale folded into B: B * scale_i / scale, computed in float64
    and rounded once into B's dtype (a factor of exactly 1 leaves B bit for bit)."""
    scale = peft_scale(config.lora_alpha, rank, config.use_rslora)
    padded = {}
    for module, (a_key, b_key) in factors.items():
        alpha = _pattern_value(config.alpha_pattern, module, config.lora_alpha)
        factor = peft_scale(alpha, ranks[module], config.use_rslora) / scale
        b = tensors[b_key]
        padded[a_key] = _pad(tensors[a_key], 0, rank)
        padded[b_key] = _pad((b.double() * factor).to(b.dtype), 1, rank)
    return padded


def _pattern_value(pattern: dict, module: str, default):
    """rank_pattern / alpha_pattern lookup exactly as PEFT does it when it creates the module's layer."""
    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def _pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`tensor` with zeros appended along `dim` up to `size`."""
    padded = tensor.new_zeros(tensor.shape[:dim] + (size,) + tensor.shape[dim + 1:])
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return padded

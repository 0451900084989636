"""QLoRA: the fused path over bitsandbytes 4-bit (nf4) and 8-bit bases, against stock PEFT on the same model.

Each base layer computes its own output with bitsandbytes' kernels, in both models; the fused group computes
the LoRA branch of its layers together and combines it as PEFT's bitsandbytes classes do. With float32 compute
the two models differ by float32 summation order only (<= 1e-5, as the fp32 fuse tests); with bf16 compute (the
usual QLoRA set-up) by rounding, bounded as a bf16 rounding of the outputs. Dropout draws the fused op's masks in
the stock model too (one seed per shared input, `lora_helpers.use_hash_dropout`), so it is compared as well.
Skipped where bitsandbytes is not installed (it is an optional test dependency; CI installs its CPU build).
"""
import copy
import warnings

import pytest
import torch
from lora_helpers import SMOLLM2_TARGETS, rel_err, use_hash_dropout
from peft import LoraConfig, PeftModel, get_peft_model

from slora_kernels import fuse, fusion_stats, unfuse
from slora_kernels.nn import FusedLoraLayer

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (optional test dependency) is not installed")

from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256)
BITS = ("4bit", "8bit")
BF16_BOUND = 2 ** -7  # one bf16 rounding, relative


def quantization(bits: str, compute_dtype: torch.dtype, quant_type: str = "nf4",
                 double_quant: bool | None = None) -> BitsAndBytesConfig:
    """4-bit nf4 (double quantization with bf16 compute unless said) or fp4, or LLM.int8."""
    if bits == "4bit":
        double_quant = compute_dtype == torch.bfloat16 if double_quant is None else double_quant
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=double_quant)
    return BitsAndBytesConfig(load_in_8bit=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama saved to disk, to load quantized (bitsandbytes quantizes while loading)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(folder)
    return folder


def quantized(folder, bits: str, dtype: torch.dtype, **variant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization(bits, dtype, **variant),
                                                dtype=dtype, device_map="cpu")


def qlora(folder, bits: str, dtype: torch.dtype, dropout: float = 0.0, targets=SMOLLM2_TARGETS, **variant):
    """A PEFT model over a quantized base, random B (ranks differ per matrix: 4 or 8)."""
    base = quantized(folder, bits, dtype, **variant)
    ranks = {name: 4 + 4 * (i % 2) for i, (name, m) in enumerate(base.named_modules()) if name.endswith(tuple(targets))}
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, rank_pattern=ranks,
                                            lora_dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def batch(vocab=256):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    return {"input_ids": ids, "labels": ids}


def step(model, inputs, seed=0):
    """Loss, logits and every LoRA gradient of one training forward/backward, torch's RNG seeded."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach().float(), {
        n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_close_runs(got, want, bound):
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = got, want
    assert abs(loss.item() - ref_loss.item()) <= bound * abs(ref_loss.item())
    assert rel_err(logits, ref_logits) <= bound
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * TINY["num_hidden_layers"]
    assert rel_err(torch.cat([g.flatten() for g in grads.values()]),
                   torch.cat([ref_grads[n].flatten() for n in grads])) <= bound
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) <= 4 * bound, name


def fused_and_stock(folder, bits, dtype, dropout, **variant):
    """Two loads of the same quantized model and adapter (a deepcopy of a bitsandbytes model is not faithful)."""
    fused, stock = (qlora(folder, bits, dtype, dropout, **variant).train() for _ in range(2))
    if dropout:
        use_hash_dropout(stock, dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every LoRA layer fuses: no warning
        fuse(fused)
    return fused, stock


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bits", BITS)
def test_float32_compute_equals_stock_peft(tiny_checkpoint, bits, dropout):
    fused, stock = fused_and_stock(tiny_checkpoint, bits, torch.float32, dropout)
    layers = [m for m in fused.modules() if isinstance(m, FusedLoraLayer)]
    assert len(layers) == 7 * TINY["num_hidden_layers"]
    assert {type(m.base_layer).__name__ for m in layers} == {"Linear4bit" if bits == "4bit" else "Linear8bitLt"}
    inputs = batch()
    for seed in range(2):
        assert_close_runs(step(fused, inputs, seed), step(stock, inputs, seed), 1e-5)
    stats = fusion_stats(fused)
    assert (stats.fused, stats.fallback, stats.left_to_peft) == (2 * len(layers), {}, {}), str(stats)
    if dropout:  # the masks are live: another seed, other outputs
        assert rel_err(step(fused, inputs, 0)[1], step(fused, inputs, 1)[1]) > 1e-4


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copy_of_a_fused_4bit_model_behaves_as_the_same_copy_of_stock(tiny_checkpoint, how, tmp_path):
    """copy.deepcopy / torch.save + torch.load(weights_only=False) of a fused QLoRA model after a forward and
    backward: the copy is fused with caches of its own, gives what the same copy of the stock model gives, and
    trains apart from the original (a deepcopy of a bitsandbytes model is not the original, so copies are
    compared with copies)."""
    fused, stock = fused_and_stock(tiny_checkpoint, "4bit", torch.float32, 0.0)
    inputs = batch()
    assert_close_runs(step(fused, inputs), step(stock, inputs), 1e-5)

    def copy_of(model, name):
        if how == "deepcopy":
            return copy.deepcopy(model)
        torch.save(model, tmp_path / name)
        return torch.load(tmp_path / name, weights_only=False)

    fused_copy, stock_copy = copy_of(fused, "fused.pt"), copy_of(stock, "stock.pt")
    calls_before = fusion_stats(fused_copy).fused
    assert_close_runs(step(fused_copy, inputs), step(stock_copy, inputs), 1e-5)
    assert fusion_stats(fused_copy).fused == calls_before + 7 * TINY["num_hidden_layers"]
    before = {n: p.detach().clone() for n, p in fused.named_parameters() if "lora_" in n}
    torch.optim.SGD([p for p in fused_copy.parameters() if p.requires_grad], lr=1.0).step()
    assert all(torch.equal(p, before[n]) for n, p in fused.named_parameters() if "lora_" in n)
    assert any(not torch.equal(p, before[n]) for n, p in fused_copy.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_variants_equal_stock_peft(tiny_checkpoint, quant_type, double_quant):
    """Each 4-bit format and double quantization on and off (fp32 compute, dropout live)."""
    fused, stock = fused_and_stock(tiny_checkpoint, "4bit", torch.float32, 0.1, quant_type=quant_type,
                                   double_quant=double_quant)
    weight = next(m for m in fused.modules() if isinstance(m, FusedLoraLayer)).base_layer.weight
    assert weight.quant_state.quant_type == quant_type and (weight.quant_state.nested == double_quant)
    inputs = batch()
    assert_close_runs(step(fused, inputs), step(stock, inputs), 1e-5)
    assert fusion_stats(fused).fused_fraction == 1.0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bits", BITS)
def test_bf16_compute_within_a_rounding_of_stock_peft(tiny_checkpoint, bits, dropout):
    """The usual QLoRA set-up: bf16 compute and non-quantized layers, PEFT's float32 factors."""
    fused, stock = fused_and_stock(tiny_checkpoint, bits, torch.bfloat16, dropout)
    assert {p.dtype for n, p in fused.named_parameters() if "lora_" in n} == {torch.float32}
    inputs = batch()
    got, want = step(fused, inputs), step(stock, inputs)
    assert got[1].dtype == want[1].dtype
    assert_close_runs(got, want, BF16_BOUND)
    assert fusion_stats(fused).fused_fraction == 1.0


@pytest.mark.parametrize("bits", BITS)
def test_eval_no_grad_inference_mode_and_checkpointing(tiny_checkpoint, bits):
    fused, stock = fused_and_stock(tiny_checkpoint, bits, torch.float32, 0.1)
    inputs = batch()
    for mode in ("no_grad", "inference_mode"):
        with getattr(torch, mode)():
            got, want = fused.eval()(**inputs).logits, stock.eval()(**inputs).logits
        assert rel_err(got, want) <= 1e-5, mode
    for model in (fused, stock):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    fusion_stats(fused, reset=True)
    assert_close_runs(step(fused, inputs), step(stock, inputs), 1e-5)
    stats = fusion_stats(fused)
    assert stats.fused == 2 * 14 and stats.fallback == {}, str(stats)  # forward, and again in the backward


def test_fuse_on_a_model_as_loaded_leaves_its_4bit_weights_and_modes_alone(tmp_path):
    """from_pretrained returns a model in eval mode; the probe forward (no grad) must not trigger bitsandbytes'
    one-way CPU repacking of 4-bit weights, which also fails on layers narrower than its 64-value block."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 32, "intermediate_size": 48})).save_pretrained(tmp_path)
    fused, stock = (qlora(tmp_path, "4bit", torch.float32, 0.1) for _ in range(2))  # eval mode, as loaded
    modes = {name: m.training for name, m in fused.named_modules()}
    fuse(fused)
    assert {name: m.training for name, m in fused.named_modules()} == modes
    layers = [m for m in fused.modules() if isinstance(m, FusedLoraLayer)]
    assert len(layers) == 7 * TINY["num_hidden_layers"]
    assert not any(getattr(m.base_layer.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    use_hash_dropout(stock.train(), 0.1)
    assert_close_runs(step(fused.train(), batch()), step(stock, batch()), 1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_saved_adapter_loads_in_stock_peft_on_a_fresh_quantized_base(tiny_checkpoint, bits, tmp_path):
    fused, _ = fused_and_stock(tiny_checkpoint, bits, torch.float32, 0.0)
    inputs = batch()
    with torch.no_grad():
        want = fused.eval()(**inputs).logits
    fused.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized(tiny_checkpoint, bits, torch.float32), tmp_path).eval()
    assert not any(isinstance(m, FusedLoraLayer) for m in loaded.modules())
    with torch.no_grad():
        assert rel_err(loaded(**inputs).logits, want) <= 1e-5


def test_fuse_names_the_layers_it_leaves_to_peft(tiny_checkpoint):
    """LoRA on the embeddings (no fused path) beside quantized projections: fuse() warns, naming the layer and
    its reason, fusion_stats counts it; unfuse() puts the fused layers back."""
    base = quantized(tiny_checkpoint, "4bit", torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"]))
    with pytest.warns(UserWarning, match=r"left 1 LoRA layer\(s\).*embed_tokens \(peft\.tuners\.lora\.layer\.Embedding "
                                         r"has no fused path"):
        fuse(model)
    model(**batch())
    stats = fusion_stats(model)
    assert stats.left_to_peft and sum(stats.left_to_peft.values()) == 1
    assert "LoRA layers left to PEFT by fuse(): 1" in str(stats) and stats.fused == 4
    assert sum(isinstance(m, FusedLoraLayer) for m in model.modules()) == 4
    unfuse(model)
    assert not any(isinstance(m, FusedLoraLayer) for m in model.modules())


def test_fusion_stats_says_why_when_nothing_is_fused(tiny_checkpoint):
    model = get_peft_model(quantized(tiny_checkpoint, "4bit", torch.float32),
                           LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="no fused path"):
        fuse(model)
    stats = fusion_stats(model)
    assert stats.fused == 0 and list(stats.left_to_peft.values()) == [1]
    assert "Embedding has no fused path" in str(stats)


@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory):
    from slora_kernels.app.defaults import save_smollm2_checkpoint

    return save_smollm2_checkpoint(tmp_path_factory.mktemp("smollm2"))


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bits", BITS)
def test_smollm2_quantized_fused_equals_stock_peft(smollm2_checkpoint, bits, dropout):
    fused, stock = fused_and_stock(smollm2_checkpoint, bits, torch.float32, dropout)
    assert sum(isinstance(m, FusedLoraLayer) for m in fused.modules()) == 7 * 30
    inputs = batch(vocab=49152)
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = step(fused, inputs), step(stock, inputs)
    # 30 layers of float32: summation order moves a small matrix's gradient by ~1e-5 (as in test_fuse.py).
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()) and rel_err(logits, ref_logits) <= 1e-5
    assert rel_err(torch.cat([g.flatten() for g in grads.values()]),
                   torch.cat([ref_grads[n].flatten() for n in grads])) <= 1e-5
    assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) <= 5e-5
    assert fusion_stats(fused).fused_fraction == 1.0

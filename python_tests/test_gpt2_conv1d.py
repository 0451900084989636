"""GPT-2's projections are transformers Conv1D (weight stored [d_in, d_out], PEFT's fan_in_fan_out=True).

A small random GPT2Config (no download). Fused runs equal stock PEFT (logits and every LoRA gradient,
fp32), also under LoRA dropout with stock PEFT drawing the fused op's seeded hash mask, on the CPU and
the Triton path; every sensitivity estimator measures a Conv1D exactly as it measures the nn.Linear that
computes the same function; a report's lora_config trains and saves an adapter stock PEFT loads.
"""
import copy
import json
import warnings

import pytest
import torch
from lora_helpers import lora_model, rel_err, use_hash_dropout
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from slora_kernels import estimate_sensitivity, fuse, fusion_stats, unfuse
from slora_kernels.nn import FusedLoraLinear
from slora_kernels.ops import utils
from slora_kernels.sensitivity.estimate import _collector, _run
from slora_kernels.sensitivity.targets import find_targets

TARGETS = ["c_attn", "c_proj", "c_fc"]
VOCAB = 97


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def batches(count=3):
    """Batches with right padding (attention_mask 0, label -100) in all but the first row."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1:, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


@pytest.fixture(params=["cpu", "triton"])
def path(request, monkeypatch):
    """The fused op's CPU path, or its Triton (CUDA) path, run by the interpreter on CPU tensors."""
    if request.param == "triton":
        monkeypatch.setattr(utils, "triton_path", lambda x: True)
    return request.param


def run(model, inputs, seed=0):
    """Logits and LoRA gradients of one training step's forward/backward, torch's RNG seeded."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_same(got, want):
    assert rel_err(got[0], want[0]) <= 1e-5
    assert got[1].keys() == want[1].keys() and len(want[1]) > 0
    for name, grad in want[1].items():
        assert rel_err(got[1][name], grad) <= 1e-5, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_gpt2_equals_stock_peft(path, dropout):
    fused = lora_model(tiny_gpt2(), TARGETS, seed=1, lora_dropout=dropout, fan_in_fan_out=True).train()
    stock = use_hash_dropout(copy.deepcopy(fused), dropout) if dropout else copy.deepcopy(fused)
    fuse(fused)
    layers = [m for m in fused.modules() if isinstance(m, FusedLoraLinear)]
    assert len(layers) == 8 and all(type(m.base_layer) is Conv1D and m.fan_in_fan_out for m in layers)
    # Each projection reads its own input (c_attn computes q, k and v at once): groups of one.
    assert all(len(m._slora_group.members) == 1 for m in layers)
    inputs = batches(1)[0]
    for step in range(2):
        assert_same(run(fused, inputs, seed=step), run(stock, inputs, seed=step))
    stats = fusion_stats(fused)
    assert (stats.fused, stats.calls) == (16, 16), stats
    if dropout:
        assert rel_err(run(fused, inputs, seed=0)[0], run(fused, inputs, seed=1)[0]) > 1e-3
    unfuse(fused)  # PEFT's nn.Dropout again: compared without dropout
    assert_same(run(fused.eval(), inputs), run(stock.eval(), inputs))


class SharedInput(torch.nn.Module):
    """A Conv1D and an nn.Linear reading one tensor (one group, W_cat stacked from both layouts),
    and a Conv1D reading another."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = Conv1D(5, 12), torch.nn.Linear(12, 7), Conv1D(3, 12)

    def forward(self, x):
        h = torch.tanh(x)
        return self.q(h).sum(-1) * self.k(h).sum(-1) + self.out(x).sum(-1)


def test_mixed_conv1d_and_linear_group(path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT corrects fan_in_fan_out per module, with a warning each
        stock = get_peft_model(SharedInput(), LoraConfig(target_modules=["q", "k", "out"],
                                                         rank_pattern={"q": 3, "k": 1}))
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_B" in name:
                p.normal_()
    fused = fuse(copy.deepcopy(stock), example_inputs={"x": torch.randn(1, 2, 12)})
    x = torch.randn(4, 6, 12)

    def step(model):
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    group = fused.get_submodule("base_model.model.q")._slora_group
    assert [type(m.base_layer) for m in group.members] == [Conv1D, torch.nn.Linear]
    assert_same(step(fused), step(stock))
    with torch.no_grad():  # the op reads the weights themselves on every call (no copy kept)
        for model in (fused, stock):
            model.get_submodule("base_model.model.q.base_layer").weight.data.mul_(-2.0)
    assert_same(step(fused), step(stock))
    assert fusion_stats(fused).fallback == {}


def linear_twin(model):
    """A copy of model with every Conv1D replaced by the nn.Linear computing the same function."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.nx, module.nf)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            twin.set_submodule(name, linear)
    return twin


ESTIMATORS = [("activation", {}), ("fisher", {}), ("fisher", {"per_sample": True}), ("hutchinson", {"probes": 2})]


def diagonals(model, estimator, options):
    """Each target's Hessian diagonal ([d_out, d_in] or [d_in]), collected as estimate_sensitivity does;
    the report's metrics alone would not show a transposed one."""
    collector = _collector(find_targets(model, TARGETS), estimator, options.get("per_sample", False),
                           options.get("probes", 1), seed=0)
    _run(model, collector, batches(), max_batches=None, progress=False)
    return {name: collector.diagonal(name) for name in collector.targets}


@pytest.mark.parametrize("estimator,options", ESTIMATORS)
def test_conv1d_statistics_equal_the_linear_twin(estimator, options):
    model = tiny_gpt2()
    twin = linear_twin(model)
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert set(find_targets(model, TARGETS)) == conv1d and len(conv1d) == 8
    got, want = diagonals(model, estimator, options), diagonals(twin, estimator, options)
    assert got.keys() == want.keys() == conv1d
    for name in conv1d:  # same [d_out, d_in] orientation, same values
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7 * want[name].abs().max().item())

    report, twin_report = (estimate_sensitivity(m, batches(), target_modules=TARGETS, estimator=estimator,
                                                progress=False, **options) for m in (model, twin))
    assert [m.name for m in report.matrices] == [m.name for m in twin_report.matrices]
    for got_m, want_m in zip(report.matrices, twin_report.matrices):
        assert (got_m.shape, got_m.tokens, got_m.fan_in_fan_out) == (want_m.shape, want_m.tokens, True)
        assert not want_m.fan_in_fan_out
        for key, value in want_m.metrics.to_dict().items():
            assert getattr(got_m.metrics, key) == pytest.approx(value, rel=1e-5), (got_m.name, key)
        assert got_m.theta == pytest.approx(want_m.theta, rel=1e-5)
    shapes = {m.name.removeprefix("transformer.h.0."): m.shape for m in report.matrices if ".h.0." in m.name}
    assert shapes == {"attn.c_attn": (144, 48), "attn.c_proj": (48, 48), "mlp.c_fc": (192, 48), "mlp.c_proj": (48, 192)}


def test_report_lora_config_trains_and_saves_a_stock_adapter(tmp_path):
    base = tiny_gpt2()
    report = estimate_sensitivity(base, batches(), target_modules=TARGETS, progress=False)
    report.to_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["matrices"][0]["fan_in_fan_out"] is True
    config = type(report).from_json(tmp_path / "report.json").lora_config(4, lora_alpha=8, lora_dropout=0.1)
    assert config.fan_in_fan_out
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "fan_in_fan_out is set to False" correction
        model = get_peft_model(copy.deepcopy(base), config)
    ranks = report.ranks(4)
    for name, rank in ranks.items():
        assert model.get_submodule(f"base_model.model.{name}").r["default"] == rank
    assert len(set(ranks.values())) > 1
    fuse(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batches(1)[0]
    model(**inputs).loss.backward()
    optimizer.step()
    assert fusion_stats(model).fallback == {}
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # PEFT starts B at 0
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base).eval(), tmp_path / "adapter")
    assert loaded.peft_config["default"].fan_in_fan_out
    assert not any(isinstance(m, FusedLoraLinear) for m in loaded.modules())
    with torch.no_grad():
        assert (loaded(**inputs).logits - logits).abs().max().item() <= 1e-5


def test_cli_default_targets_select_every_gpt2_projection():
    from slora_kernels.app.models import linear_targets

    names = linear_targets(tiny_gpt2())
    assert len(names) == 2 * 4 and all(n.startswith("transformer.h.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"c_attn", "c_proj", "c_fc"}

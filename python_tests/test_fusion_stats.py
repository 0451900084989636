"""fusion_stats, the first-call warning, hooks, and the group cache's staleness guards, on small models."""
import copy
import warnings

import pytest
import torch
from lora_helpers import batch, randomize_lora_b, rel_err, tiny_fused_bert
from peft import LoraConfig, get_peft_model
from peft.tuners import lora

from slora_kernels import fuse, fusion_stats, unfuse
from slora_kernels.nn import FusedLoraLinear

LAYERS = 13  # tiny_fused_bert: q, k, v, attention output, intermediate, output per layer (x2), pooler


def forward(model):
    ids, labels = batch()
    return model(input_ids=ids, labels=labels)


def test_counts_fused_calls_and_each_fallback_reason():
    model = tiny_fused_bert()
    forward(model).loss.backward()
    assert (fusion_stats(model).fused, fusion_stats(model).fallback) == (LAYERS, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fallbacks after a layer's first call do not warn
        with model.disable_adapter():
            forward(model)
        model.merge_adapter()
        forward(model)
        model.unmerge_adapter()
    stats = fusion_stats(model, reset=True)
    assert stats.fused == LAYERS and stats.fallback == {"disabled": LAYERS, "merged": LAYERS}
    assert stats.calls == 3 * LAYERS and stats.fused_fraction == pytest.approx(1 / 3)
    assert str(stats) == f"{LAYERS} of {3 * LAYERS} LoRA layer calls fused (33.3%); fallbacks: disabled 13, merged 13"
    assert fusion_stats(model).calls == 0  # reset
    layer = model.get_submodule("base_model.model.bert.pooler.dense")
    x = torch.randn(2, 32)
    stock = lora.Linear.forward(layer, x, adapter_names=["default", "__base__"])
    torch.testing.assert_close(layer(x, adapter_names=["default", "__base__"]), stock)
    assert fusion_stats(model).fallback == {"arguments": 1}


def test_warns_once_per_reason_when_a_first_call_falls_back():
    model = tiny_fused_bert()
    with model.disable_adapter():
        with pytest.warns(UserWarning, match=r"runs PEFT's own forward, not the fused one \(disabled\)") as caught:
            forward(model)
    assert len([w for w in caught if "slora_kernels" in str(w.message)]) == 1


def test_stats_of_a_model_never_fused_is_an_error():
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="not fused; call slora_kernels.fuse"):
        fusion_stats(model)


class TwoReaders(torch.nn.Module):
    """q and k read the same tensor h; between the two calls h may be edited in place, or k's factor."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(6, 5), torch.nn.Linear(6, 3)
        self.edit = None

    def forward(self, x):
        h = x * 1.0
        q = self.q(h)
        if self.edit == "input":
            h.mul_(-3.0)
        elif self.edit == "factor":
            self.k.lora_B["default"].weight.mul_(2.0)
        return torch.cat([q, self.k(h)], dim=-1)


def two_readers():
    torch.manual_seed(0)
    model = get_peft_model(TwoReaders(), LoraConfig(target_modules=["q", "k"], rank_pattern={"q": 2, "k": 4}))
    randomize_lora_b(model, 0)
    return model


@pytest.mark.parametrize("edit", ["input", "factor"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_an_edit_between_two_readers_is_never_served_stale(edit, mode):
    """The group computes k's output when q is called; an in-place edit of the input or of k's
    factor before k is called must not hand out that output (PEFT would see the edit)."""
    stock, fused = two_readers(), two_readers()
    x = torch.randn(3, 6)
    fuse(fused, example_inputs={"x": x})
    assert {tuple(type(m).__name__ for m in module._slora_group.members)
            for module in fused.modules() if isinstance(module, FusedLoraLinear)} == {("FusedLoraLinear",) * 2}
    stock.base_model.model.edit = fused.base_model.model.edit = edit
    with getattr(torch, mode)():
        want, got = stock(x.clone()), fused(x.clone())
    assert rel_err(got, want) <= 1e-6
    assert fusion_stats(fused).fused == 2


def test_layers_with_hooks_stay_stock_or_fall_back():
    model = tiny_fused_bert()
    unfuse(model)
    seen = []
    hooked = "base_model.model.bert.encoder.layer.0.attention.self.query"
    model.get_submodule(hooked + ".base_layer").register_forward_hook(lambda *_: seen.append("base"))
    with pytest.warns(UserWarning, match=r"query \(forward hooks on base_layer"):
        fuse(model)
    assert type(model.get_submodule(hooked)) is lora.Linear
    seen.clear()  # fuse's probe forward ran the hook
    stock = unfuse(copy.deepcopy(model))
    later = "base_model.model.bert.pooler.dense"  # a hook added after fuse(): checked on every call
    model.get_submodule(later + ".lora_A.default").register_forward_pre_hook(lambda *_: seen.append("lora_A"))
    with pytest.warns(UserWarning, match=r"pooler.dense runs PEFT's own forward, not the fused one \(hooks\)"):
        logits = forward(model).logits
    assert seen == ["base", "lora_A"]
    assert fusion_stats(model).fallback == {"hooks": 1} and fusion_stats(model).fused == LAYERS - 2
    torch.testing.assert_close(logits, forward(stock).logits, rtol=1e-5, atol=1e-6)

"""estimate_sensitivity on models larger than memory: accelerate's offload hooks, and offload="sequential"
(block by block). Each run must give the in-memory run's theta and token counts; padding must not count."""
import copy
from collections import Counter
from types import SimpleNamespace

import accelerate.hooks
import pytest
import torch
from accelerate import cpu_offload, disk_offload
from lora_helpers import SMOLLM2_TARGETS
from sensitivity_toy import Toy, toy_batches
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from slora_kernels import estimate_sensitivity
from slora_kernels.app.defaults import load_smollm2
from slora_kernels.sensitivity.estimate import input_device

VOCAB, LENGTH = 96, 12
LLAMA_TARGETS = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
BERT_TARGETS = r"bert\.encoder\.layer\.\d+\..*(query|key|value|dense)"
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def padded_batches(n_batches=2, batch=3, length=LENGTH, vocab=VOCAB, seed=0):
    """Random ids, random lengths >= 2 (right padding, random ids under the padding), labels = ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, length), generator=gen)
        lengths = torch.randint(2, length + 1, (batch,), generator=gen)
        lengths[0] = length - 3  # at least one padded sample in every batch
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def classification(batches):
    return [{**b, "labels": torch.arange(b["input_ids"].shape[0]) % 3} for b in batches]


def assert_same_report(got, want, rtol=1e-5):
    """Same matrices, token counts, trace and theta (fp32 rounding apart)."""
    assert [m.name for m in got.matrices] == [m.name for m in want.matrices]
    for g, w in zip(got.matrices, want.matrices):
        assert g.tokens == w.tokens, g.name
        assert g.metrics.trace == pytest.approx(w.metrics.trace, rel=rtol), g.name
        assert g.theta == pytest.approx(w.theta, rel=rtol), g.name
    assert got.settings["batches"] == want.settings["batches"]
    assert got.settings["samples"] == want.settings["samples"]


def unpadded_tokens(batches):
    return sum(int(b["attention_mask"].sum()) for b in batches)


def offloaded(kind, model, folder):
    """The model under accelerate's hooks, every weight on the meta device between calls."""
    if kind == "cpu":
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        disk_offload(model, str(folder), execution_device=torch.device("cpu"))
    assert all(p.is_meta for p in model.parameters())
    return model


@pytest.mark.parametrize("kind", ["cpu", "disk"])
@pytest.mark.parametrize("estimator", ["activation", "fisher"])
def test_accelerate_offload_matches_in_memory(kind, estimator, tmp_path):
    model, batches = tiny_llama(), padded_batches()
    want = estimate_sensitivity(model, batches, target_modules=LLAMA_TARGETS, estimator=estimator, progress=False)
    assert {m.tokens for m in want.matrices} == {unpadded_tokens(batches)}
    got = estimate_sensitivity(offloaded(kind, copy.deepcopy(model), tmp_path), batches,
                               target_modules=LLAMA_TARGETS, estimator=estimator, progress=False)
    assert_same_report(got, want)
    assert len({round(m.theta, 6) for m in got.matrices}) > 3  # real, distinct values


def test_hutchinson_on_offloaded_weights_is_refused(tmp_path):
    model = offloaded("cpu", tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match=r"estimator='hutchinson'.*offloaded.*'activation' or 'fisher'"):
        estimate_sensitivity(model, padded_batches(), target_modules=LLAMA_TARGETS, estimator="hutchinson",
                             progress=False)


def test_input_device_resolution(tmp_path):
    model = tiny_llama()
    assert input_device(model) == torch.device("cpu")
    assert input_device(offloaded("disk", model, tmp_path)) == torch.device("cpu")  # hooks on submodules
    chained = SimpleNamespace(hooks=[SimpleNamespace(execution_device=None), SimpleNamespace(execution_device="meta")])
    model.model.embed_tokens._hf_hook = chained  # accelerate's SequentialHook: the first device set wins
    assert input_device(model) == torch.device("meta")
    with torch.device("meta"):
        assert input_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


@pytest.mark.parametrize("build, targets, labels", [
    (tiny_llama, LLAMA_TARGETS, False), (tiny_bert, BERT_TARGETS, True), (tiny_gpt2, GPT2_TARGETS, False)],
    ids=["llama", "bert", "gpt2-conv1d"])
def test_sequential_matches_in_memory(build, targets, labels):
    model = build()
    batches = padded_batches(n_batches=3)
    if labels:
        batches = classification(batches)
    want = estimate_sensitivity(model, batches, target_modules=targets, progress=False)
    got = estimate_sensitivity(model, batches, target_modules=targets, offload="sequential", device="cpu",
                               progress=False)
    assert_same_report(got, want)
    assert {m.tokens for m in got.matrices} == {unpadded_tokens(batches)}  # padding did not count
    assert got.settings["offload"] == "sequential"
    assert not model.training and all(p.requires_grad for p in model.parameters())  # state restored


def test_sequential_ignores_padding_content():
    """Extra padding with random ids changes no hidden state of a real token, and no padded token counts."""
    model, batches = tiny_llama(), padded_batches(length=8)
    gen = torch.Generator().manual_seed(5)
    longer = [{"input_ids": torch.cat([b["input_ids"], torch.randint(1, VOCAB, (3, 4), generator=gen)], 1),
               "attention_mask": torch.cat([b["attention_mask"], torch.zeros(3, 4, dtype=torch.long)], 1)}
              for b in batches]
    short = estimate_sensitivity(model, batches, target_modules=LLAMA_TARGETS, offload="sequential", progress=False)
    padded = estimate_sensitivity(model, longer, target_modules=LLAMA_TARGETS, offload="sequential", progress=False)
    assert_same_report(padded, short, rtol=1e-4)


def test_from_pretrained_device_map_with_disk_offload(tmp_path):
    """transformers' from_pretrained(device_map=..., offload_folder=...): embeddings and block 0 in memory,
    the rest read from the checkpoint at each call; both modes give the in-memory report."""
    model, batches = tiny_llama(), padded_batches()
    model.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "disk", "lm_head": "disk"}
    dispatched = LlamaForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                  offload_folder=str(tmp_path / "offload"))
    assert dispatched.model.layers[1].self_attn.q_proj.weight.is_meta
    want = estimate_sensitivity(model, batches, target_modules=LLAMA_TARGETS, progress=False)
    for offload in (None, "sequential"):
        got = estimate_sensitivity(dispatched, batches, target_modules=LLAMA_TARGETS, offload=offload, progress=False)
        assert_same_report(got, want)


def test_sequential_on_disk_offloaded_model_loads_each_block_once(tmp_path, monkeypatch):
    """accelerate's hooks would load every weight from disk at every call; sequential loads each block's
    weights once for all batches and drops them afterwards."""
    model, batches = tiny_llama(), padded_batches(n_batches=3)
    want = estimate_sensitivity(model, batches, target_modules=LLAMA_TARGETS, progress=False)
    disk = offloaded("disk", copy.deepcopy(model), tmp_path)
    in_blocks = {id(m) for m in disk.model.layers.modules()}
    loads = Counter()
    real = accelerate.hooks.set_module_tensor_to_device

    def counting(module, name, device, *args, **kwargs):
        if id(module) in in_blocks and str(device) != "meta":
            loads[id(module), name] += 1
        return real(module, name, device, *args, **kwargs)

    monkeypatch.setattr(accelerate.hooks, "set_module_tensor_to_device", counting)
    got = estimate_sensitivity(disk, batches, target_modules=LLAMA_TARGETS, offload="sequential", progress=False)
    assert_same_report(got, want)
    block_tensors = {(id(m), n) for m in disk.model.layers.modules() for n, _ in m.named_parameters(recurse=False)}
    assert set(loads) == block_tensors and set(loads.values()) == {1}
    assert all(p.is_meta for p in disk.parameters())


@pytest.mark.parametrize("estimator", ["fisher", "hutchinson"])
def test_sequential_needs_activation(estimator):
    with pytest.raises(ValueError, match=rf"offload='sequential' supports only estimator='activation'.*"
                                         rf"estimator='{estimator}'"):
        estimate_sensitivity(tiny_llama(), padded_batches(), target_modules=LLAMA_TARGETS, estimator=estimator,
                             offload="sequential", progress=False)


def test_bad_offload_and_device():
    model, batches = tiny_llama(), padded_batches()
    with pytest.raises(ValueError, match=r"offload must be None or 'sequential', got 'disk'"):
        estimate_sensitivity(model, batches, target_modules=LLAMA_TARGETS, offload="disk", progress=False)
    with pytest.raises(ValueError, match=r"device is used only with offload='sequential'"):
        estimate_sensitivity(model, batches, target_modules=LLAMA_TARGETS, device="cpu", progress=False)


def test_sequential_refuses_mixed_layer_types():
    model = tiny_llama()
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"offload='sequential'.*mixes layer types"):
        estimate_sensitivity(model, padded_batches(), target_modules=LLAMA_TARGETS, offload="sequential",
                             progress=False)


def test_sequential_needs_a_block_list():
    with pytest.raises(ValueError, match=r"offload='sequential'.*no nn.ModuleList of this model holds any target"):
        estimate_sensitivity(Toy(), toy_batches(), target_modules=["query", "key"], offload="sequential",
                             progress=False)


@pytest.mark.parametrize("build, targets, outside", [
    (tiny_llama, r".*_proj|lm_head", "lm_head"),
    (tiny_bert, ["query", "dense"], "bert.pooler.dense")], ids=["llama-lm_head", "bert-pooler"])
def test_sequential_rejects_targets_outside_the_blocks(build, targets, outside):
    model = build()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"inside the blocks '[\w.]+'; these are outside: {outside}\."):
        estimate_sensitivity(model, classification(padded_batches()), target_modules=targets, offload="sequential",
                             progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.fixture(scope="module")
def smollm2_batches():
    """The embedded SmolLM2-135M and 2 batches of 2 x 16 real tokens, the second sample partly padded."""
    model, tokenizer = load_smollm2()
    texts = [["The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
              "Short one."],
             ["Sensitivity measures how much each weight matrix matters for the loss of a task.",
              "Calibration batches come from the training data."]]
    batches = [dict(tokenizer(t, padding="max_length", truncation=True, max_length=16, return_tensors="pt"))
               for t in texts]
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)
    return model.eval(), batches


@pytest.mark.slow
def test_smollm2_sequential_and_disk_offload_match_in_memory(smollm2_batches, tmp_path):
    model, batches = smollm2_batches
    want = estimate_sensitivity(model, batches, target_modules=SMOLLM2_TARGETS, progress=False)
    assert len(want.matrices) == 7 * 30 and {m.tokens for m in want.matrices} == {unpadded_tokens(batches)}
    sequential = estimate_sensitivity(model, batches, target_modules=SMOLLM2_TARGETS, offload="sequential",
                                      progress=False)
    assert_same_report(sequential, want)
    disk = offloaded("disk", copy.deepcopy(model), tmp_path)
    assert_same_report(estimate_sensitivity(disk, batches, target_modules=SMOLLM2_TARGETS, progress=False), want)

"""Must-show checks on the embedded defaults: MiniLM with Rotten Tomatoes as calibration data."""
import pytest

from slora_kernels import estimate_sensitivity

pytestmark = pytest.mark.slow
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
SNIPPETS = 512


@pytest.fixture(scope="module")
def minilm():
    from slora_kernels.app.data import rotten_tomatoes
    from slora_kernels.app.defaults import load_minilm_classifier

    model, tokenizer = load_minilm_classifier()
    train, _ = rotten_tomatoes()
    return model, tokenizer, train.head(SNIPPETS)


def batches(tokenizer, split, indices, batch_size=32):
    """Batches of similar-length snippets (less padding to compute; padding never counts anyway)."""
    from slora_kernels.app.data import Examples
    from slora_kernels.app.training import batches as tokenised

    order = sorted(indices, key=lambda i: len(split.texts[i]))
    by_length = Examples([split.texts[i] for i in order], [split.labels[i] for i in order])
    return list(tokenised(tokenizer, by_length, batch_size, max_length=64))


@pytest.fixture(scope="module")
def activation_reports(minilm):
    model, tokenizer, split = minilm
    return [estimate_sensitivity(model, batches(tokenizer, split, range(half, SNIPPETS, 2)), target_modules=TARGETS,
                                 progress=False) for half in (0, 1)]


def test_allocation_stable_across_disjoint_halves(activation_reports):
    """Kendall tau (tau-b, ties counted) of the rank allocations, and of theta, from two disjoint halves."""
    from scipy.stats import kendalltau

    first, second = activation_reports
    assert len(first.matrices) == 36 and first.settings["samples"] == second.settings["samples"] == SNIPPETS // 2
    for budget in ("rank", "params"):
        a, b = first.ranks(8, budget=budget), second.ranks(8, budget=budget)
        assert list(a) == list(b)
        assert kendalltau(list(a.values()), list(b.values())).statistic >= 0.9
    assert kendalltau(list(first.theta.values()), list(second.theta.values())).statistic >= 0.9


def test_fisher_separates_query_key_value(minilm, activation_reports):
    model, tokenizer, split = minilm
    fisher = estimate_sensitivity(model, batches(tokenizer, split, range(64)), target_modules=TARGETS,
                                  estimator="fisher", progress=False)
    act_ranks, fisher_ranks = activation_reports[0].ranks(8), fisher.ranks(8)
    for layer in range(6):
        names = [f"bert.encoder.layer.{layer}.attention.self.{m}" for m in ("query", "key", "value")]
        assert len({act_ranks[n] for n in names}) == 1          # one shared input: the proxy cannot tell them apart
        assert len({fisher.theta[n] for n in names}) == 3       # the loss can
        assert fisher_ranks[names[2]] != fisher_ranks[names[0]]


def test_lora_config_on_minilm(minilm, activation_reports):
    from peft import get_peft_model

    model, _, _ = minilm
    report = activation_reports[0]
    config = report.lora_config(8, budget="params", lora_alpha=16, modules_to_save=["classifier"])
    ranks = report.ranks(8, budget="params")
    peft_model = get_peft_model(model, config)
    try:
        lora_params = 0
        for name, rank in ranks.items():
            layer = peft_model.base_model.model.get_submodule(name)
            assert layer.r["default"] == rank and layer.scaling["default"] == pytest.approx(2.0)
            lora_params += layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel()
        uniform = sum(8 * sum(m.shape) for m in report.matrices)
        assert uniform - min(sum(m.shape) for m in report.matrices) < lora_params <= uniform
    finally:
        peft_model.unload()

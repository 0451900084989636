"""estimate_sensitivity on a toy model against hand-written references, and the report's outputs."""
import json
import math

import pytest
import torch
from sensitivity_toy import Toy, toy_batches, with_extra_padding

from slora_kernels import Metrics, SensitivityReport, estimate_sensitivity, metrics
from slora_kernels.sensitivity.report import MatrixSensitivity, rank_pattern_key

TARGETS = ["query", "key", "value", "up", "down", "head"]
NAMES = [f"block.{n}" for n in TARGETS[:5]] + ["head"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def captured_inputs(model, batches):
    """Reference: each target's inputs (and the matching [.., T] masks) from plain forward hooks."""
    seen = {n: [] for n in NAMES}
    handles = [dict(model.named_modules())[n].register_forward_hook(
        lambda mod, inp, out, n=n: seen[n].append(inp[0].detach().double())) for n in NAMES]
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return seen


def test_activation_matches_reference():
    model, batches = Toy(), toy_batches()
    report = estimate_sensitivity(model, batches, target_modules=TARGETS, progress=False)
    seen = captured_inputs(model, batches)
    assert [m.name for m in report.matrices] == NAMES
    for m in report.matrices:
        if m.name == "head":  # pooled [B, d]: every row counts
            xs, n = torch.cat(seen[m.name]), sum(x.shape[0] for x in seen[m.name])
        else:
            xs = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen[m.name], batches)])
            n = sum(int(b["attention_mask"].sum()) for b in batches)
        h = 2.0 / n * xs.square().sum(0)
        want = metrics(h, repeat=m.shape[0])
        assert m.tokens == n
        assert m.metrics.trace == pytest.approx(want.trace, rel=1e-5)
        assert m.metrics.topk == pytest.approx(want.topk, rel=1e-5)
        assert m.metrics.eff_rank == want.eff_rank
    # the activation proxy cannot tell q, k and v apart
    assert report.theta["block.query"] == report.theta["block.key"] == report.theta["block.value"]


def reference_fisher(model, batches, per_sample):
    """Float64 Fisher diagonals from one sample at a time.

    Per sample: the squared gradient of that sample's own loss; per token: sum_t g_t^2 x_t^2 with
    g_t = dL/dy_t taken by autograd on the captured outputs, padding tokens left out.
    """
    model.eval()
    modules = dict(model.named_modules())
    acc = {n: torch.zeros_like(modules[n].weight, dtype=torch.float64) for n in NAMES}
    count = 0
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            one = {k: v[i:i + 1] for k, v in b.items()}
            keep = one["attention_mask"][0].bool()
            io = {}
            hooks = [modules[n].register_forward_hook(lambda m, inp, out, n=n: io.__setitem__(n, (inp[0], out)))
                     for n in NAMES]
            loss = model(**one).loss
            for h in hooks:
                h.remove()
            if per_sample:
                grads = torch.autograd.grad(loss, [modules[n].weight for n in NAMES])
                for n, g in zip(NAMES, grads):
                    acc[n] += g.double().square()
                count += 1
                continue
            gs = torch.autograd.grad(loss, [io[n][1] for n in NAMES])
            for n, g in zip(NAMES, gs):
                x = io[n][0].detach().double().reshape(-1, io[n][0].shape[-1])
                g = g.double().reshape(-1, g.shape[-1])
                if n != "head":
                    x, g = x[keep], g[keep]
                acc[n] += g.square().T @ x.square()
            count += int(keep.sum())
    return acc, count


@pytest.mark.parametrize("per_sample", [False, True])
def test_fisher_matches_reference(per_sample):
    model, batches = Toy(), toy_batches()
    report = estimate_sensitivity(model, batches, target_modules=TARGETS, estimator="fisher",
                                  per_sample=per_sample, progress=False)
    acc, count = reference_fisher(Toy(), batches, per_sample)
    for m in report.matrices:
        n = count if per_sample or m.name != "head" else sum(b["input_ids"].shape[0] for b in batches)
        want = metrics(acc[m.name] / n)
        assert m.metrics.trace == pytest.approx(want.trace, rel=1e-4)
        assert m.metrics.topk == pytest.approx(want.topk, rel=1e-4)
        assert abs(m.metrics.eff_rank - want.eff_rank) <= 1
    theta = report.theta
    assert len({theta["block.query"], theta["block.key"], theta["block.value"]}) == 3


@pytest.mark.parametrize("estimator", ["activation", "fisher"])
def test_padding_never_counts(estimator):
    batches = toy_batches()
    plain = estimate_sensitivity(Toy(), batches, target_modules=TARGETS, estimator=estimator, progress=False)
    padded = estimate_sensitivity(Toy(), with_extra_padding(batches, 5), target_modules=TARGETS,
                                  estimator=estimator, progress=False)
    for a, b in zip(plain.matrices, padded.matrices):
        assert a.tokens == b.tokens
        assert a.metrics.trace == pytest.approx(b.metrics.trace, rel=1e-5)
        assert a.theta == pytest.approx(b.theta, rel=1e-5)


def exact_hessian_diagonal(model, batch, name):
    weight = dict(model.named_modules())[name].weight

    def loss_of(w):
        return torch.func.functional_call(model, {f"{name}.weight": w}, kwargs=batch).loss

    return torch.autograd.functional.hessian(loss_of, weight.detach()).reshape(weight.numel(), -1).diagonal()


def test_hutchinson_converges_to_the_hessian_diagonal():
    model, batches = Toy().double(), toy_batches(n_batches=1)
    report = estimate_sensitivity(model, batches, target_modules=["query", "down"], estimator="hutchinson",
                                  probes=400, seed=3, diag_layout="feature", progress=False)
    model.eval()
    for m in report.matrices:
        exact = exact_hessian_diagonal(model, batches[0], m.name).abs().reshape(m.shape)
        assert m.metrics.trace == pytest.approx(exact.mean(0).sum().item(), rel=0.15)  # 400 probes: ~5% noise
    again = estimate_sensitivity(model, batches, target_modules=["query", "down"], estimator="hutchinson",
                                 probes=5, seed=3, progress=False)
    same = estimate_sensitivity(model, batches, target_modules=["query", "down"], estimator="hutchinson",
                                probes=5, seed=3, progress=False)
    other = estimate_sensitivity(model, batches, target_modules=["query", "down"], estimator="hutchinson",
                                 probes=5, seed=4, progress=False)
    assert again.theta == same.theta and again.theta != other.theta


def test_feature_layout_and_options():
    model, batches = Toy(), toy_batches()
    per_param = estimate_sensitivity(model, batches, target_modules=TARGETS, progress=False)
    per_feature = estimate_sensitivity(model, batches, target_modules=TARGETS, diag_layout="feature",
                                       topk_fraction=1 / 3, alpha=0.8, max_batches=2, progress=False)
    assert per_feature.settings["batches"] == 2 and per_param.settings["batches"] == 4
    up_param = next(m for m in per_param.matrices if m.name == "block.up")
    up_feature = next(m for m in per_feature.matrices if m.name == "block.up")
    assert up_param.metrics.eff_rank > up_feature.metrics.eff_rank  # counts d_out * d_in entries, not d_in
    assert up_feature.metrics.eff_rank <= up_feature.shape[1]


def test_regex_and_list_targets_and_no_match_error():
    model = Toy()
    by_regex = estimate_sensitivity(model, toy_batches(1), target_modules=r"block\.(query|key)", progress=False)
    assert [m.name for m in by_regex.matrices] == ["block.query", "block.key"]
    with pytest.raises(ValueError, match=r"matches no nn.Linear in the model; candidates: block.query, block.key"):
        estimate_sensitivity(model, toy_batches(1), target_modules=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        estimate_sensitivity(model, toy_batches(1), target_modules="query", progress=False)  # full match only
    with pytest.raises(TypeError, match="target_modules must be a regex string or a non-empty list"):
        estimate_sensitivity(model, toy_batches(1), target_modules=[], progress=False)


def test_model_state_is_restored_and_progress_bar(capsys):
    model = Toy()
    model.train()
    model.head.weight.requires_grad_(False)
    estimate_sensitivity(model, toy_batches(), target_modules=TARGETS, estimator="fisher", progress=True)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [n != "head.weight" for n, _ in model.named_parameters()]
    assert all(p.grad is None for p in model.parameters())
    assert "sensitivity" in capsys.readouterr().err
    estimate_sensitivity(model, toy_batches(), target_modules=TARGETS, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kwargs,error,text", [
    ({"estimator": "gradient"}, ValueError, "estimator must be 'activation', 'fisher' or 'hutchinson'"),
    ({"diag_layout": "row"}, ValueError, "diag_layout must be 'parameter' or 'feature'"),
    ({"max_batches": 0}, ValueError, "max_batches must be >= 1"),
    ({"estimator": "hutchinson", "probes": 0}, ValueError, "probes must be >= 1"),
])
def test_bad_options(kwargs, error, text):
    with pytest.raises(error, match=text):
        estimate_sensitivity(Toy(), toy_batches(1), target_modules=TARGETS, progress=False, **kwargs)


def test_bad_batches():
    with pytest.raises(ValueError, match="put the labels in each batch"):
        estimate_sensitivity(Toy(), toy_batches(1, labels=False), target_modules=TARGETS, estimator="fisher",
                             progress=False)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        estimate_sensitivity(Toy(), [], target_modules=TARGETS, progress=False)
    with pytest.raises(TypeError, match="batches must yield dicts"):
        estimate_sensitivity(Toy(), [torch.ones(2)], target_modules=TARGETS, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        estimate_sensitivity("bert", toy_batches(1), target_modules=TARGETS)


def report_for_peft():
    return estimate_sensitivity(Toy(), toy_batches(), target_modules=TARGETS, estimator="fisher", progress=False)


def test_ranks_budgets():
    report = report_for_peft()
    ranks = report.ranks(4)
    assert sum(ranks.values()) == 4 * len(NAMES)
    assert all(1 <= r <= min(m.shape) for r, m in zip(ranks.values(), report.matrices))
    by_params = report.ranks(4, budget="params")
    cost = {m.name: sum(m.shape) for m in report.matrices}
    spent = sum(by_params[n] * cost[n] for n in cost)
    assert spent <= 4 * sum(cost.values()) < spent + max(cost.values())
    with pytest.raises(ValueError, match="budget must be 'rank' or 'params'"):
        report.ranks(4, budget="flops")


def test_ranks_of_a_report_built_by_hand():
    # PRA's tiers by hand: 6 matrices, average 5, 3 tiers -> 6, 6, 5, 5, 4, 4 in theta order.
    flat = Metrics(1.0, 1.0, 1.0)
    thetas = {"f": 0.1, "b": 0.8, "d": 0.4, "a": 0.9, "e": 0.2, "c": 0.5}
    report = SensitivityReport([MatrixSensitivity(n, (64, 64), 10, flat, t) for n, t in thetas.items()])
    assert report.ranks(5, strategy="pra") == {"a": 6, "b": 6, "c": 5, "d": 5, "e": 4, "f": 4}
    # Equal theta, 8 rank units: the 2 x 64 matrix is capped at its rank 2, the wide one takes the rest.
    capped = SensitivityReport([MatrixSensitivity("wide", (64, 64), 10, flat, 1.0),
                                MatrixSensitivity("thin", (2, 64), 10, flat, 1.0)])
    assert capped.ranks(4) == {"wide": 6, "thin": 2}
    # budget="params": uniform rank 4 costs 4 * (128 + 66) = 776 parameters; thin keeps 2 (132), wide gets
    # (776 - 132) / 128 = 5.03 -> 5 (772 spent; 6 would spend 900).
    assert capped.ranks(4, budget="params") == {"wide": 5, "thin": 2}


@pytest.mark.parametrize("alpha_scaling", ["constant", "rslora"])
def test_lora_config_gives_each_module_its_rank(alpha_scaling):
    from peft import get_peft_model

    report = report_for_peft()
    ranks = report.ranks(4)
    config = report.lora_config(4, alpha_scaling=alpha_scaling, lora_alpha=8, lora_dropout=0.0)
    assert config.target_modules == set(NAMES) or sorted(config.target_modules) == sorted(NAMES)
    peft_model = get_peft_model(Toy(), config)
    for name, rank in ranks.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.r["default"] == rank
        expected = 8 / math.sqrt(rank) if alpha_scaling == "rslora" else 8 / 4
        assert layer.scaling["default"] == pytest.approx(expected)
    with pytest.raises(TypeError, match="lora_config sets"):
        report.lora_config(4, rank_pattern={})


def rank_zero_report():
    """Toy's matrices by hand, theta chosen so that at the parameters of uniform rank 1 (151) and min_rank=0
    q/k/v get none: quotas value 0.06, up 2.92, down 1.75 -> 0, 3, 1 (128 spent); of the 23 left, one rank
    of the head (15) fits, one more of value (24) or down (32) does not."""
    flat = Metrics(1.0, 1.0, 1.0)
    thetas = {"block.query": 0.0, "block.key": 0.0, "block.value": 0.1, "block.up": 5.0, "block.down": 3.0,
              "head": 0.0}
    shapes = {"block.query": (12, 12), "block.key": (12, 12), "block.value": (12, 12), "block.up": (20, 12),
              "block.down": (12, 20), "head": (3, 12)}
    return SensitivityReport([MatrixSensitivity(n, shapes[n], 10, flat, t) for n, t in thetas.items()])


def test_rank_zero_matrices_get_no_adapter_and_stock_peft_loads_it(tmp_path):
    from peft import PeftModel, get_peft_model

    report = rank_zero_report()
    ranks = report.ranks(1, budget="params", min_rank=0)
    assert ranks == {"block.query": 0, "block.key": 0, "block.value": 0, "block.up": 3, "block.down": 1, "head": 1}
    spent = sum(r * sum(m.shape) for r, m in zip(ranks.values(), report.matrices))
    assert spent == 143 <= 151  # uniform rank 1 on all six: 3 * 24 + 2 * 32 + 15
    config = report.lora_config(1, budget="params", min_rank=0, lora_alpha=2)
    assert sorted(config.target_modules) == ["block.down", "block.up", "head"]
    assert sorted(config.rank_pattern.values()) == [1, 1, 3] and len(config.alpha_pattern) == 3
    model = get_peft_model(Toy(), config)
    adapted = {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
               if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert adapted == {"block.up": 3, "block.down": 1, "head": 1}
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == spent
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(Toy(), str(tmp_path / "adapter")).eval()
    batch = toy_batches(1)[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    # min_rank=1 (the default) still adapts every matrix
    assert len(report.lora_config(1, budget="params").target_modules) == 6


def test_rank_zero_bad_values():
    from slora_kernels.sensitivity import lora_config_for_ranks

    report = rank_zero_report()
    with pytest.raises(ValueError, match="min_rank must be >= 0, got -1"):
        report.ranks(2, min_rank=-1)
    with pytest.raises(ValueError, match="every one of the 2 modules has rank 0"):
        lora_config_for_ranks({"block.up": 0, "block.down": 0}, 4)
    with pytest.raises(ValueError, match=r"ranks\['block.up'\] must be >= 0"):
        lora_config_for_ranks({"block.up": -1, "block.down": 2}, 4)
    config = lora_config_for_ranks({"block.up": 0, "block.down": 2}, 4, lora_alpha=8)
    assert list(config.target_modules) == ["block.down"] and config.alpha_pattern == {"^block\\.down$": 4.0}


def test_rank_pattern_key_matches_only_its_module():
    import re

    key = rank_pattern_key("layer.1.attn.q")
    match = lambda name: re.match(rf"(.*\.)?({key})$", name)  # noqa: E731  (PEFT's rule)
    assert match("layer.1.attn.q") and not match("model.layer.1.attn.q") and not match("layer.11.attn.q")


def test_json_round_trip_and_table(tmp_path):
    report = report_for_peft()
    path = tmp_path / "report.json"
    report.to_json(path)
    loaded = SensitivityReport.from_json(path)
    assert loaded.matrices == report.matrices and loaded.settings == report.settings
    assert loaded.ranks(4) == report.ranks(4)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        report.to_json(path)
    report.to_json(path, overwrite=True)
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="is not a sensitivity report"):
        SensitivityReport.from_json(tmp_path / "other.json")
    table = str(report)
    assert "estimator=fisher" in table and all(n in table for n in NAMES)
    assert len(table.splitlines()) == 3 + len(NAMES)


def test_batch_encoding_from_a_collator_is_accepted():
    """Data collators yield transformers.BatchEncoding (a Mapping, not a dict): it must work as-is."""
    from transformers import BatchEncoding

    model, batches = Toy(), toy_batches()
    plain = estimate_sensitivity(model, batches, target_modules=TARGETS, progress=False)
    wrapped = estimate_sensitivity(model, [BatchEncoding(dict(b)) for b in batches], target_modules=TARGETS,
                                   progress=False)
    assert len(plain.matrices) > 0
    assert [m.metrics for m in wrapped.matrices] == [m.metrics for m in plain.matrices]

"""Step 3: theta from the metrics of all matrices (population std), ablations, degenerate cases."""
import math

import pytest
import torch

from slora_kernels import Metrics, combine, metrics


def weight(values):
    """Reference sigma/mu^2 with the population std, written out longhand."""
    n = len(values)
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / n) / mu**2


def test_hand_computed():
    ms = {"a": Metrics(2.0, 1.0, 1.0), "b": Metrics(4.0, 3.0, 3.0)}
    # topk: mu 2, sigma 1 -> beta1 1/4; eff: same -> beta2 1/4; local a = 0.5, b = 1.5
    # global: mu 3, sigma 1 -> gamma1 1/9; local: mu 1, sigma 0.5 -> gamma2 0.5
    theta = combine(ms)
    assert theta["a"] == pytest.approx(2 / 9 + 0.25)
    assert theta["b"] == pytest.approx(4 / 9 + 0.75)


def test_matches_formula_on_random_metrics(seeded):
    ms = {f"m{i}": Metrics(*(torch.rand(3, generator=seeded).double() * 10 + 0.1).tolist()) for i in range(9)}
    tr, tk, ef = ([getattr(m, f) for m in ms.values()] for f in ("trace", "topk", "eff_rank"))
    b1, b2 = weight(tk), weight(ef)
    local = [b1 * t + b2 * e for t, e in zip(tk, ef)]
    g1, g2 = weight(tr), weight(local)
    expected = [g1 * g + g2 * s for g, s in zip(tr, local)]
    assert list(combine(ms).values()) == pytest.approx(expected, rel=1e-12)
    assert list(combine(ms, components="global").values()) == pytest.approx([g1 * g for g in tr], rel=1e-12)
    assert list(combine(ms, components="local").values()) == pytest.approx([g2 * s for s in local], rel=1e-12)
    mu = [sum(v) / len(v) for v in (tr, tk, ef)]
    eq_local = [t / mu[1] + e / mu[2] for t, e in zip(tk, ef)]
    mu_local = sum(eq_local) / len(eq_local)
    assert list(combine(ms, weighting="equal").values()) == pytest.approx(
        [g / mu[0] + s / mu_local for g, s in zip(tr, eq_local)], rel=1e-12)


def test_theta_invariant_to_scaling_all_diagonals(seeded):
    diags = {f"layer{i}": torch.rand(50, generator=seeded, dtype=torch.float64) ** (i + 1) for i in range(6)}
    base = combine({n: metrics(d, repeat=8) for n, d in diags.items()})
    for scale in (1e-6, 3.0, 1e8):
        scaled = combine({n: metrics(d * scale, repeat=8) for n, d in diags.items()})
        assert list(scaled.values()) == pytest.approx(list(base.values()), rel=1e-9)


def test_one_matrix_and_all_equal_fall_back_to_uniform():
    assert combine({"only": Metrics(3.0, 2.0, 5.0)}) == {"only": 1.0}
    same = {n: Metrics(3.0, 2.0, 5.0) for n in "abc"}
    assert combine(same) == {"a": 1.0, "b": 1.0, "c": 1.0}
    zeros = {n: Metrics(0.0, 0.0, 0.0) for n in "ab"}
    assert combine(zeros) == {"a": 1.0, "b": 1.0}


def test_constant_metric_gets_zero_weight():
    # eff_rank equal everywhere: only top-k (and trace) separate the matrices, theta stays finite
    ms = {"a": Metrics(1.0, 1.0, 4.0), "b": Metrics(1.0, 3.0, 4.0)}
    theta = combine(ms)
    assert all(math.isfinite(t) for t in theta.values())
    assert theta["b"] > theta["a"] > 0
    # one all-zero matrix among others: theta 0 for it, never NaN
    theta = combine({"a": Metrics(0.0, 0.0, 0.0), "b": Metrics(2.0, 1.0, 3.0), "c": Metrics(4.0, 1.5, 2.0)})
    assert theta["a"] == 0.0 and theta["b"] > 0 and theta["c"] > 0


@pytest.mark.parametrize("bad,error,text", [
    ({}, ValueError, "at least one matrix"),
    ([Metrics(1, 1, 1)], TypeError, "must be a mapping"),
    ({"a": Metrics(float("nan"), 1, 1)}, ValueError, r"\['a'\]\.trace must be finite"),
    ({"a": Metrics(1, -1, 1)}, ValueError, r"\['a'\]\.topk must be finite and >= 0"),
    ({"a": Metrics(1, 1, float("inf"))}, ValueError, "eff_rank must be finite"),
    ({"a": object()}, TypeError, "trace must be a number"),
])
def test_bad_input(bad, error, text):
    with pytest.raises(error, match=text):
        combine(bad)


def test_bad_options():
    ms = {"a": Metrics(1, 1, 1), "b": Metrics(2, 2, 2)}
    with pytest.raises(ValueError, match="components must be"):
        combine(ms, components="all")
    with pytest.raises(ValueError, match="weighting must be"):
        combine(ms, weighting="cv")

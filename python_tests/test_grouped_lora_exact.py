"""The C++ op's autograd node against stock PEFT's per-layer computation (plain torch F.linear): base-bias gradients
under autocast, second-order gradients (create_graph), version checks of in-place edits, no gradient for a layer whose
output the loss does not use, and PreparedGroup.backward_calls. Each test calls the op (`grouped_lora`) and the
prepared call (`prepare`: the extension's PreparedGroup)."""
import random

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import random_group, rel_err, seeded_keep

from slora_kernels.ops import _grouped_cpu, grouped_lora
from slora_kernels.ops.grouped_lora import GroupLayout, Operands, autocast_dtype, prepare, run_group
from slora_kernels.ops.utils import draw_seed

pytestmark = pytest.mark.skipif(not _grouped_cpu.NATIVE, reason="the compiled extension is not loaded")
PATHS = ["op", "prepared"]
BF16_STEP = torch.finfo(torch.bfloat16).eps


def fused(path, x, weights, biases, lora_a, lora_b, scales, p=0.0, seed=5):
    """The C++ op's outputs, called as `grouped_lora` or through `prepare` (the extension's PreparedGroup; run_group
    when `_grouped_cpu.NATIVE` is patched off; it draws the dropout seed from torch's RNG: seeded with `seed` first,
    see `mask_seed`)."""
    if path == "op":
        return grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=p, seed=seed)
    layout = GroupLayout.of(lora_b, scales, p, autocast_dtype(x))
    call, _ = prepare(layout, Operands(weights, biases, lora_a, lora_b), x)
    torch.manual_seed(seed)
    return call(x)


def mask_seed(path, p, seed):
    """The dropout seed `fused(path, ..., p, seed)` uses."""
    if path == "op" or not p:
        return seed
    torch.manual_seed(seed)
    return draw_seed()


def stock(x, weights, biases, lora_a, lora_b, scales, p=0.0, seed=5):
    """Stock PEFT's LoRA Linear per layer in plain torch (F.linear each, the input cast to the factors' dtype, the
    sum rounded into the base output's dtype), with the dropout mask the fused op draws."""
    outputs = []
    for w, b, a, bb, s in zip(weights, biases, lora_a, lora_b, scales):
        y = F.linear(x, w, b)
        xf = x.to(a.dtype)
        xd = xf * seeded_keep(xf.detach(), p, seed) if p else xf
        outputs.append((y + F.linear(F.linear(xd, a), bb) * s).to(y.dtype))
    return outputs


def group(case, dtype=torch.float64, max_groups=3, max_rank=6):
    return random_group(random.Random(case), dtype, max_groups=max_groups, max_rank=max_rank)


def layers(n, case, dtype=torch.float64):
    """A group of exactly n layers (odd sizes), every layer with a bias."""
    rng = random.Random(case)
    while True:
        x, weights, biases, lora_a, lora_b, scales = random_group(rng, dtype, max_groups=n, max_rank=5, bias=False)
        if len(weights) == n:
            gen = torch.Generator().manual_seed(case)
            biases = [torch.randn(w.shape[0], generator=gen, dtype=dtype) for w in weights]
            return x, weights, biases, lora_a, lora_b, scales


def assert_close_bf16(got, want):
    assert got is not None and want is not None
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.double(), want.double(), rtol=4 * BF16_STEP,
                               atol=4 * BF16_STEP * want.abs().max().item())


# ----------------------------------------------------------------------------- base gradients under autocast


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("train_weights", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_trainable_float32_bias_under_bf16_autocast(path, train_weights, p):
    """PEFT bias="all" / "lora_only" under Trainer(bf16=True) on CPU: float32 biases train (and, here, the weights
    too), autocast copies them into bf16 per call. Their gradients reach them, in float32, as stock's do."""
    x, weights, biases, lora_a, lora_b, scales = layers(3, 41, torch.float32)
    x.requires_grad_(True)
    trained = [*lora_a, *lora_b, *biases] + (weights if train_weights else [])
    results = []
    for run in (lambda *a: fused(path, *a), stock):
        leaves = [t.detach().requires_grad_(t.requires_grad or any(t is u for u in trained))
                  for t in (x, *weights, *biases, *lora_a, *lora_b)]
        xs, ws, bs, la, lb = leaves[0], leaves[1:4], leaves[4:7], leaves[7:10], leaves[10:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys = run(xs, ws, bs, la, lb, scales, p, mask_seed(path, p, 5) if run is stock else 5)
        cotangents = [torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(y.dtype)
                      for i, y in enumerate(ys)]
        results.append([*ys, *torch.autograd.grad(ys, [t for t in leaves if t.requires_grad], cotangents)])
    for got, want in zip(*results):
        assert_close_bf16(got, want)


# ----------------------------------------------------------------------------- second-order gradients


def as_function(path, n, scales, p, seed):
    """f(x, *weights, *biases, *lora_a, *lora_b) -> outputs of n layers, for gradcheck."""
    def f(x, *params):
        ws, bs, la, lb = (list(params[i * n:(i + 1) * n]) for i in range(4))
        return tuple(fused(path, x, ws, bs, la, lb, scales, p, seed))
    return f


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("train_base", [False, True])
def test_gradgradcheck_float64(path, n, p, train_base):
    x, weights, biases, lora_a, lora_b, scales = layers(n, 50 + n)
    for t in (x, *lora_a, *lora_b, *((*weights, *biases) if train_base else ())):
        t.requires_grad_(True)
    inputs = [x, *weights, *biases, *lora_a, *lora_b]
    f = as_function(path, n, scales, p, seed=9)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def penalty_gradients(run, x, weights, biases, lora_a, lora_b, scales, p, seed, trained):
    """A gradient penalty: L = sum_i <y_i, c_i>, then ||dL/dx||^2 differentiated to the trained tensors."""
    ys = run(x, weights, biases, lora_a, lora_b, scales, p, seed)
    cotangents = [torch.randn(y.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(y.dtype)
                  for i, y in enumerate(ys)]
    loss = sum((y * c).sum() for y, c in zip(ys, cotangents))
    (dx,) = torch.autograd.grad(loss, [x], create_graph=True)
    return torch.autograd.grad(dx.pow(2).sum(), trained)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradient_penalty_matches_float64_reference(path, p):
    x, weights, biases, lora_a, lora_b, scales = group(61, max_groups=4, max_rank=9)
    x = x.requires_grad_(True)
    trained = [*lora_a, *lora_b]
    for t in trained:
        t.requires_grad_(True)
    got = penalty_gradients(lambda *a: fused(path, *a), x, weights, biases, lora_a, lora_b, scales, p, 7, trained)
    want = penalty_gradients(stock, x, weights, biases, lora_a, lora_b, scales, p, mask_seed(path, p, 7), trained)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradient_penalty_under_bf16_autocast(path, p):
    """float32 model and factors under bf16 autocast: the penalty's gradients close to stock's under the same
    autocast (each rounds its bf16 GEMMs in its own order: norm-wise within a few bf16 steps)."""
    x, weights, biases, lora_a, lora_b, scales = layers(3, 62, torch.float32)
    x = x.requires_grad_(True)
    trained = [*lora_a, *lora_b]
    for t in trained:
        t.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = penalty_gradients(lambda *a: fused(path, *a), x, weights, biases, lora_a, lora_b, scales, p, 7, trained)
        want = penalty_gradients(stock, x, weights, biases, lora_a, lora_b, scales, p, mask_seed(path, p, 7), trained)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        assert rel_err(g, w) < 4 * BF16_STEP


# ----------------------------------------------------------------------------- version checks


EDITS = [  # (tensor edited in place, x requires grad, the A factors train)
    ("lora_a", True, True), ("lora_a", False, True),
    ("lora_b", True, True), ("lora_b", False, True), ("lora_b", False, False),
    ("weights", True, True), ("weights", False, True),
    ("biases", True, True),
]


def raises_after_edit(run, edited, x_grad, a_grad, autocast, factor_dtype):
    """Whether the backward raises autograd's in-place error after `edited[0]` changed between forward and backward."""
    x, weights, biases, lora_a, lora_b, scales = layers(2, 71, torch.float32)
    lora_a, lora_b = [a.to(factor_dtype) for a in lora_a], [b.to(factor_dtype) for b in lora_b]
    x.requires_grad_(x_grad)
    for t in (*lora_a, *lora_b) if a_grad else lora_b:
        t.requires_grad_(True)
    tensors = {"weights": weights, "biases": biases, "lora_a": lora_a, "lora_b": lora_b}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ys = run(x, weights, biases, lora_a, lora_b, scales)
    with torch.no_grad():
        tensors[edited][0].mul_(2.0)
    try:
        torch.autograd.backward([y.float().sum() for y in ys])
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
        return True
    return False


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("autocast, factor_dtype", [(False, torch.float32), (True, torch.float32),
                                                    (True, torch.bfloat16)],
                         ids=["float32", "autocast-float32-factors", "autocast-bf16-factors"])
@pytest.mark.parametrize("edited, x_grad, a_grad", EDITS, ids=["-".join(map(str, e)) for e in EDITS])
def test_in_place_edit_raises_where_stock_raises(path, autocast, factor_dtype, edited, x_grad, a_grad):
    """F.linear saves its weight only when its input needs a gradient and its input only when the weight does;
    under autocast it saves autocast's copies (an edit of a float32 original does not raise) but a tensor
    already in the autocast dtype itself. The fused node raises exactly where stock does."""
    args = (edited, x_grad, a_grad, autocast, factor_dtype)
    want = raises_after_edit(stock, *args)
    assert raises_after_edit(lambda *a: fused(path, *a), *args) == want
    if edited in ("lora_a", "lora_b") and x_grad and a_grad:  # the point of the test: both cases occur
        assert want == (not autocast or factor_dtype == torch.bfloat16)


# ----------------------------------------------------------------------------- unused outputs


@pytest.fixture(params=["native", "python"])
def body(request, monkeypatch):
    """The C++ op, or the Python autograd Function (`_GroupedLora`, what CPU calls run without the extension)."""
    monkeypatch.setattr(_grouped_cpu, "NATIVE", request.param == "native")
    return request.param


UNUSED_MODES = ["float32", "bf16-autocast", "bf16-base-float32-factors"]
USED = (1, 2)  # the loss reads outputs 1 and 2 of the 3-layer group, not output 0


def cotangent(y, i):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(y.dtype)


def used_output_grads(run, named, scales, p, seed, create_graph, autocast):
    """{name: gradient or None} of L = <y_1, c_1> + <y_2, c_2> to every tensor of `named` that requires grad (None
    where L does not reach it); with create_graph also those of the penalty ||dL/dx||^2, as "penalty-<name>"."""
    leaves = {name: t for name, t in named.items() if t.requires_grad}
    tensors = [[named.get(f"{kind}{i}") for i in range(3)] for kind in ("w", "b", "a", "B")]  # absent bias: None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ys = run(named["x"], *tensors, scales, p, seed)
        grads = torch.autograd.grad([ys[i] for i in USED], list(leaves.values()), [cotangent(ys[i], i) for i in USED],
                                    create_graph=create_graph, allow_unused=True)
        result = dict(zip(leaves, grads))
        if create_graph:
            trained = [name for name in leaves if name != "x"]
            penalty = torch.autograd.grad(result["x"].pow(2).sum(), [leaves[n] for n in trained], allow_unused=True)
            result.update({f"penalty-{n}": g for n, g in zip(trained, penalty)})
    return result


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", UNUSED_MODES)
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
@pytest.mark.parametrize("base", ["frozen", "trains", "trains-no-bias-0", "trains-no-bias-1"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_unused_output_gives_its_layer_no_gradient(body, path, mode, create_graph, base, p):
    """A loss over outputs 1 and 2 of a group (k and v, not q): as with stock PEFT, layer 0's factors (and its
    trainable weight and bias) get no gradient at all (None, not zeros: weight decay and Adam's state tell them
    apart); the other gradients are stock's (float32: a float64 reference; bf16: stock under the same dtypes).
    An absent bias moves the later biases' places among the node's inputs ("no-bias-<i>")."""
    train_base = base != "frozen"
    x, weights, biases, lora_a, lora_b, scales = layers(3, 91, torch.float32)
    if mode == "bf16-base-float32-factors":
        x, weights, biases = x.bfloat16(), [w.bfloat16() for w in weights], [b.bfloat16() for b in biases]
    named = {"x": x, **{f"{kind}{i}": t for kind, ts in zip("wbaB", (weights, biases, lora_a, lora_b))
                        for i, t in enumerate(ts)}}
    if base.startswith("trains-no-bias-"):
        del named["b" + base[-1]]
    for name, t in named.items():
        t.requires_grad_(name[0] in "xaB" or train_base)
    autocast = mode == "bf16-autocast"
    got = used_output_grads(lambda *a: fused(path, *a), named, scales, p, 5, create_graph, autocast)
    ref = named
    if mode == "float32":
        ref = {name: t.detach().double().requires_grad_(t.requires_grad) for name, t in named.items()}
    want = used_output_grads(stock, ref, scales, p, mask_seed(path, p, 5), create_graph, autocast)
    trained = [name for name, t in named.items() if t.requires_grad]
    assert all((got[name] is None) == name.endswith("0") for name in trained)  # layer 0's: None; x's and the rest
    assert [name for name, g in got.items() if g is None] == [name for name, g in want.items() if g is None]
    for name, g in got.items():
        w = want[name]
        if g is None:
            continue
        assert g.dtype == named[name.removeprefix("penalty-")].dtype
        if mode == "float32":
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
        elif name.startswith("penalty-"):  # bf16 GEMMs rounded in other orders: norm-wise (see the penalty test)
            assert rel_err(g.double(), w.double()) < 4 * BF16_STEP
        else:
            assert_close_bf16(g, w)


@pytest.mark.parametrize("call", ["run_group", "prepare"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_unused_output_of_lora_terms_alone(body, call, x_dtype, create_graph):
    """The call without base weights (the LoRA terms alone, a quantized layer's): an unused term's factors get no
    gradient either; the others match float64 (the terms in the float32 factors' dtype, x's gradient in x's)."""
    x, _, _, lora_a, lora_b, scales = layers(3, 92, torch.float32)
    x = x.to(x_dtype).requires_grad_(True)
    for t in (*lora_a, *lora_b):
        t.requires_grad_(True)
    leaves = [x, *lora_a, *lora_b]

    def grads(x, lora_a, lora_b, ys):
        outs = torch.autograd.grad([ys[i] for i in USED], [x, *lora_a, *lora_b], [cotangent(ys[i], i) for i in USED],
                                   create_graph=create_graph, allow_unused=True)
        if create_graph:  # and the penalty's, to the factors
            outs += torch.autograd.grad(outs[0].pow(2).sum(), [*lora_a, *lora_b], allow_unused=True)
        return outs

    layout, operands = GroupLayout.of(lora_b, scales), Operands([], [], lora_a, lora_b)
    ys = run_group(layout, x, operands) if call == "run_group" else prepare(layout, operands, x)[0](x)
    assert all(y.dtype == torch.float32 for y in ys)
    got = grads(x, lora_a, lora_b, ys)
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    want = grads(ref[0], ref[1:4], ref[4:],
                 [s * (ref[0] @ a.T) @ b.T for a, b, s in zip(ref[1:4], ref[4:], scales)])
    assert [g is None for g in got] == [w is None for w in want]
    assert got[1] is None and got[4] is None  # layer 0's A and B
    for k, (g, w, t) in enumerate(zip(got, want, leaves + leaves[1:])):
        if g is not None:
            assert g.dtype == t.dtype
            penalty = k >= len(leaves)  # over x's gradient, in x's dtype
            tol = 4 * BF16_STEP if torch.bfloat16 in (t.dtype, x_dtype if penalty else None) else 1e-4
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * w.abs().max().item())


# ----------------------------------------------------------------------------- backward_calls


def test_backward_calls_counts_backwards_of_the_groups_nodes():
    x, weights, biases, lora_a, lora_b, scales = group(81)
    x.requires_grad_(True)
    for t in (*lora_a, *lora_b):
        t.requires_grad_(True)
    prepared = _grouped_cpu.PreparedGroup(weights, biases, lora_a, lora_b, scales, 0.0, None, False)
    other = _grouped_cpu.PreparedGroup(weights, biases, lora_a, lora_b, scales, 0.0, None, False)
    assert prepared.backward_calls == 0
    ys = prepared(x, 0)
    assert prepared.backward_calls == 0
    torch.autograd.backward([y.sum() for y in ys], retain_graph=True)
    assert prepared.backward_calls == 1
    torch.autograd.backward([y.sum() for y in ys])
    assert prepared.backward_calls == 2
    other_ys = other(x, 0)  # another group's node, and the op's: not counted here
    torch.autograd.backward([y.sum() for y in (*other_ys, *grouped_lora(x, weights, biases, lora_a, lora_b, scales))])
    assert (prepared.backward_calls, other.backward_calls) == (2, 1)
    with torch.no_grad():
        prepared(x, 0)
    assert prepared.backward_calls == 2
    ys = prepared(x, 0)
    (dx,) = torch.autograd.grad(sum(y.sum() for y in ys), [x], create_graph=True)
    assert prepared.backward_calls == 3
    dx.pow(2).sum().backward()  # through the create_graph backward's own ops, not the node
    assert prepared.backward_calls == 3
    with pytest.raises(AttributeError):
        prepared.backward_calls = 0

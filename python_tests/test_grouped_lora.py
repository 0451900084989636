"""grouped_lora on CPU: float64 references, gradcheck, dropout, bad input, torch.compile.

Every eager test runs twice: on the extension's C++ op (what CPU calls take) and on the pure-Python op
(the fallback without the extension, and the bodies of the compile path)."""
import random

import pytest
import torch
from lora_helpers import assert_mixed_dtype_group_matches_float64, random_group, reference, seeded_keep

from slora_kernels.ops import _grouped_cpu, grouped_lora
from slora_kernels.ops.grouped_lora import GroupLayout, Operands, prepare, run_group


@pytest.fixture(autouse=True, params=["native", "python"])
def cpu_op(request, monkeypatch):
    """The C++ op (skipped without the extension) or the pure-Python op."""
    if request.param == "native" and not _grouped_cpu.NATIVE:
        pytest.skip("the compiled extension is not loaded")
    monkeypatch.setattr(_grouped_cpu, "NATIVE", request.param == "native")
    return request.param


@pytest.mark.parametrize("case", range(12))
def test_forward_matches_float64_reference(case):
    rng = random.Random(case)
    dtype = torch.float64 if case % 2 else torch.float32
    group = random_group(rng, dtype)
    outputs = grouped_lora(*group)
    expected = reference(*group)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert len(outputs) == len(expected)
    for y, e, w in zip(outputs, expected, group[1]):
        assert y.dtype == dtype and y.shape == (*group[0].shape[:-1], w.shape[0])
        torch.testing.assert_close(y.double(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", range(8))
def test_gradients_match_float64_reference(case):
    rng = random.Random(100 + case)
    p = 0.3 if case % 2 else 0.0
    x, weights, biases, lora_a, lora_b, scales = random_group(rng)
    leaves = [x, *weights, *[b for b in biases if b is not None], *lora_a, *lora_b]
    for t in leaves:
        t.requires_grad_(True)
    keep = seeded_keep(x, p, 7) if p else None
    ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=p, seed=7)
    refs = reference(x, weights, biases, lora_a, lora_b, scales, keep)
    cotangents = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, leaves, cotangents)
    want = torch.autograd.grad(refs, leaves, cotangents)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(4))
def test_half_base_with_float32_factors_matches_float64_reference(base_dtype, case):
    assert_mixed_dtype_group_matches_float64(random.Random(400 + case), base_dtype, dropout_p=0.2 * (case % 2))


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_every_input_like_f_linear(autocast_dtype):
    """Under autocast the op computes what the op computes on inputs cast to the autocast dtype (float32 base
    weights there: the stacked form, whose roundings differ by at most a couple of half-precision steps), and
    its gradients reach the float32 leaves in float32, as autocast's F.linear does."""
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(11), torch.float32)
    leaves = [x, *lora_a, *lora_b]
    for t in leaves:
        t.requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype):
        ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=0.1, seed=2)

    def cast(ts):
        return [None if t is None else t.detach().to(autocast_dtype) for t in ts]

    expected = grouped_lora(cast([x])[0], cast(weights), cast(biases), cast(lora_a), cast(lora_b), scales,
                            dropout_p=0.1, seed=2)
    step = torch.finfo(autocast_dtype).eps
    for y, e in zip(ys, expected):
        assert y.dtype == autocast_dtype
        torch.testing.assert_close(y.double(), e.double(), rtol=2 * step, atol=2 * step * e.abs().max().item())
    grads = torch.autograd.grad([y.float().sum() for y in ys], leaves)
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(6))
def test_autocast_over_float32_weights_matches_float64_reference(cpu_op, autocast_dtype, case):
    """Trainer(bf16=True) over a float32 model: every input is rounded to the autocast dtype, then the op computes
    (the C++ op in its stacked form: [W; A] and a block-diagonal B). Outputs and every gradient - x, the factors,
    and the base weights and biases where they train - against float64 on the rounded inputs."""
    rng = random.Random(500 + case)
    p = 0.3 if case % 2 else 0.0
    x, weights, biases, lora_a, lora_b, scales = random_group(rng, torch.float32, max_groups=4, max_rank=20)
    leaves = [x, *lora_a, *lora_b]
    if case >= 4:  # the base trains too
        leaves += [*weights, *[b for b in biases if b is not None]]
    for t in leaves:
        t.requires_grad_(True)
    packed = []
    with torch.autocast("cpu", dtype=autocast_dtype), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=p, seed=3)
    if cpu_op == "native":  # the stacked form is what the backward keeps
        rows = sum(w.shape[0] for w in weights) + sum(a.shape[0] for a in lora_a)
        assert any(t.shape == (rows, x.shape[-1]) for t in packed)

    def rounded(t):
        return t.detach().to(autocast_dtype).double().requires_grad_(t.requires_grad)

    ref_leaves = {id(t): rounded(t) for t in [x, *weights, *[b for b in biases if b is not None], *lora_a, *lora_b]}
    keep = seeded_keep(x.to(autocast_dtype).float(), p, 3) if p else None
    refs = reference(ref_leaves[id(x)], [ref_leaves[id(w)] for w in weights],
                     [None if b is None else ref_leaves[id(b)] for b in biases],
                     [ref_leaves[id(a)] for a in lora_a], [ref_leaves[id(b)] for b in lora_b], scales, keep)
    tol = 4 * torch.finfo(autocast_dtype).eps
    for y, r in zip(ys, refs):
        assert y.dtype == autocast_dtype
        torch.testing.assert_close(y.double(), r, rtol=tol, atol=tol * r.abs().max().item())
    cotangents = [torch.randn(y.shape, dtype=torch.float64).to(autocast_dtype) for y in ys]
    got = torch.autograd.grad(ys, leaves, cotangents)
    want = torch.autograd.grad(refs, [ref_leaves[id(t)] for t in leaves], [c.double() for c in cotangents])
    for leaf, g, w in zip(leaves, got, want):
        assert g.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * w.abs().max().item())


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_prepared_call_is_the_op_with_its_arguments_fixed(cpu_op, p):
    """What the fused modules call (`prepare`: on the C++ path the extension's PreparedGroup, which takes x alone):
    the op's outputs and gradients under grad mode, no_grad and inference_mode, recorded by the profiler under
    the op's name."""
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(31), torch.float64)
    for t in (x, *lora_a, *lora_b):
        t.requires_grad_(True)
    layout = GroupLayout.of(lora_b, scales, p)
    call, _ = prepare(layout, Operands(weights, biases, lora_a, lora_b), x)
    torch.manual_seed(0)  # the dropout seed is drawn from torch's RNG per call, as run_group draws it
    with torch.profiler.profile() as profile:
        got = call(x)
    torch.manual_seed(0)
    want = run_group(layout, x, Operands(weights, biases, lora_a, lora_b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if cpu_op == "native":
        assert "slora::grouped_lora_cpu" in {event.key for event in profile.key_averages()}
    cotangents = [torch.randn_like(y) for y in got]
    leaves = [x, *lora_a, *lora_b]
    for g, w in zip(torch.autograd.grad(got, leaves, cotangents), torch.autograd.grad(want, leaves, cotangents)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.manual_seed(0)
            outputs = call(x)
        assert all(not y.requires_grad for y in outputs)
        for g, w in zip(outputs, want):
            torch.testing.assert_close(g, w.detach(), rtol=0, atol=0)


def test_eager_calls_run_one_autograd_node_under_autocast_too():
    """Eager calls run the op bodies in one light autograd.Function node, under autocast too (the factors' and
    weights' casts happen inside it): no custom-op wrapping, no view nodes around it, each of which would cost
    host time on every layer of every step. Under autocast a float32 x's cast is the one recorded node before
    it, so the x the node saves stays connected to x's graph (second-order gradients need it)."""
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(12), torch.float32)
    x = x.reshape(2, -1, x.shape[-1]).requires_grad_(True)  # leading dims folded inside the op
    for t in lora_a:
        t.requires_grad_(True)
    (eager, *_) = grouped_lora(x, weights, biases, lora_a, lora_b, scales)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (cast, *_) = grouped_lora(x, weights, biases, lora_a, lora_b, scales)
    for y, recorded_cast in ((eager, False), (cast, True)):
        assert "GroupedLora" in y.grad_fn.name()  # the C++ op's node, or the Python Function's without it
        (x_node, _), *factor_edges = y.grad_fn.next_functions
        if recorded_cast:
            assert x_node.name() == "ToCopyBackward0"
            x_node = x_node.next_functions[0][0]
        assert x_node.variable is x
        assert {type(f).__name__ for f, _ in factor_edges if f is not None} == {"AccumulateGrad"}
    assert eager.shape[:-1] == cast.shape[:-1] == x.shape[:-1] and not eager._is_view()


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_float64(p):
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(5), max_groups=3, max_rank=5)
    groups = len(weights)
    bias_slots = [i for i, b in enumerate(biases) if b is not None]
    inputs = [t.requires_grad_(True) for t in [x, *weights, *[biases[i] for i in bias_slots], *lora_a, *lora_b]]

    def f(x, *params):
        ws, rest = list(params[:groups]), params[groups:]
        bs = [None] * groups
        for slot, b in zip(bias_slots, rest):
            bs[slot] = b
        rest = rest[len(bias_slots):]
        return tuple(grouped_lora(x, ws, bs, list(rest[:groups]), list(rest[groups:]), scales, dropout_p=p, seed=3))

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_frozen_base_gets_no_gradient():
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(9))
    for t in [*lora_a, *lora_b]:
        t.requires_grad_(True)
    sum(y.sum() for y in grouped_lora(x, weights, biases, lora_a, lora_b, scales)).backward()
    assert all(w.grad is None for w in weights)
    assert all(a.grad is not None and b.grad is not None for a, b in zip(lora_a, lora_b))


def test_dropout_same_seed_same_mask_and_peft_semantics():
    p, d = 0.3, 64
    x = torch.ones(50, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    # W = 0, A = B = I, scale 1: the output is drop(x) itself.
    args = (x, [torch.zeros(d, d, dtype=torch.float64)], [None], [eye], [eye], [1.0])
    first = grouped_lora(*args, dropout_p=p, seed=11)[0]
    assert torch.equal(first, grouped_lora(*args, dropout_p=p, seed=11)[0])
    assert not torch.equal(first, grouped_lora(*args, dropout_p=p, seed=12)[0])
    assert torch.equal(first, seeded_keep(x, p, 11))
    values = set(first.unique().tolist())
    assert values <= {0.0, 1.0 / (1.0 - p)}  # nn.Dropout: zero or scaled by 1/(1-p)
    assert abs((first == 0).double().mean().item() - p) < 0.03
    torch.manual_seed(0)
    unseeded = grouped_lora(*args, dropout_p=p)[0]
    torch.manual_seed(0)
    assert torch.equal(unseeded, grouped_lora(*args, dropout_p=p)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equal_scales_biases_and_a_strided_input(dtype):
    """Uniform LoRA's case (every layer the same scale, layers with and without biases), on an input that is
    a transposed view: outputs and every gradient against float64."""
    x, weights, _, lora_a, lora_b, _ = random_group(random.Random(21), dtype, max_groups=4, max_rank=9)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not x.is_contiguous() or x.dim() < 3 or x.shape[0] == 1
    gen = torch.Generator().manual_seed(3)
    biases = [torch.randn(w.shape[0], generator=gen, dtype=torch.float64).to(dtype) if i % 2 else None
              for i, w in enumerate(weights)]
    scales = [0.75] * len(weights)
    leaves = [x, *[b for b in biases if b is not None], *lora_a, *lora_b]
    for t in leaves:
        t.requires_grad_(True)
    ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales)
    refs = reference(x, weights, biases, lora_a, lora_b, scales)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y.double(), r, rtol=tol, atol=tol)
    cotangents = [torch.randn(y.shape, dtype=torch.float64, generator=gen) for y in ys]
    got = torch.autograd.grad(ys, leaves, [c.to(dtype) for c in cotangents])
    for g, w in zip(got, torch.autograd.grad(refs, leaves, cotangents)):
        torch.testing.assert_close(g.double(), w.double(), rtol=tol * 10, atol=tol * 10)


def test_outputs_can_be_modified_in_place():
    """Outputs are tensors of their own, not views of the op's buffers: a model may modify them in place (an
    autograd node's view outputs could not be), and gradients still follow."""
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(22))
    x = x.reshape(1, -1, x.shape[-1]).requires_grad_(True)
    ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales)
    refs = reference(x, weights, biases, lora_a, lora_b, scales)
    for y in ys:
        assert not y._is_view()
        y.mul_(3.0)
    (dx,) = torch.autograd.grad(sum(y.sum() for y in ys), [x])
    (want,) = torch.autograd.grad(sum(3.0 * r.sum() for r in refs), [x])
    torch.testing.assert_close(dx, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode_give_the_same_outputs(mode):
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(23))
    want = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=0.2, seed=8)
    with getattr(torch, mode)():
        got = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=0.2, seed=8)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_saved_tensor_hooks_see_the_activations():
    """x and S go through autograd's saved tensors, so checkpointing and offloading hooks reach them (and the
    memory the benchmark counts is what the op keeps)."""
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(24), max_groups=3)
    x.requires_grad_(True)
    for t in lora_a:
        t.requires_grad_(True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales)
    flat = x.reshape(-1, x.shape[-1])
    assert any(t.data_ptr() == flat.data_ptr() for t in packed)
    assert any(t.shape == (flat.shape[0], sum(a.shape[0] for a in lora_a)) for t in packed)  # S
    assert all(g is not None for g in torch.autograd.grad(sum(y.sum() for y in ys), [x, *lora_a]))


class GroupedModule(torch.nn.Module):
    def __init__(self, d_in, d_outs, ranks):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.randn(d, d_in) for d in d_outs)
        self.lora_a = torch.nn.ParameterList(torch.randn(r, d_in) for r in ranks)
        self.lora_b = torch.nn.ParameterList(torch.randn(d, r) for d, r in zip(d_outs, ranks))

    def forward(self, x):
        outputs = grouped_lora(x, list(self.weights), [None] * len(self.weights), list(self.lora_a), list(self.lora_b),
                               [0.5] * len(self.weights), dropout_p=0.1, seed=4)
        return sum(y.sum() for y in outputs)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    module = GroupedModule(13, [5, 9, 3], [2, 7, 1])
    x = torch.randn(2, 6, 13)
    eager = module(x)
    eager_grads = torch.autograd.grad(eager, list(module.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out, list(module.parameters()))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_opcheck():
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(3), max_groups=3, max_rank=6)
    x2 = x.reshape(-1, x.shape[-1]).requires_grad_(True)
    args = (x2, weights, biases, [a.requires_grad_(True) for a in lora_a],
            [b.requires_grad_(True) for b in lora_b], scales, 0.2, 5)
    torch.library.opcheck(torch.ops.slora.grouped_lora_forward, args)


def good_args():
    x, weights, biases, lora_a, lora_b, scales = random_group(random.Random(1), max_groups=2, max_rank=3)
    return {"x": x, "weights": weights, "biases": biases, "lora_a": lora_a, "lora_b": lora_b, "scales": scales}


BAD = [
    ("x", lambda a: a.update(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("x dtype", lambda a: a.update(x=a["x"].long()), TypeError, "x must have dtype"),
    ("weights list", lambda a: a.update(weights=a["weights"][0]), TypeError, "weights must be a list"),
    ("empty", lambda a: a.update(weights=[], biases=[], lora_a=[], lora_b=[], scales=[]), ValueError, "at least one"),
    ("lengths", lambda a: a.update(scales=a["scales"] + [1.0]), ValueError, "scales must have one entry per layer"),
    ("d_in", lambda a: a["weights"].__setitem__(0, a["weights"][0][:, :-1]), ValueError, r"weights\[0\] must be"),
    # factors may have a dtype of their own (float32 under a bf16 base), but one for all of them
    ("dtype", lambda a: a["lora_a"].__setitem__(0, a["lora_a"][0].float()), TypeError,
     r"lora_b\[0\] has dtype torch.float64, expected torch.float32 like lora_a\[0\]"),
    ("weight dtype", lambda a: a["weights"].__setitem__(0, a["weights"][0].float()), TypeError,
     r"weights\[0\] has dtype torch.float32, expected torch.float64 like x"),
    ("rank 0", lambda a: a["lora_a"].__setitem__(0, a["lora_a"][0][:0]), ValueError, "rank >= 1"),
    ("lora_b", lambda a: a["lora_b"].__setitem__(0, a["lora_b"][0].T), ValueError, r"lora_b\[0\] must be"),
    ("bias", lambda a: a["biases"].__setitem__(0, torch.zeros(1000, dtype=torch.float64)), ValueError,
     r"biases\[0\] must be"),
    ("scale", lambda a: a["scales"].__setitem__(0, "1"), TypeError, r"scales\[0\] must be a float"),
    ("scale nan", lambda a: a["scales"].__setitem__(0, float("nan")), ValueError, "finite"),
    ("dropout", lambda a: a.update(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout neg", lambda a: a.update(dropout_p=-0.1), ValueError, "dropout_p"),
    ("seed", lambda a: a.update(seed=1.5), TypeError, "seed must be an int"),
]


@pytest.mark.parametrize("name, mutate, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, mutate, error, message):
    args = good_args()
    mutate(args)
    with pytest.raises(error, match=message):
        grouped_lora(**args)

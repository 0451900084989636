"""A fused model is a drop-in for stock PEFT: under the PyTorch / PEFT mechanisms users apply to a model (autocast
with trainable biases, second-order gradients, hooks, writes through .data, hotswapped adapters, parametrizations,
in-place edits, threads, copies and pickling, gradient checkpointing, torch.func, dtype conversion by swapping,
shared-input corner cases, dropout 1) it computes what stock PEFT computes, or falls back to PEFT's forward and
says so in fusion_stats.

Each test builds the same tiny LoRA model twice (stock and fused; a float64 copy too in low precision), applies the
mechanism to each, and compares outputs and gradients (drop_in_helpers.assert_like_stock). Core items run on both
bodies of the fused op: "cpp" (the C++ CPU op) and "triton" (the CUDA body, run on CPU tensors by Triton's
interpreter). SLORA_DROP_IN_SELF_CHECK=1 runs every test with stock PEFT on both sides (a check of the tests).
"""
import copy
import io
import os
import random
import sys
import threading

import pytest
import torch
from drop_in_helpers import (BART_TARGETS, FP32_TOL, Copies, assert_fell_back, assert_fused_calls,
                             assert_like_stock, build, forward_backward, forward_only, lora_config, lora_grads,
                             lora_layers, loss_of, rel_err, run, spawn_child, stats, tiny_bart, tiny_llama,
                             token_batch)
from torch import nn

from slora_kernels.ops import utils

pytestmark = pytest.mark.usefixtures("one_thread")

PRECISIONS = ["fp32", "bf16"]
BASE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(params=["cpp", "triton"])
def body(request, monkeypatch):
    """The fused op's C++ CPU body, or its CUDA body (Triton kernels run by the interpreter on CPU tensors)."""
    if request.param == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton body on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1)")
        monkeypatch.setattr(utils, "triton_path", lambda x: True)
    return request.param


def skip_bf16_kernels_in_interpreter(body):
    """Triton 3.9's interpreter loads and stores bf16 tensors wrongly (a kernel storing x * 2 + w in bf16 gives NaN,
    tl.dot of bf16 tiles ~1e10 off; grouped_lora itself on all-bf16 operands ~1e9 off): where the op's operands are
    bf16 (autocast casts them) the interpreter cannot stand in for a GPU. (A bf16 base with PEFT's float32 factors
    matches stock within bf16 rounding on the interpreter, so those runs stay.)"""
    if body == "triton":
        pytest.skip("Triton's interpreter computes bf16 kernels wrongly (CPU autocast on the Triton body)")


def attention(model, layer=0):
    return model.get_base_model().model.layers[layer].self_attn


def hidden(seed=3, shape=(2, 5, 32)):
    """A random activation like the q/k/v input (float64: convert with in_dtype)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def in_dtype(model, t):
    """t in the dtype of model's base weights (float64 for the float64 copy)."""
    return t.to(model.get_input_embeddings().weight.dtype)


# 1. autocast with trainable base biases ------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast bf16", "fp32"])
def test_autocast_trainable_base_biases_get_stock_gradients(body, autocast, bias):
    """torch.autocast("cpu", bf16) over a float32 Qwen2 whose q/k/v biases train (LoraConfig bias=...): the
    biases' gradients (and the LoRA ones) are stock PEFT's, not None."""
    if autocast:
        skip_bf16_kernels_in_interpreter(body)
    inputs = token_batch()
    copies = build("autocast" if autocast else "fp32", make=lambda: tiny_llama("qwen2"), bias=bias, inputs=inputs)

    def scenario(model):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and model is not copies.exact):
            logits = model(**inputs).logits
        loss_of(logits).backward()
        return {"logits": logits.detach(), **lora_grads(model, ("lora_", "bias"))}

    results = run(copies, scenario)
    bias_grads = [g for n, g in results["stock"].items() if n.endswith("bias")]
    assert len(bias_grads) == 6 and all(g is not None for g in bias_grads)  # q/k/v of 2 layers
    assert_like_stock(results, "autocast" if autocast else "fp32")


# 2. second-order gradients --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_penalty_double_backward(body, precision, dropout):
    """loss + ||d loss / d inputs_embeds||^2 (autograd.grad with create_graph=True, then backward), training mode,
    with and without LoRA dropout (the stock copy draws the fused op's masks)."""
    inputs = token_batch()
    copies = build(precision, dropout=dropout, inputs=inputs)

    def scenario(model):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        loss = loss_of(logits)
        (d_embeds,) = torch.autograd.grad(loss, embeds, create_graph=True)
        (loss + d_embeds.double().pow(2).sum()).backward()
        return {"logits": logits.detach(), "d_embeds": d_embeds.detach(), **lora_grads(model)}

    assert_like_stock(run(copies, scenario), precision)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_hessian_vector_product_of_lora_parameters(body, precision, dropout):
    """A Hessian-vector product w.r.t. the LoRA parameters: torch.autograd.grad twice (create_graph=True)."""
    inputs = token_batch()
    copies = build(precision, dropout=dropout, inputs=inputs)

    def scenario(model):
        torch.manual_seed(0)
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if "lora_" in n])
        grads = torch.autograd.grad(loss_of(model(**inputs).logits), params, create_graph=True)
        gen = torch.Generator().manual_seed(5)
        vectors = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors)), params)
        return {**{f"grad {n}": g.detach() for n, g in zip(names, grads)},
                **{f"hvp {n}": h for n, h in zip(names, hvp)}}

    results = run(copies, scenario)
    assert any(h.abs().sum() > 0 for n, h in results["stock"].items() if n.startswith("hvp"))
    assert_like_stock(results, precision)


# 3. hooks -------------------------------------------------------------------------------------------------------

HOOKS = ["global forward hook on lora_B", "forward hook on lora_dropout", "full backward hook on lora_B",
         "backward pre-hook on base_layer"]


def install_hook(model, kind, log):
    """Registers hook `kind` on model, appending to log on every call; returns the handles."""
    if kind == "global forward hook on lora_B":
        lora_b = {id(layer.lora_B["default"]) for layer in lora_layers(model, "proj")}

        def scale_lora_b(module, args, output):
            if id(module) in lora_b:
                log.append(output.detach().double().norm().item())
                return output * 1.5
            return None

        return [nn.modules.module.register_module_forward_hook(scale_lora_b)]
    if kind == "forward hook on lora_dropout":
        def halve(module, args, output):
            log.append(output.detach().double().norm().item())
            return output * 0.5

        return [layer.lora_dropout["default"].register_forward_hook(halve)
                for suffix in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.1.mlp.gate_proj")
                for layer in lora_layers(model, suffix)]
    if kind == "full backward hook on lora_B":
        def double_grad_input(module, grad_input, grad_output):
            log.append(grad_output[0].double().norm().item())
            return (grad_input[0] * 2.0,)

        return [layer.lora_B["default"].register_full_backward_hook(double_grad_input)
                for suffix in ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.up_proj")
                for layer in lora_layers(model, suffix)]
    if kind == "backward pre-hook on base_layer":
        def halve_grad_output(module, grad_output):
            log.append(grad_output[0].double().norm().item())
            return (grad_output[0] * 0.5,)

        return [layer.base_layer.register_full_backward_pre_hook(halve_grad_output)
                for suffix in ("layers.1.self_attn.k_proj", "layers.0.mlp.down_proj", "layers.1.mlp.gate_proj")
                for layer in lora_layers(model, suffix)]
    raise ValueError(kind)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_hooks_run_as_in_stock(body, precision, hook):
    """Forward hooks (global, and on a lora_dropout module) changing outputs, a full backward hook on lora_B and a
    backward pre-hook on a base layer changing gradients: outputs, gradients and the hooks' calls are stock's, and
    the fused model counts the calls it left to PEFT under "hooks"."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    logs = {}

    def scenario(model):
        log = logs.setdefault(id(model), [])
        handles = install_hook(model, hook, log)
        try:
            return forward_backward(model, inputs)
        finally:
            for handle in handles:
                handle.remove()

    results = run(copies, scenario)
    stock_log, fused_log = logs[id(copies.stock)], logs[id(copies.fused)]
    assert len(stock_log) > 0
    assert len(fused_log) == len(stock_log), f"hook calls: fused {len(fused_log)}, stock {len(stock_log)}"
    tol = 1e-5 if precision == "fp32" else 5e-2
    torch.testing.assert_close(torch.tensor(fused_log), torch.tensor(stock_log), rtol=tol, atol=0)
    assert_like_stock(results, precision)
    assert_fell_back(copies.fused, "hooks")


# 4. writes no version counter sees ------------------------------------------------------------------------------

WRITES = ["base weight .data", "factor .data", "vector_to_parameters"]


def write_targets(model, write):
    """The tensors a write changes: frozen base weights (k_proj of layer 0, up_proj of layer 1) or factors."""
    k, up = lora_layers(model, "layers.0.self_attn.k_proj")[0], lora_layers(model, "layers.1.mlp.up_proj")[0]
    if write == "factor .data":
        return [k.lora_A["default"].weight, up.lora_B["default"].weight]
    return [k.base_layer.weight, up.base_layer.weight]


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_writes_no_version_counter_sees(body, precision, write):
    """`param.data.mul_(3)` between two forwards, and torch.nn.utils.vector_to_parameters (the parameters then alias
    the vector) followed by in-place writes to the vector: each forward after a write is stock's."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    vectors = {}
    if write == "vector_to_parameters":
        for key, model in copies.items():
            params = write_targets(model, write)
            vectors[key] = torch.nn.utils.parameters_to_vector(params)
            torch.nn.utils.vector_to_parameters(vectors[key], params)

    def step(model, seed):
        return {**forward_backward(model, inputs, seed), "no_grad": forward_only(model, inputs, seed)["logits"]}

    for round_ in range(3):
        assert_like_stock(run(copies, step, round_), precision)
        for key, model in copies.items():
            if write == "vector_to_parameters":
                vectors[key].mul_(3.0 if round_ % 2 == 0 else -0.5)
            else:
                for t in write_targets(model, write):
                    t.data.mul_(3.0 if round_ % 2 == 0 else -0.5)


# 5. tensor-valued scaling (PEFT hotswap) ------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_hotswapped_adapter_with_tensor_scaling(body, precision):
    """peft.utils.hotswap: prepare_model_for_compiled_hotswap (scalings become tensors, ranks padded to 8), then
    hotswap_adapter_from_state_dict twice with new weights and other alphas (the tensors filled in place)."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap

    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    shapes = {n: p.shape for n, p in copies.stock.named_parameters() if "lora_" in n}
    assert_like_stock(run(copies, forward_backward, inputs), precision)
    for model in (m for _, m in copies.items()):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert_like_stock(run(copies, forward_backward, inputs), precision)
    previous = forward_only(copies.stock, inputs)["logits"]
    for swap, (alpha, v_alpha) in enumerate([(16, 4), (3, 24)]):
        gen = torch.Generator().manual_seed(10 + swap)
        state_dict = {n: torch.randn(shape, generator=gen) * 0.2 for n, shape in shapes.items()}
        config = lora_config(lora_alpha=alpha, alpha_pattern={"v_proj": v_alpha})
        for _, model in copies.items():
            hotswap_adapter_from_state_dict(model, {n: t.clone() for n, t in state_dict.items()},
                                            adapter_name="default", config=config)
        swapped = forward_only(copies.stock, inputs)["logits"]
        assert rel_err(swapped, previous) > 0.05  # the swap changed stock's outputs
        previous = swapped
        assert_like_stock(run(copies, forward_backward, inputs), precision)
    s = stats(copies.fused)
    assert s is None or set(s.fallback) <= {"scaling"}, str(s)


# 6. parametrized factors ----------------------------------------------------------------------------------------

class Scale(nn.Module):
    """A parametrization W -> factor * W, its factor a buffer changed between calls."""

    def __init__(self):
        super().__init__()
        self.register_buffer("factor", torch.tensor(1.5))

    def forward(self, weight):
        return weight * self.factor


@pytest.mark.parametrize("precision", PRECISIONS)
def test_parametrized_factor(body, precision):
    """torch.nn.utils.parametrize.register_parametrization on lora_B of k_proj and lora_A of gate_proj: a change
    of the parametrization's state between forwards, then two training steps (backward, SGD step) through it;
    the fused model falls back under "parametrized"."""
    from torch.nn.utils import parametrize

    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    scales = {}
    for key, model in copies.items():
        scales[key] = [Scale(), Scale()]
        parametrize.register_parametrization(lora_layers(model, "layers.0.self_attn.k_proj")[0].lora_B["default"],
                                             "weight", scales[key][0])
        parametrize.register_parametrization(lora_layers(model, "layers.1.mlp.gate_proj")[0].lora_A["default"],
                                             "weight", scales[key][1])
    assert_like_stock(run(copies, forward_backward, inputs), precision)
    for key, _ in copies.items():
        scales[key][0].factor.fill_(-0.5)
        scales[key][1].factor.fill_(3.0)
    results = run(copies, forward_backward, inputs)
    assert any("original" in n for n in results["stock"])
    assert_like_stock(results, precision)
    optimizers = {key: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
                  for key, model in copies.items()}
    for step in range(2):
        assert_like_stock(run(copies, forward_backward, inputs, step), precision)
        for optimizer in optimizers.values():
            optimizer.step()
    assert_like_stock(run(copies, forward_backward, inputs), precision)
    assert_fell_back(copies.fused, "parametrized")


# 7. in-place edits ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["layers.0.self_attn.q_proj lora_B", "layers.1.self_attn.k_proj lora_A",
                                   "layers.0.mlp.up_proj lora_A"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_factor_edited_in_place_before_backward_raises(body, precision, where):
    """A factor modified in place (torch.no_grad(): w.mul_(2)) between forward and backward: stock's backward
    raises autograd's version-counter RuntimeError; the fused model's must too, not use the new values."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    layer, factor = where.split()
    for model in (copies.stock, copies.fused):
        loss = loss_of(model(**inputs).logits)
        with torch.no_grad():
            getattr(lora_layers(model, layer)[0], factor)["default"].weight.mul_(2.0)
        with pytest.raises(RuntimeError, match=r"in-?place"):
            loss.backward()


@pytest.mark.parametrize("write", ["shared input .data", "group-mate weight .data"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_data_write_between_group_members(body, precision, write):
    """A forward hook on q_proj's LoRA layer writing through .data between the calls of q and k/v (which read the
    same input): to that input, or to k_proj's base weight. k and v then see the new values, as in stock."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    for _, model in copies.items():
        attn = attention(model)

        def hook(module, args, output, attn=attn):
            if write == "shared input .data":
                args[0].data.mul_(2.0)
            else:
                attn.k_proj.base_layer.weight.data.mul_(-1.0)

        attn.q_proj.register_forward_hook(hook)
    for seed in range(2):
        assert_like_stock(run(copies, forward_backward, inputs, seed), precision)
        assert_like_stock(run(copies, forward_only, inputs, seed), precision)


# 8. threads ------------------------------------------------------------------------------------------------------

THREADS, MODEL_CALLS, LAYER_CALLS = 8, 200, 500  # calls per thread


def hammer(work, threads=THREADS):
    """Runs work(thread_index) in `threads` threads at once with a 1 us switch interval; returns the errors."""
    errors, barrier = [], threading.Barrier(threads)

    def target(t):
        try:
            barrier.wait()
            work(t)
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            errors.append(f"thread {t}: {type(error).__name__}: {error}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=target, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


def test_threads_calling_the_model():
    """8 threads, 200 no-grad eval calls each of one fused model, each thread on its own input: every output is
    stock's output for that input."""
    copies = build("fp32")
    inputs = [token_batch(seed=100 + t) for t in range(THREADS)]
    for model in (copies.stock, copies.fused):
        model.eval()
    with torch.no_grad():
        want = [copies.stock(**x).logits for x in inputs]
        copies.fused(**inputs[0])
    wrong = []

    def work(t):
        with torch.no_grad():
            for _ in range(MODEL_CALLS):
                err = rel_err(copies.fused(**inputs[t]).logits, want[t])
                if err > FP32_TOL:
                    wrong.append(err)

    errors = hammer(work)
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} of {THREADS * MODEL_CALLS} outputs wrong (relative errors {wrong[:5]})"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_threads_calling_qkv_directly(precision, grad):
    """8 threads each calling the attention's q, k and v LoRA layers 500 times on a thread-distinct input (the
    group's shared-input path): every output is stock's (bf16: within bf16 rounding; another thread's output
    would be ~100% off)."""
    copies = build(precision)
    stock, fused = attention(copies.stock), attention(copies.fused)
    xs = [hidden(seed=200 + t).to(BASE_DTYPE[precision]) for t in range(THREADS)]
    with torch.no_grad():
        want = [[layer(x) for layer in (stock.q_proj, stock.k_proj, stock.v_proj)] for x in xs]
    tol = FP32_TOL if precision == "fp32" else 2e-2
    wrong = []

    def work(t):
        with torch.set_grad_enabled(grad):
            for _ in range(LAYER_CALLS):
                x = xs[t]
                got = [fused.q_proj(x), fused.k_proj(x), fused.v_proj(x)]
                for g, w in zip(got, want[t]):
                    err = rel_err(g.detach(), w)
                    if err > tol:
                        wrong.append(err)

    errors = hammer(work)
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} of {3 * THREADS * LAYER_CALLS} outputs wrong (relative errors {wrong[:5]})"


# 9. copies: deepcopy, torch.save / load, a spawned process ------------------------------------------------------

def clone(model, how, tmp_path):
    if how == "deepcopy":
        return copy.deepcopy(model)
    path = tmp_path / f"model-{id(model)}.pt"
    torch.save(model, path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_copied_fused_model(body, precision, how, tmp_path):
    """copy.deepcopy / torch.save + torch.load of a model after a forward and backward: the copy gives the
    original's (and stock's) outputs and gradients, trains on its own (a step changes its LoRA weights, not the
    original's), and is still fused (its calls are counted as its own, not in the original's stats)."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    first = run(copies, forward_backward, inputs)
    assert_like_stock(first, precision)
    clones = Copies(*(None if m is None else clone(m, how, tmp_path) for m in (copies.stock, copies.fused,
                                                                               copies.exact)), precision)
    original_stats = stats(copies.fused)
    results = run(clones, forward_backward, inputs)
    assert_like_stock(results, precision)
    assert rel_err(results["fused"]["logits"], first["fused"]["logits"]) <= 1e-6
    assert_fused_calls(clones.fused)
    if original_stats is not None:
        assert stats(copies.fused) == original_stats  # the copy's calls are its own
    before = {n: p.detach().clone() for n, p in copies.fused.named_parameters() if "lora_" in n}
    for _, model in clones.items():
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    after_step = {n: p.detach() for n, p in clones.fused.named_parameters() if "lora_" in n}
    assert all(not torch.equal(after_step[n], before[n]) for n in before)
    assert all(torch.equal(p, before[n]) for n, p in copies.fused.named_parameters() if "lora_" in n)
    assert_like_stock(run(clones, forward_backward, inputs), precision)
    assert_like_stock(run(copies, forward_backward, inputs), precision)


def test_fused_model_in_a_spawned_process():
    """torch.multiprocessing spawn: a fused model (after a forward and backward) passed to a child process gives
    stock's outputs and gradients there, fused; and still does in the parent afterwards."""
    inputs = token_batch()
    copies = build("fp32", inputs=inputs)
    assert_like_stock(run(copies, forward_backward, inputs))
    with torch.no_grad():
        want_no_grad = copies.stock(**inputs).logits
    want = forward_backward(copies.stock, inputs)
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=spawn_child, args=(copies.fused, inputs, queue))
    child.start()
    try:
        payload = torch.load(io.BytesIO(queue.get(timeout=240)), weights_only=False)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert payload["ok"], payload.get("error")
    assert rel_err(payload["no_grad"], want_no_grad) <= 1e-5
    assert_like_stock({"stock": want, "fused": payload["result"]})
    if payload["stats"] is not None:
        assert payload["stats"].fused > 0, str(payload["stats"])
    assert_like_stock(run(copies, forward_backward, inputs))


# 10. BART cross-attention under gradient checkpointing ------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_bart_gradient_checkpointing(body, precision):
    """A tiny BART (encoder-decoder: every decoder layer's cross-attention k_proj / v_proj read the same encoder
    states) in training mode with non-reentrant gradient checkpointing: loss.backward() works, stock gradients."""
    inputs = token_batch(tokens=6)
    labels = token_batch(seed=9, tokens=5)["input_ids"]
    copies = build(precision, make=tiny_bart, targets=BART_TARGETS, inputs={**inputs, "labels": labels})
    for _, model in copies.items():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

    def scenario(model):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        out = model(**inputs, labels=labels)
        (out.loss.double() + loss_of(out.logits)).backward()
        return {"logits": out.logits.detach(), **lora_grads(model)}

    results = run(copies, scenario)
    assert any("encoder_attn.k_proj" in n for n in results["stock"])
    assert_like_stock(results, precision)
    assert_fused_calls(copies.fused)


# 11. torch.func ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_func_grad_over_functional_call(body, precision):
    """torch.func.grad of a loss over torch.func.functional_call(model, lora_params, inputs) w.r.t. the LoRA
    parameters (new values passed in, not the model's)."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)

    def scenario(model):
        params = {n: (p.detach() * 1.25).requires_grad_(False) for n, p in model.named_parameters() if "lora_" in n}

        def loss(params):
            return loss_of(torch.func.functional_call(model, params, args=(), kwargs=inputs).logits)

        grads, value = torch.func.grad_and_value(loss)(params)
        return {"loss": value.detach().reshape(1), **grads}

    assert_like_stock(run(copies, scenario), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_func_vmap(body, precision):
    """torch.func.vmap over a batch: the whole model per sequence, the attention's q/k/v and the MLP (gate/up) per
    row, and per-sample gradients (vmap of grad over functional_call of the MLP)."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)

    def scenario(model):
        layer = model.get_base_model().model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        h = in_dtype(model, hidden(shape=(3, 5, 32)))
        logits = torch.func.vmap(lambda ids, mask: model(input_ids=ids[None], attention_mask=mask[None]).logits[0])(
            inputs["input_ids"], inputs["attention_mask"])
        rows = torch.func.vmap(lambda x: torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp(x)], -1))(h)
        params = {n: p.detach() for n, p in mlp.named_parameters() if "lora_" in n}

        def sample_loss(params, x):
            return torch.func.functional_call(mlp, params, (x[None],)).double().pow(2).sum()

        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))(params, h)
        return {"logits": logits.detach(), "rows": rows.detach(), **{f"per-sample {n}": g for n, g in
                                                                     per_sample.items()}}

    assert_like_stock(run(copies, scenario), precision)


# 12. dtype conversion by swapping tensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_double_with_swap_module_params_on_conversion(body, precision):
    """torch.__future__.set_swap_module_params_on_conversion(True), then model.double() after a forward and
    backward: works as in stock, and the float64 model's outputs and gradients are stock's."""
    inputs = token_batch()
    copies = build(precision, inputs=inputs)
    assert_like_stock(run(copies, forward_backward, inputs), precision)
    copies = Copies(copies.stock, copies.fused, None, "fp32")  # both float64 from here on
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for model in (copies.stock, copies.fused):
            model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert {p.dtype for p in copies.fused.parameters()} == {torch.float64}
    results = run(copies, forward_backward, inputs)
    assert results["stock"]["logits"].dtype == torch.float64
    assert_like_stock(results, "fp32")


# 13. shared-input (pending output) corner cases ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["backward between members", "requires_grad set between members",
                                  "inference_mode then no_grad"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_qkv_called_directly(body, precision, case):
    """The attention's q/k/v LoRA layers called directly on one tensor h: (a) q(h) backward, then k(h) backward;
    (b) q(h) with h not requiring grad, then h.requires_grad_(), then k(h) and v(h): connected to h; (c) q(h)
    under inference_mode, then k(h), v(h) under no_grad: not inference tensors, usable in autograd afterwards."""
    copies = build(precision)

    def scenario(model):
        attn = attention(model)
        model.zero_grad(set_to_none=True)
        h = in_dtype(model, hidden())
        out = {}
        if case == "backward between members":
            h.requires_grad_(True)
            for name in ("q_proj", "k_proj", "v_proj"):
                y = getattr(attn, name)(h)
                loss_of(y).backward()
                out[name] = y.detach()
        elif case == "requires_grad set between members":
            out["q_proj"] = attn.q_proj(h).detach()
            h.requires_grad_(True)
            yk, yv = attn.k_proj(h), attn.v_proj(h)
            assert yk.requires_grad == yv.requires_grad == True  # noqa: E712 (stock's outputs are)
            (loss_of(yk) + loss_of(yv)).backward()
            out["k_proj"], out["v_proj"] = yk.detach(), yv.detach()
        else:
            with torch.inference_mode():
                out["q_proj"] = attn.q_proj(h).clone()
            with torch.no_grad():
                yk, yv = attn.k_proj(h), attn.v_proj(h)
            assert not yk.is_inference() and not yv.is_inference()  # stock's are ordinary tensors
            w = torch.ones_like(yk, requires_grad=True)
            (yk * w).double().sum().backward()  # an inference tensor could not be saved for backward
            out["k_proj"], out["v_proj"], out["w grad"] = yk, yv, w.grad
            return out
        return {**out, "h grad": h.grad, **lora_grads(attn)}

    assert_like_stock(run(copies, scenario), precision)


# 14. lora_dropout = 1 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_dropout_one(body, precision):
    """LoraConfig(lora_dropout=1.0) in training mode: stock PEFT's nn.Dropout(1.0) zeroes the LoRA input, so the
    LoRA terms and the factors' gradients are zero; the fused model's forward and backward must match (finite)."""
    inputs = token_batch()
    copies = build(precision, dropout=1.0, hash_dropout=False, inputs=inputs)
    results = run(copies, forward_backward, inputs)
    assert all(g is not None and not g.any() for n, g in results["stock"].items() if "lora_" in n)
    assert_like_stock(results, precision)


# Mechanisms fuzz ---------------------------------------------------------------------------------------------------

class Fuzz:
    """A seeded random sequence of mechanisms applied identically to a stock, a fused and a float64 copy, each step
    compared (outputs, and gradients where computed). Hooks (a fallback: PEFT's forward draws its own dropout masks,
    not the fused op's) are only added while dropout is 0, and dropout only turned on while no hook is present."""

    OPS = ["train step", "no_grad forward", "inference_mode forward", "optimizer step", ".data write", "toggle disable",
           "hook", "dropout p", "train/eval", "deepcopy", "autocast step"]

    def __init__(self, seed, precision):
        self.rng, self.precision, self.seed = random.Random(seed), precision, seed
        self.inputs = token_batch(seed)
        built = build("bf16" if precision == "bf16" else "autocast", dropout=0.1, inputs=self.inputs, seed=seed)
        self.models = dict(built.items())
        self.disabled, self.hooks, self.step, self.comparisons = False, {}, 0, 0
        self._set_dropout(self.rng.choice([0.0, 0.1]))  # built with 0.1: PEFT made nn.Dropout modules (not Identity)
        names = [n for n, _ in built.stock.named_parameters()]
        self.weights = ([n for n in names if n.endswith("base_layer.weight")], [n for n in names if "lora_" in n])
        self.layer_names = [n for n, m in built.stock.named_modules() if n.endswith("_proj") and hasattr(m, "lora_A")]
        self.optimizers = self._optimizers()

    def _optimizers(self):
        return {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
                for k, m in self.models.items()}

    def compare(self, results, autocast=False):
        precision = "autocast" if autocast or self.precision == "bf16" else "fp32"
        assert_like_stock(results, precision)
        self.comparisons += 1

    def forward(self, key, model, grad=True, mode=None, autocast=False):
        torch.manual_seed(1000 * self.seed + self.step)
        model.zero_grad(set_to_none=True)
        ctx = model.disable_adapter() if self.disabled else torch.enable_grad()
        with ctx, (mode() if mode else torch.enable_grad()):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and key != "exact"):
                logits = model(**self.inputs).logits
            if not grad:
                return {"logits": logits.clone()}
        if not logits.requires_grad:  # adapters disabled: nothing trains
            return {"logits": logits.detach(), "requires_grad": torch.zeros(1)}
        loss_of(logits).backward()
        return {"logits": logits.detach(), "requires_grad": torch.ones(1), **lora_grads(model)}

    def forwards(self, **kwargs):
        return {k: self.forward(k, m, **kwargs) for k, m in self.models.items()}

    def allowed(self, op):
        """inference_mode while dropout is on: inference tensors have no version counter, so the fused model runs
        each layer alone, one dropout seed per layer, where the stock copy's HashDropout shares one per input (both
        PEFT's distribution, not the same masks)."""
        return op != "inference_mode forward" or not (self.models["stock"].training and self.dropout > 0)

    def apply(self, op):
        models = self.models
        if op == "train step":
            return self.compare(self.forwards())
        if op == "no_grad forward":
            return self.compare(self.forwards(grad=False, mode=torch.no_grad))
        if op == "inference_mode forward":
            return self.compare(self.forwards(grad=False, mode=torch.inference_mode))
        if op == "autocast step":
            self.compare(self.forwards(autocast=True), autocast=True)
            for model in models.values():  # bf16 gradients differ within bf16 rounding: no optimizer step on them
                model.zero_grad(set_to_none=True)
            return None
        if op == "optimizer step":
            for optimizer in self.optimizers.values():
                optimizer.step()
        elif op == ".data write":  # a frozen base weight or a factor, half the time each
            name, factor = self.rng.choice(self.rng.choice(self.weights)), self.rng.choice([2.0, -0.5, 0.75])
            for model in models.values():
                model.get_parameter(name).data.mul_(factor)
        elif op == "toggle disable":
            self.disabled = not self.disabled
        elif op == "hook":
            if self.hooks:
                for handle in self.hooks.pop(self.rng.choice(sorted(self.hooks))):
                    handle.remove()
            elif self.dropout == 0.0:
                self._add_hook((self.rng.choice(self.layer_names), self.rng.choice(["base_layer", "lora_A",
                                                                                  "lora_B"])))
        elif op == "dropout p":
            self._set_dropout(self.rng.choice([0.0, 0.1, 0.3]) if not self.hooks else 0.0)
        elif op == "train/eval":
            training = not models["stock"].training
            for model in models.values():
                model.train(training)
        elif op == "deepcopy":
            hooks = list(self.hooks)
            for key in hooks:
                for handle in self.hooks.pop(key):
                    handle.remove()
            self.models = {k: copy.deepcopy(m) for k, m in models.items()}
            for key in hooks:
                self._add_hook(key)
            self.optimizers = self._optimizers()
        # Every step ends with a comparison: a forward without grad in the current state.
        self.compare(self.forwards(grad=False, mode=torch.no_grad))

    def _set_dropout(self, p):
        self.dropout = p
        for model in self.models.values():
            for layer in lora_layers(model, "_proj"):
                layer.lora_dropout["default"].p = p

    def _add_hook(self, key):
        name, kind = key
        handles = []
        for model in self.models.values():
            layer = model.get_submodule(name)
            module = layer.base_layer if kind == "base_layer" else getattr(layer, kind)["default"]
            handles.append(module.register_forward_hook(lambda m, args, out: out * 0.75))
        self.hooks[key] = handles


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_mechanisms_fuzz(precision, seed):
    """20 random mechanisms in a row (see Fuzz), fused and stock compared after each."""
    fuzz = Fuzz(seed, precision)
    done = []
    for fuzz.step in range(20):
        op = fuzz.rng.choice([op for op in Fuzz.OPS if fuzz.allowed(op)])
        done.append(op)
        try:
            fuzz.apply(op)
        except AssertionError as error:
            raise AssertionError(f"after {done}: {error}") from error
    assert fuzz.comparisons >= len(done) == 20  # every step was followed by a comparison with stock

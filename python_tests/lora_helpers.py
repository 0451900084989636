"""Helpers shared by the LoRA tests: random groups and rank patterns, float64 references, small models."""
import random

import torch
from peft import LoraConfig, get_peft_model

from slora_kernels import fuse
from slora_kernels.layers import is_linear_like
from slora_kernels.ops import _hash_dropout as hash_dropout
from slora_kernels.ops.utils import draw_seed

MINILM_TARGETS = ["query", "key", "value", "dense"]
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_group(rng: random.Random, dtype=torch.float64, max_groups=7, max_rank=70, bias=True):
    """x, weights, biases, lora_a, lora_b, scales of a random group (odd sizes, ranks 1..max_rank)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    d_in, groups = rng.randint(1, 41), rng.randint(1, max_groups)
    d_outs = [rng.randint(1, 37) for _ in range(groups)]
    ranks = [rng.randint(1, max_rank) for _ in range(groups)]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = rand(rng.randint(1, 3), rng.randint(1, 9), d_in)
    weights = [rand(d, d_in) for d in d_outs]
    biases = [rand(d) if bias and rng.random() < 0.6 else None for d in d_outs]
    lora_a = [rand(r, d_in) for r in ranks]
    lora_b = [rand(d, r) for d, r in zip(d_outs, ranks)]
    scales = [rng.uniform(-2.0, 2.0) for _ in range(groups)]
    return x, weights, biases, lora_a, lora_b, scales


def reference(x, weights, biases, lora_a, lora_b, scales, keep=None):
    """PEFT's per-layer formula in float64; keep is the dropout mask scaled by 1/(1-p)."""
    x = x.double()
    xd = x if keep is None else x * keep.double()
    return [x @ w.double().T + (0 if b is None else b.double()) + s * (xd @ a.double().T) @ bb.double().T
            for w, b, a, bb, s in zip(weights, biases, lora_a, lora_b, scales)]


def seeded_keep(x, p, seed):
    """The documented mask over 1 - p: counter-based on CPU (its plain-torch definition), a Philox
    generator seeded with `seed` on CUDA."""
    if x.is_cuda:
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return torch.empty_like(x).bernoulli_(1.0 - p, generator=generator) / (1.0 - p)
    return hash_dropout.dropout(torch.ones_like(x), p, seed)


class HashDropout(torch.nn.Module):
    """Stock PEFT's lora_dropout drawing what the fused op draws, for a reference run with the same masks: one
    seed from torch's global RNG per shared input, then the hash mask of `slora_kernels.ops._hash_dropout` (the
    fused op's, bit for bit). A fused group draws one seed for layers that read the same tensor; so does one
    instance of this module set on all of them: a call with the values of the previous call's input (PEFT casts
    the input per layer, so the tensors are copies) reuses its seed."""

    def __init__(self, p):
        super().__init__()
        self.p, self._last = p, None

    def forward(self, x):
        if not self.training:
            return x
        last = self._last
        if last is None or last[0].shape != x.shape or not torch.equal(last[0], x):
            last = self._last = (x.detach().clone(), draw_seed())
        return hash_dropout.dropout(x, self.p, last[1])


def use_hash_dropout(model, p):
    """Give every LoRA layer of a stock PEFT model one shared HashDropout (see there); returns the model."""
    from peft.tuners.lora import LoraLayer

    dropout = HashDropout(p)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = dropout
    return model


def random_pattern(model, targets, seed):
    """A random rank_pattern (ranks 1..16) and alpha_pattern over every targeted Linear or Conv1D."""
    rng = random.Random(seed)
    names = [n for n, m in model.named_modules() if is_linear_like(m) and n.rsplit(".", 1)[-1] in targets]
    return ({n: rng.randint(1, 16) for n in names}, {n: rng.choice([4, 8, 16, 32]) for n in names})


def lora_model(base, targets, seed=0, autocast_adapter_dtype=True, **config):
    """PEFT model over base with a random rank/alpha pattern and random B; autocast_adapter_dtype as
    get_peft_model's (True keeps float32 factors under a bf16/fp16 base)."""
    ranks, alphas = random_pattern(base, targets, seed)
    cfg = LoraConfig(r=8, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas, **config)
    model = get_peft_model(base, cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    randomize_lora_b(model, seed)
    return model


def randomize_lora_b(model, seed):
    """PEFT initialises B to zero; random B makes every gradient and output term non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def rel_err(got, want):
    """Relative error ||got - want|| / ||want|| (Frobenius): fp32 summation-order noise, not one element's."""
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()


def logits_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    (logits ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return logits.detach(), grads


def tiny_lora_bert():
    """A 2-layer BERT built from a config (no download), LoRA with random ranks and random B, not fused."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(config)
    ranks, _ = random_pattern(base, ("query", "key", "value", "dense"), seed=0)
    model = get_peft_model(base, LoraConfig(target_modules=MINILM_TARGETS, rank_pattern=ranks,
                                            modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def tiny_fused_bert():
    """`tiny_lora_bert`, fused, in training mode."""
    return fuse(tiny_lora_bert()).train()


def lora_grads(model):
    """LoRA gradients by parameter name as one process holds them: DDP's "module." prefix dropped and
    FSDP2's sharded gradients gathered (a collective there: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {n.removeprefix("module."): p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
            for n, p in model.named_parameters() if "lora_" in n}


BATCH, TOKENS = 4, 9


def batch_rows(rank, world):
    """The rows of `batch()` that rank holds when the batch is split over world processes."""
    return slice(rank * BATCH // world, (rank + 1) * BATCH // world)


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 120, (BATCH, TOKENS), generator=gen), torch.randint(0, 2, (BATCH,), generator=gen)


def assert_mixed_dtype_group_matches_float64(rng: random.Random, base_dtype, device="cpu", dropout_p=0.0):
    """grouped_lora with x, W, b in base_dtype and float32 factors (PEFT's default under a half base)
    against the float64 formula on the same values: outputs and dx within two roundings of base_dtype
    (the base GEMM's output, then the sum), factor gradients within float32 accumulation error."""
    from slora_kernels.ops import grouped_lora

    x, weights, biases, lora_a, lora_b, scales = random_group(rng, torch.float32, max_rank=40)
    x, weights = x.to(base_dtype).to(device), [w.to(base_dtype).to(device) for w in weights]
    biases = [None if b is None else b.to(base_dtype).to(device) for b in biases]
    lora_a, lora_b = [a.to(device) for a in lora_a], [b.to(device) for b in lora_b]
    leaves = [x, *lora_a, *lora_b]
    for t in leaves:
        t.requires_grad_(True)
    ys = grouped_lora(x, weights, biases, lora_a, lora_b, scales, dropout_p=dropout_p, seed=5)
    keep = seeded_keep(x.float(), dropout_p, 5) if dropout_p else None
    refs = reference(x, weights, biases, lora_a, lora_b, scales, keep)
    cotangents = [torch.randn(y.shape, dtype=torch.float64).to(base_dtype).to(device) for y in ys]
    got = torch.autograd.grad(ys, leaves, cotangents)
    want = torch.autograd.grad(refs, leaves, [c.double() for c in cotangents])
    half_tol = 2 * torch.finfo(base_dtype).eps
    for y, r in zip(ys, refs):
        assert y.dtype == base_dtype
        torch.testing.assert_close(y.double(), r, rtol=half_tol, atol=half_tol * r.abs().max().item())
    assert got[0].dtype == base_dtype
    want_dx = want[0].double()  # the reference's dx, rounded once into base_dtype by autograd
    torch.testing.assert_close(got[0].double(), want_dx, rtol=half_tol, atol=half_tol * want_dx.abs().max().item())
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4 * w.abs().max().item())

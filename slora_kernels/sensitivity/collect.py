"""Estimators: hooks on the target modules (nn.Linear, transformers' Conv1D) that fill one fp32 accumulator
per matrix. Accumulators and diagonals are in nn.Linear's [d_out, d_in] orientation for both, so a Conv1D
(weight stored [d_in, d_out]) reports what the equivalent nn.Linear would (`slora_kernels.layers`).

- activation (the paper, forward only): acc[d_in] = sum_t x_t^2 over unmasked tokens; the
  Hessian diagonal is 2/n * acc, shared by all d_out rows. Modules fed the same input tensor
  (q/k/v, gate/up) reuse one reduction.
- fisher (empirical Fisher, needs labels): a tensor hook on each output receives g = dL/dy;
  per token acc[d_out, d_in] += (g^2)^T (x^2), per sample += (g_b^T x_b)^2; divided by the
  token or sample count. L is the model's loss times the batch size, i.e. per-sample losses
  summed when the model averages over samples.
- hutchinson (true Hessian diagonal, needs labels): acc += mean over probes of z * (H z),
  Rademacher z seeded per batch (see HutchinsonCollector), H z by double backward restricted to the target
  weights; averaged over batches. The estimate can dip below zero; its magnitude is reported.
Padding tokens (attention_mask == 0) never count: the [B, T] mask is mapped onto each input
of shape [B, T, d] (or [B*T, d]); inputs with other leading shapes (e.g. a pooled [B, d]) count
every row.
Accumulators are created on the device of the first input each target sees, not on its weight's: under
accelerate's offload hooks the weights sit on the meta device between calls.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from slora_kernels.layers import features, linear_orientation
from slora_kernels.ops.sensitivity import activation_sq_accumulate, fisher_diag_accumulate
from slora_kernels.sensitivity.distributed import all_reduce_sum, rank_and_world


def token_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The attention mask reshaped to x's token dimensions, or None when every row counts."""
    if mask is None:
        return None
    mask = mask.to(x.device)  # a no-op unless the model spans devices (accelerate's device_map)
    lead = tuple(x.shape[:-1])
    if lead == tuple(mask.shape):
        return mask
    if math.prod(lead) == mask.numel():
        return mask.reshape(lead)
    return None


def batch_size(batch: Mapping) -> int:
    """The leading dimension of the batch's first tensor with one."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    raise ValueError(f"a batch must hold at least one tensor with a batch dimension, got keys {sorted(batch)}")


class Collector(ABC):
    """Common part: accumulators, token counts, hooks, the all-reduce, and the final diagonals.

    device: where the model takes its inputs; accumulators of targets that never saw an input, and the
    reduced ones, live there (None: where the first accumulator was created, else cpu).
    """

    def __init__(self, targets: Mapping[str, nn.Linear], acc_shape: str, device: torch.device | None = None):
        self.targets = dict(targets)
        self.device = device
        self._shapes = {n: features(m)[1:] if acc_shape == "feature" else features(m) for n, m in self.targets.items()}
        self.acc: dict[str, torch.Tensor] = {}
        self.tokens = {n: 0 for n in self.targets}
        self.samples = 0
        self.batches = 0
        self.mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last: tuple[torch.Tensor, object] | None = None  # (input, work derived from it) of this batch

    def _acc(self, name: str, device: torch.device) -> torch.Tensor:
        """The fp32 accumulator of `name`, created on `device` at its first use."""
        if name not in self.acc:
            self.acc[name] = torch.zeros(self._shapes[name], dtype=torch.float32, device=device)
        return self.acc[name]

    def attach(self) -> None:
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _count(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        m = token_mask(self.mask, x)
        self.tokens[name] += int(m.count_nonzero()) if m is not None else math.prod(x.shape[:-1])
        return m

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.observe(name, inputs[0], output)
        return hook

    def observe(self, name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        self._count(name, x)

    def _per_input(self, x: torch.Tensor, compute):
        """compute() once per distinct input tensor: modules that share x (q/k/v, gate/up) reuse it."""
        if self._last is None or self._last[0] is not x:
            self._last = (x, compute())
        return self._last[1]

    @contextmanager
    def masked(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Hooks called inside count only the tokens that `mask` keeps (every token when None)."""
        self.mask = mask
        try:
            yield
        finally:
            self.mask, self._last = None, None

    def count_batch(self, size: int) -> None:
        self.samples += size
        self.batches += 1

    def run_batch(self, model: nn.Module, batch: dict) -> None:
        """Run one batch (on the model's input device) with the hooks attached, its padding masked."""
        size = batch_size(batch)
        with self.masked(batch.get("attention_mask")):
            self.step(model, batch, size)
        self.count_batch(size)

    @abstractmethod
    def step(self, model: nn.Module, batch: dict, batch_size: int) -> None:
        """Run one batch through the model with the hooks attached."""

    def reduce(self) -> None:
        """Sum accumulators and counts over torch.distributed ranks (no-op in one process)."""
        names = list(self.targets)
        device = self.device or next((a.device for a in self.acc.values()), torch.device("cpu"))
        self.acc = {n: self._acc(n, device).to(device) for n in names}  # one device for the collective
        counts = torch.tensor([self.tokens[n] for n in names] + [self.samples, self.batches],
                              dtype=torch.int64, device=device)
        all_reduce_sum([self.acc[n] for n in names] + [counts])
        values = counts.tolist()
        self.tokens = dict(zip(names, values[:len(names)]))
        self.samples, self.batches = values[-2], values[-1]

    @abstractmethod
    def diagonal(self, name: str) -> torch.Tensor:
        """The estimated Hessian diagonal of one matrix ([d_in] shared by all rows, or [d_out, d_in])."""


class ActivationCollector(Collector):
    def __init__(self, targets: Mapping[str, nn.Linear], device: torch.device | None = None):
        super().__init__(targets, "feature", device)

    def observe(self, name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        mask = self._count(name, x)
        acc = self._acc(name, x.device)
        acc += self._per_input(x, lambda: activation_sq_accumulate(torch.zeros_like(acc), x.detach(), mask))

    def step(self, model, batch, batch_size):
        with torch.no_grad():
            model(**batch)

    def diagonal(self, name):
        return self.acc[name].double() * (2.0 / self.tokens[name])


def _loss(model: nn.Module, batch: dict, estimator: str) -> torch.Tensor:
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError(f"estimator={estimator!r} needs the task loss, but the model returned none: put the "
                         f"labels in each batch (e.g. batch['labels']); got keys {sorted(batch)}")
    return loss


class FisherCollector(Collector):
    def __init__(self, targets: Mapping[str, nn.Linear], per_sample: bool, device: torch.device | None = None):
        super().__init__(targets, "matrix", device)
        self.per_sample = per_sample

    def observe(self, name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        mask = self._count(name, x)
        if not output.requires_grad:
            output.requires_grad_()  # a leaf: the graph starts here, no frozen weight gets a gradient
        x3, keep = self._per_input(x, lambda: self._prepare(x.detach(), mask))

        def on_grad(g: torch.Tensor) -> None:
            if keep is None:
                g3 = g.reshape(*x3.shape[:-1], g.shape[-1])
            elif self.per_sample:
                g3 = g.reshape(*keep.shape[:-1], g.shape[-1]) * keep.to(g.dtype)
            else:
                g3 = g.reshape(-1, g.shape[-1]).index_select(0, keep)[None]
            fisher_diag_accumulate(self._acc(name, x3.device), x3, g3.to(x3.dtype), per_sample=self.per_sample)
        output.register_hook(on_grad)

    def _prepare(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x as [B, T, d_in] and how to drop padding from g: per token, padding rows are removed
        from both (less work); per sample, the [B, T, 1] mask zeroes their gradients."""
        if mask is None:
            return x.reshape(x.shape[0], -1, x.shape[-1]), None
        if self.per_sample:
            return x.reshape(x.shape[0], -1, x.shape[-1]), mask.reshape(x.shape[0], -1, 1)
        keep = mask.reshape(-1).nonzero().squeeze(1)
        return x.reshape(-1, x.shape[-1]).index_select(0, keep)[None], keep

    def step(self, model, batch, batch_size):
        with torch.enable_grad():
            (_loss(model, batch, "fisher") * batch_size).backward()

    def diagonal(self, name):
        return self.acc[name].double() / (self.samples if self.per_sample else self.tokens[name])


def probe_generator(seed: int, batch: int) -> torch.Generator:
    """The generator of global batch `batch`'s probes: seeded by (seed, batch) alone, whichever process runs
    it. torch's CPU generator keeps 32 bits of a seed; within those, a run's batches get distinct seeds and
    the golden-ratio multiplier puts different seeds' sequences far apart."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + batch) % 2**32)


class HutchinsonCollector(Collector):
    """Probes per batch: this rank's k-th batch is global batch k * world + rank, i.e. the batches are one
    stream dealt round-robin over the ranks (as `batches[rank::world]` or accelerate's prepared DataLoader
    deal them), and its probes come from `probe_generator(seed, k * world + rank)`. Ranks thus draw
    different probes, and the all-reduced estimate equals one process's over the whole stream with the
    same seed: the same batches with the same probes, summed in another order (fp32 rounding apart)."""

    def __init__(self, targets: Mapping[str, nn.Linear], probes: int, seed: int,
                 device: torch.device | None = None):
        super().__init__(targets, "matrix", device)
        self.probes, self.seed = probes, seed
        self.rank, self.world = rank_and_world()

    def step(self, model, batch, batch_size):
        generator = probe_generator(self.seed, self.batches * self.world + self.rank)
        names = list(self.targets)
        modules = [self.targets[n] for n in names]
        weights = [m.weight for m in modules]
        for w in weights:
            w.requires_grad_(True)
        try:  # the math attention backend is the one with a double backward
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                grads = torch.autograd.grad(_loss(model, batch, "hutchinson"), weights, create_graph=True)
                for _ in range(self.probes):
                    # Drawn as [d_out, d_in], then laid out like each weight: a Conv1D gets its nn.Linear twin's z.
                    signs = [torch.randint(0, 2, features(m), generator=generator) * 2 - 1 for m in modules]
                    zs = [linear_orientation(m, z).to(w) for m, z, w in zip(modules, signs, weights)]
                    hvs = torch.autograd.grad(grads, weights, grad_outputs=zs, retain_graph=True)
                    for n, m, z, hv in zip(names, modules, zs, hvs):
                        self._acc(n, hv.device).add_(linear_orientation(m, z * hv).float() / self.probes)
        finally:
            for w in weights:
                w.requires_grad_(False)

    def diagonal(self, name):
        return (self.acc[name].double() / self.batches).abs()

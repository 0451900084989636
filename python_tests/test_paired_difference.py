"""Per-example evaluation results and the paired interval the demo prints."""
import math
import random
from types import SimpleNamespace

import pytest
import torch
from scipy import stats

from slora_kernels.app.commands import paired_difference
from slora_kernels.app.data import Examples
from slora_kernels.app.training import evaluate


def fake_tokenizer(texts, padding, truncation, max_length, return_tensors):
    """One token per word, right-padded: the batch's lengths are what the model reads."""
    lengths = [min(len(t.split()), max_length) for t in texts]
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return {"input_ids": mask.clone(), "attention_mask": mask}


class ParityModel(torch.nn.Module):
    """Predicts class (number of words) % 2, so which examples it gets right is known in advance; as a causal
    LM (token labels) its loss is a constant."""

    def forward(self, input_ids, attention_mask, labels):
        logits = torch.nn.functional.one_hot(attention_mask.sum(1) % 2, 2).double()
        if labels.dim() == 2:
            return SimpleNamespace(logits=logits, loss=torch.tensor(2.0))
        return SimpleNamespace(logits=logits, loss=torch.nn.functional.cross_entropy(logits, labels))


def test_per_example_results_are_in_the_examples_order():
    rng = random.Random(3)
    texts = [" ".join(["w"] * rng.randint(1, 40)) for _ in range(203)]  # evaluation sorts these by length
    labels = [rng.randint(0, 1) for _ in texts]
    result = evaluate(ParityModel(), fake_tokenizer, Examples(texts, labels), batch_size=16, progress=False)
    expected = [len(t.split()) % 2 == y for t, y in zip(texts, labels)]
    assert result.correct == expected
    assert result.scores["accuracy"] == sum(expected) / len(texts)
    lm = evaluate(ParityModel(), fake_tokenizer, Examples(texts, None), progress=False)
    assert lm.correct is None and lm.scores == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0))}


def test_paired_difference_is_the_mean_difference_with_a_normal_interval():
    rng = random.Random(0)
    base = [rng.random() < 0.75 for _ in range(1000)]
    other = [b if rng.random() < 0.9 else not b for b in base]
    diff, half = paired_difference(base, other)
    d = [int(o) - int(b) for b, o in zip(base, other)]
    assert diff == pytest.approx(100 * (sum(other) - sum(base)) / 1000)
    assert half == pytest.approx(100 * 1.96 * stats.sem(d))
    assert 0 < half < 100 * 1.96 * math.sqrt(0.1 / 1000) * 1.2  # ~10% disagreements: about 1.9 points
    assert paired_difference(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference(base, other[:-1])

"""A tiny classifier with the shapes that matter (q/k/v sharing an input, a [B, d] head) for the estimator tests."""
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, D, FF, CLASSES = 50, 12, 20, 3


class Toy(nn.Module):
    """Per-token q/k/v/ffn, masked mean pooling, a linear head: padding cannot reach the loss."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.block = nn.ModuleDict({"query": nn.Linear(D, D), "key": nn.Linear(D, D), "value": nn.Linear(D, D),
                                    "up": nn.Linear(D, FF), "down": nn.Linear(FF, D)})
        self.head = nn.Linear(D, CLASSES)
        self.dropout = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.embed(input_ids)
        b = self.block
        h = h + b["value"](h) * torch.sigmoid(b["query"](h) * b["key"](h))
        h = h + b["down"](F.gelu(b["up"](h)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head(self.dropout((h * m).sum(1) / m.sum(1)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def toy_batches(n_batches: int = 4, batch: int = 5, length: int = 7, seed: int = 0, labels: bool = True) -> list[dict]:
    """Random token batches, each sample with its own length (padding at the end, random pad ids)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        item = {"input_ids": ids, "attention_mask": mask}
        if labels:
            item["labels"] = torch.randint(0, CLASSES, (batch,), generator=gen)
        out.append(item)
    return out


def with_extra_padding(batches: list[dict], extra: int, seed: int = 1) -> list[dict]:
    """The same samples with `extra` more padding positions holding random token ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        bsz = b["input_ids"].shape[0]
        pad_ids = torch.randint(0, VOCAB, (bsz, extra), generator=gen)
        out.append({**b, "input_ids": torch.cat([b["input_ids"], pad_ids], 1),
                    "attention_mask": torch.cat([b["attention_mask"], torch.zeros(bsz, extra, dtype=torch.long)], 1)})
    return out

"""The picture of an allocation: a heatmap of ranks, layers down, module types across, numbers in cells.

Module names split at their block index ("...layer.3.attention.self.query" -> layer 3, type
"attention.self.query"), so the same code draws BERT, Llama or anything with numbered blocks;
names without a block index form a row of their own.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

_BLOCK = re.compile(r"^(?:.*\.)?(\d+)\.(.+)$")


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """(row labels, column labels, grid) with grid[row][col] the rank or None where no matrix is."""
    cells: dict[tuple[str, str], int] = {}
    for name, rank in ranks.items():
        match = _BLOCK.match(name)
        row, col = (match.group(1), match.group(2)) if match else ("other", name)
        cells[(row, col)] = int(rank)
    rows = sorted({r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0))
    cols = list(dict.fromkeys(c for _, c in cells))  # first-seen order follows the model's order
    return rows, cols, [[cells.get((r, c)) for c in cols] for r in rows]


def short_labels(columns: list[str]) -> list[str]:
    """The shortest dotted suffix that tells each column apart ('attention.self.query' -> 'query')."""
    parts = [c.split(".") for c in columns]

    def label(i: int) -> str:
        for k in range(1, len(parts[i]) + 1):
            mine = parts[i][-k:]
            if all(other[-k:] != mine for j, other in enumerate(parts) if j != i):
                return ".".join(mine)
        return columns[i]

    return [label(i) for i in range(len(columns))]


def plot_ranks(ranks: Mapping[str, int], path: str | Path, title: str = "LoRA rank per matrix") -> Path:
    """Write the heatmap PNG to `path` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols, grid = rank_grid(ranks)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.2 + 0.45 * len(rows)), dpi=110)
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    top = np.nanmax(values)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9,
                        color="black" if v > 0.6 * top else "white")
    ax.set_xticks(range(len(cols)), short_labels(cols), rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(rows)), [f"layer {r}" if r.isdigit() else r for r in rows], fontsize=9)
    ax.set_title(f"{title} (total {sum(ranks.values())}, mean {sum(ranks.values()) / len(ranks):.2f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="rank", fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

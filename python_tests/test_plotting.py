"""The rank picture: grid layout from module names, unambiguous column labels, a real PNG."""
from slora_kernels.app.plotting import plot_ranks, rank_grid, short_labels

BERT = {f"bert.encoder.layer.{i}.{t}": 1 + i + j for i in range(2) for j, t in enumerate(
    ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"])}


def test_grid_has_layers_down_and_module_types_across():
    rows, cols, grid = rank_grid({**BERT, "classifier": 7})
    assert rows == ["0", "1", "other"]
    assert cols[:4] == ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert grid[1][:4] == [2, 3, 4, 5]
    assert grid[2] == [None, None, None, None, 7] and grid[0][4] is None


def test_short_labels_stay_unique():
    cols = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert short_labels(cols) == ["query", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert short_labels(["self_attn.q_proj", "mlp.gate_proj"]) == ["q_proj", "gate_proj"]


def test_plot_writes_a_png(tmp_path):
    path = plot_ranks(BERT, tmp_path / "ranks.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

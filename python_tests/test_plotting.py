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


def test_plot_draws_the_grid_and_writes_a_png_of_its_size(tmp_path, monkeypatch):
    import matplotlib.image
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read what was drawn
    path = plot_ranks(BERT, tmp_path / "ranks.png", title="t")
    ax = figures[0].axes[0]
    assert ax.images[0].get_array().tolist() == [[1, 2, 3, 4], [2, 3, 4, 5]]
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3", "4", "2", "3", "4", "5"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["query", "attention.output.dense", "intermediate.dense",
                                                            "output.dense"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 1"]
    assert ax.get_title() == "t (total 24, mean 3.00)"
    # 4 columns x 2 rows: (1.2 + 1.1 * 4) x (1.2 + 0.45 * 2) inches at 110 dpi
    assert matplotlib.image.imread(path).shape[:2] == (231, 616)

"""Plots, drawn headless and checked by what they draw."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

import histoseq as hs


def _evaluate_scores() -> pd.DataFrame:
    genes = ["a", "b", "c"]
    rows = []
    for section, r in [("s1", [0.5, 0.1, np.nan]), ("s2", [0.7, 0.3, 0.2]), ("all", [0.6, 0.2, 0.2])]:
        for g, v in zip(genes, r):
            rows.append({"section": section, "gene": g, "n_spots": 10, "pearson": v, "pearson_ceiling": 0.9})
    return pd.DataFrame(rows)


def test_scores_plot_sorts_genes_and_draws_the_spread_and_the_ceiling():
    import matplotlib.pyplot as plt

    fig = hs.pl.scores(_evaluate_scores(), show=False)
    ax = fig.axes[0]
    position = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert position["a"] > position["b"] > position["c"]  # best at the top (b and c tie: kept in order)
    points, ceiling = ax.collections[1], ax.collections[2]
    assert sorted(points.get_offsets()[:, 0].tolist()) == pytest.approx([0.2, 0.2, 0.6])
    assert np.allclose(ceiling.get_offsets()[:, 0], 0.9)
    spread = ax.collections[0].get_segments()
    top = next(s for s in spread if s[0][1] == 2)  # gene "a": sections 0.5 and 0.7
    assert top[0][0] == pytest.approx(0.5) and top[1][0] == pytest.approx(0.7)
    plt.close(fig)


def test_scores_plot_of_a_cross_validation_spans_the_folds(tmp_path):
    import matplotlib.pyplot as plt

    cv = pd.DataFrame(
        {
            "fold": [0, 0, 1, 1],
            "test_group": ["x", "x", "y", "y"],
            "gene": ["a", "b", "a", "b"],
            "pearson": [0.1, 0.4, 0.3, 0.6],
        }
    )
    fig = hs.pl.scores(cv, n=1, save=tmp_path / "s.png", show=False)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b"]
    assert ax.collections[1].get_offsets()[0, 0] == pytest.approx(0.5)
    assert "2 folds" in ax.get_xlabel()
    assert (tmp_path / "s.png").stat().st_size > 0
    plt.close(fig)
    with pytest.raises(KeyError, match="choose one of"):
        hs.pl.scores(cv, metric="nope")
    with pytest.raises(TypeError, match="hs.tl.evaluate"):
        hs.pl.scores([1, 2])

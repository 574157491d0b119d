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


@pytest.mark.slow
def test_expression_plot_draws_measured_beside_predicted_on_one_scale():
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection, PolyCollection

    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    t = sdata.tables["table"]
    t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    model = hs.tl.fit(sdata, genes=["TUM1", "DENS1"], method="ridge", embedding="X_demo", progress=False)
    hs.tl.predict(sdata, model, progress=False)
    fig = hs.pl.expression(sdata, ["TUM1", "DENS1"], section="section1", show=False)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "TUM1: measured",
        "TUM1: predicted",
        "DENS1: measured",
        "DENS1: predicted",
    ]
    n = int((t.obs["sample_id"] == "section1").sum())
    for row in (panels[:2], panels[2:]):
        colls = [next(c for c in ax.collections if isinstance(c, EllipseCollection)) for ax in row]
        assert all(len(c.get_array()) == n for c in colls)
        assert colls[0].get_clim() == colls[1].get_clim()  # one colour scale per gene
        assert len(row[0].images) == 1  # the H&E under the spots
        for ax, c in zip(row, colls, strict=True):  # the spots lie on the image, in the axes' data coordinates
            assert c.get_offset_transform() is ax.transData
            x0, x1, y0, y1 = ax.images[0].get_extent()
            xy = c.get_offsets()
            assert (xy[:, 0] >= min(x0, x1)).all() and (xy[:, 0] <= max(x0, x1)).all()
            assert (xy[:, 1] >= min(y0, y1)).all() and (xy[:, 1] <= max(y0, y1)).all()
    # the measured values are the model's targets: log1p of counts per 10,000
    measured = next(c for c in panels[0].collections if isinstance(c, EllipseCollection)).get_array()
    rows = (t.obs["sample_id"] == "section1").to_numpy()
    x = t.X[rows].toarray()
    expect = np.log1p(x[:, t.var_names.get_loc("TUM1")] / x.sum(1) * 1e4)
    np.testing.assert_allclose(np.asarray(measured), expect, rtol=1e-5)
    plt.close(fig)
    # a grid: prediction only, tiles drawn as squares
    with pytest.raises(KeyError, match="not predicted"):
        hs.pl.expression(sdata, "NOISE1", section="section1", show=False)
    t2 = hs.datasets.synthetic(n_sections=1, section_size_um=700, random_state=9, progress=False)
    del t2.tables["table"]
    model2 = hs.tl.fit(
        sdata, genes=["TUM1"], method="ridge", embed_kwargs={"patch_px": 32}, embedding="X_morphology", progress=False
    )
    hs.tl.predict(t2, model2, image_key="section0_image", spacing_um=100, progress=False)
    fig = hs.pl.expression(t2, "TUM1", predicted="section0_image_grid_predicted", show=False)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["TUM1: predicted"]
    squares = next(c for c in panels[0].collections if isinstance(c, PolyCollection))
    assert len(squares.get_paths()) == len(t2.shapes["section0_image_grid"])
    plt.close(fig)

"""``method="attention"``: the network, the method (fit, predict, save, load), attention maps, hotspots and the plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import histoseq as hs
from histoseq.models._attention import AttentionRegressionPlan, GatedAttentionRegressor
from histoseq.tl._attention import relative_attention


@pytest.fixture(scope="module")
def small():
    """Two small sections and a tiny attention model (2 epochs) of 4 genes."""
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=600, progress=False)
    model = hs.tl.fit(
        sdata, genes=4, method="attention", max_epochs=2, n_hidden=8, n_attention=4, batch_size=16, progress=False
    )
    return sdata, model


# -- the network ---------------------------------------------------------------------------------------


def test_network_shapes_attention_and_errors():
    net = GatedAttentionRegressor(6, 3, n_hidden=8, n_attention=4).eval()
    x = torch.randn(5, 16, 6)
    assert net(x).shape == (5, 3)
    assert net.scores(x).shape == (5, 16, 3)
    # a new network attends evenly: every gene starts from uniform attention
    assert torch.allclose(net.attention(x), torch.full((5, 16, 3), 1 / 16))
    with torch.no_grad():
        net.attention_w.normal_()
    a = net.attention(x)
    assert torch.allclose(a.sum(dim=1), torch.ones(5, 3)) and not torch.allclose(a, torch.full_like(a, 1 / 16))
    # a tile's scores do not depend on the other tiles of its bag
    torch.testing.assert_close(net.scores(x)[:, :1], net.scores(x[:, :1]))
    # the prediction is the attention-weighted mean of the tiles' representation, read out per gene
    h = net.tile(x)
    expected = torch.einsum("btg,bth,gh->bg", a, h, net.readout) + net.bias
    torch.testing.assert_close(net(x), expected)
    # the penalty on uneven attention counts in training only
    plan = AttentionRegressionPlan(net, attention_penalty=0.5)
    y = torch.randn(5, 3)
    mse = torch.nn.functional.mse_loss(net(x), y)
    torch.testing.assert_close(plan.loss((x, y), training=False)[0], mse)
    penalty = 0.5 * net.scores(x).var(dim=1, unbiased=False).mean()
    torch.testing.assert_close(plan.loss((x, y), training=True)[0], mse + penalty)
    with pytest.raises(ValueError, match=r"\(B, T, 6\)"):
        net(torch.randn(5, 6))
    with pytest.raises(ValueError, match="n_attention"):
        GatedAttentionRegressor(6, 3, n_attention=0)
    with pytest.raises(ValueError, match="dropout"):
        GatedAttentionRegressor(6, 3, dropout=1.0)


def test_relative_attention_is_one_for_flat_scores_and_stable():
    tissue = np.ones((7, 9), dtype=bool)
    tissue[0, :3] = False
    flat = relative_attention(np.full((2, 7, 9), 4.2), tissue, grid=3)
    assert np.isnan(flat[:, 0, :3]).all()
    np.testing.assert_allclose(flat[:, tissue], 1.0)
    # one tile stands out: it gets more than uniform, its neighbours less, tiles beyond its windows exactly 1
    s = np.zeros((1, 7, 9))
    s[0, 3, 4] = 2.0
    w = relative_attention(s, tissue, grid=3)
    assert w[0, 3, 4] > 2 and w[0, 3, 5] < 1 and w[0, 6, 0] == 1.0
    # the definition, window by window: exp(s_t) * mean over the windows b holding t of k_b / Z_b
    rng = np.random.default_rng(0)
    s, holes = rng.normal(size=(2, 5, 6)), rng.random((5, 6)) < 0.3
    g = 3
    expected = np.full(s.shape, np.nan)
    for r, c in zip(*np.nonzero(~holes)):
        terms = []
        for top in range(r - g + 1, r + 1):
            for left in range(c - g + 1, c + 1):
                rows = slice(max(top, 0), top + g)
                cols = slice(max(left, 0), left + g)
                inside = ~holes[rows, cols]
                z = np.exp(s[:, rows, cols])[:, inside].sum(axis=1)
                terms.append(inside.sum() * np.exp(s[:, r, c]) / z)
        expected[:, r, c] = np.mean(terms, axis=0)
    np.testing.assert_allclose(relative_attention(s, ~holes, grid=g), expected, rtol=1e-10)
    # huge scores neither overflow nor lose the ordering
    big = relative_attention(np.array([[[0.0, 800.0], [-800.0, 1.0]]]), np.ones((2, 2), dtype=bool), grid=2)
    assert np.isfinite(big).all() and big[0, 0, 1] > 1 > big[0, 0, 0] >= big[0, 1, 0]


# -- the method ----------------------------------------------------------------------------------------


def test_options_are_checked_before_any_work():
    sdata = hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False)

    def fit(**options):
        hs.tl.fit(sdata, genes=2, method="attention", progress=False, **options)

    with pytest.raises(ValueError, match="Unknown encoder 'tissue_position'"):
        fit(encoder="tissue_position")
    with pytest.raises(TypeError, match="name of a built-in encoder"):
        fit(encoder=torch.nn.Identity())
    with pytest.raises(ValueError, match=r"whole number of tiles.*region_um=96"):
        fit(region_um=100, tile_um=32)
    with pytest.raises(ValueError, match="tile_px"):
        fit(tile_px=4)
    with pytest.raises(ValueError, match="dropout"):
        fit(dropout=1.5)
    with pytest.raises(ValueError, match="stain_norm"):
        fit(stain_norm="bright")
    with pytest.raises(ValueError, match="attention_penalty"):
        fit(attention_penalty=-1)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['patch_px'\]"):
        fit(patch_px=64)


@pytest.mark.slow
def test_fit_predict_save_load(small, tmp_path):
    sdata, model = small
    assert model.method == "attention" and model.uses_images and model.embedding is None
    c = model.config
    assert (c["patch_size_um"], c["patch_px"], c["grid"], c["tile_um"]) == (128.0, 128, 4, 32.0)
    assert "bags of 4×4 tiles of 32 µm (morphology" in repr(model)
    hs.tl.predict(sdata, model, tta=True, device="cpu", key_added="attention_predicted", progress=False)
    predicted = sdata.tables["attention_predicted"]
    assert predicted.shape == (sdata.tables["table"].n_obs, 4) and list(predicted.var_names) == model.genes
    assert np.isfinite(predicted.X).all() and predicted.X.std(axis=0).min() > 0
    info = predicted.uns["attention_predicted"]
    assert info["method"] == "attention" and info["tile_um"] == 32.0 and info["patch_size_um"] == 128.0
    patches = hs.pp.extract_patches(sdata, patch_size_um=128, patch_px=128, progress=False).images[:12]
    before = model.predict_patches(patches)
    loaded = hs.tl.load_model(model.save(tmp_path / "attention.pt"))
    assert loaded.config == model.config and loaded.genes == model.genes
    np.testing.assert_array_equal(loaded.predict_patches(patches), before)
    # a loaded model writes the same predictions
    again = hs.tl.predict(sdata, loaded, inplace=False, progress=False)
    np.testing.assert_array_equal(again.X, predicted.X)


@pytest.mark.slow
def test_a_network_encoder_is_rebuilt_from_its_seed(tmp_path):
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=500, progress=False)
    model = hs.tl.fit(sdata, genes=2, method="attention", encoder="small_cnn", max_epochs=1, n_hidden=4, progress=False)
    assert model.n_features == 128 and model.config["encoder"] == "small_cnn"
    patches = hs.pp.extract_patches(sdata, patch_size_um=128, patch_px=128, progress=False).images[:4]
    loaded = hs.tl.load_model(model.save(tmp_path / "cnn_tiles.pt"))
    np.testing.assert_array_equal(loaded.predict_patches(patches), model.predict_patches(patches))


# -- maps, hotspots and the plot ------------------------------------------------------------------------


def test_attention_maps_geometry_record_and_errors(small):
    sdata, model = small
    hs.tl.attention_maps(sdata, model, image_key="section0_image", progress=False)
    att = sdata.images["section0_image_attention"]
    assert att.dtype == np.float32 and list(att.coords["c"].values) == model.genes
    values = att.values
    on = np.isfinite(values[0])
    assert on.sum() > 50 and (~on).sum() > 0  # tissue tiles, and glass around it
    assert (np.isfinite(values) == on).all() and (values[:, on] > 0).all()
    # raster pixel (i, j) covers level-0 pixels [64 j, 64 (j + 1)) x [64 i, 64 (i + 1)) (32 µm at 0.5 µm/px)
    from histoseq._sdata import affine_xy, transformations

    for cs in ("section0", "section0_um"):
        np.testing.assert_allclose(
            affine_xy(transformations(att)[cs]),
            affine_xy(transformations(sdata.images["section0_image"])[cs]) @ np.diag([64, 64, 1]),
        )
    assert att.sizes["y"] == att.sizes["x"] == int(np.ceil(1200 / 64))
    record = sdata.tables["table"].uns["attention"]["section0_image"]
    assert record["genes"] == model.genes and record["grid"] == 4 and record["n_tiles"] == int(on.sum())
    # a map is never taken for the scan
    assert hs._sdata.resolve_image_key(sdata.subset(["section0_image", "section0_image_attention"]), None) == (
        "section0_image"
    )
    with pytest.raises(ValueError, match="overwrite=True"):
        hs.tl.attention_maps(sdata, model, image_key="section0_image", progress=False)
    one = hs.tl.attention_maps(sdata, model, model.genes[1], image_key="section0_image", inplace=False, progress=False)
    np.testing.assert_array_equal(one.values[0], values[1])
    with pytest.raises(KeyError, match="does not predict"):
        hs.tl.attention_maps(sdata, model, "NOPE", image_key="section0_image", inplace=False, progress=False)
    t = sdata.tables["table"]
    t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 4))
    ridge = hs.tl.fit(sdata, genes=2, method="ridge", embedding="X_demo", progress=False)
    with pytest.raises(TypeError, match="method='attention'"):
        hs.tl.attention_maps(sdata, ridge, image_key="section0_image", progress=False)


def test_hotspots_are_the_tiles_of_highest_attention(small):
    sdata, model = small
    gene = model.genes[0]
    top = hs.tl.hotspots(sdata, model, gene, n=7, image_key="section1_image", key_added="hot")  # computes the map
    assert "section1_image_attention" in sdata.images and "hot" in sdata.shapes
    assert list(top.columns[:5]) == ["gene", "attention", "rank", "x_um", "y_um"] and len(top) == 7
    assert list(top["rank"]) == list(range(1, 8)) and (np.diff(top["attention"]) <= 0).all()
    values = sdata.images["section1_image_attention"].sel(c=gene).values
    assert top["attention"].iloc[0] == pytest.approx(np.nanmax(values))
    bounds = top.geometry.bounds
    np.testing.assert_allclose(bounds["maxx"] - bounds["minx"], 64.0)  # 32 µm tiles at 0.5 µm/px
    np.testing.assert_allclose(top["x_um"], top.geometry.centroid.x * 0.5)
    # each hotspot is the map's raster pixel under it
    rows, cols = (bounds["miny"] // 64).astype(int), (bounds["minx"] // 64).astype(int)
    np.testing.assert_allclose(values[rows, cols], top["attention"])


def test_plot_draws_the_map_over_the_he_with_the_hotspots(small):
    sdata, model = small
    if "section0_image_attention" not in sdata.images:
        hs.tl.attention_maps(sdata, model, image_key="section0_image", progress=False)
    att = sdata.images["section0_image_attention"]
    fig = hs.pl.attention(sdata, model.genes[0], image_key="section0_image", hotspots=6, show=False)
    ax = fig.axes[0]
    images = ax.get_images()
    assert len(images) == 2  # the H&E, then the map
    np.testing.assert_allclose(images[0].get_extent(), [0, 1200, 1200, 0])
    np.testing.assert_allclose(images[1].get_extent(), [0, 64 * att.sizes["x"], 64 * att.sizes["y"], 0])
    assert images[0].get_array().shape[:2] == (1200, 1200) and images[1].get_array().shape == att.shape[1:]
    assert len(ax.patches) == 6
    plt.close(fig)
    fig, ax = plt.subplots()
    assert hs.pl.attention(sdata, model.genes[1], image_key="section0_image", hotspots=0, ax=ax, show=False) is fig
    assert len(ax.patches) == 0
    plt.close(fig)
    with pytest.raises(KeyError, match="hs.tl.attention_maps"):
        hs.pl.attention(sdata, model.genes[0], image_key="section0_image", attention_key="other", show=False)


# -- what the attention learns --------------------------------------------------------------------------


def _inside_outside(sdata, sid: str, gene: str, step: float) -> float:
    """Mean attention per pixel of the immune regions over that of the other tissue (tumour and stroma)."""
    labels = np.asarray(hs._sdata.image_levels(sdata.labels[f"{sid}_cell_types"])[0].values)
    att = sdata.images[f"{sid}_image_attention"].sel(c=gene).values
    rows = np.minimum(np.arange(labels.shape[0]) // step, att.shape[0] - 1).astype(int)
    cols = np.minimum(np.arange(labels.shape[1]) // step, att.shape[1] - 1).astype(int)
    per_pixel = att[rows][:, cols]
    mapped = np.isfinite(per_pixel)
    return float(per_pixel[mapped & (labels == 3)].mean() / per_pixel[mapped & np.isin(labels, (1, 2))].mean())


@pytest.mark.slow
def test_attention_follows_immune_cells_and_stays_flat_for_noise():
    # stroma-rich tissue with immune infiltrates, spots the size of the bags, enough molecules, one donor
    sdata = hs.datasets.synthetic(
        n_sections=3,
        section_size_um=1600,
        spot_diameter_um=100,
        spot_pitch_um=100,
        library_size=5,
        tumour_fraction=0.05,
        n_donors=1,
        ground_truth=True,
        progress=False,
    )
    var = sdata.tables["table"].var
    immune = var.index[(var["truth"] == "celltype_immune") & (var["effect"] > 0)]
    rising = str(var.loc[immune, "effect"].idxmax())  # the immune gene with the largest effect
    noise = ["NOISE1", "NOISE2"]
    model = hs.tl.fit(
        sdata,
        genes=[*var.index[var["truth"] == "celltype_immune"], *noise],
        method="attention",
        tile_um=16,
        tile_px=16,
        batch_size=32,
        max_epochs=40,
        progress=False,
    )
    hs.tl.attention_maps(sdata, model, image_key="section2_image", progress=False)
    step = 16 / 0.5
    assert _inside_outside(sdata, "section2", rising, step) >= 1.5
    for gene in noise:
        assert 0.8 <= _inside_outside(sdata, "section2", gene, step) <= 1.25

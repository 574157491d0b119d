"""``method="superres"``: the tile network, weak supervision, prediction on grids, rasters, domains, and the truth."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import sys
from pathlib import Path

import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pytest
import shapely
import torch
from spatialdata.models import ShapesModel

import histoseq as hs
from histoseq._sdata import centers_in_image, transformations
from histoseq.models._superres import SuperResolutionPlan, TileRegressor, neighbour_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def small():
    """Two small sections and a tiny superres model (3 epochs) of 5 genes."""
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    model = hs.tl.fit(sdata, genes=5, method="superres", max_epochs=3, n_hidden=8, batch_size=16, progress=False)
    return sdata, model


# -- the network ---------------------------------------------------------------------------------------


def test_tile_network_pools_by_the_mean_and_the_smoothness_penalty():
    net = TileRegressor(6, 3, n_hidden=8).eval()
    x = torch.randn(5, 4, 6)
    torch.testing.assert_close(net(x), net.tiles(x).mean(dim=1))
    # a tile's prediction depends on that tile only
    torch.testing.assert_close(net.tiles(x)[:, :1], net.tiles(x[:, :1]))
    assert neighbour_pairs(2).tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]
    assert len(neighbour_pairs(3)) == 12 and len(neighbour_pairs(1)) == 0
    plan = SuperResolutionPlan(net, grid=2, smoothness=0.5)
    y = torch.randn(5, 3)
    mse = torch.nn.functional.mse_loss(net(x), y)
    torch.testing.assert_close(plan.loss((x, y), training=False)[0], mse)
    t = net.tiles(x)
    pairs = neighbour_pairs(2)
    penalty = 0.5 * (t[:, pairs[:, 0]] - t[:, pairs[:, 1]]).pow(2).mean()
    torch.testing.assert_close(plan.loss((x, y), training=True)[0], mse + penalty)
    with pytest.raises(ValueError, match=r"\(B, T, 6\)"):
        net(torch.randn(5, 6))
    with pytest.raises(ValueError, match="n_hidden"):
        TileRegressor(6, 3, n_hidden=-1)


def test_weak_supervision_recovers_tiles_from_their_means():
    """Tiles whose expression is a function of their features, seen only through 2 × 2 means, are learnt per tile."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4, 3)).astype(np.float32)
    tiles = np.tanh(x @ np.array([[1.0], [-0.5], [0.3]], dtype=np.float32))  # (n, 4, 1) truth per tile
    y = torch.from_numpy(tiles.mean(axis=1))
    torch.manual_seed(0)
    net = TileRegressor(3, 1, n_hidden=16, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(250):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(torch.from_numpy(x)), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = net.tiles(torch.from_numpy(x)).numpy().ravel()
    # the spot means never showed a single tile, yet the tiles are recovered
    assert np.corrcoef(pred, tiles.ravel())[0, 1] > 0.95


# -- the method ----------------------------------------------------------------------------------------


def test_fit_defaults_follow_the_spots(small):
    _sdata, model = small
    c = model.config
    # 55 µm spots: 2 × 2 tiles of 27.5 µm, with one tile of context around them
    assert c["spot_um"] == pytest.approx(55.0)
    assert c["tile_um"] == pytest.approx(27.5) and c["tiles_per_spot"] == 2
    assert c["patch_size_um"] == pytest.approx(4 * 27.5) and c["patch_px"] == 4 * 32
    assert model.uses_images and model.patches_follow_shapes
    assert "superres" in repr(model)
    assert model.patch_options(27.5)["patch_size_um"] == pytest.approx(3 * 27.5)
    assert model.patch_options(55.0)["patch_px"] == 4 * 32
    assert model.patch_options(None)["patch_px"] == 3 * 32


def test_bad_options_name_the_fix():
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=500, progress=False)
    with pytest.raises(ValueError, match="whole number of tiles"):
        hs.tl.fit(sdata, genes=3, method="superres", tile_um=40.0, progress=False)
    with pytest.raises(ValueError, match="Unknown encoder"):
        hs.tl.fit(sdata, genes=3, method="superres", encoder="tissue_position", progress=False)
    with pytest.raises(ValueError, match="smoothness"):
        hs.tl.fit(sdata, genes=3, method="superres", smoothness=-1, progress=False)
    with pytest.raises(ValueError, match="context_tiles"):
        hs.tl.fit(sdata, genes=3, method="superres", context_tiles=9, progress=False)


def test_a_spot_is_the_mean_of_its_tiles(small):
    """Predicting a spot equals the mean of predicting the four tiles that make it up, each on its own."""
    sdata, model = small
    image_key, spots_key = "section0_image", "section0_spots"
    centres, _ = centers_in_image(sdata, spots_key, image_key)
    px = sdata.tables["table"].uns["synthetic"]["params"]["pixel_size_um"]
    half = model.config["tile_um"] / px / 2  # half a tile in level-0 px
    pick = [3, 7, 11]
    boxes, names = [], []
    for i in pick:
        cx, cy = centres[i]
        for dy in (-half, half):
            for dx in (-half, half):
                x, y = cx + dx, cy + dy
                boxes.append(shapely.box(x - half, y - half, x + half, y + half))
                names.append(f"{i}")
    sub = ShapesModel.parse(gpd.GeoDataFrame({"spot": names}, geometry=boxes), transformations=transformations(
        sdata.shapes[spots_key]))  # fmt: skip
    sdata.shapes["subtiles"] = sub
    try:
        tiles = hs.tl.predict(sdata, model, shapes_key="subtiles", inplace=False, progress=False)
    finally:
        del sdata.shapes["subtiles"]
        sdata.tables.pop("subtiles_table", None)
    table = sdata.tables["table"]
    rows = np.flatnonzero(table.obs["region"].astype(str).to_numpy() == spots_key)[pick]
    spots = hs.tl.predict(sdata, model, spots=rows, inplace=False, progress=False)
    per_tile = np.asarray(tiles.X).reshape(len(pick), 4, -1).mean(axis=1)
    np.testing.assert_allclose(per_tile, np.asarray(spots.X), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_predict_on_a_grid_write_a_raster_and_draw_domains(small, tmp_path):
    import scanpy as sc

    sdata, model = small
    tile = model.config["tile_um"]
    hs.tl.predict(sdata, model, image_key="section1_image", spacing_um=tile, key_added="sr", progress=False)
    table = sdata.tables["sr"]
    assert list(table.var_names) == model.genes and np.isfinite(np.asarray(table.X)).all()
    grid = sdata.shapes["section1_image_grid"]
    assert table.n_obs == len(grid) > 4 * sdata.tables["table"].obs["sample_id"].eq("section1").sum()
    # the raster holds each tile's prediction at (grid_row, grid_col), NaN off tissue, on the image's systems
    hs.tl.expression_map(sdata, "sr", genes=model.genes[:2])
    raster = sdata.images["sr_map"]
    assert list(raster.coords["c"].values) == model.genes[:2]
    values = np.asarray(raster.values)
    pos = grid.index.get_indexer(table.obs[table.uns["spatialdata_attrs"]["instance_key"]])
    r, c = grid["grid_row"].to_numpy()[pos], grid["grid_col"].to_numpy()[pos]
    np.testing.assert_allclose(values[0, r, c], np.asarray(table.X)[:, 0], rtol=1e-6)
    assert np.isnan(values).sum() == values.size - 2 * table.n_obs
    assert set(transformations(raster)) == set(transformations(sdata.images["section1_image"]))
    with pytest.raises(ValueError, match="overwrite=True"):
        hs.tl.expression_map(sdata, "sr")
    hs.tl.predict(sdata, model, shapes_key="section0_spots", key_added="spots_sr", progress=False)
    with pytest.raises(ValueError, match="not a grid"):
        hs.tl.expression_map(sdata, "spots_sr")
    hs.tl.predict(sdata, model, key_added="both_sr", progress=False)
    with pytest.raises(ValueError, match="one grid"):
        hs.tl.expression_map(sdata, "both_sr")
    # leiden domains of the super-resolved table, drawn as the grid's squares over the H&E
    sc.pp.pca(table, n_comps=3)
    sc.pp.neighbors(table, n_neighbors=8)
    sc.tl.leiden(table, resolution=0.5, flavor="igraph", n_iterations=2, directed=False)
    assert table.obs["leiden"].nunique() >= 2
    fig = hs.pl.classes(sdata, truth=None, pred="leiden", table_key="sr", groups=None)
    (ax,) = fig.axes
    squares = [c for c in ax.collections if type(c).__name__ == "PolyCollection"]
    assert len(squares) == 1 and len(squares[0].get_paths()) == table.n_obs
    plt.close(fig)


def test_save_and_load_predict_the_same(small, tmp_path):
    sdata, model = small
    path = model.save(tmp_path / "sr.histoseq")
    again = hs.tl.load_model(path)
    a = hs.tl.predict(sdata, model, inplace=False, progress=False)
    b = hs.tl.predict(sdata, again, inplace=False, progress=False)
    np.testing.assert_allclose(np.asarray(a.X), np.asarray(b.X), rtol=1e-6)
    assert again.config["tile_um"] == model.config["tile_um"]


@pytest.mark.slow
def test_super_resolved_map_beats_upsampled_spots_and_keeps_spot_accuracy():
    """On synthetic truth: grid-level r above the nearest-spot upsampling, and aggregated back onto spots, no loss."""
    import superres

    out = superres.run_seed(0, 1000.0, [0.0], log=lambda m: None)
    margin = out["superres"]["grid r"] - out["default, upsampled"]["grid r"]
    assert margin > 0.05, out
    assert out["superres"]["grid r"] > out["superres, upsampled"]["grid r"] + 0.05, out
    # aggregated onto held-out spots, as accurate as the spot-level default (within 0.02) or better
    assert out["superres"]["spot r"] >= out["default, spot level"]["spot r"] - 0.02, out

"""The ``"tissue_position"`` encoder: each spot's offsets from its tissue's centroid along the tissue's axes, from
the image alone."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import histoseq as hs
from histoseq._sdata import resolve_regions
from histoseq.tl._position import tissue_position

PX_UM = 2.0


def tissue_slide(
    centre=(620.0, 480.0),
    radius=300.0,
    shape=(1000, 1200),
    spots=None,
    blank=False,
    seed=0,
    more=(),
    ellipse=None,
) -> sd.SpatialData:
    """Glass with one disk of pink tissue (``centre`` as ``(x, y)`` px), spots at ``spots`` (px).

    ``more``: further disks of tissue as ``(x, y, radius)``. ``ellipse=(a, b, degrees)`` makes the first
    piece an ellipse with semi-axes ``a`` and ``b`` px, its major axis turned by ``degrees`` from x to y.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    img = np.clip(rng.normal(240, 4, (h, w, 3)), 0, 255)
    a, b, degrees = ellipse if ellipse is not None else (radius, radius, 0.0)
    major, minor = frame(degrees)
    u = (xx - centre[0]) * major[0] + (yy - centre[1]) * major[1]
    v = (xx - centre[0]) * minor[0] + (yy - centre[1]) * minor[1]
    disk = (u / a) ** 2 + (v / b) ** 2 <= 1
    for x, y, r in more:
        disk |= (xx - x) ** 2 + (yy - y) ** 2 <= r**2
    if not blank:
        img[disk] = np.clip(rng.normal((190, 110, 170), 12, (int(disk.sum()), 3)), 0, 255)
    t = {"s": Identity(), "s_um": Scale([PX_UM, PX_UM], axes=("y", "x"))}
    image = Image2DModel.parse(
        np.moveaxis(img.astype(np.uint8), -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=t
    )
    xy = np.asarray(spots if spots is not None else [[620, 480], [720, 480], [620, 700], [400, 300]], float)
    n = len(xy)
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(n, 10.0), index=pd.Index(np.arange(n)), transformations=t)
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * n), "spot_id": np.arange(n)}, index=[f"spot{i}" for i in range(n)]
    )
    table = TableModel.parse(
        ad.AnnData(np.ones((n, 2), np.float32), obs=obs), region="spots", region_key="region", instance_key="spot_id"
    )
    return sd.SpatialData(images={"img": image}, shapes={"spots": shapes}, tables={"table": table})


def frame(degrees):
    """Unit vectors (x, y) of an axis turned by ``degrees`` from x towards y, and of the axis across it."""
    t = np.deg2rad(degrees)
    return np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])


def spots_in_frame(centre, degrees, uv):
    """Pixel positions of points given as offsets ``(u, v)`` px along the axes of :func:`frame`."""
    major, minor = frame(degrees)
    return [list(np.asarray(centre) + u * major + v * minor) for u, v in uv]


#: offsets (px) along the tissue's major and minor axes of the spots of the tests
UV = [(0.0, 0.0), (200.0, 0.0), (0.0, 100.0), (150.0, -80.0), (-250.0, 60.0)]


def test_offsets_along_the_tissue_axes_in_um():
    centre = (620.0, 480.0)
    sdata = tissue_slide(centre=centre, ellipse=(350.0, 180.0, 30.0), spots=spots_in_frame(centre, 30.0, UV))
    hs.tl.embed(sdata, encoder="tissue_position", progress=False)
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["X_tissue_position"], np.abs(UV) * PX_UM, atol=2.0)
    entry = table.uns["tissue_position"]
    assert entry["params"]["encoder"] == "tissue_position" and entry["params"]["feature_names"] == [
        "major_axis_offset_um",
        "minor_axis_offset_um",
    ]
    info = entry["images"]["img"]
    np.testing.assert_allclose(info["centroid_px"], centre, atol=0.75)
    np.testing.assert_allclose(np.abs(info["axes"]), np.abs(frame(30.0)), atol=0.01)
    # a uniform ellipse spreads a/2 and b/2 along its axes
    np.testing.assert_allclose(info["axis_sd_um"], [175 * PX_UM, 90 * PX_UM], rtol=0.02)
    np.testing.assert_allclose(info["elongation"], 350 / 180, rtol=0.03)
    assert info["n_pieces"] == 1 and info["border_fraction"] == 0.0
    np.testing.assert_allclose(info["tissue_area_mm2"], np.pi * 350 * 180 * PX_UM**2 / 1e6, rtol=0.02)


def test_subset_of_spots_and_inplace_false():
    sdata = tissue_slide()
    out = hs.tl.embed(sdata, encoder="tissue_position", spots=[True, False, True, False], inplace=False)
    assert "X_tissue_position" not in sdata.tables["table"].obsm and "tissue_position" not in sdata.tables["table"].uns
    assert np.isfinite(out[[0, 2], 0]).all() and np.isnan(out[[1, 3], 0]).all()


def test_a_cut_off_or_scattered_tissue_is_flagged(caplog):
    cut = tissue_slide(centre=(100.0, 480.0), spots=[[150, 480]])
    with caplog.at_level(logging.WARNING, logger="histoseq.tl._position"):
        hs.tl.embed(cut, encoder="tissue_position", progress=False)
    assert "image border" in caplog.text
    assert cut.tables["table"].uns["tissue_position"]["images"]["img"]["border_fraction"] > 0.1
    # three equal pieces: the centroid is theirs together, and the user is told
    caplog.clear()
    scattered = tissue_slide(centre=(250.0, 250.0), radius=150.0, more=[(850.0, 250.0, 150.0), (550.0, 750.0, 150.0)])
    with caplog.at_level(logging.WARNING, logger="histoseq.tl._position"):
        hs.tl.embed(scattered, encoder="tissue_position", progress=False)
    assert "in 3 pieces" in caplog.text
    info = scattered.tables["table"].uns["tissue_position"]["images"]["img"]
    assert info["n_pieces"] == 3 and info["largest_piece_fraction"] < 0.5
    np.testing.assert_allclose(info["centroid_px"], [550, 416.7], atol=1.5)
    # a crumb of debris (under 1% of the tissue) moves nothing and is no piece
    caplog.clear()
    crumb = tissue_slide(more=[(1100.0, 900.0, 15.0)])
    with caplog.at_level(logging.WARNING, logger="histoseq.tl._position"):
        hs.tl.embed(crumb, encoder="tissue_position", progress=False)
    info = crumb.tables["table"].uns["tissue_position"]["images"]["img"]
    assert info["n_pieces"] == 1 and caplog.text == ""
    np.testing.assert_allclose(info["centroid_px"], [620, 480], atol=0.75)


def test_blank_image_fails_clearly_and_changes_nothing():
    sdata = tissue_slide(blank=True)
    before = set(sdata.tables["table"].obsm), set(sdata.tables["table"].uns)
    with pytest.raises(ValueError, match="found no tissue in image 'img'"):
        hs.tl.embed(sdata, encoder="tissue_position", progress=False)
    assert (set(sdata.tables["table"].obsm), set(sdata.tables["table"].uns)) == before


def test_works_on_a_dense_grid_without_a_table():
    sdata = hs.datasets.synthetic(n_sections=1, section_size_um=900, random_state=0, progress=False)
    hs.pp.make_grid(sdata, image_key="section0_image", spacing_um=100, key_added="grid")
    regions = resolve_regions(sdata, table_key=None, shapes_key="grid")
    out, images = tissue_position(sdata, regions, len(sdata.shapes["grid"]))
    assert np.isfinite(out).all() and out.min() >= 0
    # the grid covers the tissue, so its tiles spread evenly around the centroid
    centres = regions[0].centers_px
    np.testing.assert_allclose(centres.mean(axis=0), images["section0_image"]["centroid_px"], atol=100 / 0.5)


def test_the_embedding_follows_the_tissue_not_how_it_lies_on_the_glass():
    # the same tissue and spots, shifted and turned on the glass (by more than 90°, so that an axis flips):
    # the offsets stay; the spots' own layout does not enter
    a_centre, b_centre = (620.0, 480.0), (560.0, 520.0)
    a = tissue_slide(centre=a_centre, ellipse=(350.0, 180.0, 10.0), spots=spots_in_frame(a_centre, 10.0, UV))
    b = tissue_slide(centre=b_centre, ellipse=(350.0, 180.0, 125.0), spots=spots_in_frame(b_centre, 125.0, UV), seed=1)
    for s in (a, b):
        hs.tl.embed(s, encoder="tissue_position", progress=False)
    np.testing.assert_allclose(
        a.tables["table"].obsm["X_tissue_position"], b.tables["table"].obsm["X_tissue_position"], atol=2.5
    )


def test_olfactory_bulb_layers_follow_the_distance_to_the_centre(mob_dir):
    # the bulb is built in concentric layers: the main axis of expression of every section follows the distance
    # of its spots to the tissue's centroid (which the two offsets make), which the image alone gives
    import scanpy as sc
    from scipy.stats import spearmanr

    sdata = hs.datasets.mouse_olfactory_bulb(mob_dir, progress=False)
    hs.tl.embed(sdata, encoder="tissue_position", progress=False)
    table = sdata.tables["table"]
    info = table.uns["tissue_position"]["images"]
    assert len(info) == 4 and all(i["n_pieces"] >= 1 and i["contrast"] > 10 for i in info.values())
    for section in table.obs["sample_id"].unique():
        a = table[table.obs["sample_id"] == section].copy()
        sc.pp.normalize_total(a)
        sc.pp.log1p(a)
        sc.pp.highly_variable_genes(a, n_top_genes=500)
        sc.pp.pca(a, n_comps=2, mask_var="highly_variable")
        distance = np.hypot(*a.obsm["X_tissue_position"].T)  # to the centroid
        rho = spearmanr(distance, a.obsm["X_pca"][:, 0])[0]
        assert abs(rho) > 0.3, section


def test_detect_tissue_keeps_pieces_of_one_size():
    # squidpy's size threshold between specimens and artefacts keeps none of two equal sections; both are tissue
    sdata = tissue_slide(centre=(350.0, 500.0), radius=150.0, more=[(850.0, 500.0, 150.0)])
    hs.pp.detect_tissue(sdata, image_key="img")
    mask = np.asarray(sdata.labels["img_tissue"]) > 0
    assert mask[500, 350] and mask[500, 850] and not mask[500, 600]
    np.testing.assert_allclose(mask.mean(), 2 * np.pi * 150**2 / mask.size, rtol=0.05)

"""histoseq on Visium data as :func:`spatialdata_io.visium` reads it, with no conversion in between.

The Space Ranger folder is synthetic (see ``tests/_visium.py``): true Visium spot geometry and a black disk of
exactly 20 µm at every spot centre, so that the µm scale and the centring of patches can be measured.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

import histoseq as hs

from ._visium import write_visium_fixture

spatialdata_io = pytest.importorskip("spatialdata_io")


def _read(info):
    return spatialdata_io.visium(
        info["path"], dataset_id=info["dataset_id"], fullres_image_file=info["fullres_image_file"]
    )


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    """Ground truth of a Space Ranger folder with a full-resolution image (0.5 µm/px)."""
    # 10 rows of 12 spots: a 1.75 × 1.38 mm image at 0.5 µm/px, small enough to keep the tests quick
    return write_visium_fixture(tmp_path_factory.mktemp("visium") / "outs", n_rows=10, n_cols=12, dataset_id="V1")


@pytest.fixture(scope="module")
def sdata(visium):
    """The folder read once, for the tests that only read it (they must not modify it)."""
    return _read(visium)


@pytest.fixture
def fresh_sdata(visium):
    """The folder read anew, for tests that add elements."""
    return _read(visium)


def _full(info):
    return f"{info['dataset_id']}_full_image"


def _hires_pixel_size(info):
    return info["pixel_size_um"] / info["scalefactors"]["tissue_hires_scalef"]


def _snapshot(sdata):
    """What a failed call must leave untouched: the elements, the table's columns and the attributes."""
    table = sdata.tables["table"]
    return (
        {kind: sorted(getattr(sdata, kind)) for kind in ("images", "labels", "points", "shapes", "tables")},
        list(table.obs.columns),
        sorted(table.uns),
        sorted(table.obsm),
        repr(sdata.attrs),
        {k: list(v.columns) for k, v in sdata.shapes.items()},
    )


def _measure_disk(patch, um_per_px, inner_um=15.0, annulus_um=(15.0, 22.0)):
    """Diameter (px) and centre (x, y in px, pixel ``i`` covering ``[i, i + 1)``) of the dark disk of a patch.

    The darkness of each pixel relative to the local background (the median of an annulus on the flat clearing
    around the mark) sums to the disk's area even where resampling blurred its edge.
    """
    grey = patch.astype(float).mean(axis=2)
    n_y, n_x = grey.shape
    yy, xx = np.meshgrid(np.arange(n_y) + 0.5, np.arange(n_x) + 0.5, indexing="ij")
    r_um = np.hypot(xx - n_x / 2, yy - n_y / 2) * um_per_px
    background = np.median(grey[(r_um > annulus_um[0]) & (r_um < annulus_um[1])])
    inner = r_um < inner_um
    darkness = (background - grey[inner]) / background
    area = darkness.sum()
    centre = np.array([(darkness * xx[inner]).sum(), (darkness * yy[inner]).sum()]) / area
    return 2 * np.sqrt(area / np.pi), centre


# --- the fixture as spatialdata-io reads it ---------------------------------------------------------------------


def test_reader_layout(sdata, visium):
    did = visium["dataset_id"]
    assert set(sdata.images) == {f"{did}_full_image", f"{did}_hires_image", f"{did}_lowres_image"}
    assert set(sdata.shapes) == {did}
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.obs_names.to_numpy(), visium["barcodes"])
    np.testing.assert_array_equal(table.X.toarray(), visium["counts"])
    np.testing.assert_array_equal(table.var_names.to_numpy(), visium["gene_names"])
    assert (table.obs["in_tissue"] == 1).all()
    shapes = sdata.shapes[did]
    xy = np.column_stack([shapes.geometry.x, shapes.geometry.y])
    np.testing.assert_allclose(xy, visium["spot_centers_px"][table.obs["spot_id"].to_numpy()])
    np.testing.assert_allclose(shapes["radius"], 27.5 / visium["pixel_size_um"])
    full = sdata.images[f"{did}_full_image"]["scale0"]["image"]
    assert (full.sizes["y"], full.sizes["x"]) == visium["image_shape"]
    assert full.dtype == np.uint8
    # the spots lie on the Visium array: 100 µm to the six nearest neighbours
    dist, _ = cKDTree(xy).query(xy, k=7)
    inner = dist[:, 6] * visium["pixel_size_um"] < 100.5  # spots with six neighbours
    assert inner.any()
    np.testing.assert_allclose(dist[inner, 1:] * visium["pixel_size_um"], 100.0, rtol=1e-4)


# --- patches from the full-resolution image -----------------------------------------------------------------------


def test_patches_from_fullres_use_spot_pitch(sdata, visium):
    patches = hs.pp.extract_patches(sdata, patch_size_um=64, patch_px=64, progress=False)
    assert patches.images.shape == (len(visium["barcodes"]), 64, 64, 3)
    assert patches.images.dtype == np.uint8
    np.testing.assert_array_equal(patches.obs_names, visium["barcodes"])
    assert not patches.at_border.any()
    images = patches.params["images"]
    assert list(images) == [_full(visium)]
    assert images[_full(visium)]["pixel_size_method"] == "spot_pitch"
    assert images[_full(visium)]["pixel_size_um"] == pytest.approx(visium["pixel_size_um"], rel=0.01)


@pytest.mark.parametrize(
    ("patch_size_um", "patch_px"),
    [(64, 64), (50, 72), (60, 25)],
    ids=["1um_per_px", "0.69um_per_px", "2.4um_per_px"],
)
def test_disk_has_its_size_in_um_and_is_centred(sdata, visium, patch_size_um, patch_px):
    patches = hs.pp.extract_patches(sdata, patch_size_um=patch_size_um, patch_px=patch_px, progress=False)
    um_per_px = patch_size_um / patch_px
    expected = visium["mark_diameter_um"] / um_per_px
    measured = np.array([_measure_disk(p, um_per_px) for p in patches.images], dtype=object)
    diameters = np.array([d for d, _ in measured])
    centres = np.stack([c for _, c in measured])
    np.testing.assert_allclose(diameters, expected, atol=1.0)
    assert abs(np.median(diameters) - expected) < 0.25
    np.testing.assert_allclose(centres, patch_px / 2, atol=1.0)
    # no systematic shift (spatialdata's pyramid trims odd sizes: up to half a pixel of a level far from the origin)
    assert np.abs(np.median(centres, axis=0) - patch_px / 2).max() < 0.3


# --- full-resolution vs hires and lowres images -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "patch_size_um", "patch_px", "max_mean_diff"),
    [("hires", 112, 56, 3.0), ("lowres", 224, 40, 4.0)],
)
def test_downscaled_images_agree_with_fullres(sdata, visium, which, patch_size_um, patch_px, max_mean_diff):
    from scipy.ndimage import gaussian_filter

    key = f"{visium['dataset_id']}_{which}_image"
    full = hs.pp.extract_patches(sdata, patch_size_um=patch_size_um, patch_px=patch_px, progress=False)
    low = hs.pp.extract_patches(sdata, image_key=key, patch_size_um=patch_size_um, patch_px=patch_px, progress=False)
    params = low.params["images"]
    assert list(params) == [key]
    assert params[key]["pixel_size_method"] == "spot_pitch"
    truth = visium["pixel_size_um"] / visium["scalefactors"][f"tissue_{which}_scalef"]
    assert params[key]["pixel_size_um"] == pytest.approx(truth, rel=0.01)
    np.testing.assert_array_equal(low.obs_names, full.obs_names)

    def blur(images):
        return gaussian_filter(images.astype(float), sigma=(0, 1.5, 1.5, 0))

    diff = np.abs(blur(full.images) - blur(low.images))
    assert diff.mean() < max_mean_diff
    # the same tissue: the mean colour of each patch follows the full-resolution one
    mean_full = full.images.reshape(len(full), -1, 3).mean(axis=1)
    mean_low = low.images.reshape(len(low), -1, 3).mean(axis=1)
    assert np.abs(mean_full - mean_low).max() < max_mean_diff
    assert np.corrcoef(mean_full[:, 1], mean_low[:, 1])[0, 1] > 0.98


def test_without_fullres_the_hires_image_is_used(tmp_path):
    info = write_visium_fixture(tmp_path / "outs", n_rows=6, n_cols=7, with_fullres=False, dataset_id="S2")
    sdata = spatialdata_io.visium(info["path"], dataset_id="S2")
    assert "S2_full_image" not in sdata.images
    patches = hs.pp.extract_patches(sdata, patch_size_um=64, patch_px=32, progress=False)
    params = patches.params["images"]
    assert list(params) == ["S2_hires_image"]
    assert params["S2_hires_image"]["pixel_size_method"] == "spot_pitch"
    assert params["S2_hires_image"]["pixel_size_um"] == pytest.approx(_hires_pixel_size(info), rel=0.01)
    diameters = np.array([_measure_disk(p, 2.0)[0] for p in patches.images])
    np.testing.assert_allclose(diameters, info["mark_diameter_um"] / 2.0, atol=1.0)


# --- tissue and grids ---------------------------------------------------------------------------------------------


def _labels_at(sdata, labels_key, xy_fullres, cs):
    """Values of a labels element at points given in the full-res pixels of coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    labels = sdata.labels[labels_key]
    affine = get_transformation(labels, cs).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    to_labels = np.linalg.inv(np.asarray(affine, dtype=float))
    xy = xy_fullres @ to_labels[:2, :2].T + to_labels[:2, 2]
    data = np.asarray(labels.data)
    ix = np.clip(np.floor(xy[:, 0]).astype(int), 0, data.shape[1] - 1)
    iy = np.clip(np.floor(xy[:, 1]).astype(int), 0, data.shape[0] - 1)
    return data[iy, ix]


@pytest.mark.parametrize("which", ["full", "hires"])
def test_detect_tissue_finds_the_section(fresh_sdata, visium, which):
    did = visium["dataset_id"]
    key = f"{did}_{which}_image"
    before = set(fresh_sdata.images)
    hs.pp.detect_tissue(fresh_sdata, image_key=key)
    assert set(fresh_sdata.images) == before
    assert f"{key}_tissue" in fresh_sdata.labels
    pos = visium["positions"]
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    found = _labels_at(fresh_sdata, f"{key}_tissue", xy, did) > 0
    truth = pos["in_tissue"].to_numpy() == 1
    assert truth.any()
    assert (~truth).any()
    assert (found == truth).mean() > 0.95
    mask = np.asarray(fresh_sdata.labels[f"{key}_tissue"].data) > 0
    assert mask.mean() == pytest.approx(visium["tissue_mask"].mean(), abs=0.02)


def test_make_grid_with_pixel_size(fresh_sdata, visium):
    key = _full(visium)
    px = visium["pixel_size_um"]
    hs.pp.make_grid(fresh_sdata, image_key=key, spacing_um=100, pixel_size_um=px)
    grid = fresh_sdata.shapes[f"{key}_grid"]
    cx, cy = grid.geometry.centroid.x.to_numpy(), grid.geometry.centroid.y.to_numpy()
    np.testing.assert_allclose(np.diff(np.unique(np.round(cx, 6))), 100 / px)
    np.testing.assert_allclose(grid["x_um"], cx * px)
    np.testing.assert_allclose(grid["y_um"], cy * px)
    np.testing.assert_allclose(grid.geometry.area, (100 / px) ** 2)
    # tiles kept are on the tissue
    tissue = visium["tissue_mask"]
    on_tissue = tissue[cy.astype(int), cx.astype(int)]
    assert on_tissue.mean() > 0.95
    h, w = visium["image_shape"]
    n_tissue_tiles = tissue.sum() / (100 / px) ** 2
    assert len(grid) == pytest.approx(n_tissue_tiles, rel=0.1)
    assert w * h / (100 / px) ** 2 > 1.3 * len(grid)


@pytest.mark.parametrize("image_key", ["V1_full_image", None])
def test_make_grid_uses_visium_spot_pitch(fresh_sdata, visium, image_key):
    key = _full(visium)
    # without image_key: the finest of the section's full/hires/lowres images
    hs.pp.make_grid(fresh_sdata, image_key=image_key, spacing_um=100, tissue=False)
    grid = fresh_sdata.shapes[f"{key}_grid"]
    h, w = visium["image_shape"]
    step = 100 / visium["pixel_size_um"]
    assert len(grid) == len(np.arange(step / 2, w, step)) * len(np.arange(step / 2, h, step))
    np.testing.assert_allclose(grid.geometry.area, step**2, rtol=0.02)


@pytest.mark.parametrize("table_key", ["table", None])
def test_grid_patches_have_the_image_pixel_size(fresh_sdata, visium, table_key):
    key = _full(visium)
    px = visium["pixel_size_um"]
    hs.pp.make_grid(fresh_sdata, image_key=key, spacing_um=50, tissue=False, pixel_size_um=px)
    patches = hs.pp.extract_patches(
        fresh_sdata,
        table_key=table_key,
        shapes_key=f"{key}_grid",
        spots=np.arange(10),
        patch_size_um=64,
        patch_px=64,
        progress=False,
    )
    assert patches.params["images"][key]["pixel_size_um"] == pytest.approx(px, rel=0.01)


# --- failed calls leave the SpatialData as it was -----------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda s: hs.pp.extract_patches(s, patch_size_um=-1, patch_px=32, progress=False),
        lambda s: hs.pp.extract_patches(s, patch_size_um=64, patch_px=0, progress=False),
        lambda s: hs.pp.extract_patches(s, image_key="missing", progress=False),
        lambda s: hs.pp.extract_patches(s, spots=["not-a-barcode"], progress=False),
        lambda s: hs.pp.make_grid(s, image_key="V1_full_image", spacing_um=-100, tissue=False),
        lambda s: hs.pp.make_grid(
            s, image_key="V1_full_image", spacing_um=100, pixel_size_um=0.5, min_tissue_fraction=2
        ),
        lambda s: hs.pp.detect_tissue(s, image_key="missing"),
        # fails late, after the tissue detection
        lambda s: hs.pp.make_grid(
            s, image_key="V1_full_image", spacing_um=2000, tile_size_um=5000, pixel_size_um=0.5, min_tissue_fraction=1
        ),
    ],
    ids=[
        "negative_patch_size",
        "zero_patch_px",
        "missing_image",
        "missing_spot",
        "negative_spacing",
        "bad_tissue_fraction",
        "tissue_missing_image",
        "no_tile_on_tissue",
    ],
)
def test_failed_call_leaves_sdata_unchanged(sdata, visium, call):
    assert visium["dataset_id"] == "V1"
    before = _snapshot(sdata)
    with pytest.raises((ValueError, KeyError)):
        call(sdata)
    assert _snapshot(sdata) == before

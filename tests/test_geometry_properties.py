"""Properties of histoseq's geometry, on random inputs (hypothesis): µm ↔ pixel transforms round-trip, a patch is
centred on its spot whichever pyramid level is read, and a grid tiles its image without overlap.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel, ShapesModel
from spatialdata.transformations import Affine, Identity, Scale, get_transformation

import histoseq as hs
from histoseq._sdata import centers_in_image, image_ref, pixel_size_from_affine

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None)


def _image(data: np.ndarray, transformations: dict, scale_factors=None):
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        scale_factors=scale_factors,
        transformations=transformations,
        c_coords=["r", "g", "b"],
    )


def _points(xy: np.ndarray, transformations: dict, radius: float = 1.0):
    n = len(xy)
    return ShapesModel.parse(
        np.asarray(xy, float),
        geometry=0,
        radius=np.full(n, radius),
        index=pd.Index(np.arange(n)),
        transformations=transformations,
    )


# --- µm <-> pixels ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    pixel_size=st.floats(0.1, 5.0),
    angle=st.floats(-np.pi, np.pi),
    shift=st.tuples(st.floats(-5000, 5000), st.floats(-5000, 5000)),
    points=st.lists(st.tuples(st.floats(0, 4000), st.floats(0, 4000)), min_size=1, max_size=8),
    radius_um=st.floats(1.0, 100.0),
)
def test_um_to_pixels_round_trips_through_any_placement(pixel_size, angle, shift, points, radius_um):
    """Spots given in µm land on the image pixels that the image's (rotated, shifted) µm transformation says."""
    c, s = np.cos(angle), np.sin(angle)
    to_um = np.array(
        [[pixel_size * c, -pixel_size * s, shift[0]], [pixel_size * s, pixel_size * c, shift[1]], [0, 0, 1]]
    )
    q = np.asarray(points, float)  # level-0 pixels (x, y)
    um = q @ to_um[:2, :2].T + to_um[:2, 2]
    affine = Affine(to_um, input_axes=("x", "y"), output_axes=("x", "y"))
    image = _image(np.zeros((3, 16, 16), np.uint8), {"s": Identity(), "s_um": affine})
    sdata = sd.SpatialData(images={"img": image}, shapes={"pts": _points(um, {"s_um": Identity()}, radius_um)})

    value, anisotropy = pixel_size_from_affine(to_um)
    assert value == pytest.approx(pixel_size, rel=1e-9) and anisotropy == pytest.approx(0.0, abs=1e-9)
    ref = image_ref(sdata, "img")
    assert ref.pixel_size_um == pytest.approx(pixel_size, rel=1e-9) and ref.pixel_size_method == "um_coordinate_system"
    centres, radius = centers_in_image(sdata, "pts", "img")
    np.testing.assert_allclose(centres, q, atol=1e-6 * (1 + np.abs(um).max() / pixel_size))
    np.testing.assert_allclose(radius, radius_um / pixel_size, rtol=1e-9)


@SETTINGS
@given(sx=st.floats(0.05, 20.0), sy=st.floats(0.05, 20.0), angle=st.floats(-np.pi, np.pi))
def test_pixel_size_of_an_anisotropic_affine_is_the_geometric_mean(sx, sy, angle):
    c, s = np.cos(angle), np.sin(angle)
    m = np.eye(3)
    m[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([sx, sy])
    value, anisotropy = pixel_size_from_affine(m)
    assert value == pytest.approx(np.sqrt(sx * sy), rel=1e-9)
    assert anisotropy == pytest.approx(abs(sx - sy) / max(sx, sy), abs=1e-9)


@SETTINGS
@given(
    pixel_size=st.floats(0.05, 10.0),
    points=st.lists(st.tuples(st.floats(0, 2000), st.floats(0, 2000)), min_size=2, max_size=8),
)
def test_set_pixel_size_adds_a_um_system_that_round_trips(pixel_size, points):
    """``hs.io.set_pixel_size`` places image and spots in µm consistently: pixels × size = µm, and back."""
    q = np.asarray(points, float)
    image = _image(np.zeros((3, 16, 16), np.uint8), {"s": Identity()})
    sdata = sd.SpatialData(images={"img": image}, shapes={"pts": _points(q, {"s": Identity()})})
    assert hs.io.set_pixel_size(sdata, pixel_size, image_key="img") == pytest.approx(pixel_size)
    assert image_ref(sdata, "img").pixel_size_um == pytest.approx(pixel_size, rel=1e-9)
    to_um = np.asarray(get_transformation(sdata.shapes["pts"], "s_um").to_affine_matrix(("x", "y"), ("x", "y")))
    np.testing.assert_allclose(q @ to_um[:2, :2].T + to_um[:2, 2], q * pixel_size, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(centers_in_image(sdata, "pts", "img")[0], q, atol=1e-9)


# --- patches are centred on their spot at every pyramid level ---------------------------------------------------------

SIZE = 256  # level-0 pixels of the dot images
SIGMA = 6.0  # level-0 pixels: 1.5 px at level 2, still a dot


@SETTINGS
@given(
    x=st.floats(64.0, 192.0),
    y=st.floats(64.0, 192.0),
    level=st.integers(0, 2),
    coarser=st.floats(1.0, 3.0),
    patch_px=st.sampled_from([16, 24, 32]),
    pixel_size=st.floats(0.25, 2.0),
)
def test_a_patch_is_centred_on_its_spot_whichever_level_is_read(x, y, level, coarser, patch_px, pixel_size):
    """A bright dot at a random sub-pixel position: the patch around it has its brightest pixel in the middle.

    The patch's pixels are ``coarser`` times the read level's (no upsampling), so one output pixel is the tolerance
    of the brightest pixel; the dot's intensity-weighted centre is held to a tenth of a pixel.
    """
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel i covers [i, i + 1)
    dot = 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * SIGMA**2))
    data = np.repeat(np.round(dot).astype(np.uint8)[None], 3, axis=0)
    t = {"s": Identity(), "s_um": Scale([pixel_size, pixel_size], axes=("y", "x"))}
    sdata = sd.SpatialData(
        images={"img": _image(data, t, scale_factors=[2, 2])}, shapes={"dot": _points(np.array([[x, y]]), t)}
    )
    patch_size_um = patch_px * coarser * 2**level * pixel_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patches = hs.pp.extract_patches(
            sdata,
            table_key=None,
            shapes_key="dot",
            patch_size_um=patch_size_um,
            patch_px=patch_px,
            level=level,
            pad_value=0,
            progress=False,
        )
    assert patches.params["images"]["img"]["level"] == level
    img = patches.images[0].astype(int).sum(axis=-1)
    iy, ix = np.unravel_index(np.argmax(img), img.shape)
    middle = (patch_px - 1) / 2  # the spot centre is the corner shared by the four middle pixels
    assert abs(iy - middle) <= 1 and abs(ix - middle) <= 1, (iy, ix, middle)
    # and to a tenth of an output pixel, weighing every pixel (a half-pixel slip of any level shows)
    weights = img / img.sum()
    rows, cols = np.mgrid[0:patch_px, 0:patch_px]
    np.testing.assert_allclose([(weights * rows).sum(), (weights * cols).sum()], [middle, middle], atol=0.1)


# --- a grid tiles its image -------------------------------------------------------------------------------------------


@SETTINGS
@given(
    height=st.integers(40, 400),
    width=st.integers(40, 400),
    pixel_size=st.floats(0.3, 2.0),
    tiles_across=st.floats(1.0, 25.0),
)
def test_grid_tiles_the_image_without_overlap(height, width, pixel_size, tiles_across):
    """``make_grid(tissue=False)``: square tiles of ``spacing_um`` abut on a lattice from the image's corner, one per
    (row, column), and cover the image but for a strip under half a tile at its right and bottom edges (the tile
    there would be centred outside the image)."""
    spacing_um = min(height, width) * pixel_size / tiles_across
    t = {"s": Identity(), "s_um": Scale([pixel_size, pixel_size], axes=("y", "x"))}
    sdata = sd.SpatialData(images={"img": _image(np.zeros((3, height, width), np.uint8), t)})
    grid = hs.pp.make_grid(sdata, image_key="img", spacing_um=spacing_um, tissue=False, inplace=False)
    step = spacing_um / pixel_size
    n_rows, n_cols = int(grid["grid_row"].max()) + 1, int(grid["grid_col"].max()) + 1
    # one tile per (row, column): the lattice is complete
    cells = set(zip(grid["grid_row"], grid["grid_col"]))
    assert len(cells) == len(grid) == n_rows * n_cols
    # each tile is the square [col · step, (col + 1) · step) × [row · step, (row + 1) · step)
    bounds = grid.geometry.bounds.to_numpy()
    expected = np.column_stack(
        [grid["grid_col"] * step, grid["grid_row"] * step, (grid["grid_col"] + 1) * step, (grid["grid_row"] + 1) * step]
    )
    np.testing.assert_allclose(bounds, expected, atol=1e-6 * step)
    np.testing.assert_allclose(grid.geometry.area, step**2, rtol=1e-6)
    # every tile's centre is in the image, and the tiles reach its far edges to within half a tile
    centres = np.column_stack([grid.geometry.centroid.x, grid.geometry.centroid.y])
    assert (centres >= 0).all() and (centres[:, 0] < width).all() and (centres[:, 1] < height).all()
    assert abs(n_cols * step - width) <= step / 2 + 1e-9 and abs(n_rows * step - height) <= step / 2 + 1e-9
    # pixels: each covered pixel by exactly one tile (no overlap), and every pixel up to the last tile covered
    for n, size in ((n_cols, width), (n_rows, height)):
        centre = np.arange(size) + 0.5
        count = ((centre[:, None] >= np.arange(n) * step) & (centre[:, None] < (np.arange(n) + 1) * step)).sum(axis=1)
        assert count.max() == 1
        assert (count[centre < n * step] == 1).all()

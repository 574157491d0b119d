"""Tissue detection and dense grids of tiles on the tissue (for super-resolution and image-only slides)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import image_levels, image_ref, resolve_image_key, resolve_key, store_element, transformations

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_MAX_DETECTION_PX = 4_000_000
#: Most pieces of tissue kept when squidpy's size threshold keeps none (pieces of one size)
_MAX_PIECES = 64


def _detection_level(levels: list[Any], max_pixels: int) -> int:
    """The finest level with at most ``max_pixels`` pixels (the coarsest if none is that small)."""
    for i, lvl in enumerate(levels):
        if lvl.sizes["y"] * lvl.sizes["x"] <= max_pixels:
            return i
    return len(levels) - 1


@contextmanager
def _quiet_detection() -> Iterator[None]:
    """Hush squidpy's progress messages (spatialdata's logger at INFO) and its scikit-image deprecation notices."""
    import warnings

    from spatialdata._logging import logger as sd_logger

    level = sd_logger.level
    sd_logger.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"squidpy\..*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"squidpy\..*")
            yield
    finally:
        sd_logger.setLevel(level)


def _tissue_mask(sdata: SpatialData, image_key: str, max_pixels: int, method: str) -> tuple[np.ndarray, int, int]:
    """Boolean tissue mask at a coarse pyramid level, that level, and the stride read from it.

    :func:`squidpy.experimental.im.detect_tissue` does the detection. Called on the whole element it
    upsamples its mask to full resolution (1.6 GB of labels for a 40,000² px slide), so it runs here on a
    temporary single-level image holding only the coarse level, and the mask stays small. When even the coarsest
    level has more than ``max_pixels`` pixels (a pyramid with few levels), every ``stride``-th pixel of it is read:
    mask pixel ``(i, j)`` covers level pixels ``[i * stride, (i + 1) * stride)``.
    """
    from spatialdata import SpatialData as SD
    from spatialdata.models import Image2DModel

    from .._utils import squidpy_image_tools

    sq_detect = squidpy_image_tools().detect_tissue

    levels = image_levels(sdata.images[image_key])
    lvl = _detection_level(levels, max_pixels)
    small = levels[lvl]
    if small.sizes["c"] not in (1, 3, 4):
        raise ValueError(f"Image {image_key!r} has {small.sizes['c']} channels; tissue detection needs RGB or gray.")
    stride = max(1, math.ceil(math.sqrt(small.sizes["y"] * small.sizes["x"] / max_pixels)))
    arr = np.asarray(small.data[:3, ::stride, ::stride])
    tmp = SD(images={"coarse": Image2DModel.parse(arr, dims=("c", "y", "x"))})
    with _quiet_detection():
        labels = sq_detect(tmp, "coarse", method=method, inplace=False)
        if not np.any(labels):
            # squidpy tells specimens from artefacts by an Otsu threshold on the pieces' log areas; pieces of
            # one size (two sections, cores of a biopsy) all fall below it and none is kept. Keep every piece
            # above squidpy's minimum area then.
            labels = sq_detect(tmp, "coarse", method=method, inplace=False, n_samples=_MAX_PIECES)
    mask = np.asarray(labels) > 0
    if not mask.any() or (mask.all() and arr.std() < 1):
        raise ValueError(
            f"No tissue found in image {image_key!r}: the image looks blank. Check that it is the H&E scan, or pass "
            "`tissue=False` to tile the whole image."
        )
    return mask, lvl, stride


def detect_tissue(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    method: str = "otsu",
    max_pixels: int = _MAX_DETECTION_PX,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
):
    """Detect the tissue of an H&E image at a coarse pyramid level.

    Runs :func:`squidpy.experimental.im.detect_tissue` on the finest level that has at most ``max_pixels``
    pixels, and keeps the mask at that resolution with a transformation that overlays it on the image.

    Parameters
    ----------
    sdata
        SpatialData with the image.
    image_key
        The image; inferred when there is one (or one section's images at several resolutions: the finest).
    method
        Detection method of squidpy (``"otsu"`` or ``"felzenszwalb"``).
    max_pixels
        Size of the level the detection runs on.
    key_added
        Name of the labels element; default ``f"{image_key}_tissue"``.
    overwrite
        Replace a labels element of that name (never replaced otherwise).
    inplace
        Add the labels element to ``sdata``; ``False`` returns it.

    Returns
    -------
    With ``inplace=True``, adds ``sdata.labels[key_added]`` (1 = tissue, 0 = background) and returns ``None``;
    otherwise returns the labels element.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1)
    >>> hs.pp.detect_tissue(sdata, image_key="section0_image")
    >>> "section0_image_tissue" in sdata.labels
    True

    """
    from spatialdata.models import Labels2DModel

    image_key = resolve_image_key(sdata, image_key)
    from spatialdata.transformations import Scale, Sequence

    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int | np.integer) or max_pixels < 1:
        raise ValueError(
            f"`max_pixels` must be a positive whole number of pixels (default {_MAX_DETECTION_PX:,}), got "
            f"{max_pixels!r}."
        )
    key = key_added or f"{image_key}_tissue"
    if inplace:
        taken = [kind for kind in ("images", "points", "shapes", "tables") if key in getattr(sdata, kind)]
        if taken:
            raise ValueError(f"An element {key!r} exists already ({taken[0]}); choose another `key_added`.")
        if key in sdata.labels and not overwrite:
            raise ValueError(
                f"Labels {key!r} exist already; pass `overwrite=True` to replace them, or another `key_added`."
            )
    mask, lvl, stride = _tissue_mask(sdata, image_key, max_pixels, method)
    level = image_levels(sdata.images[image_key])[lvl]
    to_level = Scale([stride, stride], axes=("y", "x"))
    place = {cs: t if stride == 1 else Sequence([to_level, t]) for cs, t in transformations(level).items()}
    labels = Labels2DModel.parse(mask.astype(np.uint8), dims=("y", "x"), transformations=place)
    if not inplace:
        return labels
    store_element(sdata, "labels", key, labels)
    logger.info("Tissue of %r: %.1f%% of the image; added labels %r.", image_key, 100 * mask.mean(), key)
    return None


def make_grid(
    sdata: SpatialData,
    *,
    spacing_um: float,
    image_key: str | None = None,
    tile_size_um: float | None = None,
    tissue: bool | str = True,
    min_tissue_fraction: float = 0.5,
    pixel_size_um: float | None = None,
    key_added: str | None = None,
    inplace: bool = True,
    overwrite: bool = False,
) -> gpd.GeoDataFrame | None:
    """Tile the tissue of an image with a square grid at a given spacing in µm.

    The grid is the geometry of predictions beyond the measured spots: super-resolved expression between spots,
    or a whole slide that has only an image. Cut patches on it with
    ``hs.pp.extract_patches(sdata, shapes_key=key_added)``.

    Parameters
    ----------
    sdata
        SpatialData with the image.
    spacing_um
        Centre-to-centre distance of the tiles in µm.
    image_key
        The image; inferred when there is one (or one section's images at several resolutions: the finest).
    tile_size_um
        Side of each tile in µm; by default ``spacing_um`` (tiles that touch).
    tissue
        Keep only tiles on tissue: ``True`` detects it (:func:`detect_tissue`), a string names a labels
        element holding a tissue mask, ``False`` keeps the whole image.
    min_tissue_fraction
        Fraction of a tile that must be tissue to keep it.
    pixel_size_um
        Level-0 pixel size of the image, when it has no micrometre coordinate system.
    key_added
        Name of the shapes element; default ``f"{image_key}_grid"``.
    inplace
        Add the shapes to ``sdata``; ``False`` returns them.
    overwrite
        Replace a grid of that name. Shapes that a table annotates (the measured spots) are never replaced.

    Returns
    -------
    With ``inplace=True``, adds ``sdata.shapes[key_added]``: square polygons in the image's pixel coordinates,
    on every coordinate system of the image, with columns ``grid_row``, ``grid_col``, ``x_um``, ``y_um`` and
    ``tissue_fraction``. Otherwise returns them.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1)
    >>> hs.pp.make_grid(sdata, image_key="section0_image", spacing_um=50)
    >>> len(sdata.shapes["section0_image_grid"]) > 0
    True

    """
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    image_key = resolve_image_key(sdata, image_key)
    key = key_added or f"{image_key}_grid"
    if inplace:
        _check_grid_key(sdata, key, overwrite)
    if not (_is_number(spacing_um) and np.isfinite(spacing_um) and spacing_um > 0):
        raise ValueError(f"`spacing_um` must be a positive distance in µm (a number), got {spacing_um!r}.")
    tile_size_um = spacing_um if tile_size_um is None else tile_size_um
    if not (_is_number(tile_size_um) and np.isfinite(tile_size_um) and tile_size_um > 0):
        raise ValueError(f"`tile_size_um` must be a positive size in µm, got {tile_size_um!r}.")
    if not 0 <= min_tissue_fraction <= 1:
        raise ValueError(f"`min_tissue_fraction` must lie in [0, 1], got {min_tissue_fraction!r}.")
    ref = image_ref(sdata, image_key, pixel_size_um=pixel_size_um)
    h, w = ref.shape
    step = spacing_um / ref.pixel_size_um
    half = tile_size_um / ref.pixel_size_um / 2
    xs = np.arange(step / 2, w, step)
    ys = np.arange(step / 2, h, step)
    if len(xs) * len(ys) > 5_000_000:
        raise ValueError(
            f"A {spacing_um} µm grid on image {image_key!r} has {len(xs) * len(ys):,} tiles; choose a larger spacing."
        )
    gx, gy = np.meshgrid(xs, ys)
    rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    if tissue is False:
        fraction = np.ones(gx.shape)
    else:
        if isinstance(tissue, str):
            mask_da = sdata.labels[resolve_key(tissue, list(sdata.labels.keys()), "labels element", "tissue")]
            mask_da = image_levels(mask_da)[0] if not hasattr(mask_da, "sizes") else mask_da
            mask = np.asarray(mask_da.data) > 0
        else:
            mask, _, _ = _tissue_mask(sdata, image_key, _MAX_DETECTION_PX, "otsu")
        fraction = _box_fraction(mask, gx, gy, half, (h, w))
    keep = fraction >= min_tissue_fraction
    if not keep.any():
        raise ValueError(
            f"No grid tile of image {image_key!r} has {min_tissue_fraction:.0%} tissue. Lower `min_tissue_fraction`, "
            "pass `tissue=False`, or check the image."
        )
    cx, cy = gx[keep], gy[keep]
    boxes = shapely.box(cx - half, cy - half, cx + half, cy + half)
    gdf = gpd.GeoDataFrame(
        {
            "grid_row": rows[keep],
            "grid_col": cols[keep],
            "x_um": cx * ref.pixel_size_um,
            "y_um": cy * ref.pixel_size_um,
            "tissue_fraction": fraction[keep],
        },
        geometry=boxes,
    )
    shapes = ShapesModel.parse(gdf, transformations=transformations(sdata.images[image_key]))
    if not inplace:
        return shapes
    store_element(sdata, "shapes", key, shapes)
    logger.info("Grid of %d tiles (%g µm) on %r; added shapes %r.", len(shapes), spacing_um, image_key, key)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _check_grid_key(sdata: SpatialData, key: str, overwrite: bool) -> None:
    """Refuse a grid name that would replace an element the user made (or a grid, without ``overwrite``)."""
    from .._sdata import annotating_tables

    kinds = [kind for kind in ("images", "labels", "points", "tables") if key in getattr(sdata, kind)]
    if kinds:
        raise ValueError(f"An element {key!r} exists already ({kinds[0]}); choose another `key_added`.")
    if key in sdata.shapes:
        tables = [t for t in annotating_tables(sdata, key) if not t.endswith("_table")]
        if tables:
            raise ValueError(
                f"Shapes {key!r} are annotated by table(s) {tables} (measured spots?); a grid never replaces them. "
                "Choose another `key_added`."
            )
        if not overwrite:
            raise ValueError(
                f"Shapes {key!r} exist already; pass `overwrite=True` to replace them, or another `key_added`."
            )


def _box_fraction(mask: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: float, shape0: tuple[int, int]) -> np.ndarray:
    """Fraction of mask pixels in the boxes ``[c - half, c + half)`` given in level-0 pixels (summed-area table)."""
    mh, mw = mask.shape
    fy, fx = mh / shape0[0], mw / shape0[1]
    sat = np.zeros((mh + 1, mw + 1))
    sat[1:, 1:] = mask.astype(float).cumsum(0).cumsum(1)

    def idx(v: np.ndarray, f: float, n: int) -> np.ndarray:
        return np.clip(np.rint(v * f).astype(int), 0, n)

    x0, x1 = idx(cx - half, fx, mw), idx(cx + half, fx, mw)
    y0, y1 = idx(cy - half, fy, mh), idx(cy + half, fy, mh)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area

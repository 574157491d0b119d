"""Where each spot lies in its piece of tissue, read from the image alone: the ``"tissue_position"`` encoder.

Many tissues are organised around their middle and along their length: the olfactory bulb in concentric
layers, a lymph node in cortex and medulla, a tumour with an invasive rim. Where a spot sits in that
organisation is something a patch, however large, cannot see. The encoder places each spot in the frame
of its tissue: its offsets from the tissue's centroid along the tissue's major and minor axes (the
principal axes of the tissue mask), as absolute values in µm, so that the frame does not depend on how
the section lies on the glass, nor on which way an axis points. The mask is that of
:func:`histoseq.pp.detect_tissue`, so the encoder needs no expression and works on dense grids and on
image-only slides like any other encoder.

It is not part of :func:`histoseq.tl.fit`'s default embedding, because it describes how a dataset's sections
lie rather than what the tissue looks like:

- it **helps** on layered or rimmed tissue whose sections are cut and laid alike (serial sections of one
  organ: the olfactory bulbs of ``benchmarks/accuracy.py`` gain from it), read as a second part,
  ``hs.tl.fit(embedding=["X_morphology_context", "X_tissue_position"])``;
- it **misleads** on tissue without such an organisation (a tumour of another patient loses accuracy with
  it), on sections of different sizes or shapes (the offsets are in µm), and wherever the frame moves: tissue
  in several pieces, a section cut off by the capture area or the image border, tissue outside the capture
  area. The encoder warns in the last cases, and about spots far off the tissue (off-tissue spots of a
  capture area); spots outside their image get NaN.

On a round piece of tissue the axes are arbitrary (``elongation`` near 1 in the summary), but the distance
to the centroid that the two offsets make together is not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from .._sdata import Region

logger = logging.getLogger(__name__)

#: Name of the encoder in :func:`histoseq.tl.embed`.
ENCODER = "tissue_position"
#: Names of its features, in column order.
FEATURE_NAMES = ("major_axis_offset_um", "minor_axis_offset_um")
#: Largest tissue mask (pixels) the detection runs on: a coarse pyramid level is plenty for a centroid.
MAX_MASK_PIXELS = 4_000_000
#: Pieces of tissue smaller than this share of the tissue area are debris and ignored.
MIN_PIECE_FRACTION = 0.01
#: Tissue must be at least this much darker than the glass (mean grey level, 0-255) to count as found.
MIN_CONTRAST = 10.0
#: Warn when the tissue runs along more than this share of the image border (a cut-off section).
MAX_BORDER_FRACTION = 0.1
#: Warn about spots further from the tissue than this share of its size (the square root of its area).
MAX_OFF_TISSUE = 0.25


def tissue_geometry(sdata: SpatialData, image_key: str, method: str = "otsu") -> dict[str, Any]:
    """The tissue mask of an image at a coarse level, cleaned, with its centroid and a few checks.

    Returns ``{"mask", "level", "downsample"}`` (the boolean mask, its pyramid level and its pixel size
    in level-0 pixels along ``(y, x)``) and the JSON-able summary ``"info"``: ``centroid_px`` (level-0
    ``(x, y)``), ``axes`` (the unit vectors of the tissue's major and minor axes, as level-0 ``(x, y)``),
    ``axis_sd_um`` (the tissue's spread along each, µm) and ``elongation`` (their ratio),
    ``tissue_area_mm2``, ``n_pieces`` (pieces holding at least 1% of the tissue), the share of the tissue
    in the largest piece, and ``border_fraction`` (share of the image border covered by tissue; a section
    cut off by the image edge has a centroid that is not its middle).
    """
    from scipy import ndimage as ndi

    from .._sdata import image_levels, image_ref
    from ..pp._grid import _tissue_mask

    ref = image_ref(sdata, image_key)
    try:
        mask, level, step = _tissue_mask(sdata, image_key, MAX_MASK_PIXELS, method)
    except ValueError as err:
        if "No tissue found" not in str(err):
            raise
        raise ValueError(
            f"The tissue_position encoder found no tissue in image {image_key!r}: the image looks blank. It measures "
            "where each spot lies in the tissue, so it needs the H&E (or stained) image with tissue on glass."
        ) from None
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask, iterations=2))
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    gray = np.asarray(image_levels(sdata.images[image_key])[level].data[:3, ::step, ::step], dtype=np.float32).mean(
        axis=0
    )
    # tissue is darker than glass in bright field, brighter than the background in fluorescence
    contrast = abs(float(gray[~mask].mean() - gray[mask].mean())) if 0 < mask.sum() < mask.size else 0.0
    if sizes.sum() == 0 or contrast < MIN_CONTRAST:
        raise ValueError(
            f"The tissue_position encoder found no tissue in image {image_key!r}: what the detection split off "
            f"hardly differs from the rest ({contrast:.1f} grey levels apart). It measures where each spot lies in the "
            "tissue, so it needs the H&E (or stained) image with tissue on glass."
        )
    keep = np.flatnonzero(sizes >= MIN_PIECE_FRACTION * sizes.sum()) + 1
    mask = np.isin(labels, keep)
    dy, dx = (step * d for d in ref.level_downsample(level))
    # the mask's pixel (i, j) covers [i, i + 1) at its level: its centre is at i + 0.5
    yy, xx = np.nonzero(mask)
    points = np.column_stack([(xx + 0.5) * dx, (yy + 0.5) * dy])  # level-0 (x, y)
    centroid = points.mean(axis=0)
    variance, axes = np.linalg.eigh(np.cov((points - centroid).T))
    variance, axes = variance[::-1].clip(0.0), axes[:, ::-1]  # major axis first
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), [0, 1]] < 0, -1.0, 1.0)  # a fixed sign (no meaning)
    spread_um = np.sqrt(variance) * ref.pixel_size_um
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    px_area_mm2 = ref.pixel_size_um**2 * dy * dx / 1e6
    info = {
        "centroid_px": centroid.tolist(),
        "axes": axes.T.tolist(),
        "axis_sd_um": spread_um.tolist(),
        "elongation": float(spread_um[0] / spread_um[1]) if spread_um[1] > 0 else float("inf"),
        "tissue_area_mm2": float(mask.sum() * px_area_mm2),
        "n_pieces": len(keep),
        "largest_piece_fraction": float(sizes[keep - 1].max() / sizes[keep - 1].sum()),
        "border_fraction": float(border.mean()),
        "contrast": contrast,
        "mask_level": int(level),
        "method": method,
    }
    if info["border_fraction"] > MAX_BORDER_FRACTION:
        logger.warning(
            "The tissue of image %r runs along %.0f%% of the image border: if the section is cut off, its centroid "
            "is not the middle of the tissue, and the tissue_position features mean less there.",
            image_key,
            100 * info["border_fraction"],
        )
    if info["largest_piece_fraction"] < 0.5:
        logger.warning(
            "The tissue of image %r is in %d pieces, none holding half of it: the tissue_position features are "
            "measured in the frame (centroid and axes) of all pieces together.",
            image_key,
            info["n_pieces"],
        )
    return {"mask": mask, "level": int(level), "downsample": (dy, dx), "info": info}


def tissue_position(
    sdata: SpatialData, regions: list[Region], n_obs: int, method: str = "otsu"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Each spot's offsets (µm, absolute) from its tissue's centroid along the major and minor axes.

    ``(n_obs, 2)`` float32, in the order of :data:`FEATURE_NAMES`.

    Rows not in ``regions`` are NaN, and so are spots whose centre lies outside their image (with a warning); spots
    far off the tissue (:data:`MAX_OFF_TISSUE`) are warned about. Returns the features and, per image, the summary of
    :func:`tissue_geometry`.
    """
    import warnings

    out = np.full((n_obs, len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    images: dict[str, dict[str, Any]] = {}
    distances: dict[str, Any] = {}
    outside: list[str] = []
    far: list[str] = []
    for region in regions:
        key = region.image.key
        if key not in images:
            geometry = tissue_geometry(sdata, key, method)
            images[key], distances[key] = geometry["info"], _distance_to_tissue(geometry, region.image.pixel_size_um)
        centroid, axes = np.asarray(images[key]["centroid_px"]), np.asarray(images[key]["axes"])
        xy = region.centers_px[:, :2]
        h, w = region.image.shape
        inside = np.isfinite(xy).all(axis=1) & (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        features = np.abs((xy - centroid) @ axes.T) * region.image.pixel_size_um
        features[~inside] = np.nan  # the image says nothing there
        out[region.rows] = features
        outside += list(region.names[~inside])
        limit = MAX_OFF_TISSUE * np.sqrt(images[key]["tissue_area_mm2"]) * 1e3
        off = distances[key](xy[inside]) > limit
        far += list(region.names[inside][off])
    if outside:
        warnings.warn(
            f"{len(outside)} spot(s) lie outside their image, e.g. {outside[:3]}: their tissue_position is NaN. "
            "Check that the spots and the image share the right coordinate system, or leave them out with `spots=`.",
            UserWarning,
            stacklevel=3,
        )
    if far:
        warnings.warn(
            f"{len(far)} spot(s) lie far off the tissue (further from it than {MAX_OFF_TISSUE:.0%} of its size), "
            f"e.g. {far[:3]}: their tissue_position describes the glass, not the tissue. Leave off-tissue spots out "
            "with `spots=` (e.g. Visium's `obs['in_tissue'] == 1`), or check that the spots belong to this image.",
            UserWarning,
            stacklevel=3,
        )
    return out, images


def _distance_to_tissue(geometry: dict[str, Any], pixel_size_um: float) -> Any:
    """A function of level-0 ``(x, y)`` points giving their distance (µm) to the nearest pixel of the tissue mask."""
    from scipy import ndimage as ndi

    mask = geometry["mask"]
    dy, dx = geometry["downsample"]
    edt = ndi.distance_transform_edt(~mask, sampling=(dy * pixel_size_um, dx * pixel_size_um))

    def distance(xy: np.ndarray) -> np.ndarray:
        i = np.clip((xy[:, 1] / dy).astype(int), 0, mask.shape[0] - 1)
        j = np.clip((xy[:, 0] / dx).astype(int), 0, mask.shape[1] - 1)
        return edt[i, j]

    return distance

"""Give a SpatialData image a micrometre coordinate system."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import (
    centers_in_image,
    get_table,
    is_um_coordinate_system,
    median_nn_distance,
    resolve_key,
    table_keys,
    transformations,
    um_coordinate_system_name,
)
from .._utils import jsonable

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def record_pixel_size(sdata: SpatialData, image_key: str, value: float, method: str, **details: Any) -> None:
    """Record in ``sdata.attrs["histoseq"]["pixel_size_um"]`` how an image's pixel size was obtained."""
    hs = dict(sdata.attrs.get("histoseq", {}))
    sizes = dict(hs.get("pixel_size_um", {}))
    sizes[image_key] = {"value": float(value), "method": method, **{k: jsonable(v) for k, v in details.items()}}
    hs["pixel_size_um"] = sizes
    sdata.attrs["histoseq"] = hs


def set_pixel_size(
    sdata: SpatialData,
    pixel_size_um: float | None = None,
    *,
    image_key: str | None = None,
    spot_pitch_um: float | None = None,
    table_key: str | None = "table",
    coordinate_system: str | None = None,
    inplace: bool = True,
) -> float:
    """Add a micrometre coordinate system beside an image's pixel coordinate system.

    Every element that maps to the image's pixel coordinate system ``cs`` (the image, its spots, masks)
    gets a transformation to ``f"{cs}_um"`` as well, so that later steps read sizes in µm. How the pixel
    size was obtained is recorded in ``sdata.attrs["histoseq"]["pixel_size_um"][image_key]``.

    Parameters
    ----------
    sdata
        The SpatialData object.
    pixel_size_um
        Size of a level-0 pixel of the image in µm, when known (from the scanner's metadata).
    image_key
        The image. Inferred when there is only one.
    spot_pitch_um
        Instead of ``pixel_size_um``: the centre-to-centre distance of neighbouring spots in µm (200 for legacy
        Spatial Transcriptomics, 100 for Visium). The pixel size is this divided by the median
        nearest-neighbour distance of the table's spots in pixels.
    table_key
        Table whose spots measure the pitch.
    coordinate_system
        The pixel coordinate system of the image, when it has several.
    inplace
        Write the coordinate system; ``False`` only computes the pixel size.

    Returns
    -------
    The pixel size in µm. With ``inplace=True``, adds the coordinate system ``f"{coordinate_system}_um"`` to
    the elements and records the provenance in ``sdata.attrs["histoseq"]``.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1)
    >>> hs.io.set_pixel_size(sdata, 0.5, image_key="section0_image", coordinate_system="section0")
    0.5

    """
    from spatialdata.transformations import Scale, Sequence, set_transformation

    if (pixel_size_um is None) == (spot_pitch_um is None):
        raise ValueError("Give exactly one of `pixel_size_um` (µm per pixel) or `spot_pitch_um` (µm between spots).")
    image_key = resolve_key(image_key, list(sdata.images.keys()), "image", "image_key")
    image = sdata.images[image_key]
    pixel_systems = [cs for cs in transformations(image) if not is_um_coordinate_system(cs)]
    cs = resolve_key(coordinate_system, pixel_systems, "pixel coordinate system of the image", "coordinate_system")
    details: dict[str, Any] = {}
    if spot_pitch_um is not None:
        if not (np.isfinite(spot_pitch_um) and spot_pitch_um > 0):
            raise ValueError(f"`spot_pitch_um` must be a positive distance in µm, got {spot_pitch_um!r}.")
        _, table = get_table(sdata, table_key)
        regions, _, _ = table_keys(table)
        regions = [r for r in regions if r in sdata.shapes and cs in transformations(sdata.shapes[r])]
        if not regions:
            raise ValueError(f"No spots of table {table_key!r} lie in coordinate system {cs!r}; give `pixel_size_um`.")
        nn = median_nn_distance(np.concatenate([centers_in_image(sdata, r, image_key)[0] for r in regions]))
        pixel_size_um = spot_pitch_um / nn
        details = {"spot_pitch_um": float(spot_pitch_um), "median_nn_px": nn}
        method = "spot_pitch"
    else:
        if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise ValueError(f"`pixel_size_um` must be a positive number, got {pixel_size_um!r}.")
        method = "given"
    pixel_size_um = float(pixel_size_um)
    if not inplace:
        return pixel_size_um
    um_cs = um_coordinate_system_name(cs)
    scale = Scale([pixel_size_um, pixel_size_um], axes=("x", "y"))
    backed = sdata.is_backed()
    for _, name, element in sdata.gen_spatial_elements():
        t = transformations(element)
        if cs in t:
            set_transformation(element, Sequence([t[cs], scale]), to_coordinate_system=um_cs)
            if backed:
                sdata.write_transformations(name)
    record_pixel_size(sdata, image_key, pixel_size_um, method, coordinate_system=um_cs, **details)
    if backed:
        sdata.write_attrs()
    logger.info("Image %r: %.4f µm/px (%s); added coordinate system %r.", image_key, pixel_size_um, method, um_cs)
    return pixel_size_um

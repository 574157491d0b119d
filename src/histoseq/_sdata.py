"""How histoseq finds things in a SpatialData object: tables, regions, images, pixel sizes.

Every public function resolves its inputs through this module, so that the same rules hold everywhere:

- a key that is ``None`` is inferred when exactly one candidate exists, and a ``ValueError`` lists the
  candidates when there are several;
- the spots of a table region are matched to an image through a coordinate system they share
  (the layout of :func:`spatialdata_io.visium` and of :func:`histoseq.io.read_legacy_st`);
- the pixel size of an image in µm comes from its transformation to a micrometre coordinate system
  (a name ending in ``"_um"``, see :func:`is_um_coordinate_system`), from the spot pitch of a known
  technology, or from the caller, and is never silently assumed.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import anndata as ad
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Centre-to-centre spot distance of known technologies, in µm.
SPOT_PITCH_UM = {"legacy_st": 200.0, "visium": 100.0}
#: Spot diameter of known technologies, in µm.
SPOT_DIAMETER_UM = {"legacy_st": 100.0, "visium": 55.0}

_UM_NAMES = {"um", "µm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres"}


def is_um_coordinate_system(name: str) -> bool:
    """Whether a coordinate system name denotes micrometres.

    histoseq names the micrometre system of a section ``f"{sample_id}_um"``; a system called ``"um"``,
    ``"micrometers"`` (and similar) or ending in ``"_um"`` / ``"_micrometers"`` counts too.
    """
    low = name.lower()
    return low in _UM_NAMES or any(low.endswith("_" + n) for n in _UM_NAMES)


def um_coordinate_system_name(pixel_cs: str) -> str:
    """The name of the micrometre coordinate system that sits beside a pixel one."""
    return f"{pixel_cs}_um"


def resolve_key(key: str | None, candidates: Iterable[str], what: str, argument: str) -> str:
    """Return ``key`` if valid, or the single candidate; raise a helpful error otherwise."""
    candidates = list(candidates)
    if key is not None:
        if key not in candidates:
            raise KeyError(
                f"{what} {key!r} not found. Available: {sorted(candidates) or 'none'}. "
                f"Pass one of them as `{argument}`."
            )
        return key
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"The SpatialData object has no {what}; add one or pass `{argument}`.")
    raise ValueError(f"Several {what}s found: {sorted(candidates)}. Choose one with `{argument}=...`.")


def check_spatialdata(sdata: Any, argument: str = "sdata") -> None:
    """Raise a ``TypeError`` that names the fix when ``sdata`` is not a SpatialData object (a path, a table)."""
    from spatialdata import SpatialData

    if isinstance(sdata, SpatialData):
        return
    import anndata as ad

    if isinstance(sdata, ad.AnnData):
        hint = "pass the SpatialData that holds this table (with its images and spots), not the table itself"
    elif isinstance(sdata, str | bytes) or hasattr(sdata, "__fspath__"):
        hint = "read the store first: `sdata = spatialdata.read_zarr(path)`"
    else:
        hint = "read or build one first (e.g. `spatialdata.read_zarr(path)`, `hs.io.read_legacy_st(...)`)"
    raise TypeError(f"`{argument}` must be a SpatialData object, got {type(sdata).__name__}: {hint}.")


def get_table(sdata: SpatialData, table_key: str | None) -> tuple[str, ad.AnnData]:
    """The table under ``table_key`` (inferred when there is one), with its annotation metadata checked."""
    check_spatialdata(sdata)
    key = resolve_key(table_key, list(sdata.tables.keys()), "table", "table_key")
    table = sdata.tables[key]
    if "spatialdata_attrs" not in table.uns:
        raise ValueError(
            f"Table {key!r} does not annotate any element (no `uns['spatialdata_attrs']`). Parse it with "
            "`spatialdata.models.TableModel.parse(adata, region=..., region_key=..., instance_key=...)`."
        )
    return key, table


def table_keys(table: ad.AnnData) -> tuple[list[str], str, str]:
    """``(regions, region_key, instance_key)`` of a table."""
    from spatialdata.models import get_table_keys

    regions, region_key, instance_key = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    return regions, region_key, instance_key


def affine_xy(transformation: Any) -> np.ndarray:
    """3×3 affine matrix acting on ``(x, y, 1)`` of a spatialdata transformation."""
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def transformations(element: Any) -> dict[str, Any]:
    """All transformations of an element, keyed by coordinate system."""
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(element, get_all=True))


def shared_coordinate_systems(a: Any, b: Any) -> list[str]:
    """Coordinate systems both elements map to, pixel systems first."""
    common = set(transformations(a)) & set(transformations(b))
    return sorted(common, key=lambda n: (is_um_coordinate_system(n), n))


def pixel_size_from_affine(matrix: np.ndarray) -> tuple[float, float]:
    """Isotropic pixel size and its anisotropy (relative difference of the axis scales) of an affine."""
    lin = matrix[:2, :2]
    sx, sy = np.linalg.norm(lin[:, 0]), np.linalg.norm(lin[:, 1])
    return float(np.sqrt(abs(np.linalg.det(lin)))), float(abs(sx - sy) / max(sx, sy))


def median_nn_distance(xy: np.ndarray) -> float:
    """Median distance of each point to its nearest neighbour."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        raise ValueError("At least two spots are needed to measure the spot pitch.")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def image_levels(image: Any) -> list[xr.DataArray]:
    """The levels of an image element, finest first (a single DataArray is one level)."""
    import xarray as xr

    if isinstance(image, xr.DataArray):
        return [image]
    keys = sorted(image.children, key=lambda k: int(k.replace("scale", "")))
    return [next(iter(image[k].ds.data_vars.values())) for k in keys]


def check_rgb_uint8(image_key: str, level0: xr.DataArray, rgb: bool) -> int:
    """Validate channels and dtype of an image; return the number of channels patches will have."""
    if level0.dtype != np.uint8:
        raise TypeError(
            f"Image {image_key!r} has dtype {level0.dtype}, but histoseq reads 8-bit images (uint8), as H&E scans "
            "are. Rescale it first, e.g. `skimage.exposure.rescale_intensity(img, out_range=np.uint8)`, or for "
            "uint16 fluorescence `(img // 256).astype(np.uint8)`, and parse it again with Image2DModel."
        )
    n_channels = int(level0.sizes["c"])
    if rgb and n_channels not in (3, 4):
        raise ValueError(
            f"Image {image_key!r} has {n_channels} channel(s): it is not an RGB H&E image (a grayscale or "
            "nuclei-stained image?). Pass `rgb=False` to cut single-channel patches, or convert the image to RGB "
            "(e.g. `np.repeat(img, 3, axis=0)` for a grayscale stain)."
        )
    return 3 if rgb else n_channels


@dataclass(frozen=True)
class ImageRef:
    """An image element with the geometry that patches need.

    Attributes
    ----------
    key
        Name of the image element.
    levels
        Pyramid levels, finest first, each ``(c, y, x)``.
    pixel_size_um
        Size of a level-0 pixel in µm.
    pixel_size_method
        How :attr:`pixel_size_um` was obtained (``"um_coordinate_system"``, ``"spot_pitch"``, ``"argument"``).

    """

    key: str
    levels: tuple[Any, ...]
    pixel_size_um: float
    pixel_size_method: str

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        lvl = self.levels[0]
        return int(lvl.sizes["y"]), int(lvl.sizes["x"])

    def level_to_level0(self, level: int) -> np.ndarray:
        """Affine (3×3, on ``(x, y, 1)``) from intrinsic pixels of ``level`` to those of level 0.

        Read from the levels' transformations: spatialdata's pyramids halve exactly and drop an odd last
        pixel, so the shape ratio (5901 / 2950) would misplace windows by up to half a pixel.
        """
        if level == 0:
            return np.eye(3)
        t0, tk = transformations(self.levels[0]), transformations(self.levels[level])
        common = sorted(set(t0) & set(tk))
        if common:
            return np.linalg.inv(affine_xy(t0[common[0]])) @ affine_xy(tk[common[0]])
        h0, w0 = self.shape
        lvl = self.levels[level]
        return np.diag([w0 / int(lvl.sizes["x"]), h0 / int(lvl.sizes["y"]), 1.0])

    def level_downsample(self, level: int) -> tuple[float, float]:
        """Size of a pixel of ``level`` in level-0 pixels, along ``(y, x)``."""
        m = self.level_to_level0(level)
        return float(np.linalg.norm(m[:2, 1])), float(np.linalg.norm(m[:2, 0]))

    def choose_level(self, target_pixel_size_um: float, tolerance: float = 0.05) -> int:
        """The coarsest level whose pixels are not coarser than the target (within ``tolerance``).

        Reading from that level and downsampling by less than 2× keeps all detail the target resolution
        can hold, at the least reading cost.
        """
        best = 0
        for i in range(len(self.levels)):
            ds = max(self.level_downsample(i))
            if self.pixel_size_um * ds <= target_pixel_size_um * (1 + tolerance):
                best = i
        return best


@dataclass(frozen=True)
class Region:
    """One annotated region (a section's spots, or a grid) resolved to its image.

    ``centers_px`` are the ``(x, y)`` centres in level-0 intrinsic pixel coordinates of :attr:`image`
    (pixel ``i`` covers ``[i, i + 1)``, as in spatialdata); ``rows`` are positions in the table (or in the
    shapes element when there is no table).
    """

    shapes_key: str
    image: ImageRef
    centers_px: np.ndarray
    rows: np.ndarray
    names: np.ndarray
    radius_px: np.ndarray | None
    order: np.ndarray  # position of each spot in the caller's selection


def _shape_centers(shapes: Any) -> tuple[np.ndarray, np.ndarray | None]:
    geom = shapes.geometry
    if (geom.geom_type == "Point").all():
        xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
    else:
        c = geom.centroid
        xy = np.column_stack([c.x.to_numpy(), c.y.to_numpy()])
    radius = shapes["radius"].to_numpy(dtype=float) if "radius" in shapes.columns else None
    return xy.astype(float), radius


def is_map(image: Any) -> bool:
    """Whether an image element is a map of values (float: attention, expected expression), not a scan.

    Scans are stored as integers (uint8 H&E, uint16 fluorescence); the dense maps that histoseq and the
    synthetic ground truth write are float. Maps are never taken for the image of a section.
    """
    return np.dtype(image_levels(image)[0].dtype).kind == "f"


def scan_keys(sdata: SpatialData, keys: Iterable[str]) -> list[str]:
    """``keys`` without the maps (:func:`is_map`), unless all of them are maps."""
    keys = list(keys)
    scans = [k for k in keys if not is_map(sdata.images[k])]
    return scans or keys


def candidate_images(sdata: SpatialData, element: Any) -> list[str]:
    """Image elements (scans before maps) that share a coordinate system with ``element``."""
    cs = set(transformations(element))
    return scan_keys(sdata, [k for k, im in sdata.images.items() if cs & set(transformations(im))])


def pick_image(sdata: SpatialData, element: Any, image_key: str | None, what: str) -> str:
    """The image of ``element``: the given one, or the finest image that shares a coordinate system with it.

    Several images on one coordinate system are usually one scan at several resolutions (Visium's full-res,
    hires and lowres images); the finest keeps every later choice of resolution open.
    """
    if image_key is not None:
        return resolve_key(image_key, list(sdata.images.keys()), "image", "image_key")
    candidates = candidate_images(sdata, element)
    if not candidates:
        raise ValueError(
            f"No image shares a coordinate system with {what}. Add the H&E image with a transformation to the "
            f"coordinate system of the spots ({sorted(transformations(element))}), or pass `image_key`."
        )

    def pixel_size_in_cs(k: str) -> float:
        im = sdata.images[k]
        cs = shared_coordinate_systems(im, element)[0]
        return pixel_size_from_affine(affine_xy(transformations(im)[cs]))[0]

    return min(candidates, key=pixel_size_in_cs)


def _technology(sdata: SpatialData) -> str | None:
    if sdata.attrs.get("spatialdata_io_reader") == "visium":
        return "visium"
    return sdata.attrs.get("histoseq", {}).get("technology")


def measured_spot_pitch_px(sdata: SpatialData, image_key: str) -> float | None:
    """Median nearest-neighbour distance, in level-0 pixels of the image, of the spots that tables annotate.

    Only table regions that share a coordinate system with the image count (never a grid or other shapes):
    the measured spots of the section. ``None`` when there are none.
    """
    image = sdata.images[image_key]
    pitches = []
    for table in sdata.tables.values():
        if "spatialdata_attrs" not in table.uns:
            continue
        for region in table_keys(table)[0]:
            if region in sdata.shapes and shared_coordinate_systems(sdata.shapes[region], image):
                centers, _ = centers_in_image(sdata, region, image_key)
                if len(centers) >= 2:
                    pitches.append(median_nn_distance(centers))
    return float(np.median(pitches)) if pitches else None


def resolve_pixel_size(sdata: SpatialData, image_key: str, *, pixel_size_um: float | None = None) -> tuple[float, str]:
    """Pixel size of level 0 of ``image_key`` in µm, and how it was obtained.

    In order: the ``pixel_size_um`` argument; the image's transformation to a micrometre coordinate system;
    the spot pitch of a known technology (Visium data read by spatialdata-io: 100 µm), measured on the spots
    that the tables annotate on this image.
    """
    if pixel_size_um is not None:
        if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
            raise ValueError(f"`pixel_size_um` must be a positive number, got {pixel_size_um!r}.")
        return float(pixel_size_um), "argument"
    image = sdata.images[image_key]
    level0_affines = {cs: affine_xy(t) for cs, t in transformations(image).items()}
    um = [cs for cs in level0_affines if is_um_coordinate_system(cs)]
    if um:
        value, aniso = pixel_size_from_affine(level0_affines[um[0]])
        if aniso > 0.01:
            logger.warning("Image %r has anisotropic pixels (%.1f%%): using the mean.", image_key, 100 * aniso)
        return value, "um_coordinate_system"
    tech = _technology(sdata)
    if tech in SPOT_PITCH_UM:
        nn = measured_spot_pitch_px(sdata, image_key)
        if nn is not None:
            return SPOT_PITCH_UM[tech] / nn, "spot_pitch"
    raise ValueError(
        f"The pixel size of image {image_key!r} is unknown: it has no transformation to a micrometre coordinate "
        f"system (one named like '<name>_um'; it has {sorted(level0_affines)}). Pass `pixel_size_um=...`, or "
        "record it once with `hs.io.set_pixel_size(sdata, pixel_size_um=...)` (or `spot_pitch_um=...` to "
        "derive it from the spot grid)."
    )


def image_ref(sdata: SpatialData, image_key: str, *, pixel_size_um: float | None = None) -> ImageRef:
    """Resolve an image element into an :class:`ImageRef`."""
    value, method = resolve_pixel_size(sdata, image_key, pixel_size_um=pixel_size_um)
    return ImageRef(image_key, tuple(image_levels(sdata.images[image_key])), value, method)


def resolve_image_key(sdata: SpatialData, image_key: str | None) -> str:
    """The image to work on: ``image_key``, the only image, or the finest of one section's images.

    Several images on one coordinate system (Visium's full-resolution, hires and lowres images) are one
    section at several resolutions: the finest is taken. Images of several sections need ``image_key``.
    """
    check_spatialdata(sdata)
    keys = list(sdata.images.keys())
    if image_key is not None:
        return resolve_key(image_key, keys, "image", "image_key")
    keys = scan_keys(sdata, keys)
    if len(keys) <= 1:
        return resolve_key(image_key, keys, "image", "image_key")
    systems = [set(transformations(sdata.images[k])) for k in keys]
    if set.intersection(*systems):
        cs = sorted(set.intersection(*systems))[0]
        return min(keys, key=lambda k: pixel_size_from_affine(affine_xy(transformations(sdata.images[k])[cs]))[0])
    raise ValueError(f"Several images found: {sorted(keys)}. Choose one with `image_key=...`.")


def centers_in_image(
    sdata: SpatialData, shapes_key: str, image_key: str, *, as_size: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Centres (and radii) of a shapes element in level-0 pixels of an image, via a shared coordinate system.

    With ``as_size``, polygons get a radius too: half the side of the square of the same area.
    """
    shapes = sdata.shapes[shapes_key]
    image = sdata.images[image_key]
    common = shared_coordinate_systems(shapes, image)
    if not common:
        raise ValueError(
            f"Shapes {shapes_key!r} and image {image_key!r} share no coordinate system "
            f"({sorted(transformations(shapes))} vs {sorted(transformations(image))}). Add a transformation "
            "that places the spots on the image, or choose the matching `image_key`."
        )
    cs = common[0]
    to_image = np.linalg.inv(affine_xy(transformations(image)[cs])) @ affine_xy(transformations(shapes)[cs])
    xy, radius = _shape_centers(shapes)
    if radius is None and not (shapes.geometry.geom_type == "Point").all():
        # polygons: the side of the square of the same area, in the shapes' units (a grid tile's side)
        radius = np.sqrt(np.abs(shapes.geometry.area.to_numpy(dtype=float))) / 2 if as_size else None
    xy_img = xy @ to_image[:2, :2].T + to_image[:2, 2]
    if radius is not None:
        radius = radius * pixel_size_from_affine(to_image)[0]
    return xy_img, radius


def select_rows(n: int, names: Sequence[str], subset: Any) -> np.ndarray:
    """Positions selected by ``subset``: ``None`` (all), a boolean mask, names, or integer positions."""
    if subset is None:
        return np.arange(n)
    arr = np.asarray(subset)
    if arr.size == 0 and arr.dtype != bool:  # an empty list: no spot
        return np.zeros(0, dtype=int)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"A boolean `spots` mask must have length {n}, got {arr.shape}.")
        return np.flatnonzero(arr)
    if arr.dtype.kind in "iu":
        if n >= 3 and arr.shape == (n,) and np.isin(arr, (0, 1)).all():
            raise TypeError(
                f"`spots` is an array of {n} zeros and ones, one per spot: a mask? Integers are read as positions "
                "(it would select spots 0 and 1 over and over). Pass booleans, `np.asarray(spots, dtype=bool)`."
            )
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise IndexError(f"`spots` positions must lie in [0, {n}).")
        return np.mod(arr, n).astype(int)
    if arr.dtype.kind in "fc":
        raise TypeError(
            f"`spots` holds numbers of dtype {arr.dtype}; pass integer positions (`np.asarray(spots, dtype=int)`), "
            "a boolean mask or spot names."
        )
    index = {name: i for i, name in enumerate(names)}
    missing = [s for s in arr.tolist() if s not in index]
    if missing:
        raise KeyError(f"{len(missing)} spot name(s) not in the table, e.g. {missing[:3]}.")
    counts = collections.Counter(names) if len(index) < len(names) else {}
    ambiguous = sorted({s for s in arr.tolist() if counts.get(s, 1) > 1})
    if ambiguous:
        raise ValueError(
            f"{len(ambiguous)} spot name(s) occur more than once in the table's `obs_names`, e.g. {ambiguous[:3]}: "
            "a name does not say which spot. Make the names unique first (`table.obs_names_make_unique()`), or "
            "select spots by position or with a boolean mask."
        )
    return np.array([index[s] for s in arr.tolist()], dtype=int)


def warn_duplicated_names(table: ad.AnnData, what: str, stacklevel: int = 3) -> None:
    """Warn when a table's ``obs_names`` repeat: spots are matched and selected by name."""
    import warnings

    names = table.obs_names
    if not names.has_duplicates:
        return
    dup = names[names.duplicated()].unique()
    warnings.warn(
        f"{what} has {len(dup)} duplicated `obs_names`, e.g. {list(dup[:3])}: histoseq matches predictions to spots "
        "and selects spots (`spots=`) by name, which a repeated name does not identify. Make them unique first: "
        "`table.obs_names_make_unique()`.",
        UserWarning,
        stacklevel=stacklevel,
    )


def resolve_regions(
    sdata: SpatialData,
    *,
    table_key: str | None = "table",
    shapes_key: str | None = None,
    image_key: str | dict[str, str] | None = None,
    pixel_size_um: float | None = None,
    spots: Any = None,
) -> list[Region]:
    """Resolve the spots to cut (per region) and the image of each region.

    With a table, its regions (restricted to ``shapes_key`` when given) are used and rows refer to the
    table. Without a table (``table_key=None``), ``shapes_key`` names the shapes to use (e.g. a grid).
    """
    check_spatialdata(sdata)
    use_table = table_key is not None and len(sdata.tables) > 0
    if use_table:
        tkey, table = get_table(sdata, table_key)
        regions, region_key, instance_key = table_keys(table)
        if shapes_key is not None:
            # shapes that the table does not annotate (a grid) are cut on their own
            use_table = shapes_key in regions
            regions = [shapes_key]
    if use_table:
        missing = [r for r in regions if r not in sdata.shapes]
        if missing:
            raise KeyError(
                f"Table {tkey!r} annotates {missing}, which are not shapes elements of this SpatialData "
                f"(shapes: {sorted(sdata.shapes)}). histoseq cuts patches around shapes (spots or grid tiles)."
            )
        selected = select_rows(table.n_obs, table.obs_names, spots)
        region_col = table.obs[region_key].astype(str).to_numpy()
        instance = table.obs[instance_key].to_numpy()
        out = []
        for region in regions:
            in_region = np.flatnonzero(region_col[selected] == region)
            rows = selected[in_region]
            if rows.size == 0:
                continue
            shapes = sdata.shapes[region]
            img_key = image_key.get(region) if isinstance(image_key, dict) else image_key
            img_key = pick_image(sdata, shapes, img_key, f"shapes {region!r}")
            centers, radius = centers_in_image(sdata, region, img_key)
            pos = shapes.index.get_indexer(instance[rows])
            if (pos < 0).any():
                bad = instance[rows][pos < 0][:3]
                raise KeyError(
                    f"{int((pos < 0).sum())} table rows have no shape in {region!r} (instance ids such as "
                    f"{list(bad)}); the table's `{instance_key}` must match the shapes index."
                )
            ref = image_ref(sdata, img_key, pixel_size_um=pixel_size_um)
            out.append(
                Region(
                    region,
                    ref,
                    centers[pos],
                    rows,
                    table.obs_names.to_numpy()[rows],
                    None if radius is None else radius[pos],
                    in_region,
                )
            )
        return out
    key = resolve_key(shapes_key, list(sdata.shapes.keys()), "shapes element", "shapes_key")
    shapes = sdata.shapes[key]
    img_key = image_key.get(key) if isinstance(image_key, dict) else image_key
    img_key = pick_image(sdata, shapes, img_key, f"shapes {key!r}")
    centers, radius = centers_in_image(sdata, key, img_key)
    names = shapes.index.astype(str).to_numpy()
    rows = select_rows(len(shapes), names, spots)
    ref = image_ref(sdata, img_key, pixel_size_um=pixel_size_um)
    radius = None if radius is None else radius[rows]
    return [Region(key, ref, centers[rows], rows, names[rows], radius, np.arange(len(rows)))]


def shape_sizes_um(sdata: SpatialData, table_key: str, rows: np.ndarray) -> np.ndarray:
    """Size in µm of the shapes of table rows ``rows``: a circle's diameter, a polygon's side (√area).

    NaN where a shape has no size (points). The image of each region gives the µm scale.
    """
    _, table = get_table(sdata, table_key)
    instance_key = table_keys(table)[2]
    rows = np.asarray(rows, dtype=int)
    out = np.full(len(rows), np.nan)
    for reg in resolve_regions(sdata, table_key=table_key, spots=rows):
        _, radius = centers_in_image(sdata, reg.shapes_key, reg.image.key, as_size=True)
        if radius is None:
            continue
        pos = sdata.shapes[reg.shapes_key].index.get_indexer(table.obs[instance_key].to_numpy()[reg.rows])
        out[reg.order] = 2 * radius[pos] * reg.image.pixel_size_um
    return out


def store_element(sdata: SpatialData, kind: str, key: str, element: Any = None) -> None:
    """Put ``element`` (or the already modified element ``key``) in ``sdata.<kind>``, and on disk when backed.

    The write is atomic per element: the element is first written completely into a temporary SpatialData store
    beside the user's (``<store>.histoseq-write-<pid>``), and only then moved into the store in place of the
    old one (two renames on the same file system). A write that fails (an ``uns`` value the format cannot hold,
    a full disk, an interrupted process) leaves the store as it was, and, when ``element`` was given, the
    in-memory object too. zarr's notice of a future default (autosharding), printed once per array written, is
    hushed: nothing a user of histoseq can act on.
    """
    import os
    import shutil
    import warnings
    from pathlib import Path

    from spatialdata import SpatialData as SD

    elements = getattr(sdata, kind)
    had, old = key in elements, elements.get(key)
    if element is not None:
        elements[key] = element
    if not sdata.is_backed():
        return
    store = Path(sdata.path)
    scratch = store.with_name(f"{store.name}.histoseq-write-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*annotat.*", category=UserWarning)  # regions not in scratch
            SD(**{kind: {key: elements[key]}}).write(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        if element is not None:  # the in-memory object as it was
            if had:
                elements[key] = old
            else:
                elements.pop(key, None)
        raise
    folder = store / kind
    if not folder.exists():  # the first element of its kind: the group comes along
        os.replace(scratch / kind, folder)
    else:
        target = folder / key
        if target.exists():
            os.replace(target, scratch / "previous")
        os.replace(scratch / kind / key, target)
    shutil.rmtree(scratch, ignore_errors=True)
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()


def annotating_tables(sdata: SpatialData, shapes_key: str) -> list[str]:
    """Tables that annotate the shapes element ``shapes_key``."""
    out = []
    for key, table in sdata.tables.items():
        if "spatialdata_attrs" in table.uns and shapes_key in table_keys(table)[0]:
            out.append(key)
    return out


def shapes_table_key(shapes_key: str) -> str:
    """The name of the table that histoseq makes for a shapes element no table annotates (e.g. a grid)."""
    return f"{shapes_key}_table"


def shapes_table(sdata: SpatialData, shapes_key: str) -> tuple[str, bool]:
    """The table annotating ``shapes_key``, made (in memory, not on disk) when none does.

    A grid or any shapes element without a table gets ``f"{shapes_key}_table"``: one row per shape (``obs_names``
    are the shapes' index as strings), ``obs`` with ``region`` and ``instance_id`` and the shapes' numeric columns
    (e.g. a grid's ``grid_row``, ``grid_col``, ``x_um``, ``y_um``), ``obsm["spatial"]`` the shapes' centres in their
    own coordinates, and no genes. It is where embeddings of those shapes go. Returns ``(key, created)``; the
    caller writes a created table (:func:`store_element`) or removes it again when its work fails.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata.models import TableModel

    key = resolve_key(shapes_key, list(sdata.shapes.keys()), "shapes element", "shapes_key")
    found = annotating_tables(sdata, key)
    if found:
        return (shapes_table_key(key) if shapes_table_key(key) in found else found[0]), False
    tkey = shapes_table_key(key)
    taken = {k for kind in ("images", "labels", "points", "shapes", "tables") for k in getattr(sdata, kind)}
    if tkey in taken:
        raise ValueError(f"An element {tkey!r} exists but does not annotate shapes {key!r}; rename it first.")
    shapes = sdata.shapes[key]
    if shapes.index.has_duplicates:
        raise ValueError(f"Shapes {key!r} has duplicated index values; give every shape its own id first.")
    centres, _ = _shape_centers(shapes)
    obs = pd.DataFrame(
        {
            "region": pd.Categorical([key] * len(shapes), categories=[key]),
            "instance_id": np.asarray(shapes.index),
            **{
                c: shapes[c].to_numpy()
                for c in shapes.columns
                if c not in ("geometry", "region", "instance_id") and pd.api.types.is_numeric_dtype(shapes[c])
            },
        },
        index=pd.Index(shapes.index.astype(str), name=None),
    )
    adata = ad.AnnData(X=sparse.csr_matrix((len(shapes), 0), dtype=np.float32), obs=obs, obsm={"spatial": centres})
    sdata.tables[tkey] = TableModel.parse(adata, region=key, region_key="region", instance_key="instance_id")
    logger.info("Made table %r for the %d shapes of %r (no table annotated them).", tkey, len(shapes), key)
    return tkey, True


def table_for_shapes(sdata: SpatialData, table_key: str | None, shapes_key: str | None) -> tuple[str | None, bool]:
    """The table to read for ``shapes_key``: ``table_key`` when it annotates them, else :func:`shapes_table`'s."""
    if shapes_key is None or (table_key in sdata.tables and shapes_key in annotating_tables(sdata, shapes_key)):
        return table_key, False
    return shapes_table(sdata, shapes_key)


def with_shapes_table(func):
    """Let a function of ``(sdata, *, table_key, shapes_key, inplace, ...)`` run on shapes that no table annotates.

    The table of those shapes (:func:`shapes_table`) is made first and passed as ``table_key``; it stays when the
    call writes into it (``inplace=True``), and is removed when the call fails or returns its result instead.
    """
    import functools

    @functools.wraps(func)
    def wrapper(sdata: SpatialData, *args: Any, table_key: str | None = "table", **kwargs: Any) -> Any:
        tkey, made = table_for_shapes(sdata, table_key, kwargs.get("shapes_key"))
        try:
            out = func(sdata, *args, table_key=tkey, **kwargs)
        except BaseException:
            if made:
                del sdata.tables[tkey]
            raise
        if made and not kwargs.get("inplace", True):
            del sdata.tables[tkey]
        return out

    return wrapper

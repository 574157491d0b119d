"""The image features of the class maps: patches around any points of an image, embedded by an encoder.

:func:`histoseq.tl.fit_classifier` and :func:`histoseq.tl.classify` read patches at spots, at off-tissue tiles
(the *background* class) and on dense grids over whole images. Everything here takes an image and points on it
(level-0 pixels) and returns features; nothing is learnt and nothing is written to SpatialData.

- :func:`intensity_features`: a small intensity and texture feature set for single-channel images (a nuclear
  stain, or a grey scan), where the RGB ``"morphology"`` features do not apply;
- :class:`Featurizer`: an encoder name resolved for RGB or grey patches;
- :func:`points_region`, :func:`patch_features`: features of the patches of several sizes around points;
- :func:`background_points`: off-tissue tiles of an image to learn the background from;
- :func:`grid_points`: the centres of a square grid over a whole image;
- :func:`spot_blocks`, :func:`background_blocks`: the points a classifier trains on (the training spots with
  their labels, and off-tissue tiles labelled background), as :class:`TrainingBlock` objects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import ImageRef, Region, get_table, image_levels, image_ref, resolve_regions
from ..pp._patches import _cut, _plan
from ..pp._stain import estimate_stains, normalize_stain
from ._classes import BACKGROUND, train_masks

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Scales of the blobs counted by :func:`intensity_features` (Gaussian sigma, µm): nuclei, small groups, clusters.
BLOB_SIGMAS_UM = (2.0, 4.0, 8.0)
#: Smallest difference-of-Gaussians response (intensity in [0, 1]) that counts as a blob.
BLOB_THRESHOLD = 0.03
_PERCENTILES = (5, 25, 50, 75, 95)
_PER_SCALE = (
    *(f"p{q}" for q in _PERCENTILES),
    "mean",
    "std",
    "gradient_energy",
    "local_contrast",
    *(f"{pol}_blobs_{s:g}um_per_mm2" for s in BLOB_SIGMAS_UM for pol in ("bright", "dark")),
)
#: Names of the :func:`intensity_features` columns: the whole patch, then its central half.
INTENSITY_FEATURES = tuple(f"{scale}_{name}" for scale in ("patch", "centre") for name in _PER_SCALE)


def _gray(images: np.ndarray) -> np.ndarray:
    """``(n, h, w)`` float32 intensities in [0, 1]: the channel itself, or the luminance of RGB."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] >= 3:
        g = images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        g = images[..., 0].astype(np.float32)
    return g / 255.0


def intensity_features(images: np.ndarray, um_per_px: float) -> np.ndarray:
    """Intensity and texture features of single-channel (or RGB, taken as grey) uint8 patches.

    At two scales, the whole patch and its central half (names in :data:`INTENSITY_FEATURES`): the 5th to
    95th percentiles, mean and standard deviation of the intensity; the gradient energy (mean squared
    gradient of the intensity smoothed at 1 µm); the local contrast (mean standard deviation in 8 µm windows
    over the patch's standard deviation); and the density (per mm²) of bright and of dark blobs at the scales
    :data:`BLOB_SIGMAS_UM`, found as local extrema of a difference of Gaussians beyond
    :data:`BLOB_THRESHOLD`. Both polarities are counted, so nuclei are found whether the stain makes them
    bright (fluorescence) or dark (a grey H&E).

    Parameters
    ----------
    images
        ``(n, h, w)`` or ``(n, h, w, c)`` uint8 patches (``c >= 3``: converted to grey by luminance).
    um_per_px
        Pixel size of the patches in µm.

    Returns
    -------
    ``(n, len(INTENSITY_FEATURES))`` float64.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._class_features import INTENSITY_FEATURES, intensity_features
    >>> patches = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1), dtype=np.uint8)
    >>> intensity_features(patches, 1.0).shape == (4, len(INTENSITY_FEATURES))
    True

    """
    from scipy import ndimage

    g = _gray(images)
    n, h, w = g.shape
    centre = np.zeros((h, w), dtype=bool)
    centre[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    masks = (np.ones((h, w), dtype=bool), centre)
    areas_mm2 = [m.sum() * (um_per_px / 1000.0) ** 2 for m in masks]

    def smooth(sigma_um: float) -> np.ndarray:
        s = max(sigma_um / um_per_px, 0.5)
        return ndimage.gaussian_filter(g, sigma=(0, s, s), mode="reflect")

    g1 = smooth(1.0)
    gy, gx = np.gradient(g1, axis=(1, 2))
    grad = gy**2 + gx**2
    win = max(3, round(8.0 / um_per_px) | 1)
    local_mean = ndimage.uniform_filter(g, size=(1, win, win), mode="reflect")
    local_sq = ndimage.uniform_filter(g * g, size=(1, win, win), mode="reflect")
    local_std = np.sqrt(np.clip(local_sq - local_mean**2, 0, None))
    peaks = []
    for sigma in BLOB_SIGMAS_UM:
        dog = smooth(sigma) - smooth(1.6 * sigma)
        k = max(3, round(2 * sigma / um_per_px) | 1)
        for sign in (1.0, -1.0):  # bright blobs, then dark ones
            r = sign * dog
            peaks.append((r == ndimage.maximum_filter(r, size=(1, k, k), mode="nearest")) & (r > BLOB_THRESHOLD))
    out = np.empty((n, len(INTENSITY_FEATURES)), dtype=np.float64)
    per = len(_PER_SCALE)
    for s, (mask, area) in enumerate(zip(masks, areas_mm2)):
        vals = g[:, mask]
        cols = [*np.percentile(vals, _PERCENTILES, axis=1), vals.mean(axis=1), vals.std(axis=1)]
        cols.append(grad[:, mask].mean(axis=1))
        cols.append(local_std[:, mask].mean(axis=1) / (vals.std(axis=1) + 1e-3))
        cols += [p[:, mask].sum(axis=1) / area for p in peaks]
        out[:, s * per : (s + 1) * per] = np.column_stack(cols)
    return out


# --------------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------------


def image_channels(sdata: SpatialData, image_key: str) -> str:
    """``"rgb"`` (3 or 4 channels) or ``"gray"`` (1 channel) for an image; other channel counts are refused."""
    c = int(image_levels(sdata.images[image_key])[0].sizes["c"])
    if c in (3, 4):
        return "rgb"
    if c == 1:
        return "gray"
    raise ValueError(
        f"Image {image_key!r} has {c} channels; the class maps read RGB H&E or single-channel images. Keep one "
        "channel (e.g. the nuclear stain) or three."
    )


@dataclass
class Featurizer:
    """An encoder resolved for patches of one kind: ``featurizer(images, um_per_px) -> (n, D)`` float64.

    ``features`` names what runs: ``"morphology"`` (RGB), ``"intensity"`` (:func:`intensity_features`; what
    ``encoder="morphology"`` becomes on single-channel images), or a network of
    :func:`histoseq.tl.list_encoders` (single-channel patches are given to it as three equal channels).
    """

    encoder: str
    channels: str
    random_state: int | None = 0
    device: Any = "cpu"
    features: str = field(init=False)
    _run: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from ._embed import ENCODERS, get_encoder, list_encoders

        name = self.encoder
        if name == "intensity" or (name == "morphology" and self.channels == "gray"):
            self.features, self._run = "intensity", intensity_features
            return
        if name == "morphology":
            from ._embed import MorphologyEncoder

            self.features, self._run = "morphology", MorphologyEncoder()
            return
        if name not in ENCODERS or name == "tissue_position":
            raise ValueError(
                f"Unknown `encoder` {name!r} for class maps; choose 'intensity' or one of "
                f"{[e for e in list_encoders() if e != 'tissue_position']}."
            )
        from ._embed import TorchRunner

        resolved, model, _ = get_encoder(name, random_state=self.random_state)
        runner = TorchRunner(model, self.device, builtin=True)
        runner.__enter__()  # a built-in network: moved to the device and put in eval mode once, nothing to restore
        self.features, self._run = resolved, runner

    def __call__(self, images: np.ndarray, um_per_px: float) -> np.ndarray:
        if self.features in ("morphology", "intensity"):
            return np.asarray(self._run(images, um_per_px), dtype=np.float64)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        return np.asarray(self._run(images), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# patches around points
# --------------------------------------------------------------------------------------------------


def points_region(ref: ImageRef, centers_px: np.ndarray, name: str) -> Region:
    """A :class:`~histoseq._sdata.Region` of arbitrary points (level-0 pixels of ``ref``), rows ``0..n-1``."""
    n = len(centers_px)
    idx = np.arange(n)
    return Region(name, ref, np.asarray(centers_px, dtype=float).reshape(n, 2), idx, idx.astype(str), None, idx)


def patch_features(
    region: Region,
    sizes: Sequence[float],
    patch_px: int,
    featurize: Featurizer,
    stain: dict[str, Any] | None,
    *,
    amount: bool = False,
    batch_size: int = 256,
    bar: Any = None,
) -> dict[float, np.ndarray]:
    """Features ``size -> (n, D)`` of the patches of each size around the points of ``region``.

    Patches are streamed in batches (:mod:`histoseq.pp._reader`: each image chunk decoded once per size), stain
    normalised with ``stain`` (an :func:`histoseq.pp.estimate_stain` record; colours only, and amounts too with
    ``amount``) when given. Points whose centre lies outside the image get NaN rows.
    """
    rgb = featurize.channels == "rgb"
    n = len(region.rows)
    out: dict[float, np.ndarray] = {}
    for size in sizes:
        feats: np.ndarray | None = None
        plans = _plan([region], float(size), int(patch_px), "drop", "auto")
        for p, pos, imgs in _cut(plans, rgb, int(patch_px), 255, int(batch_size), False):
            if stain is not None:
                imgs = normalize_stain(imgs, stain, amount=amount)
            f = featurize(imgs, float(size) / int(patch_px))
            if feats is None:
                feats = np.full((n, f.shape[1]), np.nan)
            feats[p.keep[pos]] = f
            if bar is not None:
                bar.update(len(pos))
        if feats is None:  # no point inside the image
            probe = featurize(np.full((1, int(patch_px), int(patch_px), 3 if rgb else 1), 255, np.uint8), 1.0)
            feats = np.full((n, probe.shape[1]), np.nan)
        out[float(size)] = feats
    return out


def grid_points(ref: ImageRef, spacing_um: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Centres ``xs``, ``ys`` (level-0 pixels) of a square grid at ``spacing_um`` over the whole image, and its step.

    The tile of column ``j`` covers ``[j step, (j + 1) step)`` (as :func:`histoseq.pp.make_grid` lays it out).
    """
    step = float(spacing_um) / ref.pixel_size_um
    h, w = ref.shape
    return np.arange(step / 2, w, step), np.arange(step / 2, h, step), step


def background_points(
    sdata: SpatialData,
    image_key: str,
    tile_um: float,
    n: int,
    rng: np.random.Generator,
    avoid_px: np.ndarray | None = None,
    avoid_radius_px: float = 0.0,
) -> np.ndarray:
    """Centres (level-0 pixels) of at most ``n`` grid tiles of ``tile_um`` away from the tissue, drawn with ``rng``.

    Tiles come from :func:`histoseq.pp.make_grid` (``inplace=False``), their tissue fractions from the image's
    tissue mask (:func:`histoseq.pp.detect_tissue`) over a window of twice the tile's side: a tile is
    background when under 1% of that window is tissue (so the tissue is at least half a tile away, and the
    background examples do not look like the spots at the tissue's rim) and its centre is farther than
    ``avoid_radius_px`` from every point of ``avoid_px`` (the spots).
    """
    from ..pp import make_grid

    if n <= 0:
        return np.zeros((0, 2))
    try:
        tiles = make_grid(
            sdata, spacing_um=tile_um, tile_size_um=2 * tile_um, image_key=image_key, min_tissue_fraction=0.0,
            inplace=False,
        )  # fmt: skip
    except ValueError as err:  # a blank image: nothing to learn the background from
        logger.warning("No background tiles from image %r: %s", image_key, err)
        return np.zeros((0, 2))
    ref = image_ref(sdata, image_key)
    xy = np.column_stack([tiles["x_um"], tiles["y_um"]]) / ref.pixel_size_um
    keep = tiles["tissue_fraction"].to_numpy() < 0.01
    if avoid_px is not None and len(avoid_px) and keep.any():
        from scipy.spatial import cKDTree

        d, _ = cKDTree(avoid_px).query(xy[keep])
        keep[np.flatnonzero(keep)[d <= avoid_radius_px]] = False
    candidates = np.flatnonzero(keep)
    if len(candidates) == 0:
        logger.warning("Image %r has no tile without tissue: it adds no background example.", image_key)
        return np.zeros((0, 2))
    chosen = np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))
    return xy[chosen]


# --------------------------------------------------------------------------------------------------
# the points a classifier trains on
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingBlock:
    """Points of one image that the classifier trains on: spots of a section, or its background tiles."""

    region: Any
    y: np.ndarray
    groups: np.ndarray
    section: str
    stain: Any
    spots: bool = True


def check_sizes(patch_sizes_um: Any, patch_px: Any) -> list[float]:
    sizes = [patch_sizes_um] if isinstance(patch_sizes_um, int | float) else list(patch_sizes_um)
    ok = bool(sizes) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) and v > 0 for v in sizes
    )
    if not ok or len(set(map(float, sizes))) < len(sizes):
        raise ValueError(f"`patch_sizes_um` must be distinct positive sizes in µm, got {patch_sizes_um!r}.")
    if isinstance(patch_px, bool) or not isinstance(patch_px, int | np.integer) or patch_px < 8:
        raise ValueError(f"`patch_px` must be an integer of at least 8 pixels, got {patch_px!r}.")
    return [float(v) for v in sizes]


def label_values(table: Any, labels: str, rows: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """The labels of the training rows (strings) and the column's class order; refuses missing and bad columns."""
    import pandas as pd

    if labels not in table.obs:
        raise KeyError(
            f"{where} has no column obs[{labels!r}] (columns: {list(table.obs.columns)}). Make classes first, e.g. "
            f"`hs.tl.expression_classes(sdata, genes=[...], key_added={labels!r})`."
        )
    col = table.obs[labels]
    if isinstance(col.dtype, pd.CategoricalDtype):
        order = [str(c) for c in col.cat.categories]
    elif pd.api.types.is_string_dtype(col) or col.dtype == object:
        order = sorted({str(v) for v in col.dropna()})
    else:
        raise TypeError(
            f"obs[{labels!r}] holds {col.dtype} values, not classes: it must be categorical or strings "
            f"(e.g. `table.obs[{labels!r}] = table.obs[{labels!r}].astype(str).astype('category')`)."
        )
    missing = col.isna().to_numpy()[rows]
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} training spot(s) of {where} have no label (NaN) in obs[{labels!r}]. Leave them "
            "out with a boolean `train=` mask, or fill them."
        )
    return col.astype(object).to_numpy()[rows].astype(str), order


def spot_blocks(
    objects: list[Any],
    labels: str,
    train: Any,
    table_key: str | None,
    groups: str | None,
    stain_mode: str | None,
) -> tuple[list[TrainingBlock], list[str], str, list[tuple[Any, Any]]]:
    """The training spots as blocks, one per section.

    Also returns the class order of the labels, the images' channels (``"rgb"`` or ``"gray"``), and
    ``(SpatialData, region)`` of every section (to draw its background from).
    """
    tables = [get_table(obj, table_key) for obj in objects]
    masks = train_masks([t for _, t in tables], train, groups)
    blocks, order, sections, channels = [], [], [], None
    for i, (obj, (tkey, table), mask) in enumerate(zip(objects, tables, masks)):
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            continue
        where = f"table {tkey!r}" + (f" of SpatialData {i}" if len(objects) > 1 else "")
        values, cats = label_values(table, labels, rows, where)
        order += [c for c in cats if c not in order]
        grp = table.obs[groups].astype(str).to_numpy()[rows] if groups is not None and groups in table.obs else None
        regions = resolve_regions(obj, table_key=tkey, spots=rows)
        kinds = {image_channels(obj, r.image.key) for r in regions} | ({channels} if channels else set())
        if len(kinds) > 1:
            raise ValueError("The training images mix RGB and single-channel images; train on one kind.")
        channels = kinds.pop()
        stains = estimate_stains(obj, [r.image.key for r in regions]) if stain_mode and channels == "rgb" else {}
        for r in regions:
            sec = f"{i}:{r.shapes_key}" if len(objects) > 1 else r.shapes_key
            g = grp[r.order] if grp is not None else np.full(len(r.rows), sec)
            blocks.append(TrainingBlock(r, values[r.order], g, sec, stains.get(r.image.key)))
            sections.append((obj, r))
    if not blocks:
        raise ValueError("`train` selects no spot.")
    return blocks, order, channels, sections


def background_blocks(
    blocks: list[TrainingBlock], sections: list[tuple[Any, Any]], n_total: int, tile_um: float | None, rng: Any
) -> list[TrainingBlock]:
    """Blocks of off-tissue tiles labelled background: ``n_total`` shared evenly between the training images."""
    out = []
    images = {(id(obj), r.image.key) for obj, r in sections}
    per_image = int(np.ceil(n_total / max(len(images), 1)))
    done = set()
    for block, (obj, r) in zip(blocks, sections):
        key = (id(obj), r.image.key)
        if key in done:
            continue
        done.add(key)
        radius_um = float(np.median(r.radius_px)) * r.image.pixel_size_um if r.radius_px is not None else None
        tile = tile_um or (2 * radius_um if radius_um else None) or 56.0
        avoid = (radius_um or 0.0) / r.image.pixel_size_um + tile / r.image.pixel_size_um / 2
        pts = background_points(obj, r.image.key, tile, per_image, rng, r.centers_px, avoid)
        if len(pts):
            values, counts = np.unique(block.groups, return_counts=True)
            region = points_region(r.image, pts, f"{r.image.key}_background")
            n = len(pts)
            bg_groups = np.full(n, values[np.argmax(counts)])
            out.append(
                TrainingBlock(region, np.full(n, BACKGROUND), bg_groups, block.section, block.stain, spots=False)
            )
    return out

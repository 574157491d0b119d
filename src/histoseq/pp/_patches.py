"""Spot-centred patches at a fixed physical size, from SpatialData images."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._sdata import Region, check_rgb_uint8, resolve_regions
from ._reader import ChunkedLevel, Windows, cut_windows

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


@dataclass
class Patches:
    """Patches cut around spots (or grid tiles), in the order of the spots asked for.

    Attributes
    ----------
    images
        ``(n, patch_px, patch_px, c)`` uint8, channels last.
    obs_names
        Name of each patch's spot (the table's ``obs_names``, or the shapes index without a table).
    region
        Shapes element each spot belongs to.
    rows
        Position of each spot in the table (or in the shapes element without a table).
    at_border
        Whether the patch reaches beyond the image and was padded.
    params
        ``patch_size_um``, ``patch_px``, and per image the level read and the µm per pixel of the patch.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1, section_size_um=600, progress=False)
    >>> patches = hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=32, progress=False)
    >>> patches.images.shape[1:], patches.images.dtype.name
    ((32, 32, 3), 'uint8')
    >>> table = sdata.tables["table"]
    >>> bool((patches.obs_names == table.obs_names[patches.rows]).all())
    True
    >>> patches.to_tensor().shape[1:]  # channels first, floats in [0, 1]
    torch.Size([3, 32, 32])

    """

    images: np.ndarray
    obs_names: np.ndarray
    region: np.ndarray
    rows: np.ndarray
    at_border: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        n, h, w, c = self.images.shape
        return (
            f"Patches of {n} spots, {h}×{w} px × {c} channels "
            f"({self.params.get('patch_size_um')} µm), {int(self.at_border.sum())} at the image border"
        )

    def to_tensor(self, dtype: Any = None):
        """Patches as a ``(n, c, h, w)`` float tensor scaled to [0, 1] (the encoder input layout)."""
        import torch

        t = torch.from_numpy(self.images).permute(0, 3, 1, 2)
        return t.to(dtype or torch.float32).div_(255.0)


@dataclass(frozen=True)
class _Plan:
    region: Region
    level: int
    windows: Windows
    keep: np.ndarray  # positions in region.rows that are cut
    at_border: np.ndarray
    um_per_px: float


def _plan(
    regions: list[Region],
    patch_size_um: float,
    patch_px: int,
    outside: Literal["raise", "drop"],
    level: int | Literal["auto"],
) -> list[_Plan]:
    plans = []
    coarse: dict[str, float] = {}
    target = patch_size_um / patch_px
    for reg in regions:
        ref = reg.image
        h, w = ref.shape
        cx, cy = reg.centers_px[:, 0], reg.centers_px[:, 1]
        inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h) & np.isfinite(cx) & np.isfinite(cy)
        if not inside.all():
            n_out = int((~inside).sum())
            examples = list(reg.names[~inside][:3])
            nowhere = ~(np.isfinite(cx) & np.isfinite(cy))
            if outside == "raise" and nowhere.any():
                raise ValueError(
                    f"{int(nowhere.sum())} spot(s) of {reg.shapes_key!r} have no position (a NaN or infinite centre), "
                    f"e.g. {list(reg.names[nowhere][:3])}. Fix or remove their shapes (and table rows), select the "
                    "others with `spots=`, or pass `outside='drop'` to skip them."
                )
            if outside == "raise":
                raise ValueError(
                    f"{n_out} spot(s) of {reg.shapes_key!r} lie outside image {ref.key!r} ({w}×{h} px), e.g. "
                    f"{examples}. Check that the spots and the image share the right coordinate system, or pass "
                    "`outside='drop'` to skip them."
                )
            warnings.warn(
                f"Dropping {n_out} spot(s) of {reg.shapes_key!r} outside image {ref.key!r}, e.g. {examples}.",
                UserWarning,
                stacklevel=3,
            )
        keep = np.flatnonzero(inside)
        lvl = ref.choose_level(target) if level == "auto" else int(level)
        if not 0 <= lvl < len(ref.levels):
            raise ValueError(f"Image {ref.key!r} has levels 0..{len(ref.levels) - 1}; got `level={level}`.")
        dy, dx = ref.level_downsample(lvl)
        size_x = patch_size_um / (ref.pixel_size_um * dx)
        size_y = patch_size_um / (ref.pixel_size_um * dy)
        to_level = np.linalg.inv(ref.level_to_level0(lvl))
        centers = reg.centers_px[keep] @ to_level[:2, :2].T + to_level[:2, 2]
        win = Windows(centers, size_x, size_y)
        lh, lw = (int(ref.levels[lvl].sizes[d]) for d in ("y", "x"))
        bx0, bx1, by0, by1 = win.bounds()
        border = (bx0 < 0) | (by0 < 0) | (bx1 > lw) | (by1 > lh)
        if ref.pixel_size_um * dx > target * 1.5:
            coarse[ref.key] = ref.pixel_size_um * dx
        plans.append(_Plan(reg, lvl, win, keep, border, target))
    if coarse:  # one line per call, however many images
        logger.warning(
            "%s coarser (%s µm/px) than the patches (%.2f µm/px): patches are upsampled.",
            f"Image {next(iter(coarse))!r} is" if len(coarse) == 1 else f"{len(coarse)} images are",
            "/".join(f"{v:.2f}" for v in sorted(set(coarse.values()))),
            target,
        )
    return plans


def _levels(plans: list[_Plan], rgb: bool) -> dict[tuple[str, int], ChunkedLevel]:
    out = {}
    for p in plans:
        key = (p.region.image.key, p.level)
        if key not in out:
            lvl = p.region.image.levels[p.level]
            n_channels = check_rgb_uint8(p.region.image.key, p.region.image.levels[0], rgb)
            out[key] = ChunkedLevel(lvl.data, slice(0, n_channels))
    return out


def _params(plans: list[_Plan], patch_size_um: float, patch_px: int) -> dict[str, Any]:
    return {
        "patch_size_um": float(patch_size_um),
        "patch_px": int(patch_px),
        "um_per_px": float(patch_size_um / patch_px),
        "images": {
            p.region.image.key: {
                "level": p.level,
                "pixel_size_um": p.region.image.pixel_size_um,
                "pixel_size_method": p.region.image.pixel_size_method,
            }
            for p in plans
        },
    }


def _prepare(sdata, table_key, shapes_key, image_key, spots, patch_size_um, patch_px, pixel_size_um, outside, level):
    if not (np.isfinite(patch_size_um) and patch_size_um > 0):
        raise ValueError(f"`patch_size_um` must be a positive size in µm, got {patch_size_um!r}.")
    if int(patch_px) != patch_px or patch_px < 1:
        raise ValueError(f"`patch_px` must be a positive integer, got {patch_px!r}.")
    if outside not in ("raise", "drop"):
        raise ValueError(f"`outside` must be 'raise' or 'drop', got {outside!r}.")
    regions = resolve_regions(
        sdata,
        table_key=table_key,
        shapes_key=shapes_key,
        image_key=image_key,
        pixel_size_um=pixel_size_um,
        spots=spots,
    )
    return _plan(regions, float(patch_size_um), int(patch_px), outside, level)


def iter_patches(
    sdata: SpatialData,
    *,
    table_key: str | None = "table",
    shapes_key: str | None = None,
    image_key: str | dict[str, str] | None = None,
    spots: Any = None,
    patch_size_um: float = 112.0,
    patch_px: int = 224,
    pixel_size_um: float | None = None,
    batch_size: int = 256,
    rgb: bool = True,
    pad_value: int = 255,
    outside: Literal["raise", "drop"] = "raise",
    level: int | Literal["auto"] = "auto",
    progress: bool = True,
) -> Iterator[Patches]:
    """Stream patches in batches, in the order that reads each image once.

    Memory stays bounded whatever the number of spots: use this to embed a dense grid over a whole slide.
    Arguments as in :func:`extract_patches`; each batch is a :class:`Patches` whose ``rows`` say which
    spots it holds.

    Yields
    ------
    :class:`Patches` batches of at most ``batch_size`` spots.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1, random_state=0)
    >>> n = 0
    >>> for batch in hs.pp.iter_patches(sdata, patch_size_um=56, patch_px=32, batch_size=64, progress=False):
    ...     n += len(batch)
    >>> n == sdata.tables["table"].n_obs
    True

    """
    plans = _prepare(
        sdata, table_key, shapes_key, image_key, spots, patch_size_um, patch_px, pixel_size_um, outside, level
    )
    params = _params(plans, patch_size_um, patch_px)
    for p, pos, imgs in _cut(plans, rgb, patch_px, pad_value, batch_size, progress):
        sel = p.keep[pos]
        yield Patches(
            images=imgs,
            obs_names=p.region.names[sel],
            region=np.full(len(pos), p.region.shapes_key, dtype=object),
            rows=p.region.rows[sel],
            at_border=p.at_border[pos],
            params=params,
        )


def _cut(plans: list[_Plan], rgb: bool, patch_px: int, pad_value: int, batch_size: int, progress: bool):
    from tqdm.auto import tqdm

    readers = _levels(plans, rgb)
    total = sum(len(p.keep) for p in plans)
    logger.info("Cutting %d patches at %d px from %d image level(s).", total, patch_px, len(readers))
    with tqdm(total=total, desc="patches", unit="spot", disable=not progress) as bar:
        for p in plans:
            reader = readers[(p.region.image.key, p.level)]
            for pos, imgs in cut_windows(reader, p.windows, int(patch_px), pad_value=pad_value, batch_size=batch_size):
                bar.update(len(pos))
                yield p, pos, imgs


def extract_patches(
    sdata: SpatialData,
    *,
    table_key: str | None = "table",
    shapes_key: str | None = None,
    image_key: str | dict[str, str] | None = None,
    spots: Any = None,
    patch_size_um: float = 112.0,
    patch_px: int = 224,
    pixel_size_um: float | None = None,
    rgb: bool = True,
    pad_value: int = 255,
    outside: Literal["raise", "drop"] = "raise",
    level: int | Literal["auto"] = "auto",
    progress: bool = True,
) -> Patches:
    """Cut square patches of a fixed physical size centred on spots (or on grid tiles).

    The window of ``patch_size_um`` µm around each spot centre is read from the pyramid level closest to the
    target resolution ``patch_size_um / patch_px`` (the coarsest level not coarser than it), chunk by chunk,
    and resampled with sub-pixel accuracy and antialiasing to ``patch_px`` pixels. The full-resolution image
    is never loaded as a whole. The default, 112 µm at 224 px (0.5 µm/px), is the HEST benchmark's.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image and spots (circles) annotated by a table, e.g. from
        :func:`histoseq.io.read_legacy_st` or :func:`spatialdata_io.visium`.
    table_key
        Table whose spots to cut. ``None`` cuts around every shape of ``shapes_key`` (e.g. a grid from
        :func:`histoseq.pp.make_grid`) without a table.
    shapes_key
        Restrict to the spots of this shapes element (a region of the table). Inferred when unambiguous.
    image_key
        Image to cut from, or a mapping region → image. By default the finest image that shares a coordinate
        system with the spots.
    spots
        Subset of spots: a boolean mask over the table rows, ``obs_names``, or integer positions.
        Patches come back in this order.
    patch_size_um
        Side of the patch in µm.
    patch_px
        Side of the patch in pixels.
    pixel_size_um
        Level-0 pixel size of the image in µm. By default read from the image's transformation to a
        micrometre coordinate system (see :func:`histoseq.io.set_pixel_size`), or from the Visium spot pitch.
    rgb
        Expect an RGB(A) image and return 3 channels. ``False`` returns all channels (e.g. a nuclei stain).
    pad_value
        Value of the pixels of patches that reach beyond the image (255: white, like glass).
    outside
        What to do with spots whose centre is outside the image: ``"raise"`` an error or ``"drop"`` them
        with a warning.
    level
        Pyramid level to read; ``"auto"`` chooses it from the target resolution.
    progress
        Show a progress bar.

    Returns
    -------
    :class:`Patches` with ``images`` ``(n, patch_px, patch_px, c)`` uint8, the spot names, and
    ``at_border`` flags for padded patches. Nothing is written to ``sdata``.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1, random_state=0)
    >>> patches = hs.pp.extract_patches(sdata, patch_size_um=56, patch_px=32, progress=False)
    >>> patches.images.shape[1:]
    (32, 32, 3)

    """
    plans = _prepare(
        sdata, table_key, shapes_key, image_key, spots, patch_size_um, patch_px, pixel_size_um, outside, level
    )
    # output slots follow the caller's selection; dropped spots close ranks
    order = np.concatenate([p.region.order[p.keep] for p in plans]) if plans else np.array([], dtype=int)
    if order.size == 0:
        raise ValueError("No spots to cut: the selection is empty (or every spot was outside the image).")
    slot = np.empty(order.max() + 1, dtype=int)
    slot[np.sort(order)] = np.arange(order.size)
    n = order.size
    n_channels = check_rgb_uint8(plans[0].region.image.key, plans[0].region.image.levels[0], rgb)
    images = np.empty((n, int(patch_px), int(patch_px), n_channels), dtype=np.uint8)
    names = np.empty(n, dtype=object)
    region = np.empty(n, dtype=object)
    rows = np.empty(n, dtype=int)
    at_border = np.empty(n, dtype=bool)
    for p, pos, imgs in _cut(plans, rgb, patch_px, pad_value, 128, progress):
        dest = slot[p.region.order[p.keep[pos]]]
        images[dest] = imgs
        names[dest] = p.region.names[p.keep[pos]]
        region[dest] = p.region.shapes_key
        rows[dest] = p.region.rows[p.keep[pos]]
        at_border[dest] = p.at_border[pos]
    return Patches(images, names, region, rows, at_border, _params(plans, patch_size_um, patch_px))

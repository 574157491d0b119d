"""Stain normalisation on the pixels: one Macenko estimate per image, from its tissue, applied to every patch.

Two steps, kept apart so that patches can be normalised batch by batch while they stream to an encoder:

- :func:`estimate_stain` reads one coarse pyramid level of a whole image, finds its tissue, and estimates the
  image's two stain vectors (haematoxylin, eosin), how strongly each is applied (a high percentile of its
  concentration over the tissue) and the scanner's white point. The statistics come from the image's tissue
  only, never from the spots of a table, so they are the same whichever spots are later cut or held out.
  The result is a small JSON-able dict meant to be stored beside the embeddings, with the parameters that
  produced it.
- :func:`normalize_stain` maps a batch of uint8 patches of that image onto a fixed reference stain
  (:data:`REFERENCE`): stain concentrations by least squares against the image's stain vectors, each stain
  rescaled by ``reference max / image max`` (stain *amount* is equalised, not only stain colour), and
  recomposed with the reference vectors.

What comes from where
---------------------
- The tissue mask is :func:`squidpy.experimental.im.detect_tissue` through histoseq's
  :func:`~histoseq.pp.detect_tissue` helper, on a temporary SpatialData holding only the coarse level, so
  nothing is ever added to the caller's SpatialData.
- The stain vectors are fitted by :func:`squidpy.experimental.im.fit_stain_reference` (Macenko: plane of the
  two leading principal directions of optical density, ``alpha`` / ``100 - alpha`` percentile angles), with
  its canonical ordering and its sanity gate (rank, and each vector within 45° of the Ruifrok H&E vectors of
  scikit-image, :data:`skimage.color.rgb_from_hed`). It runs on another temporary SpatialData: the tissue
  pixels whose optical density exceeds ``beta`` in every channel (at most 100,000 of them, a regular sample),
  laid out as an image one pixel high, with a labels element that keeps them all.
- Written here, and why:

  * the concentration percentiles: squidpy reports them in its "SDA" units (optical density × 255 / ln 256)
    at a fixed 99th percentile, while the reference values of :data:`REFERENCE` are in natural-log optical
    density; they are two lines of numpy;
  * the white point (median of the non-tissue background, clipped to ``[200, 255]``):
    :func:`squidpy.experimental.im.estimate_white_point` needs a tissue labels element in the SpatialData;
  * :func:`normalize_stain`: :func:`squidpy.experimental.im.normalize_stains` works on a whole image element
    of a SpatialData (not on a batch of patches), refits the source stain matrix on every call, and by design
    "transfers colour, not amount": it swaps the stain colour basis but leaves the concentrations as they
    are, so a slide stained twice as strongly stays twice as dark. scikit-image's
    :func:`skimage.color.separate_stains` / :func:`~skimage.color.combine_stains` fix the white point to the
    dtype's maximum and work in float64 arrays, two passes that take about 1.3 s per 1,000 patches of
    64×64 px, against 0.05 s here. Because deconvolution, rescaling and recomposition are all linear in
    optical density, the whole map is one 3×3 matrix ``M`` on optical density, and ``exp(-od @ M)``
    factorises over the three input channels: a patch is normalised with lookup tables and two products per
    pixel (:class:`StainNormalizer`: about 30,000 patches of 64×64 px per second on one core).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import image_levels, is_um_coordinate_system, pixel_size_from_affine, resolve_image_key, transformations
from ._grid import _detection_level, _quiet_detection, _tissue_mask

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Macenko et al. (2009) reference stain of a typical H&E slide, in natural-log optical density (the target
#: values of the common Macenko implementations, e.g. staintools and torchstain). Rows of ``stain_matrix`` are
#: the unit haematoxylin and eosin vectors over (R, G, B); ``max_concentrations`` are their 99th-percentile
#: concentrations.
REFERENCE: dict[str, Any] = {
    "method": "macenko",
    "stain_matrix": ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581)),
    "max_concentrations": (1.9705, 1.0308),
    "white_point": (255.0, 255.0, 255.0),
}

_SKIP = "Stain normalisation needs an RGB H&E image; skip it for this image with `stain_norm=False`."
#: Fewest stained tissue pixels that the estimate is made from
_MIN_STAINED_PX = 1_000
#: Fewest background pixels that the white point is taken from (otherwise full white, 255)
_MIN_BACKGROUND_PX = 1_000
#: Lowest white point (per channel) taken from the background
_MIN_WHITE = 200.0
#: Most stained pixels the stain vectors are fitted on (a regular sample of them)
_FIT_PX = 100_000
#: Pixels per block in :func:`normalize_stain` (bounds the float temporaries to 512 kB, cache-sized)
_BLOCK_PX = 1 << 15


def _od(values: np.ndarray, white_point: np.ndarray) -> np.ndarray:
    """Optical density ``-log((I + 1) / (I0 + 1))`` of intensities ``(..., 3)``."""
    return -np.log((values.astype(np.float64) + 1.0) / (white_point + 1.0))


def _white_point(rgb: np.ndarray, tissue: np.ndarray, white_point: Any) -> tuple[np.ndarray, str]:
    """White point ``(3,)`` and how it was chosen: the background median, or the given value."""
    if isinstance(white_point, str):
        if white_point != "background":
            raise ValueError(f"`white_point` must be 'background', a number or 3 numbers, got {white_point!r}.")
        background = rgb[:, ~tissue]
        if background.shape[1] < _MIN_BACKGROUND_PX:
            logger.info("Too little background for a white point: using full white (255).")
            return np.full(3, 255.0), "full_white"
        # median of each channel from its histogram (uint8): ten times faster than np.median on a slide
        cumulative = np.cumsum([np.bincount(channel, minlength=256) for channel in background], axis=1)
        wp = np.argmax(cumulative >= (background.shape[1] + 1) / 2, axis=1).astype(np.float64)
        return np.clip(wp, _MIN_WHITE, 255.0), "background_median"
    wp = np.broadcast_to(np.asarray(white_point, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(wp)) or np.any(wp <= 0) or np.any(wp > 255):
        raise ValueError(f"`white_point` must lie in (0, 255], got {white_point!r}.")
    return wp, "argument"


def _fit_vectors(pixels: np.ndarray, white_point: np.ndarray, alpha: float, image_key: str) -> np.ndarray:
    """Macenko H and E unit vectors ``(2, 3)`` of stained pixels ``(3, n)``, by squidpy's fit.

    squidpy reads the pixels and the mask from a SpatialData: a temporary one holds the stained pixels only,
    as an image one pixel high (the fit does not look at where a pixel lies), with a mask that keeps them all.
    It is never the caller's SpatialData.
    """
    from spatialdata import SpatialData as SD
    from spatialdata.models import Image2DModel, Labels2DModel

    from .._utils import squidpy_image_tools

    sq_im = squidpy_image_tools()
    MacenkoParams, fit_stain_reference = sq_im.MacenkoParams, sq_im.fit_stain_reference
    from squidpy.experimental.im._stain import StainFittingError

    strip = np.ascontiguousarray(pixels)[:, None, :]
    tmp = SD(
        images={"image": Image2DModel.parse(strip, dims=("c", "y", "x"))},
        labels={"image_stained": Labels2DModel.parse(np.ones(strip.shape[1:], dtype=np.uint8), dims=("y", "x"))},
    )
    try:
        with _quiet_detection():
            fitted = fit_stain_reference(
                tmp,
                "image",
                method="macenko",
                method_params=MacenkoParams(alpha=alpha),
                white_point=white_point,
                tissue_mask_key="image_stained",
            )
    except StainFittingError as err:
        raise ValueError(
            f"The stains of image {image_key!r} could not be separated into haematoxylin and eosin ({err.reason}). "
            "Is it an H&E image? " + _SKIP
        ) from err
    vectors = np.asarray(fitted.stain_matrix, dtype=np.float64)[:, :2].T
    if vectors[0, 0] < vectors[1, 0]:  # haematoxylin absorbs relatively more red than eosin
        vectors = vectors[::-1]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _level_um_per_px(level: Any, stride: int) -> float | None:
    """µm per pixel of a pyramid level read every ``stride`` pixels, from its micrometre coordinate system."""
    for cs, t in transformations(level).items():
        if is_um_coordinate_system(cs):
            affine = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
            return pixel_size_from_affine(affine)[0] * stride
    return None


def estimate_stain(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    max_pixels: int = 2_000_000,
    percentile: float = 99.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    white_point: str | float | Sequence[float] = "background",
) -> dict[str, Any]:
    """Estimate the stain of an H&E image (Macenko) from its tissue, once per image.

    Reads the finest pyramid level with at most ``max_pixels`` pixels (every n-th pixel of the coarsest level
    when even that is larger), detects the tissue on it (as :func:`detect_tissue`), and keeps the tissue pixels
    whose optical density ``-log((I + 1) / (I0 + 1))`` exceeds ``beta`` in every channel. Their two stain
    vectors are fitted by Macenko's method (:func:`squidpy.experimental.im.fit_stain_reference`), and the
    strength of each stain is the ``percentile`` of its concentration over those pixels. The spots and tables
    of ``sdata`` are never read, and nothing is added to it.

    Parameters
    ----------
    sdata
        SpatialData with the image.
    image_key
        The image; inferred when there is one (or one section's images at several resolutions: the finest).
    max_pixels
        Most pixels of the level read. The default (about 1,400² px) keeps a few hundred thousand tissue pixels
        on a typical slide, plenty for two stain vectors, and takes a fraction of a second.
    percentile
        Percentile of each stain's concentration taken as its maximum (its strength on this slide).
    beta
        Optical density that every channel of a pixel must exceed for it to count as stained.
    alpha
        Macenko's angular percentile: the stain vectors are the ``alpha`` and ``100 - alpha`` percentile
        directions of the optical densities in their principal plane.
    white_point
        Intensity ``I0`` of unstained glass: ``"background"`` takes the median of the non-tissue pixels
        (clipped to ``[200, 255]``; full white when there is almost no background), or give a number or one
        per channel. Measured against the scanner's own background, an off-white or tinted glass is not
        mistaken for stain, and it turns white after :func:`normalize_stain`.

    Returns
    -------
    A JSON-able dict: ``method`` (``"macenko"``), ``stain_matrix`` (two unit vectors over R, G, B:
    haematoxylin, then eosin), ``max_concentrations`` (haematoxylin, eosin, in natural-log optical density),
    ``white_point`` (R, G, B), ``level`` (the pyramid level read), ``stride`` (read every ``stride``-th pixel of
    it), ``um_per_px`` (pixel size of what was read; ``None`` without a micrometre coordinate system),
    ``n_pixels`` (stained pixels the estimate rests on), ``n_tissue_pixels``, ``image_key`` and ``params`` (the
    arguments, and how the white point was chosen). Pass it to :func:`normalize_stain`.

    Raises
    ------
    ValueError
        If the image is not RGB (grayscale, single channel), has no tissue, too few stained pixels, or stains
        that do not separate into haematoxylin and eosin. The message says to skip stain normalisation
        (``stain_norm=False``) for such an image.

    Examples
    --------
    >>> import histoseq as hs
    >>> from histoseq.pp._stain import estimate_stain
    >>> sdata = hs.datasets.synthetic(n_sections=1, section_size_um=700, progress=False)
    >>> est = estimate_stain(sdata, "section0_image")
    >>> est["method"], len(est["stain_matrix"]), len(est["max_concentrations"])
    ('macenko', 2, 2)
    >>> est["stain_matrix"][0][0] > est["stain_matrix"][1][0]  # haematoxylin absorbs more red
    True

    """
    if max_pixels < 10_000:
        raise ValueError(f"`max_pixels` must be at least 10,000, got {max_pixels!r}.")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"`percentile` must lie in (50, 100], got {percentile!r}.")
    if not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"`beta` must be a non-negative optical density, got {beta!r}.")
    if not 0.0 < alpha < 50.0:
        raise ValueError(f"`alpha` must lie in (0, 50), got {alpha!r}.")
    from spatialdata import SpatialData as SD
    from spatialdata.models import Image2DModel

    image_key = resolve_image_key(sdata, image_key)
    levels = image_levels(sdata.images[image_key])
    lvl = _detection_level(levels, max_pixels)
    level = levels[lvl]
    n_channels = int(level.sizes["c"])
    if n_channels not in (3, 4):
        what = "a grayscale image" if n_channels == 1 else f"{n_channels} channels"
        raise ValueError(f"Image {image_key!r} has {n_channels} channel(s) ({what}), not RGB. " + _SKIP)
    if level.dtype != np.uint8:
        raise TypeError(
            f"Image {image_key!r} has dtype {level.dtype}; stain estimation reads 8-bit RGB (uint8) H&E images. "
            "Convert the image, or skip stain normalisation with `stain_norm=False`."
        )
    h, w = int(level.sizes["y"]), int(level.sizes["x"])
    stride = max(1, math.ceil(math.sqrt(h * w / max_pixels)))
    rgb = np.ascontiguousarray(np.asarray(level.data[:3, ::stride, ::stride]))

    tmp = SD(images={"image": Image2DModel.parse(rgb, dims=("c", "y", "x"))})
    try:
        tissue, _, _ = _tissue_mask(tmp, "image", rgb.shape[1] * rgb.shape[2], "otsu")
    except ValueError as err:
        raise ValueError(f"No tissue found in image {image_key!r} to estimate its stain from. " + _SKIP) from err
    pixels = rgb[:, tissue]  # (3, n)
    if np.mean(np.ptp(pixels, axis=0) > 8) < 0.01:
        raise ValueError(f"Image {image_key!r} is grayscale (its three channels are equal on the tissue). " + _SKIP)

    wp, wp_method = _white_point(rgb, tissue, white_point)
    od = _od(pixels.T, wp)  # (n, 3)
    keep = od.min(axis=1) > beta
    n_stained = int(keep.sum())
    if n_stained < _MIN_STAINED_PX:
        raise ValueError(
            f"Image {image_key!r} has {n_stained} stained tissue pixels (optical density above beta={beta} in every "
            f"channel) at the level read; at least {_MIN_STAINED_PX} are needed. Lower `beta`, raise `max_pixels`, "
            "or skip stain normalisation with `stain_norm=False`."
        )
    stained = pixels[:, keep]
    # the stain vectors of a few hundred thousand pixels are those of a regular sample of 100,000 (to 0.1°)
    vectors = _fit_vectors(stained[:, :: max(1, n_stained // _FIT_PX)], wp, alpha, image_key)
    concentrations = od[keep] @ np.linalg.pinv(vectors)  # least squares: od ≈ c @ vectors
    max_c = np.percentile(concentrations, percentile, axis=0)
    if np.any(max_c <= 1e-3):
        raise ValueError(
            f"One stain of image {image_key!r} is absent from its tissue (its {percentile}th percentile concentration "
            f"is {max_c.min():.2g}). " + _SKIP
        )
    return {
        "method": "macenko",
        "stain_matrix": [[round(float(v), 6) for v in row] for row in vectors],
        "max_concentrations": [round(float(v), 6) for v in max_c],
        "white_point": [round(float(v), 3) for v in wp],
        "level": int(lvl),
        "stride": int(stride),
        "um_per_px": _level_um_per_px(level, stride),
        "n_pixels": n_stained,
        "n_tissue_pixels": int(tissue.sum()),
        "image_key": image_key,
        "params": {
            "max_pixels": int(max_pixels),
            "percentile": float(percentile),
            "beta": float(beta),
            "alpha": float(alpha),
            "white_point": white_point if isinstance(white_point, str) else [float(v) for v in wp],
            "white_point_method": wp_method,
            "tissue_method": "otsu",
            "optical_density": "-ln((I + 1) / (I0 + 1))",
        },
    }


def _stain(estimate: Mapping[str, Any], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(stain_matrix (2, 3), max_concentrations (2,), white_point (3,))`` of an estimate."""
    try:
        vectors = np.asarray(estimate["stain_matrix"], dtype=np.float64)
        max_c = np.asarray(estimate["max_concentrations"], dtype=np.float64)
        wp = np.asarray(estimate.get("white_point", (255.0, 255.0, 255.0)), dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"The {what} must be a stain estimate of `estimate_stain` (keys 'stain_matrix', 'max_concentrations', "
            f"'white_point'); got {type(estimate).__name__} ({err})."
        ) from err
    if vectors.shape != (2, 3) or max_c.shape != (2,) or wp.shape != (3,):
        raise ValueError(
            f"The {what} has a stain matrix of shape {vectors.shape}, max concentrations of shape {max_c.shape} and "
            f"a white point of shape {wp.shape}; expected (2, 3), (2,) and (3,)."
        )
    if not (np.all(np.isfinite(vectors)) and np.all(np.isfinite(max_c)) and np.all(np.isfinite(wp))):
        raise ValueError(f"The {what} holds non-finite values.")
    if np.any(max_c <= 0) or np.any(wp <= 0):
        raise ValueError(f"The {what} needs positive max concentrations and white point.")
    norms = np.linalg.norm(vectors, axis=1)
    if np.any(norms < 1e-8) or abs(np.cross(vectors[0] / norms[0], vectors[1] / norms[1])).max() < 1e-3:
        raise ValueError(f"The {what} has a zero or two parallel stain vectors.")
    return vectors / norms[:, None], max_c, wp


def _lookup_tables(estimate: Mapping[str, Any], reference: Mapping[str, Any], amount: bool = True) -> np.ndarray:
    """Per input channel, the factor ``exp(-od_c · M[c])`` of every 8-bit value: ``(3, 256, 3)`` float32.

    ``M = pinv(S_image) @ diag(max_ref / max_image) @ S_ref`` maps optical density of the image onto
    optical density of the reference, and ``exp(-od @ M)`` is the product over input channels ``c`` of
    ``exp(-od_c * M[c])``. Table 0 carries the factor 256 of ``I = 256 exp(-od) - 1`` and the 0.5 of the
    rounding is subtracted later.
    """
    vectors, max_c, wp = _stain(estimate, "estimate")
    ref_vectors, ref_max, _ = _stain(reference, "reference")
    scale = ref_max / max_c if amount else np.ones_like(max_c)
    m = np.linalg.pinv(vectors) @ np.diag(scale) @ ref_vectors  # (3, 3)
    od = _od(np.arange(256, dtype=np.float64)[None, :], wp[:, None])  # (3, 256): od of value v in channel c
    exponent = np.clip(-od[:, :, None] * m[:, None, :], -60.0, 60.0)  # keep float32 finite: no inf * 0
    tables = np.exp(exponent)
    tables[0] *= 256.0
    return tables.astype(np.float32)


def normalize_stain(
    images: np.ndarray, estimate: Mapping[str, Any], reference: Mapping[str, Any] = REFERENCE, *, amount: bool = True
) -> np.ndarray:
    """Map uint8 H&E patches of one image onto a reference stain (Macenko), amount included.

    From the optical density ``-log((I + 1) / (I0 + 1))`` (``I0``: the estimate's white point), the
    concentrations of haematoxylin and eosin by least squares against the image's stain vectors; each is
    rescaled by ``reference max / estimate max``, so that a strongly or weakly stained slide comes out as
    strongly stained as the reference (its colour *and* its amount), recomposed with the reference vectors,
    and turned back into intensities ``I = 256 exp(-od) - 1``, rounded and clipped to ``[0, 255]``. Glass at
    the white point has no optical density and comes out white (255). The whole map is computed with lookup
    tables (:class:`StainNormalizer`): about 30,000 patches of 64×64 px per second on one core.

    With ``amount=False`` the concentrations are kept as they are and only the stain colours are mapped: a
    slide stained twice as strongly stays twice as dark. That is the safe choice when slides differ in what
    tissue they hold, since the strength estimate (a high percentile of each stain over the tissue) moves with
    the tissue's make-up as well as with the staining.

    Parameters
    ----------
    images
        ``(n, h, w, c)`` or ``(h, w, c)`` uint8 patches, channels last, with ``c >= 3``: the first three
        channels are R, G, B. Further channels (an alpha channel) are passed through unchanged.
    estimate
        The image's stain, from :func:`estimate_stain` (also after a round trip through JSON).
    reference
        The target stain: a dict with ``stain_matrix`` (2 × 3) and ``max_concentrations`` (2), by default
        :data:`REFERENCE`; the estimate of another image serves too (its white point is not used: the
        output's white is 255).
    amount
        Rescale each stain's concentrations by ``reference max / estimate max`` (see above).

    Returns
    -------
    uint8 array of the shape of ``images``.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.pp._stain import REFERENCE, normalize_stain
    >>> est = {"stain_matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], "max_concentrations": [1.2, 0.6],
    ...        "white_point": [240, 238, 242]}
    >>> patches = np.full((2, 64, 64, 3), 240, dtype=np.uint8)  # the glass of this scanner
    >>> out = normalize_stain(patches, est)
    >>> out.shape, out.dtype, int(out.min())
    ((2, 64, 64, 3), dtype('uint8'), 255)

    """
    images = _check_patches(images)
    return StainNormalizer(estimate, reference, amount=amount)(images)


class StainNormalizer:
    """:func:`normalize_stain` with its tables computed once: a callable on batches of uint8 patches of one image.

    ``StainNormalizer(estimate, reference, amount=amount)(images)`` equals
    ``normalize_stain(images, estimate, reference, amount=amount)`` bit for bit; it only spares the tables of every
    call when many batches of one image are normalised. The tables of the first two channels are fused into one
    of every (R, G) pair (65,536 entries, the product computed once, in the same float32 rounding), so a pixel
    takes two lookups instead of three.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.pp._stain import StainNormalizer, normalize_stain
    >>> est = {"stain_matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], "max_concentrations": [1.2, 0.6]}
    >>> patches = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    >>> bool((StainNormalizer(est)(patches) == normalize_stain(patches, est)).all())
    True

    """

    def __init__(self, estimate: Mapping[str, Any], reference: Mapping[str, Any] = REFERENCE, *, amount: bool = True):
        tables = _lookup_tables(estimate, reference, amount)  # (3, 256, 3)
        # 4 float32 per entry (the 4th is 1), looked up as one 16-byte item: numpy's fast path for np.take
        padded = np.ones((3, 256, 4), dtype=np.float32)
        padded[:, :, :3] = tables
        # entry r + 256 g: the little-endian uint16 read from the two adjacent bytes R, G of a pixel
        pairs = padded[0][None, :, :] * padded[1][:, None, :]  # [g, r] = t0[r] * t1[g], rounded as in float32
        self._rg = np.ascontiguousarray(pairs.reshape(65536, 4)).view(np.complex128)[:, 0]
        self._b = np.ascontiguousarray(padded[2]).view(np.complex128)[:, 0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``(n, h, w, c)`` or ``(h, w, c)`` uint8 patches, ``c >= 3`` → the same shape, stain-normalised."""
        images = _check_patches(images)
        c = images.shape[-1]
        flat = np.ascontiguousarray(images).reshape(-1, c)
        out = np.empty_like(flat)
        if c > 3:
            out[:, 3:] = flat[:, 3:]
        n = len(flat)
        if n == 0:
            return out.reshape(images.shape)
        rg = np.ndarray((n,), dtype="<u2", buffer=flat, strides=(c,))  # R + 256 G of every pixel
        block = min(n, _BLOCK_PX)
        as_uint8 = np.empty((block, 4), dtype=np.uint8)
        for start in range(0, n, block):
            stop = min(n, start + block)
            value = np.take(self._rg, rg[start:stop].astype(np.intp)).view(np.float32).reshape(-1, 4)
            value *= np.take(self._b, flat[start:stop, 2]).view(np.float32).reshape(-1, 4)
            value -= 0.5  # 256 exp(-od) - 1, rounded by the truncation below
            np.clip(value, 0.0, 255.0, out=value)
            dest = as_uint8[: stop - start]
            np.copyto(dest, value, casting="unsafe")
            out[start:stop, :3] = _rgb(dest)
        return out.reshape(images.shape)


def _rgb(rgbx: np.ndarray) -> np.ndarray:
    """The first three of ``(n, 4)`` uint8 channels, as ``(n, 3)``: packed by PIL, 8× faster than numpy's copy."""
    from PIL import Image

    n = len(rgbx)
    packed = Image.frombuffer("RGBX", (n, 1), rgbx, "raw", "RGBX", 0, 1).tobytes("raw", "RGB")
    return np.frombuffer(packed, dtype=np.uint8).reshape(n, 3)


def _check_patches(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"`images` must be uint8 RGB patches, got dtype {images.dtype}.")
    if images.ndim not in (3, 4) or images.shape[-1] < 3:
        raise ValueError(
            f"`images` must be (n, h, w, c) or (h, w, c) with c >= 3 RGB channels last, got shape {images.shape}."
        )
    return images


def estimate_stains(sdata: SpatialData, image_keys: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """:func:`estimate_stain` of each image, or ``None`` (with a message) where stain normalisation does not apply.

    An image that is not RGB (a nuclear stain), or whose stain cannot be estimated (grey, blank), gets ``None``:
    its patches are used as scanned. This is what :func:`histoseq.tl.embed` and the other readers of patches
    call with ``stain_norm=True``. An estimate is remembered while the image's arrays live, and not made again
    for the same image (see :func:`_remembered_estimate`).
    """
    out: dict[str, dict[str, Any] | None] = {}
    for key in dict.fromkeys(image_keys):
        channels = int(image_levels(sdata.images[key])[0].shape[0])
        if channels < 3:
            logger.info("Image %r has %d channel(s), not RGB: its patches are not stain-normalised.", key, channels)
            out[key] = None
            continue
        try:
            out[key] = _remembered_estimate(sdata, key)
        except ValueError as err:  # a nuclear stain stored as RGB, a blank image: the pixels as they are
            logger.warning("%s Its patches are used without stain normalisation.", err)
            out[key] = None
    return out


#: Estimates of :func:`_remembered_estimate`: the identity of an image's level arrays → (weak references to them,
#: the estimate); beyond :data:`_REMEMBERED_MAX` entries the least recently used goes first.
_REMEMBERED: OrderedDict[tuple[Any, ...], tuple[list[Any], dict[str, Any]]] = OrderedDict()
_REMEMBERED_MAX = 64
_REMEMBERED_LOCK = threading.Lock()


def _remembered_estimate(sdata: SpatialData, key: str) -> dict[str, Any]:
    """:func:`estimate_stain` of image ``key`` with its defaults, computed once while the image's arrays live.

    The estimate reads a coarse pyramid level; when that level is computed lazily from full resolution (an
    in-memory image parsed with ``scale_factors``: spatialdata resamples in float64 on every read), reading it
    takes seconds for a slide, on every call of :func:`histoseq.tl.embed` and the other readers of patches. The
    estimate is a function of the pixels, so it is remembered for the very dask arrays of the image's levels
    (the same objects, by weak reference, with the same graph names: a new or changed image, or the same slide
    read again from disk, is estimated anew). What is not the pixels' is refreshed: ``image_key``, and
    ``um_per_px`` from the level's current transformations.
    """
    import copy
    import weakref

    import dask.array as da

    levels = image_levels(sdata.images[key])
    arrays = [level.data for level in levels]
    if not all(isinstance(a, da.Array) for a in arrays):
        return estimate_stain(sdata, key)
    ident = tuple((id(a), a.name, a.shape, str(a.dtype)) for a in arrays)
    with _REMEMBERED_LOCK:
        hit = _REMEMBERED.get(ident)
        if hit is not None and all(ref() is a for ref, a in zip(hit[0], arrays)):
            _REMEMBERED.move_to_end(ident)
            estimate = copy.deepcopy(hit[1])
            estimate["image_key"] = key
            estimate["um_per_px"] = _level_um_per_px(levels[estimate["level"]], estimate["stride"])
            return estimate
    estimate = estimate_stain(sdata, key)
    with _REMEMBERED_LOCK:
        _REMEMBERED[ident] = ([weakref.ref(a) for a in arrays], copy.deepcopy(estimate))
        while len(_REMEMBERED) > _REMEMBERED_MAX:
            _REMEMBERED.popitem(last=False)
    return estimate


#: How patches can be stain-normalised (``stain_norm=`` of :func:`histoseq.tl.embed` and the other readers of
#: patches): ``"colour"`` maps each image's stain vectors onto the reference's and keeps how much of each stain
#: there is; ``"amount"`` also rescales each stain's amount to the reference's, which assumes the slides hold
#: alike tissue (the strength estimate moves with the tissue's make-up).
STAIN_NORMS = ("colour", "amount")


def stain_norm_mode(value: Any) -> str | None:
    """``stain_norm=`` as a mode: ``"colour"`` (also ``True``), ``"amount"``, or ``None`` (``False``)."""
    if value is True:
        return "colour"
    if value is False or value is None:
        return None
    if isinstance(value, str) and value in STAIN_NORMS:
        return value
    raise ValueError(f"`stain_norm` must be one of {[*STAIN_NORMS, True, False]} (True = 'colour'), got {value!r}.")

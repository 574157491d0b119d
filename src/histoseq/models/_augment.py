"""Augmentations of H&E tiles in plain torch, on whole batches.

Every function takes ``(B, C, H, W)`` float tensors in [0, 1] (RGB for the stain ones), keeps the shape (except
:func:`random_resized_crop` with another ``size``) and the [0, 1] range, and draws one set of random parameters per
tile. Random parameters are drawn on the CPU from ``generator`` (the global torch generator when ``None``) and
moved to the tensor's device, so a seeded generator gives the same augmentations on every device.

:class:`Augment` composes them into the view generator of contrastive pretraining
(:func:`histoseq.tl.pretrain_encoder`); the functions are reusable on their own (e.g. :func:`dihedral` as test-time
or training augmentation of an end-to-end model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

#: Ruifrok & Johnston (2001) stain optical-density vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B), the
#: matrix of :func:`skimage.color.rgb2hed`.
RGB_FROM_HED = torch.tensor(
    [
        [0.65, 0.70, 0.29],
        [0.07, 0.99, 0.11],
        [0.27, 0.57, 0.78],
    ],
    dtype=torch.float64,
)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

_EPS = 1e-3  # smallest intensity turned into optical density (OD at most 3)


def _check(x: torch.Tensor, rgb: bool = False) -> None:
    if x.ndim != 4:
        raise ValueError(f"Expected a (B, C, H, W) batch, got shape {tuple(x.shape)}.")
    if rgb and x.shape[1] != 3:
        raise ValueError(f"Stain augmentations need RGB tiles (3 channels), got {x.shape[1]}.")
    if not x.is_floating_point():
        raise TypeError(f"Expected a float tensor in [0, 1], got {x.dtype}; divide uint8 tiles by 255.")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float32)
    return (low + (high - low) * u).to(device)


def dihedral(
    x: torch.Tensor, k: torch.Tensor | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square (rotations by 90° and reflections) to each tile.

    Tissue has no orientation, so these change the tile without changing what it shows.

    Parameters
    ----------
    x
        ``(B, C, H, W)`` tiles with ``H == W``.
    k
        ``(B,)`` integers in 0..7, the symmetry of each tile: ``k % 4`` quarter turns, then a horizontal flip
        when ``k >= 4``. Drawn uniformly when ``None``.
    generator
        Random generator (CPU) for ``k``.

    Returns
    -------
    The transformed tiles, same shape.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models._augment import dihedral
    >>> x = torch.rand(4, 3, 8, 8)
    >>> torch.equal(dihedral(x, torch.zeros(4, dtype=torch.long)), x)
    True

    """
    if x.ndim != 4:
        raise ValueError(f"Expected a (B, C, H, W) batch, got shape {tuple(x.shape)}.")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"Rotating by 90° needs square tiles, got {x.shape[-2]}×{x.shape[-1]}.")
    b = x.shape[0]
    if k is None:
        k = torch.randint(0, 8, (b,), generator=generator)
    k = torch.as_tensor(k, dtype=torch.long).cpu()
    if k.shape != (b,) or (k < 0).any() or (k > 7).any():
        raise ValueError(f"`k` must hold one integer in 0..7 per tile ({b}), got {k.tolist()}.")
    out = torch.empty_like(x)
    for g in k.unique().tolist():
        idx = torch.nonzero(k == g).flatten().to(x.device)
        part = torch.rot90(x.index_select(0, idx), g % 4, dims=(2, 3))
        if g >= 4:
            part = torch.flip(part, dims=(3,))
        out.index_copy_(0, idx, part)
    return out


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → stain concentrations (haematoxylin, eosin, DAB) in optical-density units (log10).

    Beer–Lambert optical density ``-log10(max(x, 1e-3))`` unmixed with the Ruifrok–Johnston matrix
    (:data:`HED_FROM_RGB`). Unlike :func:`skimage.color.rgb2hed`, concentrations are not clipped at zero, so
    :func:`hed_to_rgb` inverts this exactly (up to the clipping of dark pixels at 1e-3).
    """
    _check(x, rgb=True)
    od = -torch.log10(x.clamp(min=_EPS))
    m = HED_FROM_RGB.to(device=x.device, dtype=x.dtype)
    return torch.einsum("bchw,cd->bdhw", od, m)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (from :func:`rgb_to_hed`) → RGB in [0, 1]."""
    m = RGB_FROM_HED.to(device=hed.device, dtype=hed.dtype)
    od = torch.einsum("bdhw,dc->bchw", hed, m)
    return torch.pow(10.0, -od).clamp(0.0, 1.0)


def hed_jitter(
    x: torch.Tensor,
    scale: float = 0.05,
    shift: float = 0.02,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stain augmentation: scale and shift the haematoxylin, eosin and DAB concentrations of each tile.

    Each tile's stains ``s`` (optical density, :func:`rgb_to_hed`) become ``a * s + b`` with ``a`` uniform in
    ``[1 - scale, 1 + scale]`` and ``b`` uniform in ``[-shift, shift]`` per stain, then go back to RGB (the
    HED-space augmentation of Tellez et al., 2018, which mimics differences of staining between slides).

    Parameters
    ----------
    x
        ``(B, 3, H, W)`` RGB in [0, 1].
    scale
        Largest relative change of a stain's concentration.
    shift
        Largest added concentration, in optical density units (0.02 darkens white by about 3% per stain).
    generator
        Random generator (CPU).

    Returns
    -------
    The jittered tiles in [0, 1]; with ``scale = shift = 0`` the input (up to float rounding and pixels darker
    than 1e-3).

    Examples
    --------
    >>> import torch
    >>> from histoseq.models._augment import hed_jitter
    >>> x = torch.rand(2, 3, 8, 8) * 0.9 + 0.1
    >>> bool((hed_jitter(x, 0.0, 0.0) - x).abs().max() < 1e-4)
    True

    """
    _check(x, rgb=True)
    if scale < 0 or shift < 0:
        raise ValueError(f"`scale` and `shift` must be non-negative, got {scale!r} and {shift!r}.")
    b = x.shape[0]
    a = _uniform(b * 3, 1 - scale, 1 + scale, generator, x.device).view(b, 3, 1, 1).to(x.dtype)
    c = _uniform(b * 3, -shift, shift, generator, x.device).view(b, 3, 1, 1).to(x.dtype)
    return hed_to_rgb(rgb_to_hed(x) * a + c)


def brightness_contrast(
    x: torch.Tensor, brightness: float = 0.1, contrast: float = 0.1, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Jitter the brightness and contrast of each tile.

    Each tile is multiplied by a factor in ``[1 - brightness, 1 + brightness]``, then its contrast around its mean
    is scaled by a factor in ``[1 - contrast, 1 + contrast]``; the result is clipped to [0, 1].
    """
    _check(x)
    if brightness < 0 or contrast < 0:
        raise ValueError(f"`brightness` and `contrast` must be non-negative, got {brightness!r} and {contrast!r}.")
    b = x.shape[0]
    fb = _uniform(b, 1 - brightness, 1 + brightness, generator, x.device).view(b, 1, 1, 1).to(x.dtype)
    fc = _uniform(b, 1 - contrast, 1 + contrast, generator, x.device).view(b, 1, 1, 1).to(x.dtype)
    x = x * fb
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * fc + mean).clamp(0.0, 1.0)


def gaussian_blur(
    x: torch.Tensor,
    sigma: tuple[float, float] = (0.1, 1.5),
    p: float = 0.5,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blur each tile, with probability ``p``, by a Gaussian of standard deviation uniform in ``sigma`` (pixels).

    Mimics out-of-focus scanning. The separable kernels (one per tile, radius ``3 * sigma``) run as one grouped
    convolution with reflected borders; tiles that are not blurred are returned unchanged.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models._augment import gaussian_blur
    >>> x = torch.rand(3, 3, 16, 16)
    >>> gaussian_blur(x, (1.0, 1.0), p=1.0).std() < x.std()
    tensor(True)

    """
    _check(x)
    lo, hi = float(sigma[0]), float(sigma[1])
    if not 0 < lo <= hi:
        raise ValueError(f"`sigma` must be a range (low, high) with 0 < low <= high, got {sigma!r}.")
    if not 0 <= p <= 1:
        raise ValueError(f"`p` must lie in [0, 1], got {p!r}.")
    b, c, h, w = x.shape
    s = _uniform(b, lo, hi, generator, torch.device("cpu"))
    on = torch.rand(b, generator=generator) < p
    if not on.any():
        return x
    radius = min(math.ceil(3 * hi), (min(h, w) - 1) // 2)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kern = torch.exp(-0.5 * (t[None, :] / s[:, None]) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    kern[~on] = 0.0
    kern[~on, radius] = 1.0
    kern = kern.to(device=x.device, dtype=x.dtype).repeat_interleave(c, dim=0)  # (B * C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, kern.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w).clamp(0.0, 1.0)


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    size: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box from each tile and resample it to ``size`` pixels (bilinear).

    The box covers a fraction of the tile's area uniform in ``scale``, with an aspect ratio log-uniform in
    ``ratio``, at a uniform position inside the tile. All tiles are resampled at once with
    :func:`torch.nn.functional.grid_sample`.

    Parameters
    ----------
    x
        ``(B, C, H, W)`` tiles.
    scale
        Range of the box area as a fraction of the tile.
    ratio
        Range of the box width / height.
    size
        Side of the output; default the input's (``H × W``).
    generator
        Random generator (CPU).

    """
    _check(x)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"`scale` must be a range within (0, 1], got {scale!r}.")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"`ratio` must be a positive range, got {ratio!r}.")
    b, c, h, w = x.shape
    out_h, out_w = (h, w) if size is None else (int(size), int(size))
    cpu = torch.device("cpu")
    area = _uniform(b, scale[0], scale[1], generator, cpu)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator, cpu)
    r = torch.exp(log_r)
    bw = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the tile side
    bh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - bw)  # normalised [-1, 1] coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - bh)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = bw, cx
    theta[:, 1, 1], theta[:, 1, 2] = bh, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0.0, 1.0)


@dataclass(frozen=True)
class Augment:
    """The random view of an H&E tile used by contrastive pretraining: crop, symmetry, stain, light, focus.

    Calling it on a ``(B, 3, H, W)`` batch in [0, 1] applies, per tile: :func:`random_resized_crop` (area
    fraction in ``crop_scale``; skipped when ``None``), :func:`dihedral` (when ``flips``), :func:`hed_jitter`
    (``hed_scale``, ``hed_shift``), :func:`brightness_contrast` and :func:`gaussian_blur` (with probability
    ``blur_p``, sigma in ``blur_sigma`` pixels at the tile's resolution).

    Examples
    --------
    >>> import torch
    >>> from histoseq.models._augment import Augment
    >>> x = torch.rand(4, 3, 32, 32)
    >>> y = Augment()(x, generator=torch.Generator().manual_seed(0))
    >>> y.shape, bool(y.min() >= 0), bool(y.max() <= 1)
    (torch.Size([4, 3, 32, 32]), True, True)

    """

    crop_scale: tuple[float, float] | None = (0.5, 1.0)
    flips: bool = True
    hed_scale: float = 0.05
    hed_shift: float = 0.02
    brightness: float = 0.1
    contrast: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    blur_p: float = 0.5

    def __post_init__(self):
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"`crop_scale` must be a range within (0, 1] or None, got {self.crop_scale!r}.")
        for name in ("hed_scale", "hed_shift", "brightness", "contrast"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)!r}.")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"`blur_sigma` must be a range (low, high) with 0 < low <= high, got {self.blur_sigma!r}.")
        if not 0 <= self.blur_p <= 1:
            raise ValueError(f"`blur_p` must lie in [0, 1], got {self.blur_p!r}.")

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random view of each tile of ``x``."""
        if self.crop_scale is not None:
            x = random_resized_crop(x, self.crop_scale, generator=generator)
        if self.flips:
            x = dihedral(x, generator=generator)
        if self.hed_scale or self.hed_shift:
            x = hed_jitter(x, self.hed_scale, self.hed_shift, generator=generator)
        if self.brightness or self.contrast:
            x = brightness_contrast(x, self.brightness, self.contrast, generator=generator)
        if self.blur_p > 0:
            x = gaussian_blur(x, self.blur_sigma, self.blur_p, generator=generator)
        return x

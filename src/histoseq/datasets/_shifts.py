"""Slide-level shifts of single synthetic sections: stain strength and hue, composition, library size, blur.

Parses and checks the shift options of :func:`histoseq.datasets.synthetic` (one :class:`_Shift` per
section), turns the stain hue into rotated stain vectors for :func:`._tissue._render`, blurs the rendered
images (in memory or lazily) and records the options applied in the table's ``uns``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from ._tissue import _E_VEC, _H_VEC

if TYPE_CHECKING:
    from ._spots import _Section

_MIN_STAIN_OD = 1e-3  # floor of a stain vector's components after a hue rotation (before renormalising)


# --------------------------------------------------------------------------------------------------
# Options per section
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shift:
    """Options that shift one section (the defaults change nothing)."""

    stain_strength: float = 1.0
    stain_hue: float = 0.0
    tumour_fraction: float | None = None
    library_size: float = 1.0
    blur_um: float = 0.0

    def render_options(self) -> tuple[tuple[float, float], dict]:
        """Stain-strength multiplier pair and the keyword arguments of :func:`._tissue._render`."""
        strength = (self.stain_strength, self.stain_strength)
        return strength, {"tumour_fraction": self.tumour_fraction, "stain_vectors": _stain_vectors(self.stain_hue)}


#: name -> (test of one value, what the test asks for)
_SHIFT_CHECKS = {
    "stain_strength": (lambda v: v > 0, "a positive number"),
    "stain_hue": (lambda v: -90 <= v <= 90, "an angle in degrees between -90 and 90"),
    "tumour_fraction": (lambda v: 0 <= v <= 1, "a number between 0 and 1"),
    "library_size": (lambda v: v > 0, "a positive number"),
    "blur_um": (lambda v: v >= 0, "a non-negative number of µm"),
}


def _section_shifts(options: dict, n_sections: int) -> list[_Shift] | None:
    """One :class:`_Shift` per section from the arguments (``None`` when no option is given)."""
    if all(v is None for v in options.values()):
        return None
    defaults = _Shift()
    per_section: dict[str, list] = {}
    for name, value in options.items():
        ok, what = _SHIFT_CHECKS[name]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if value is None or isinstance(value, numbers.Number):
            values = [value] * n_sections
        elif isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
            values = list(value)
            if len(values) != n_sections:
                raise ValueError(
                    f"`{name}` has {len(values)} values for {n_sections} section(s); give one value per section "
                    "or a single value for all."
                )
        else:
            raise ValueError(f"`{name}` must be None, a number or a sequence of one number per section, got {value!r}.")
        checked = []
        for v in values:
            if v is None:
                checked.append(getattr(defaults, name))
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(float(v)):
                raise ValueError(f"`{name}` must be {what} (or None), got {v!r}.")
            checked.append(float(v))
        per_section[name] = checked
    return [_Shift(**{name: values[i] for name, values in per_section.items()}) for i in range(n_sections)]


def _record_shifts(params: dict, shifts: list[_Shift], sections: list[_Section]) -> None:
    """Add the per-section options and the realised tumour share to ``params`` (lists, one entry a section)."""
    for f in dataclasses.fields(_Shift):
        values = [getattr(s, f.name) for s in shifts]
        params[f.name] = [math.nan if v is None else float(v) for v in values]
    params["tumour_area_fraction"] = [float(s.tumour_area_fraction) for s in sections]


# --------------------------------------------------------------------------------------------------
# Slide-level shifts: stain colour, scanner blur
# --------------------------------------------------------------------------------------------------


def _stain_vectors(hue_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin optical-density vectors rotated by ``hue_deg`` about the grey axis.

    The grey axis ``(1, 1, 1)`` is the axis of hue: turning an optical-density vector about it shifts the
    hue of the stain's colour by about as many degrees (positive angles turn eosin from pink towards
    red and haematoxylin from blue towards violet) and keeps the angle between the two stains, so they
    stay separable. Components that would turn negative are clipped to a small positive floor (from
    about +27°, eosin's red component), and both vectors are renormalised to unit length.
    """
    if hue_deg == 0:
        return _H_VEC, _E_VEC
    k = np.ones(3) / math.sqrt(3)
    t = math.radians(hue_deg)
    out = []
    for v in (_H_VEC, _E_VEC):
        v = v.astype(np.float64)
        r = v * math.cos(t) + np.cross(k, v) * math.sin(t) + k * (k @ v) * (1 - math.cos(t))  # Rodrigues
        r = np.maximum(r, _MIN_STAIN_OD)
        out.append((r / np.linalg.norm(r)).astype(np.float32))
    return out[0], out[1]


def _blur_rgb(rgb: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a ``(3, H, W)`` uint8 image in y and x (``sigma_px`` in pixels), rounded back to uint8."""
    out = ndi.gaussian_filter(rgb.astype(np.float32), (0, sigma_px, sigma_px), mode="reflect", truncate=4.0)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _blur_lazy(image, sigma_px: float):
    """:func:`_blur_rgb` of a dask ``(3, y, x)`` array, block by block with overlapping borders."""
    depth = int(4.0 * sigma_px + 0.5) + 1  # the radius of scipy's kernel at ``truncate=4``, plus one
    return image.map_overlap(
        _blur_rgb, depth={0: 0, 1: depth, 2: depth}, boundary="reflect", dtype=np.uint8, sigma_px=sigma_px
    )

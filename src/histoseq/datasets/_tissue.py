"""Painting the synthetic tissue: cell types and lumina, smooth random fields, nuclei, stain and RGB.

Holds the array layer of :mod:`histoseq.datasets._synthetic`: the cell-type and lumen specifications, the
smooth random fields on coarse grids (:class:`_Grid`), the renderer that draws one piece of H&E-stained
tissue with its pixel classes and nucleus table (:func:`_render`), and the large-mode tile bank that
assembles an arbitrarily large image lazily from a few rendered tiles (:class:`_TileBank`,
:func:`_lazy_image`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Cell types of the synthetic tissue, in the order of their integer codes.
CELL_TYPES = ("tumour", "stroma", "immune")

# Pixel classes of the label maps.
_GLASS, _EOSIN, _NUCLEUS, _LUMEN, _CLEFT = 0, 1, 2, 3, 4
_N_CLASSES = 5

# Stain optical-density vectors (per unit concentration, base 10) for R, G, B, and the glass intensity.
_H_VEC = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_H_VEC /= np.linalg.norm(_H_VEC)
_E_VEC = np.array([0.07, 0.88, 0.45], dtype=np.float32)
_E_VEC /= np.linalg.norm(_E_VEC)
_GLASS_INTENSITY = 240.0

_GRID_UM = 8.0  # spacing of the coarse grids that hold the smooth fields
_TILE_PX = 1024  # tile size of the large-mode tile bank
_N_TILES = 8  # tiles in the bank (each is also used rotated / flipped: 64 variants)


@dataclass(frozen=True)
class _CellType:
    """Appearance of one cell type."""

    density_per_um2: float  # intensity of candidate nuclei, before hard-core thinning
    semi_major_um: float
    aspect: tuple[float, float]  # range of minor / major semi-axis
    hardcore_um: float  # two nuclei closer than the sum of these radii are thinned
    h_od: tuple[float, float]  # haematoxylin optical density of the nuclei
    e_background: float  # eosin optical density of cytoplasm / extracellular matrix
    h_background: float  # haematoxylin tint of the background


_TYPES = (
    _CellType(1 / 80, 5.2, (0.72, 0.95), 3.6, (0.50, 0.70), 0.20, 0.09),  # tumour
    _CellType(1 / 300, 6.5, (0.22, 0.36), 3.0, (0.60, 0.80), 0.30, 0.015),  # stroma
    _CellType(1 / 40, 2.9, (0.85, 1.00), 2.6, (0.80, 1.00), 0.15, 0.05),  # immune
)
_TUMOUR, _STROMA, _IMMUNE = 0, 1, 2


@dataclass(frozen=True)
class _LumenKind:
    """Hollow structures and the nuclei lining them."""

    cell_type: int  # region they appear in; also the type of their lining nuclei
    spacing_um: float  # mean distance between candidate centres (kept only in their region)
    semi_major_um: tuple[float, float]
    aspect: tuple[float, float]
    lining_offset_um: float  # distance of the lining nuclei's centres outside the border
    lining_spacing_um: float
    lining_semi_major_um: float
    lining_aspect: tuple[float, float]
    lining_along_normal: bool  # columnar (major axis along the normal) or flat (along the border)


_LUMINA = (
    _LumenKind(_TUMOUR, 70.0, (9.0, 24.0), (0.5, 1.0), 3.8, 7.0, 4.6, (0.5, 0.65), True),  # glands
    _LumenKind(_STROMA, 50.0, (4.0, 11.0), (0.3, 0.8), 1.4, 12.0, 4.5, (0.22, 0.32), False),  # vessels
)


# --------------------------------------------------------------------------------------------------
# Smooth fields on coarse grids
# --------------------------------------------------------------------------------------------------


def _interp_matrix(start: int, stop: int, pixel_size_um: float, grid_um: float, n_nodes: int) -> tuple[int, np.ndarray]:
    """Bilinear weights from grid nodes to the centres of pixels ``start..stop-1`` along one axis.

    Returns the first node used and a ``(stop - start, k)`` matrix over nodes ``first..first+k-1``.
    """
    t = (np.arange(start, stop, dtype=np.float64) + 0.5) * (pixel_size_um / grid_um)
    i0 = np.clip(np.floor(t).astype(np.int64), 0, n_nodes - 2)
    w = np.clip(t - i0, 0.0, 1.0).astype(np.float32)
    lo = int(i0.min())
    mat = np.zeros((stop - start, int(i0.max()) + 2 - lo), dtype=np.float32)
    rows = np.arange(stop - start)
    mat[rows, i0 - lo] = 1 - w
    mat[rows, i0 - lo + 1] = w
    return lo, mat


@dataclass(frozen=True)
class _Grid:
    """A field sampled on a grid: node ``(i, j)`` sits at ``(i * grid_um, j * grid_um)`` µm (y, x)."""

    values: np.ndarray
    grid_um: float

    def at_points(self, y_um: np.ndarray, x_um: np.ndarray) -> np.ndarray:
        """Bilinear interpolation at points given in µm."""
        coords = np.stack([np.asarray(y_um, float) / self.grid_um, np.asarray(x_um, float) / self.grid_um])
        return ndi.map_coordinates(self.values, coords, order=1, mode="nearest").astype(np.float32)

    def at_pixels(self, pixel_size_um: float, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Bilinear interpolation at the centres of the pixels ``[y0, y1) × [x0, x1)``."""
        ny, nx = self.values.shape
        ly, my = _interp_matrix(y0, y1, pixel_size_um, self.grid_um, ny)
        lx, mx = _interp_matrix(x0, x1, pixel_size_um, self.grid_um, nx)
        sub = self.values[ly : ly + my.shape[1], lx : lx + mx.shape[1]]
        return (my @ sub) @ mx.T

    def range_over_pixels(self, pixel_size_um: float, y0: int, y1: int, x0: int, x1: int) -> tuple[float, float]:
        """Bounds of :meth:`at_pixels` over a pixel box (bilinear values lie between their nodes)."""
        ny, nx = self.values.shape
        t = lambda a, n: min(max(math.floor((a + 0.5) * pixel_size_um / self.grid_um), 0), n - 2)
        sub = self.values[t(y0, ny) : t(y1 - 1, ny) + 2, t(x0, nx) : t(x1 - 1, nx) + 2]
        return float(sub.min()), float(sub.max())


def _grid_shape(height_um: float, width_um: float, grid_um: float) -> tuple[int, int]:
    return math.ceil(height_um / grid_um) + 2, math.ceil(width_um / grid_um) + 2


def _smooth_grid(
    rng: np.random.Generator, height_um: float, width_um: float, sigma_um: float, grid_um: float = _GRID_UM
) -> _Grid:
    """A smooth Gaussian random field with unit variance and correlation length ~``sigma_um``."""
    shape = _grid_shape(height_um, width_um, grid_um)
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = ndi.gaussian_filter(noise, sigma_um / grid_um, mode="reflect")
    field /= max(float(field.std()), 1e-12)
    return _Grid(field, grid_um)


def _tissue_grid(rng: np.random.Generator, height_um: float, width_um: float) -> _Grid:
    """Signed distance-like field (µm) of an irregular blob of tissue; tissue where it is positive."""
    grid_um = max(_GRID_UM, min(height_um, width_um) / 1500)
    ny, nx = _grid_shape(height_um, width_um, grid_um)
    y = (np.arange(ny) * grid_um)[:, None]
    x = (np.arange(nx) * grid_um)[None, :]
    size = min(height_um, width_um)
    cy = height_um / 2 + rng.uniform(-0.03, 0.03) * size
    cx = width_um / 2 + rng.uniform(-0.03, 0.03) * size
    theta = np.arctan2(y - cy, x - cx)
    dist = np.hypot(y - cy, x - cx)
    radius = np.ones_like(theta)
    for k in range(2, 6):
        radius = radius + rng.uniform(0.0, 0.16 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # squash the blob a little so the tissue does not look like a disk
    stretch = rng.uniform(0.85, 1.0)
    radius = 0.43 * size * radius
    rough = _smooth_grid(rng, height_um, width_um, 0.04 * size, grid_um).values
    field = radius * (1 - (1 - stretch) * np.sin(theta) ** 2) - dist + 0.035 * size * rough
    border = np.minimum(np.minimum(y, height_um - y), np.minimum(x, width_um - x)) - 0.05 * size
    return _Grid(np.minimum(field, border).astype(np.float32), grid_um)


# --------------------------------------------------------------------------------------------------
# Rendering one piece of tissue
# --------------------------------------------------------------------------------------------------


def _stamp(
    height: int, width: int, cy: np.ndarray, cx: np.ndarray, a: np.ndarray, b: np.ndarray, angle: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Pixels whose centre lies inside each ellipse (centres and semi-axes in px, angle of the major axis).

    Yields ``(ellipse index, rows, cols, rho²)`` in batches, ``rho² ≤ 1`` the normalised radius.
    """
    n = cy.size
    if n == 0:
        return
    half = int(np.ceil(float(a.max()))) + 1
    off = np.arange(-half, half + 1, dtype=np.int64)
    batch = max(1, 3_000_000 // off.size**2)
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        rr = np.floor(cy[sl]).astype(np.int64)[:, None, None] + off[None, :, None]
        cc = np.floor(cx[sl]).astype(np.int64)[:, None, None] + off[None, None, :]
        v = (rr + 0.5 - cy[sl, None, None]).astype(np.float32)
        u = (cc + 0.5 - cx[sl, None, None]).astype(np.float32)
        cos = np.cos(angle[sl]).astype(np.float32)[:, None, None]
        sin = np.sin(angle[sl]).astype(np.float32)[:, None, None]
        aa = a[sl].astype(np.float32)[:, None, None]
        bb = b[sl].astype(np.float32)[:, None, None]
        rho2 = ((u * cos + v * sin) / aa) ** 2 + ((v * cos - u * sin) / bb) ** 2
        inside = (rho2 <= 1) & (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        k, i, j = np.nonzero(inside)
        yield s + k, rr[k, i, 0], cc[k, 0, j], rho2[k, i, j]


def _matern_thinning(xy_um: np.ndarray, radius_um: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Keep-mask of a Matérn type-II thinning: of two points closer than their summed radii the later goes."""
    from scipy.spatial import cKDTree

    keep = np.ones(len(xy_um), dtype=bool)
    if len(xy_um) < 2:
        return keep
    pairs = cKDTree(xy_um).query_pairs(2 * float(radius_um.max()), output_type="ndarray")
    if len(pairs) == 0:
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    close = np.linalg.norm(xy_um[i] - xy_um[j], axis=1) < radius_um[i] + radius_um[j]
    i, j = i[close], j[close]
    loser = np.where(priority[i] < priority[j], i, j)
    keep[loser] = False
    return keep


@dataclass
class _Rendered:
    """A rendered piece of tissue: pixels, pixel classes and the nucleus table (px coordinates)."""

    rgb: np.ndarray  # (3, H, W) uint8
    labels: np.ndarray  # (H, W) uint8, one of the _GLASS ... _CLEFT codes
    nuclei: dict[str, np.ndarray]  # "x", "y" (px, continuous), "area_um2", "type" (index into CELL_TYPES)
    tumour_area_fraction: float  # share of the tissue pixels in tumour regions (NaN without tissue)
    cell_types: np.ndarray | None = None  # (H, W) uint8 cell-type regions: 0 glass, 1 + index into CELL_TYPES


def _glass_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Glass intensity with a little multiplicative sensor noise, ``(H, W)`` float32."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(0.012 * _GLASS_INTENSITY)
    noise += np.float32(_GLASS_INTENSITY)
    return noise


def _glass(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Empty slide as drawn by :func:`_render` outside the tissue, ``(3, H, W)`` uint8."""
    return np.broadcast_to(np.clip(_glass_noise(rng, shape), 0, 255).astype(np.uint8), (3, *shape)).copy()


def _render(
    rng: np.random.Generator,
    height: int,
    width: int,
    pixel_size_um: float,
    tissue: _Grid | None,
    stain_scale: tuple[float, float] = (1.0, 1.0),
    tumour_fraction: float | None = None,
    stain_vectors: tuple[np.ndarray, np.ndarray] | None = None,
) -> _Rendered:
    """Draw a ``height × width`` px piece of H&E-stained tissue (all tissue when ``tissue`` is ``None``).

    ``tumour_fraction`` shifts the tumour score against the larger of the other two so that this share of
    the tissue pixels is tumour (stroma and immune split the rest as drawn); ``stain_vectors`` replaces
    the haematoxylin and eosin optical-density vectors (see :func:`._shifts._stain_vectors`).
    """
    p = pixel_size_um
    h_um, w_um = height * p, width * p

    # smooth fields: cell-type scores (with a finer wiggle for ragged borders), nuclear density and size,
    # stroma looseness, fibre warp
    type_grids = [
        _Grid(
            _smooth_grid(rng, h_um, w_um, 90.0).values + 0.35 * _smooth_grid(rng, h_um, w_um, 20.0).values + bias,
            _GRID_UM,
        )
        for bias in (0.1, 0.4, -0.15)
    ]
    density = _smooth_grid(rng, h_um, w_um, 70.0)
    size = _smooth_grid(rng, h_um, w_um, 70.0)
    loose = _smooth_grid(rng, h_um, w_um, 100.0)
    warp = _smooth_grid(rng, h_um, w_um, 80.0)
    fibre_theta = rng.uniform(0, np.pi)
    fibre_period_um, warp_cycles = 8.0, 3.0

    box = (0, height, 0, width)
    in_tissue = np.ones((height, width), dtype=bool) if tissue is None else tissue.at_pixels(p, *box) > 0
    best = type_grids[0].at_pixels(p, *box)
    if tumour_fraction is not None:
        margin = best - np.maximum(type_grids[1].at_pixels(p, *box), type_grids[2].at_pixels(p, *box))
        margin = margin[in_tissue] if in_tissue.any() else margin.ravel()
        best -= np.float32(np.quantile(margin, 1.0 - tumour_fraction))  # ties go to tumour
        del margin
    ctype = np.zeros((height, width), dtype=np.uint8)
    for k in range(1, len(CELL_TYPES)):
        f = type_grids[k].at_pixels(p, *box)
        better = f > best
        ctype[better] = k
        np.maximum(best, f, out=best)
    del best, f, better
    n_tissue = int(np.count_nonzero(in_tissue))
    tumour_area = np.count_nonzero((ctype == _TUMOUR) & in_tissue) / n_tissue if n_tissue else float("nan")
    is_stroma = ctype == _STROMA
    ys = ((np.arange(height, dtype=np.float32) + 0.5) * p)[:, None]
    xs = ((np.arange(width, dtype=np.float32) + 0.5) * p)[None, :]
    fibre = warp.at_pixels(p, *box)
    fibre *= np.float32(warp_cycles)
    fibre += (xs * np.float32(np.cos(fibre_theta)) + ys * np.float32(np.sin(fibre_theta))) / np.float32(fibre_period_um)
    fibre *= np.float32(2 * np.pi)
    np.sin(fibre, out=fibre)  # +-1 along the fibres' cross-section

    # lumina: glands in tumour regions, small vessels in the stroma
    lum = {k: [] for k in ("y", "x", "a", "b", "angle", "kind")}
    for kind, spec in enumerate(_LUMINA):
        n = rng.poisson(h_um * w_um / spec.spacing_um**2)
        y, x = rng.uniform(0, height, n), rng.uniform(0, width, n)
        ok = (ctype[y.astype(int), x.astype(int)] == spec.cell_type) & in_tissue[y.astype(int), x.astype(int)]
        a_ = rng.uniform(*spec.semi_major_um, int(ok.sum())) / p
        for key, val in zip(lum, (y[ok], x[ok], a_, a_ * rng.uniform(*spec.aspect, a_.size))):
            lum[key].append(val)
        lum["angle"].append(rng.uniform(0, np.pi, a_.size))
        lum["kind"].append(np.full(a_.size, kind))
    ly, lx, la, lb, lang, lkind = (np.concatenate(v) for v in lum.values())

    labels = np.where(in_tissue, np.uint8(_EOSIN), np.uint8(_GLASS))
    # clefts: thin unstained gaps between stroma fibres, more where the stroma is loose, a few elsewhere
    # (the noise is drawn at half resolution: a Gaussian filter at full resolution costs 3x more)
    hh, hw = (height + 1) // 2, (width + 1) // 2
    sigma_half = max(0.8 / p, 0.5)
    cleft_noise = ndi.gaussian_filter(rng.standard_normal((hh, hw), dtype=np.float32), sigma_half, truncate=3.0)
    cleft_noise *= np.float32(math.sqrt(4 * math.pi) * sigma_half)
    cleft_noise = np.repeat(np.repeat(cleft_noise, 2, axis=0), 2, axis=1)[:height, :width]
    looseness = loose.at_pixels(p, *box)
    cleft = (cleft_noise > np.float32(2.4) - np.float32(0.5) * looseness) | (
        is_stroma & (fibre < -0.8) & (cleft_noise > np.float32(0.2) - np.float32(0.9) * looseness)
    )
    cleft &= in_tissue
    labels[cleft] = _CLEFT
    del cleft_noise, looseness, cleft
    lumen_mask = np.zeros((height, width), dtype=bool)
    for _, rr, cc, _ in _stamp(height, width, ly, lx, la, lb, lang):
        lumen_mask[rr, cc] = True
    lumen_mask &= in_tissue
    labels[lumen_mask] = _LUMEN

    # nuclei: thinned Poisson process whose intensity follows cell type and the density field
    dens = np.array([t.density_per_um2 for t in _TYPES])
    lam_max = float(dens.max() * np.exp(0.4 * 3))
    n_cand = rng.poisson(lam_max * h_um * w_um)
    ny_, nx_ = rng.uniform(0, height, n_cand), rng.uniform(0, width, n_cand)
    iy, ix = ny_.astype(int), nx_.astype(int)
    ntype = ctype[iy, ix]
    lam = dens[ntype] * np.exp(0.4 * np.clip(density.at_points(ny_ * p, nx_ * p), -3, 3))
    ok = (rng.uniform(0, lam_max, n_cand) < lam) & in_tissue[iy, ix] & ~lumen_mask[iy, ix]
    ny_, nx_, ntype = ny_[ok], nx_[ok], ntype[ok]
    priority = rng.uniform(0, 1, ny_.size)

    # nuclei lining the lumina: columnar epithelium around glands (along the normal), flat endothelium
    # around vessels (along the border)
    lin = {k: [] for k in ("y", "x", "angle", "kind")}
    for j in range(ly.size):
        spec = _LUMINA[lkind[j]]
        ra, rb = la[j] + spec.lining_offset_um / p, lb[j] + spec.lining_offset_um / p
        n_lining = max(4, int(2 * np.pi * math.sqrt((ra**2 + rb**2) / 2) * p / spec.lining_spacing_um))
        t = np.linspace(0, 2 * np.pi, n_lining, endpoint=False) + rng.uniform(0, 2 * np.pi)
        ex, ey = ra * np.cos(t), rb * np.sin(t)
        c, s = np.cos(lang[j]), np.sin(lang[j])
        normal = lang[j] + np.arctan2(ra * np.sin(t), rb * np.cos(t))
        lin["x"].append(lx[j] + ex * c - ey * s)
        lin["y"].append(ly[j] + ex * s + ey * c)
        lin["angle"].append(normal if spec.lining_along_normal else normal + np.pi / 2)
        lin["kind"].append(np.full(n_lining, lkind[j]))
    lin_y_, lin_x_, lin_ang_, lin_kind = (np.concatenate(v) if v else np.zeros(0) for v in lin.values())
    lin_kind = lin_kind.astype(int)
    inside = (lin_y_ >= 0) & (lin_y_ < height) & (lin_x_ >= 0) & (lin_x_ < width)
    iy, ix = lin_y_.astype(int).clip(0, height - 1), lin_x_.astype(int).clip(0, width - 1)
    inside &= in_tissue[iy, ix] & ~lumen_mask[iy, ix]
    lin_y_, lin_x_, lin_ang_, lin_kind = lin_y_[inside], lin_x_[inside], lin_ang_[inside], lin_kind[inside]
    n_lin = lin_y_.size
    all_y = np.concatenate([lin_y_, ny_])
    all_x = np.concatenate([lin_x_, nx_])
    all_t = np.concatenate([np.array([_LUMINA[k].cell_type for k in lin_kind], dtype=np.uint8), ntype])
    hard = np.array([t.hardcore_um for t in _TYPES])[all_t]
    hard[:n_lin] = 2.6
    keep = _matern_thinning(np.column_stack([all_x, all_y]) * p, hard, np.concatenate([np.full(n_lin, 2.0), priority]))
    is_lining = np.arange(all_y.size) < n_lin
    all_y, all_x, all_t, is_lining = all_y[keep], all_x[keep], all_t[keep], is_lining[keep]
    n_nuc = all_y.size

    # shape and darkness of each nucleus
    size_mod = np.clip(size.at_points(all_y * p, all_x * p), -3, 3)
    semi = np.array([t.semi_major_um for t in _TYPES])[all_t]
    a_um = semi * np.exp(0.13 * size_mod + 0.08 * rng.standard_normal(n_nuc))
    lo = np.array([t.aspect[0] for t in _TYPES])[all_t]
    hi = np.array([t.aspect[1] for t in _TYPES])[all_t]
    b_um = a_um * rng.uniform(lo, hi)
    angle = rng.uniform(0, np.pi, n_nuc)
    # stroma nuclei follow the fibres: the fibre direction is perpendicular to the gradient of the phase
    st = all_t == _STROMA
    if st.any():
        gy, gx = np.gradient(warp.values, warp.grid_um)
        py, px_ = all_y[st] * p, all_x[st] * p
        grad_x = np.cos(fibre_theta) / fibre_period_um + warp_cycles * _Grid(gx, warp.grid_um).at_points(py, px_)
        grad_y = np.sin(fibre_theta) / fibre_period_um + warp_cycles * _Grid(gy, warp.grid_um).at_points(py, px_)
        angle[st] = np.arctan2(grad_y, grad_x) + np.pi / 2 + 0.2 * rng.standard_normal(int(st.sum()))
    if is_lining.any():
        kinds = lin_kind[keep[:n_lin]]
        a_um[is_lining] = np.array([s.lining_semi_major_um for s in _LUMINA])[kinds] * np.exp(
            0.13 * size_mod[is_lining]
        )
        b_um[is_lining] = a_um[is_lining] * rng.uniform(
            np.array([s.lining_aspect[0] for s in _LUMINA])[kinds],
            np.array([s.lining_aspect[1] for s in _LUMINA])[kinds],
        )
        angle[is_lining] = lin_ang_[keep[:n_lin]]
    h_lo = np.array([t.h_od[0] for t in _TYPES])[all_t]
    h_hi = np.array([t.h_od[1] for t in _TYPES])[all_t]
    h_od = rng.uniform(h_lo, h_hi).astype(np.float32)

    # stain maps (optical densities)
    texture = ndi.gaussian_filter(rng.standard_normal((height, width), dtype=np.float32), 0.8, truncate=3.0)
    texture *= np.float32(math.sqrt(4 * math.pi) * 0.8)  # about unit variance
    e_bg = np.array([t.e_background for t in _TYPES], dtype=np.float32)
    h_bg = np.array([t.h_background for t in _TYPES], dtype=np.float32)
    eosin_od = np.float32(0.18) * fibre
    eosin_od *= is_stroma
    eosin_od += np.float32(0.08) * texture
    eosin_od += 1
    eosin_od *= e_bg[ctype]
    haem_od = np.float32(0.15) * texture
    haem_od += 1
    haem_od *= h_bg[ctype]
    del fibre, is_stroma
    unstained = labels >= _LUMEN
    eosin_od[unstained] = 0.02
    haem_od[unstained] = 0.0
    eosin_od[~in_tissue] = 0.0
    haem_od[~in_tissue] = 0.0
    del unstained
    order = np.argsort(a_um)  # draw big nuclei first: small ones on top stay visible
    for t in range(len(CELL_TYPES)):
        sel = order[all_t[order] == t]
        for k, rr, cc, rho2 in _stamp(height, width, all_y[sel], all_x[sel], a_um[sel] / p, b_um[sel] / p, angle[sel]):
            # chromatin: darker rim and speckles
            haem_od[rr, cc] = h_od[sel[k]] * (0.75 + 0.35 * rho2) * (1 + 0.22 * texture[rr, cc])
            eosin_od[rr, cc] = 0.08
            labels[rr, cc] = _NUCLEUS
    del texture
    haem_od = ndi.gaussian_filter(haem_od, 0.6, truncate=3.0)
    haem_od *= np.float32(stain_scale[0] * math.log(10))
    eosin_od = ndi.gaussian_filter(eosin_od, 0.6, truncate=3.0)
    eosin_od *= np.float32(stain_scale[1] * math.log(10))

    # Beer-Lambert, with a little multiplicative sensor noise (also on the glass)
    noise = _glass_noise(rng, (height, width))
    h_vec, e_vec = (_H_VEC, _E_VEC) if stain_vectors is None else stain_vectors
    rgb = np.empty((3, height, width), dtype=np.uint8)
    for c in range(3):
        od = haem_od * -h_vec[c]
        od -= eosin_od * e_vec[c]
        np.exp(od, out=od)
        od *= noise
        np.clip(od, 0, 255, out=od)
        rgb[c] = od
    del od, noise, haem_od, eosin_od

    area = np.pi * a_um * b_um
    nuclei = {"x": all_x, "y": all_y, "area_um2": area, "type": all_t.astype(np.int8)}
    # the cell-type map: 0 on glass, 1 + the type's index on tissue (nuclei overhanging its border included)
    ctype += 1
    ctype[labels == _GLASS] = 0
    return _Rendered(rgb, labels, nuclei, float(tumour_area), ctype)


# --------------------------------------------------------------------------------------------------
# Large mode: lazily assembled image from a bank of tiles
# --------------------------------------------------------------------------------------------------


def _dihedral(a: np.ndarray, variant: int) -> np.ndarray:
    """One of the 8 rotations / reflections of the last two axes (a view)."""
    if variant & 1:
        a = np.swapaxes(a, -1, -2)
    if variant & 2:
        a = a[..., ::-1, :]
    if variant & 4:
        a = a[..., :, ::-1]
    return a


class _TileBank:
    """Tissue tiles rendered once, assembled into any box of a large section on demand."""

    def __init__(
        self,
        ss: np.random.SeedSequence,
        height: int,
        width: int,
        pixel_size_um: float,
        tissue: _Grid,
        stain_scale: tuple[float, float],
        tumour_fraction: float | None = None,
        stain_vectors: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.height, self.width, self.p, self.tissue = height, width, pixel_size_um, tissue
        self.tile = min(_TILE_PX, max(height, width))
        n_cells = math.ceil(height / self.tile) * math.ceil(width / self.tile)
        n_tiles = max(1, min(_N_TILES, n_cells))
        children = ss.spawn(n_tiles + 1)
        self.key = int(ss.generate_state(1)[0])
        self.tiles = [
            _render(
                np.random.default_rng(c),
                self.tile,
                self.tile,
                pixel_size_um,
                None,
                stain_scale,
                tumour_fraction,
                stain_vectors,
            )
            for c in children[:n_tiles]
        ]
        self.glass = _glass(np.random.default_rng(children[-1]), (self.tile, self.tile))
        self.n_tiles = n_tiles

    def tumour_area_fraction(self) -> float:
        """Share of the section's tissue in tumour regions, from the tiles placed in the cells on tissue."""
        T = self.tile
        shares = [
            self.tiles[self.pick(ty, tx)[0]].tumour_area_fraction
            for ty in range(math.ceil(self.height / T))
            for tx in range(math.ceil(self.width / T))
            if self.tissue_state(ty * T, min((ty + 1) * T, self.height), tx * T, min((tx + 1) * T, self.width)) != 0
        ]
        return float(np.mean(shares)) if shares else float("nan")

    def pick(self, ty: int, tx: int) -> tuple[int, int]:
        """Tile and dihedral variant of tile cell ``(ty, tx)``, from a hash of its position."""
        h = int(np.random.default_rng([self.key, ty, tx]).integers(0, self.n_tiles * 8))
        return h // 8, h % 8

    def _cells(self, y0: int, y1: int, x0: int, x1: int) -> Iterator[tuple[int, int, slice, slice, slice, slice]]:
        T = self.tile
        for ty in range(y0 // T, (y1 - 1) // T + 1):
            for tx in range(x0 // T, (x1 - 1) // T + 1):
                ys, ye = max(y0, ty * T), min(y1, (ty + 1) * T)
                xs, xe = max(x0, tx * T), min(x1, (tx + 1) * T)
                yield (
                    ty,
                    tx,
                    slice(ys - y0, ye - y0),
                    slice(xs - x0, xe - x0),
                    slice(ys - ty * T, ye - ty * T),
                    slice(xs - tx * T, xe - tx * T),
                )

    def tissue_state(self, y0: int, y1: int, x0: int, x1: int) -> int:
        """1: the box is all tissue, 0: all glass, -1: it crosses the tissue border."""
        lo, hi = self.tissue.range_over_pixels(self.p, y0, y1, x0, x1)
        return 1 if lo > 0 else 0 if hi <= 0 else -1

    def rgb(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The ``(3, y1 - y0, x1 - x0)`` uint8 pixels of a box."""
        state = self.tissue_state(y0, y1, x0, x1)
        out = np.empty((3, y1 - y0, x1 - x0), dtype=np.uint8)
        glass = np.empty_like(out) if state != 1 else None
        for ty, tx, oy, ox, sy, sx in self._cells(y0, y1, x0, x1):
            if state != 0:
                k, v = self.pick(ty, tx)
                out[:, oy, ox] = _dihedral(self.tiles[k].rgb, v)[:, sy, sx]
            if glass is not None:
                glass[:, oy, ox] = self.glass[:, sy, sx]
        if state == 0:
            return glass
        if state == -1:
            mask = self.tissue.at_pixels(self.p, y0, y1, x0, x1) > 0
            out = np.where(mask[None], out, glass)
        return out

    def labels(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixel classes of a box."""
        state = self.tissue_state(y0, y1, x0, x1)
        out = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        if state == 0:
            return out
        for ty, tx, oy, ox, sy, sx in self._cells(y0, y1, x0, x1):
            k, v = self.pick(ty, tx)
            out[oy, ox] = _dihedral(self.tiles[k].labels, v)[sy, sx]
        if state == -1:
            out[~(self.tissue.at_pixels(self.p, y0, y1, x0, x1) > 0)] = _GLASS
        return out

    def nuclei(self, ty: int, tx: int) -> dict[str, np.ndarray]:
        """Nuclei of tile cell ``(ty, tx)`` in global px coordinates, those on glass removed."""
        T = self.tile
        k, v = self.pick(ty, tx)
        nuc = self.tiles[k].nuclei
        x, y = nuc["x"].copy(), nuc["y"].copy()
        if v & 1:
            x, y = y, x
        if v & 2:
            y = T - y
        if v & 4:
            x = T - x
        x, y = x + tx * T, y + ty * T
        keep = (
            (x >= tx * T) & (x < min((tx + 1) * T, self.width)) & (y >= ty * T) & (y < min((ty + 1) * T, self.height))
        )
        if keep.any():
            iy, ix = np.floor(y[keep]), np.floor(x[keep])
            keep[keep] = self.tissue.at_points((iy + 0.5) * self.p, (ix + 0.5) * self.p) > 0
        return {"x": x[keep], "y": y[keep], "area_um2": nuc["area_um2"][keep], "type": nuc["type"][keep]}


def _lazy_image(bank: _TileBank, chunk: int, name: str):
    """A dask ``(3, y, x)`` uint8 array whose blocks are assembled from the tile bank."""
    import dask.array as da

    def split(n: int) -> tuple[int, ...]:
        return tuple(min(chunk, n - s) for s in range(0, n, chunk))

    chunks = ((3,), split(bank.height), split(bank.width))

    def block(block_id: tuple[int, int, int] | None = None) -> np.ndarray:
        _, bi, bj = block_id
        y0, x0 = bi * chunk, bj * chunk
        return bank.rgb(y0, min(y0 + chunk, bank.height), x0, min(x0 + chunk, bank.width))

    return da.map_blocks(block, dtype=np.uint8, chunks=chunks, meta=np.empty((0, 0, 0), np.uint8), name=name)

"""Spots of the synthetic sections and their expression: spot grid, true features, genes and counts.

Lays the Visium-like hexagonal spot grid over a section, counts the ``true_`` features of every spot from
the rendered pixel classes and nuclei (:class:`_SpotFeatures`), keeps the in-tissue spots of a section
(:class:`_Section`), and defines the genes and their driving factors (:func:`_make_genes`) and the
negative-binomial counts drawn from the features: the drivers standardised over all spots
(:class:`_Drivers`), the expected means (:func:`_expected_means`, shared with the ground-truth maps of
:mod:`._truth`) and the draws (:func:`_counts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._tissue import _EOSIN, _LUMEN, _N_CLASSES, CELL_TYPES, _Grid, _smooth_grid

#: Morphology factors: name -> (driving ``obs`` column, gene-name prefix).
_MORPHOLOGY_FACTORS = {
    "nuclei_count": ("true_nuclei_count", "DENS"),
    "nuclear_area": ("true_nuclear_area_um2", "NSIZE"),
    "eosin": ("true_eosin_fraction", "EOS"),
    "celltype_tumour": ("true_frac_tumour", "TUM"),
    "celltype_stroma": ("true_frac_stroma", "STRO"),
    "celltype_immune": ("true_frac_immune", "IMM"),
    "lumen": ("true_lumen_fraction", "LUMEN"),
}
_TRUTH_CATEGORIES = [*_MORPHOLOGY_FACTORS, "spatial", "noise"]


# --------------------------------------------------------------------------------------------------
# Spots and their true features
# --------------------------------------------------------------------------------------------------


def _hex_grid(height_um: float, width_um: float, pitch_um: float, margin_um: float) -> np.ndarray:
    """``(x, y)`` µm centres of a hexagonal grid, centred in the section, at least ``margin_um`` from its edges."""
    dy = pitch_um * math.sqrt(3) / 2
    n_rows = math.floor((height_um - 2 * margin_um) / dy + 1e-9) + 1
    n_cols = math.floor((width_um - 2 * margin_um - pitch_um / 2) / pitch_um + 1e-9) + 1
    if n_rows < 1 or n_cols < 1 or height_um < 2 * margin_um or width_um < 2 * margin_um + pitch_um / 2:
        return np.zeros((0, 2))
    y0 = (height_um - (n_rows - 1) * dy) / 2
    x0 = (width_um - (n_cols - 1) * pitch_um - pitch_um / 2) / 2
    rows = np.arange(n_rows)
    y = y0 + rows * dy
    xy = [
        np.column_stack([x0 + (r % 2) * pitch_um / 2 + np.arange(n_cols) * pitch_um, np.full(n_cols, yy)])
        for r, yy in zip(rows, y)
    ]
    return np.concatenate(xy)


class _SpotFeatures:
    """Accumulates pixel classes and nuclei inside spot disks, block by block."""

    def __init__(self, xy_px: np.ndarray, radius_px: float):
        from scipy.spatial import cKDTree

        self.xy = xy_px
        self.radius = radius_px
        n = len(xy_px)
        self.class_px = np.zeros((n, _N_CLASSES), dtype=np.int64)
        self.n_disk = np.zeros(n, dtype=np.int64)
        self.n_nuclei = np.zeros(n, dtype=np.int64)
        self.area_sum = np.zeros(n)
        self.type_counts = np.zeros((n, len(CELL_TYPES)), dtype=np.int64)
        self.tree = cKDTree(xy_px) if n else None
        for k in range(n):
            self.n_disk[k] = int(self._disk(k, 0, 10**9, 0, 10**9)[2].sum())

    def _disk(self, k: int, y0: int, y1: int, x0: int, x1: int) -> tuple[slice, slice, np.ndarray]:
        """Window of spot ``k`` clipped to ``[y0, y1) × [x0, x1)`` and its disk mask (pixel centres)."""
        x, y = self.xy[k]
        r = self.radius
        r0, r1 = max(math.floor(y - r), y0), min(math.ceil(y + r) + 1, y1)
        c0, c1 = max(math.floor(x - r), x0), min(math.ceil(x + r) + 1, x1)
        dy = np.arange(r0, r1) + 0.5 - y
        dx = np.arange(c0, c1) + 0.5 - x
        mask = dy[:, None] ** 2 + dx[None, :] ** 2 <= r * r
        return slice(r0, r1), slice(c0, c1), mask

    def spots_touching(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Spots whose disk bounding box meets the pixel box."""
        if self.tree is None:
            return np.zeros(0, dtype=int)
        x, y, r = self.xy[:, 0], self.xy[:, 1], self.radius
        return np.flatnonzero((x + r >= x0) & (x - r < x1) & (y + r >= y0) & (y - r < y1))

    def add_labels(self, y0: int, x0: int, labels: np.ndarray) -> None:
        """Count the pixel classes of a block (its top-left pixel at ``(y0, x0)``) inside each disk."""
        h, w = labels.shape
        for k in self.spots_touching(y0, y0 + h, x0, x0 + w):
            rs, cs, mask = self._disk(k, y0, y0 + h, x0, x0 + w)
            if mask.size == 0:
                continue
            sub = labels[rs.start - y0 : rs.stop - y0, cs.start - x0 : cs.stop - x0]
            self.class_px[k] += np.bincount(sub[mask], minlength=_N_CLASSES)

    def add_nuclei(self, nuclei: dict[str, np.ndarray]) -> None:
        """Assign nuclei (global px coordinates) to the spot whose disk holds their centre."""
        if self.tree is None or nuclei["x"].size == 0:
            return
        d, idx = self.tree.query(np.column_stack([nuclei["x"], nuclei["y"]]), distance_upper_bound=self.radius)
        hit = np.isfinite(d) & (d <= self.radius)
        idx = idx[hit]
        self.n_nuclei += np.bincount(idx, minlength=len(self.xy))
        self.area_sum += np.bincount(idx, weights=nuclei["area_um2"][hit], minlength=len(self.xy))
        for t in range(len(CELL_TYPES)):
            self.type_counts[:, t] += np.bincount(idx[nuclei["type"][hit] == t], minlength=len(self.xy))

    def table(self) -> dict[str, np.ndarray]:
        """The ``true_`` features, plus the tissue fraction of each disk."""
        n_disk = np.maximum(self.n_disk, 1)
        stained = self.class_px[:, 1:].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_area = np.where(self.n_nuclei > 0, self.area_sum / np.maximum(self.n_nuclei, 1), 0.0)
            fracs = self.type_counts / np.maximum(self.n_nuclei, 1)[:, None]
        out = {
            "true_nuclei_count": self.n_nuclei.astype(np.int64),
            "true_nuclear_area_um2": mean_area.astype(np.float64),
            "true_eosin_fraction": self.class_px[:, _EOSIN] / n_disk,
            "true_lumen_fraction": self.class_px[:, _LUMEN] / n_disk,
        }
        for t, name in enumerate(CELL_TYPES):
            out[f"true_frac_{name}"] = fracs[:, t].astype(np.float64)
        out["tissue_fraction"] = stained / n_disk
        return out


# --------------------------------------------------------------------------------------------------
# Expression
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Genes:
    names: list[str]
    truth: list[str]
    effect: np.ndarray
    base_rate: np.ndarray
    donor_shift: np.ndarray  # (n_donors, n_genes)
    field: np.ndarray  # index of the spatial field driving each spatial gene (-1 for the others)

    @property
    def n_fields(self) -> int:
        return int(self.field.max()) + 1 if self.field.size else 0


def _make_genes(rng: np.random.Generator, n_genes: int, n_donors: int) -> _Genes:
    """Gene names, driving factors and parameters.

    Driven genes come in pairs with the same base rate and opposite effects on the same driver, and their
    means are ``base * 2 * sigmoid(±2 * effect * z)``: the pair's expected total is the same in every spot,
    so library sizes (and hence the normalised expression of the noise genes) do not depend on
    morphology. ``effect`` is the log fold change per standard deviation of the driver at ``z = 0``.
    """
    n_noise = round(n_genes / 3)
    n_spatial = 2 * round(n_genes / 12)
    n_morph = n_genes - n_noise - n_spatial
    if n_morph % 2:  # an unpaired driven gene would make library sizes depend on its driver
        n_morph -= 1
        n_noise += 1
    factors = list(_MORPHOLOGY_FACTORS)
    pairs = sorted((factors[i % len(factors)] for i in range(n_morph // 2)), key=factors.index)
    truth = [t for t in pairs for _ in range(2)] + ["spatial"] * n_spatial + ["noise"] * n_noise
    prefixes = {f: pre for f, (_, pre) in _MORPHOLOGY_FACTORS.items()} | {"spatial": "SPAT", "noise": "NOISE"}
    names, seen = [], {}
    for t in truth:
        seen[t] = seen.get(t, 0) + 1
        names.append(f"{prefixes[t]}{seen[t]}")
    n_pairs = (n_morph + n_spatial) // 2
    magnitude = rng.uniform(0.8, 1.1, n_pairs)
    pair_rate = np.exp(rng.uniform(np.log(8.0), np.log(30.0), n_pairs))
    effect = np.zeros(n_genes)
    effect[: 2 * n_pairs] = np.repeat(magnitude, 2) * np.tile([1.0, -1.0], n_pairs)  # odd genes rise with z
    base_rate = np.exp(rng.uniform(np.log(8.0), np.log(30.0), n_genes))
    base_rate[: 2 * n_pairs] = np.repeat(pair_rate, 2)
    field = np.full(n_genes, -1)
    field[n_morph : n_morph + n_spatial] = np.repeat(np.arange(n_spatial // 2), 2)
    donor_shift = rng.normal(0.0, 0.1, (n_donors, n_genes))
    return _Genes(names, truth, effect, base_rate, donor_shift, field)


@dataclass(frozen=True)
class _Drivers:
    """Standardisation of the morphology drivers: their mean and standard deviation over all spots.

    A driver is a ``true_`` feature, for the lumen its square root (the lumen fraction is zero in many spots
    and long-tailed in the others); its standardised value ``z`` is clipped to ±3.
    """

    mean: dict[str, float]
    sd: dict[str, float]

    @staticmethod
    def values(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The raw driver of each morphology factor from ``true_`` feature columns."""
        out = {f: np.asarray(features[col], dtype=float) for f, (col, _) in _MORPHOLOGY_FACTORS.items()}
        out["lumen"] = np.asarray(np.sqrt(features["true_lumen_fraction"]), dtype=float)
        return out

    @classmethod
    def fit(cls, sections: list[_Section]) -> _Drivers:
        """Mean and standard deviation of every driver over the spots of all sections."""
        feats = {k: np.concatenate([s.features[k] for s in sections]) for k in sections[0].features}
        values = cls.values(feats)
        return cls({f: v.mean() for f, v in values.items()}, {f: v.std() for f, v in values.items()})

    def z(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Standardised drivers (clipped to ±3; zero for a driver that does not vary) of some spots."""
        out = {}
        for f, v in self.values(features).items():
            sd = self.sd[f]
            out[f] = np.clip((v - self.mean[f]) / sd, -3, 3) if sd > 0 else np.zeros_like(v)
        return out


@dataclass
class _Section:
    sample_id: str
    donor_id: str
    image: Any  # numpy (3, H, W) or dask
    xy_px: np.ndarray
    features: dict[str, np.ndarray]
    spatial: np.ndarray  # (n_spots, n_spatial) standardised spatial fields at the spots
    rng_counts: np.random.Generator
    library_size: float = 1.0  # multiplier of the expected counts (a slide-level shift)
    tumour_area_fraction: float = float("nan")  # share of the tissue area in tumour regions
    truth: Any = None  # ground-truth maps of the section (a ``_truth._SectionTruth``), when asked for


def _spots_and_fields(
    rng_spatial: np.random.Generator,
    height_um: float,
    width_um: float,
    pixel_size_um: float,
    spot_diameter_um: float,
    spot_pitch_um: float,
    n_spatial: int,
) -> tuple[np.ndarray, list[_Grid]]:
    xy_um = _hex_grid(height_um, width_um, spot_pitch_um, spot_diameter_um / 2)
    grid_um = max(25.0, min(height_um, width_um) / 400)
    fields = [_smooth_grid(rng_spatial, height_um, width_um, 250.0, grid_um) for _ in range(n_spatial)]
    return xy_um / pixel_size_um, fields


def _finish_section(i, n_donors, image, xy_px, acc, fields, p, ss_counts) -> _Section:
    feats = acc.table()
    keep = feats.pop("tissue_fraction") >= 0.5  # like Visium's "in tissue" spots
    xy_px = xy_px[keep]
    feats = {k: v[keep] for k, v in feats.items()}
    spatial = np.column_stack([f.at_points(xy_px[:, 1] * p, xy_px[:, 0] * p) for f in fields]) if fields else None
    spatial = np.zeros((len(xy_px), 0)) if spatial is None else np.clip(spatial, -3, 3)
    return _Section(
        f"section{i}", f"donor{i % n_donors}", image, xy_px, feats, spatial, np.random.default_rng(ss_counts)
    )


def _drive(genes: _Genes, z: dict[str, np.ndarray], spatial: np.ndarray) -> np.ndarray:
    """``(n, n_genes)`` driving factor of every gene from the standardised drivers and the spatial fields."""
    drive = np.zeros((len(spatial), len(genes.names)))
    for g, t in enumerate(genes.truth):
        if t in z:
            drive[:, g] = z[t]
        elif t == "spatial":
            drive[:, g] = spatial[:, genes.field[g]]
    return drive


def _expected_means(
    genes: _Genes,
    drive: np.ndarray,
    donor: int,
    library_size: float = 1.0,
    size_factor: np.ndarray | None = None,
) -> np.ndarray:
    """Negative-binomial means ``(n, n_genes)``: ``size_factor * base_rate * 2 * sigmoid(2 * effect * z)``.

    Times the donor's gene shift and the section's library size; ``size_factor=None`` is a size factor of 1.
    """
    shape = 2 / (1 + np.exp(-2 * drive * genes.effect))  # 2 * sigmoid: 1 at z = 0, pairs sum to 2
    rate = genes.base_rate if size_factor is None else size_factor[:, None] * genes.base_rate
    mu = rate * shape * np.exp(genes.donor_shift[donor])
    if library_size != 1.0:
        mu *= library_size
    return mu


def _donor_index(section: _Section) -> int:
    return int(section.donor_id.removeprefix("donor"))


def _counts(
    sections: list[_Section], genes: _Genes, drivers: _Drivers | None = None, dispersion: float = 0.07
) -> np.ndarray:
    """Negative-binomial counts (spots × genes) from the standardised spot features (see :func:`_make_genes`).

    ``drivers`` (by default fitted to ``sections``) standardises the spot features.
    """
    drivers = _Drivers.fit(sections) if drivers is None else drivers
    out = []
    for s in sections:
        n = len(s.xy_px)
        drive = _drive(genes, drivers.z(s.features), s.spatial)
        size_factor = np.exp(s.rng_counts.normal(0.0, 0.3, n))
        mu = _expected_means(genes, drive, _donor_index(s), s.library_size, size_factor)
        lam = s.rng_counts.gamma(1 / dispersion, mu * dispersion)
        out.append(s.rng_counts.poisson(lam))
    return np.concatenate(out) if out else np.zeros((0, len(genes.names)))

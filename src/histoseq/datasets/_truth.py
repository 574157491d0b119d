"""Ground-truth maps of the synthetic sections: cell-type regions and expected expression.

For every section drawn in the default (in-memory) mode, :func:`histoseq.datasets.synthetic` can add

- the cell-type region map that the renderer drew (:attr:`._tissue._Rendered.cell_types`), as labels;
- the expected expression on a coarse raster: at every raster pixel, the negative-binomial mean of a
  *hypothetical spot* centred there, by the same code that draws the spots' counts
  (:class:`._spots._Drivers`, :func:`._spots._drive`, :func:`._spots._expected_means`).

The ``true_`` features of a hypothetical spot are those :class:`._spots._SpotFeatures` counts for a real
one, at any centre: the pixel classes in the disk are summed along the disk's rows from running sums of
each class map (a disk is a stack of row segments), and nuclei are counted by their centre with a k-d tree.
Both are exact, cost a few operations per disk row and per nucleus, and need no map at the raster's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._spots import _donor_index, _drive, _Drivers, _expected_means, _Genes, _Section
from ._tissue import _EOSIN, _GLASS, _LUMEN, _N_CLASSES, CELL_TYPES, _Grid, _Rendered

if TYPE_CHECKING:
    from spatialdata.models import SpatialElement

#: Codes of the cell-type labels.
CELL_TYPE_CODES = {"glass": 0, **{name: k + 1 for k, name in enumerate(CELL_TYPES)}}

_EXPECTED_DEFINITION = (
    "Expected count (negative-binomial mean, size factor 1, with the section's donor shift and library size) "
    "of each gene in a spot of spot_diameter_um centred at the raster pixel's centre, its true_ features "
    "counted from the drawn tissue and standardised like those of the real spots."
)

_CENTRE_BATCH = 4096  # hypothetical spots handled at once (bounds the memory of the row and nucleus lookups)


# --------------------------------------------------------------------------------------------------
# Spots anywhere: the true_ features of hypothetical spots
# --------------------------------------------------------------------------------------------------


def _disk_rows(
    x: np.ndarray, y: np.ndarray, radius: float, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pixels whose centre lies in each disk, as row segments.

    Returns ``rows`` ``(n, k)``, the first and one-past-last column ``c0``, ``c1`` of each row's segment
    (``c0 == c1`` for none), all clipped to the image, and the unclipped number of pixels in each disk. The
    test is :class:`._spots._SpotFeatures`'s: ``(row + 0.5 - y)² + (col + 0.5 - x)² <= radius²``.
    """
    r2 = radius * radius
    k = math.ceil(radius) + 2
    rows = np.floor(y).astype(np.int64)[:, None] + np.arange(-k, k + 1)
    dy2 = (rows + 0.5 - y[:, None]) ** 2
    half = np.sqrt(np.maximum(r2 - dy2, 0.0))
    xc = x[:, None]
    c0 = np.ceil(xc - 0.5 - half).astype(np.int64)
    c1 = np.floor(xc - 0.5 + half).astype(np.int64) + 1
    inside = lambda c: dy2 + (c + 0.5 - xc) ** 2 <= r2
    # the square root may be off by a rounding error: settle the end pixels with the exact test
    c0 = np.where(inside(c0 - 1), c0 - 1, np.where(inside(c0), c0, c0 + 1))
    c1 = np.where(inside(c1), c1 + 1, np.where(inside(c1 - 1), c1, c1 - 1))
    c1 = np.where(dy2 <= r2, np.maximum(c1, c0), c0)
    n_disk = (c1 - c0).sum(1)
    ok = (rows >= 0) & (rows < height)
    c0, c1 = np.clip(c0, 0, width), np.clip(c1, 0, width)
    c1 = np.where(ok, c1, c0)
    return np.clip(rows, 0, height - 1), c0, c1, n_disk


@dataclass
class _HypotheticalSpots:
    """The ``true_`` features of spots of one radius centred anywhere on a drawn section.

    Parameters
    ----------
    labels
        ``(H, W)`` pixel classes (:data:`._tissue._GLASS` ... :data:`._tissue._CLEFT`).
    nuclei
        The nucleus table of :class:`._tissue._Rendered` (centres in level-0 px).
    radius_px
        Spot radius in level-0 pixels.

    """

    labels: np.ndarray
    nuclei: dict[str, np.ndarray]
    radius_px: float

    def __post_init__(self):
        from scipy.spatial import cKDTree

        xy = np.column_stack([self.nuclei["x"], self.nuclei["y"]])
        self._tree = cKDTree(xy) if len(xy) else None

    def features(self, xy_px: np.ndarray) -> dict[str, np.ndarray]:
        """``true_`` features (and ``tissue_fraction``) of spots centred at ``xy_px`` (``(n, 2)``, x then y).

        The same values as :meth:`._spots._SpotFeatures.table` for non-overlapping spots inside the image;
        pixels of a disk beyond the image count as glass.
        """
        xy_px = np.asarray(xy_px, dtype=float).reshape(-1, 2)
        n = len(xy_px)
        class_px = np.zeros((n, _N_CLASSES), dtype=np.int64)
        stained = np.zeros(n, dtype=np.int64)
        n_disk = np.zeros(n, dtype=np.int64)
        n_nuclei = np.zeros(n, dtype=np.int64)
        area_sum = np.zeros(n)
        type_counts = np.zeros((n, len(CELL_TYPES)), dtype=np.int64)
        row_sums = _row_sums(self.labels)
        for s in range(0, n, _CENTRE_BATCH):
            sl = slice(s, s + _CENTRE_BATCH)
            x, y = xy_px[sl, 0], xy_px[sl, 1]
            rows, c0, c1, n_disk[sl] = _disk_rows(x, y, self.radius_px, *self.labels.shape)
            in_disk = (row_sums[rows, c1] - row_sums[rows, c0]).sum(1, dtype=np.int64)  # eosin, lumen, stained
            class_px[sl, _EOSIN], class_px[sl, _LUMEN], stained[sl] = in_disk.T
            n_nuclei[sl], area_sum[sl], type_counts[sl] = self._nuclei_in_disks(x, y)
        del row_sums
        return _feature_table(class_px, stained, n_disk, n_nuclei, area_sum, type_counts)

    def _nuclei_in_disks(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nuclei whose centre lies in each disk: their number, summed area and number per type."""
        from scipy.spatial import cKDTree

        n = len(x)
        counts, area, types = np.zeros(n, np.int64), np.zeros(n), np.zeros((n, len(CELL_TYPES)), np.int64)
        if self._tree is None or n == 0:
            return counts, area, types
        pairs = cKDTree(np.column_stack([x, y])).sparse_distance_matrix(
            self._tree, self.radius_px, output_type="ndarray"
        )
        spot, nucleus = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
        counts = np.bincount(spot, minlength=n)
        area = np.bincount(spot, weights=self.nuclei["area_um2"][nucleus], minlength=n)
        flat = spot * len(CELL_TYPES) + self.nuclei["type"][nucleus].astype(np.int64)
        types = np.bincount(flat, minlength=n * len(CELL_TYPES)).reshape(n, len(CELL_TYPES))
        return counts, area, types


def _row_sums(labels: np.ndarray) -> np.ndarray:
    """``(H, W + 1, 3)`` running sums along x of the eosin, lumen and stained (not glass) pixels.

    ``out[r, c1] - out[r, c0]`` counts them in the pixels ``c0 .. c1 - 1`` of row ``r``.
    """
    h, w = labels.shape
    dtype = np.uint16 if w < 2**16 else np.int64
    out = np.zeros((h, w + 1, 3), dtype=dtype)
    for k, mask in enumerate((labels == _EOSIN, labels == _LUMEN, labels != _GLASS)):
        np.cumsum(mask, axis=1, dtype=dtype, out=out[:, 1:, k])
    return out


def _feature_table(class_px, stained, n_disk, n_nuclei, area_sum, type_counts) -> dict[str, np.ndarray]:
    """The ``true_`` features from the counts in the disks, as :meth:`._spots._SpotFeatures.table`."""
    disk = np.maximum(n_disk, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_area = np.where(n_nuclei > 0, area_sum / np.maximum(n_nuclei, 1), 0.0)
        fracs = type_counts / np.maximum(n_nuclei, 1)[:, None]
    out = {
        "true_nuclei_count": n_nuclei.astype(np.int64),
        "true_nuclear_area_um2": mean_area.astype(np.float64),
        "true_eosin_fraction": class_px[:, _EOSIN] / disk,
        "true_lumen_fraction": class_px[:, _LUMEN] / disk,
    }
    for t, name in enumerate(CELL_TYPES):
        out[f"true_frac_{name}"] = fracs[:, t].astype(np.float64)
    out["tissue_fraction"] = stained / disk
    return out


# --------------------------------------------------------------------------------------------------
# One section's ground truth
# --------------------------------------------------------------------------------------------------


@dataclass
class _SectionTruth:
    """What the ground-truth maps of one section are made from.

    ``step_px`` is the raster's pixel size in level-0 pixels: raster pixel ``(i, j)`` covers level-0
    pixels ``[i * step_px, (i + 1) * step_px) × [j * step_px, (j + 1) * step_px)``.
    """

    cell_types: np.ndarray  # (H, W) uint8, CELL_TYPE_CODES
    spots: _HypotheticalSpots
    fields: list[_Grid]  # the section's spatial fields (µm grids)
    pixel_size_um: float
    step_px: float

    @property
    def raster_shape(self) -> tuple[int, int]:
        h, w = self.cell_types.shape
        return math.ceil(h / self.step_px - 1e-9), math.ceil(w / self.step_px - 1e-9)

    def raster_centres(self) -> np.ndarray:
        """``(ny * nx, 2)`` level-0 ``(x, y)`` px centres of the raster pixels, row by row."""
        ny, nx = self.raster_shape
        yy, xx = np.meshgrid((np.arange(ny) + 0.5) * self.step_px, (np.arange(nx) + 0.5) * self.step_px, indexing="ij")
        return np.column_stack([xx.ravel(), yy.ravel()])

    def spatial(self, xy_px: np.ndarray) -> np.ndarray:
        """The spatial fields at points ``(x, y)`` px, clipped to ±3 like those of the spots."""
        p = self.pixel_size_um
        if not self.fields:
            return np.zeros((len(xy_px), 0))
        return np.clip(np.column_stack([f.at_points(xy_px[:, 1] * p, xy_px[:, 0] * p) for f in self.fields]), -3, 3)

    def expected(self, xy_px: np.ndarray, genes: _Genes, drivers: _Drivers, section: _Section) -> np.ndarray:
        """``(n, n_genes)`` expected counts (size factor 1) of spots centred at ``xy_px`` (x, y)."""
        drive = _drive(genes, drivers.z(self.spots.features(xy_px)), self.spatial(xy_px))
        return _expected_means(genes, drive, _donor_index(section), section.library_size)

    def expected_raster(self, genes: _Genes, drivers: _Drivers, section: _Section) -> np.ndarray:
        """``(n_genes, ny, nx)`` float32 expected counts at the raster pixels' centres."""
        mu = self.expected(self.raster_centres(), genes, drivers, section)
        return np.ascontiguousarray(mu.T.reshape(len(genes.names), *self.raster_shape), dtype=np.float32)


def _section_truth(
    rendered: _Rendered, fields: list[_Grid], pixel_size_um: float, spot_diameter_um: float, ground_truth_um: float
) -> _SectionTruth:
    """The ground truth of a section drawn in one piece (the default mode)."""
    spots = _HypotheticalSpots(rendered.labels, rendered.nuclei, spot_diameter_um / 2 / pixel_size_um)
    return _SectionTruth(rendered.cell_types, spots, fields, pixel_size_um, ground_truth_um / pixel_size_um)


# --------------------------------------------------------------------------------------------------
# SpatialData elements
# --------------------------------------------------------------------------------------------------


def _truth_elements(
    sections: list[_Section],
    genes: _Genes,
    drivers: _Drivers,
    ground_truth_um: float,
    scale_factors: list[int],
    image_chunks: int,
) -> tuple[dict[str, SpatialElement], dict[str, SpatialElement], dict]:
    """Labels ``{sid}_cell_types``, images ``{sid}_expected`` and the ``uns`` record of the ground truth."""
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import Identity, Scale

    labels, images = {}, {}
    record = {
        "cell_types": {},
        "expected": {},
        "cell_type_codes": dict(CELL_TYPE_CODES),
        "expected_um": float(ground_truth_um),
        "expected_definition": _EXPECTED_DEFINITION,
    }
    for s in sections:
        truth, sid = s.truth, s.sample_id
        p = truth.pixel_size_um
        key = f"{sid}_cell_types"
        labels[key] = Labels2DModel.parse(
            truth.cell_types,
            dims=("y", "x"),
            scale_factors=scale_factors or None,
            chunks=(image_chunks, image_chunks),
            transformations={sid: Identity(), f"{sid}_um": Scale([p, p], axes=("y", "x"))},
        )
        record["cell_types"][sid] = key
        expected = truth.expected_raster(genes, drivers, s)
        key = f"{sid}_expected"
        images[key] = Image2DModel.parse(
            expected,
            dims=("c", "y", "x"),
            c_coords=list(genes.names),
            chunks=(expected.shape[0], image_chunks, image_chunks),
            transformations={
                sid: Scale([truth.step_px, truth.step_px], axes=("y", "x")),
                f"{sid}_um": Scale([ground_truth_um, ground_truth_um], axes=("y", "x")),
            },
        )
        record["expected"][sid] = key
    return labels, images, record

"""A small synthetic Space Ranger ``outs`` folder with exactly known geometry, for tests.

:func:`write_visium_fixture` writes what :func:`spatialdata_io.visium` reads: the filtered counts as a
10x HDF5 file, ``spatial/tissue_positions.csv`` (Space Ranger 2 layout), ``spatial/scalefactors_json.json``,
the hires and lowres PNGs and a full-resolution RGB TIFF.

The spots lie on the true Visium array: a hexagonal grid with 100 µm between neighbouring spot centres
(two ``array_col`` steps along a row; odd rows shifted by one column; rows ``100 * sqrt(3) / 2`` µm apart),
spots 55 µm across. The image is an H&E-like drawing: white glass, an elliptical pink tissue section with
purple nuclei and blobs, and, at the centre of every spot under the tissue, a black disk of exactly
``MARK_DIAMETER_UM`` on a flat pink clearing of ``CLEARING_DIAMETER_UM``, so that a test can measure sizes
and positions in µm on a patch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SPOT_PITCH_UM = 100.0
SPOT_DIAMETER_UM = 55.0
FIDUCIAL_DIAMETER_UM = 65.0
MARK_DIAMETER_UM = 20.0
CLEARING_DIAMETER_UM = 50.0
MARGIN_UM = 300.0
HIRES_LONG_SIDE = 2000
LOWRES_LONG_SIDE = 600

GLASS = (250, 250, 250)
PINK = (228, 152, 192)
PURPLE = (112, 58, 150)
BLACK = (0, 0, 0)
NOISE = 6  # amplitude of the grey-level noise

FULLRES_FILE = "fullres.tif"
COUNTS_FILE = "filtered_feature_bc_matrix.h5"


def visium_array(n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``array_row`` and ``array_col`` of a Visium grid with ``n_cols`` spots in each of ``n_rows`` rows."""
    rows, k = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    cols = 2 * k + rows % 2
    return rows.ravel(), cols.ravel()


def _barcodes(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct 16-mer barcodes with the ``-1`` GEM-well suffix of Space Ranger."""
    out: list[str] = []
    seen: set[str] = set()
    letters = np.array(list("ACGT"))
    while len(out) < n:
        code = "".join(letters[rng.integers(0, 4, 16)]) + "-1"
        if code not in seen:
            seen.add(code)
            out.append(code)
    return np.array(out)


def _paint_disk(img: np.ndarray, cx: float, cy: float, r: float, colour: Any) -> None:
    """Fill the pixels whose centre lies within ``r`` of ``(cx, cy)`` (pixel ``i`` covers ``[i, i + 1)``)."""
    h, w = img.shape[:2]
    x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, w)
    y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    img[y0:y1, x0:x1][inside] = colour


def _paint_ellipse(
    img: np.ndarray, mask: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float, colour: Any
) -> None:
    """Fill a rotated ellipse, only where ``mask`` (the tissue) is set."""
    h, w = img.shape[:2]
    r = max(a, b)
    x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, w)
    y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    inside = ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & mask[y0:y1, x0:x1]
    img[y0:y1, x0:x1][inside] = colour


def _resize(img: np.ndarray, scalef: float) -> np.ndarray:
    """Downsample ``img`` by ``scalef`` with area averaging, as Space Ranger's hires and lowres images are."""
    from PIL import Image

    h, w = img.shape[:2]
    size = (max(round(w * scalef), 1), max(round(h * scalef), 1))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))


def _write_counts_h5(
    path: Path, counts: np.ndarray, barcodes: np.ndarray, gene_ids: np.ndarray, gene_names: np.ndarray, library: str
) -> None:
    """Write a spots × genes count matrix in the Cell Ranger / Space Ranger (v3+) HDF5 layout.

    The file stores the genes × barcodes matrix in CSC form, which is the barcodes × genes matrix in CSR
    form: ``indptr`` runs over barcodes and ``indices`` are gene positions; ``shape`` is ``(n_genes, n_barcodes)``.
    """
    import h5py

    n_spots, n_genes = counts.shape
    rows, cols = np.nonzero(counts)  # row-major order: grouped by barcode, genes ascending
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_spots))])

    def strings(values: np.ndarray) -> np.ndarray:
        return np.array([str(v).encode() for v in values], dtype=f"S{max(len(str(v)) for v in values)}")

    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([library.encode()])
        f.attrs["chemistry_description"] = b"Spatial 3' v1"
        f.attrs["software_version"] = b"spaceranger-2.0.0 (histoseq test fixture)"
        f.attrs["filetype"] = b"matrix"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=strings(barcodes))
        m.create_dataset("data", data=counts[rows, cols].astype(np.int32))
        m.create_dataset("indices", data=cols.astype(np.int64))
        m.create_dataset("indptr", data=indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([n_genes, n_spots], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("id", data=strings(gene_ids))
        feat.create_dataset("name", data=strings(gene_names))
        feat.create_dataset("feature_type", data=strings(np.full(n_genes, "Gene Expression")))
        feat.create_dataset("genome", data=strings(np.full(n_genes, "GRCh38")))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def write_visium_fixture(
    path: str | Path,
    *,
    n_rows: int = 20,
    n_cols: int = 24,
    n_genes: int = 30,
    fullres_px_per_um: float = 2.0,
    random_state: int = 0,
    with_fullres: bool = True,
    dataset_id: str = "V1",
) -> dict[str, Any]:
    """Write a minimal Space Ranger ``outs`` folder at ``path`` and return its ground truth.

    Read it with ``spatialdata_io.visium(path, dataset_id=info["dataset_id"],
    fullres_image_file=info["fullres_image_file"])``.

    Parameters
    ----------
    path
        Folder to write (created if needed).
    n_rows, n_cols
        Size of the spot array: ``n_rows`` rows of ``n_cols`` spots.
    n_genes
        Number of genes.
    fullres_px_per_um
        Resolution of the full-resolution image.
    random_state
        Seed of the drawing, the barcodes and the counts.
    with_fullres
        Write the full-resolution image (``fullres.tif``); without it only the hires and lowres PNGs exist.
    dataset_id
        Library id, written to the counts file's ``library_ids``.

    Returns
    -------
    A dict with ``dataset_id``, ``path``, ``fullres_image_file`` (relative to ``path``; ``None`` without it),
    ``pixel_size_um`` (of the full-res image), ``spot_pitch_px``, ``mark_diameter_um``, ``image_shape``
    (height, width of the full-res image), ``scalefactors``, ``barcodes`` and ``spot_centers_px`` (``(n, 2)``
    x, y in full-res pixels, pixel ``i`` covering ``[i, i + 1)``) of the spots in the counts file (those
    under the tissue), ``counts`` (spots × genes int array), ``gene_names``, ``positions`` (the whole
    ``tissue_positions.csv`` as a DataFrame indexed by barcode) and ``tissue_mask`` (full-res boolean).
    """
    path = Path(path)
    spatial = path / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(random_state)
    ppu = float(fullres_px_per_um)

    # --- spot geometry, in full-res pixels --------------------------------------------------------
    array_row, array_col = visium_array(n_rows, n_cols)
    pitch = SPOT_PITCH_UM * ppu
    col_step, row_step = pitch / 2, pitch * np.sqrt(3) / 2
    margin = MARGIN_UM * ppu
    # a sub-pixel origin, so that spot centres fall between pixel centres
    origin_x, origin_y = margin + 0.37, margin + 0.61
    x = origin_x + array_col * col_step
    y = origin_y + array_row * row_step
    width = int(np.ceil(origin_x + (2 * n_cols - 1) * col_step + margin))
    height = int(np.ceil(origin_y + (n_rows - 1) * row_step + margin))
    # Space Ranger 2.1+ writes sub-pixel positions; round as a CSV would, and use the rounded values
    x, y = np.round(x, 3), np.round(y, 3)

    # --- tissue: an ellipse over most of the array ------------------------------------------------
    tcx, tcy = (x.min() + x.max()) / 2, (y.min() + y.max()) / 2
    ta, tb = 0.47 * (x.max() - x.min()) + pitch / 2, 0.47 * (y.max() - y.min()) + pitch / 2
    yy, xx = np.ogrid[0:height, 0:width]
    tissue = ((xx + 0.5 - tcx) / ta) ** 2 + ((yy + 0.5 - tcy) / tb) ** 2 <= 1.0
    in_tissue = ((x - tcx) / ta) ** 2 + ((y - tcy) / tb) ** 2 <= 1.0

    # --- H&E-like drawing -------------------------------------------------------------------------
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = GLASS
    img[tissue] = PINK
    area_um2 = tissue.sum() / ppu**2
    for _ in range(int(area_um2 / 1200)):  # nuclei, about 8 µm across
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(3.0, 5.0) * ppu
        _paint_ellipse(img, tissue, cx, cy, r, 0.7 * r, rng.uniform(0, np.pi), PURPLE)
    for _ in range(int(area_um2 / 30000)):  # dense (purple) regions, tens of µm
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        a = rng.uniform(20.0, 80.0) * ppu
        shade = tuple(int(c + d) for c, d in zip(PURPLE, rng.integers(-20, 21, 3)))
        _paint_ellipse(img, tissue, cx, cy, a, a * rng.uniform(0.4, 1.0), rng.uniform(0, np.pi), shade)
    for cx, cy in zip(x[in_tissue], y[in_tissue]):
        _paint_disk(img, cx, cy, CLEARING_DIAMETER_UM / 2 * ppu, PINK)
    # scanner noise (real scans have no flat colours; Otsu thresholds misplace flat ones by a histogram bin)
    for y0 in range(0, height, 512):
        block = img[y0 : y0 + 512].astype(np.int16)
        block += rng.integers(-NOISE, NOISE + 1, block.shape[:2], dtype=np.int16)[:, :, None]
        img[y0 : y0 + 512] = np.clip(block, 0, 255).astype(np.uint8)
    for cx, cy in zip(x[in_tissue], y[in_tissue]):
        _paint_disk(img, cx, cy, MARK_DIAMETER_UM / 2 * ppu, BLACK)

    # --- images -----------------------------------------------------------------------------------
    long_side = max(height, width)
    hires_scalef = min(1.0, HIRES_LONG_SIDE / long_side)
    lowres_scalef = min(1.0, LOWRES_LONG_SIDE / long_side)
    from PIL import Image

    Image.fromarray(_resize(img, hires_scalef)).save(spatial / "tissue_hires_image.png", compress_level=1)
    Image.fromarray(_resize(img, lowres_scalef)).save(spatial / "tissue_lowres_image.png", compress_level=1)
    fullres_file = None
    if with_fullres:
        import tifffile

        fullres_file = FULLRES_FILE
        tifffile.imwrite(path / fullres_file, img, photometric="rgb")

    scalefactors = {
        "spot_diameter_fullres": SPOT_DIAMETER_UM * ppu,
        "tissue_hires_scalef": hires_scalef,
        "fiducial_diameter_fullres": FIDUCIAL_DIAMETER_UM * ppu,
        "tissue_lowres_scalef": lowres_scalef,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=2))

    # --- tissue_positions.csv (Space Ranger 2: with a header, every spot of the array) -------------
    barcodes = _barcodes(len(x), rng)
    positions = pd.DataFrame(
        {
            "in_tissue": in_tissue.astype(int),
            "array_row": array_row,
            "array_col": array_col,
            "pxl_row_in_fullres": y,
            "pxl_col_in_fullres": x,
        },
        index=pd.Index(barcodes, name="barcode"),
    )
    positions.to_csv(spatial / "tissue_positions.csv")

    # --- counts of the spots under the tissue (the *filtered* matrix) ------------------------------
    keep = np.flatnonzero(in_tissue)
    gene_means = rng.gamma(0.8, 3.0, n_genes)
    counts = rng.poisson(gene_means[None, :] * rng.uniform(0.5, 1.5, (len(keep), 1))).astype(np.int64)
    gene_ids = np.array([f"ENSG{i:011d}" for i in range(n_genes)])
    gene_names = np.array([f"GENE{i}" for i in range(n_genes)])
    _write_counts_h5(path / COUNTS_FILE, counts, barcodes[keep], gene_ids, gene_names, dataset_id)

    return {
        "dataset_id": dataset_id,
        "path": path,
        "fullres_image_file": fullres_file,
        "pixel_size_um": 1.0 / ppu,
        "spot_pitch_px": pitch,
        "mark_diameter_um": MARK_DIAMETER_UM,
        "image_shape": (height, width),
        "scalefactors": scalefactors,
        "barcodes": barcodes[keep],
        "spot_centers_px": np.column_stack([x[keep], y[keep]]),
        "counts": counts,
        "gene_names": gene_names,
        "positions": positions,
        "tissue_mask": tissue,
    }

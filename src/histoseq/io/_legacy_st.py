"""Reader for legacy Spatial Transcriptomics (ST) sections: counts, spot file and full-resolution H&E."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._sdata import SPOT_DIAMETER_UM, SPOT_PITCH_UM, median_nn_distance, um_coordinate_system_name
from ._image import parse_image, read_image_lazy
from ._pixel_size import record_pixel_size

logger = logging.getLogger(__name__)

_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}. Check the path (and the section name).")
    return path


def read_counts(counts: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Spots × genes counts with ``"<x>x<y>"`` spot ids as the index, validated."""
    if isinstance(counts, pd.DataFrame):
        df = counts
    else:
        df = pd.read_csv(_existing(counts, "Counts file"), sep="\t", index_col=0)
    df.index = df.index.astype(str)
    values = df.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise TypeError("The counts table is not numeric: expected spots × genes with the spot id in the first column.")
    if np.isnan(values).any():
        n = int(np.isnan(values).any(axis=1).sum())
        raise ValueError(f"{n} spot(s) have NaN counts. Counts must be complete raw integers; fix or drop those rows.")
    if (values < 0).any():
        raise ValueError("The counts table has negative values; histoseq expects raw (non-negative) counts.")
    if df.index.has_duplicates:
        raise ValueError(f"Duplicated spot ids in the counts, e.g. {df.index[df.index.duplicated()][:3].tolist()}.")
    return df


def read_spot_file(spots: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A legacy ST spot (selection/alignment) file indexed by ``"<x>x<y>"`` ids."""
    df = spots if isinstance(spots, pd.DataFrame) else pd.read_csv(_existing(spots, "Spot file"), sep="\t")
    missing = [c for c in _SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"The spot file lacks column(s) {missing}; a legacy ST spot file has `x y pixel_x pixel_y` "
            f"(and usually `new_x new_y selected`). Found: {list(df.columns)}."
        )
    df = df.copy()
    position = df[["x", "y", "pixel_x", "pixel_y"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(position).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} row(s) of the spot file have no numeric position (`x y pixel_x pixel_y` NaN, infinite "
            f"or not a number), e.g. rows {np.flatnonzero(bad)[:3].tolist()}. Fix or drop those rows first."
        )
    df.index = pd.Index(df["x"].astype(int).astype(str) + "x" + df["y"].astype(int).astype(str), name="spot")
    return df


def read_gene_names(gene_names: str | Path | Mapping[str, str]) -> Mapping[str, str]:
    """Gene id → symbol from a mapping or a table with ``gene_id`` and ``gene_name`` columns."""
    if isinstance(gene_names, Mapping):
        return gene_names
    df = pd.read_csv(_existing(gene_names, "Gene name file"), sep="\t")
    if not {"gene_id", "gene_name"} <= set(df.columns):
        raise ValueError(f"The gene name file needs `gene_id` and `gene_name` columns; found {list(df.columns)}.")
    return dict(zip(df["gene_id"].astype(str), df["gene_name"].astype(str)))


def read_legacy_st(
    counts: str | Path | pd.DataFrame,
    spots: str | Path | pd.DataFrame,
    image: str | Path,
    *,
    sample_id: str,
    pixel_size_um: float | None = None,
    spot_pitch_um: float = SPOT_PITCH_UM["legacy_st"],
    spot_diameter_um: float = SPOT_DIAMETER_UM["legacy_st"],
    donor_id: str | None = None,
    gene_names: str | Path | Mapping[str, str] | None = None,
    selected_only: bool = True,
    rgb: bool = True,
    chunks: int = 1024,
    scale_factors: Sequence[int] | None = None,
    table_key: str = "table",
):
    """Read a legacy Spatial Transcriptomics section into a SpatialData object.

    The layout is that of the HER2ST and STUtility example data: a spots × genes count table whose first
    column is the spot id ``"<x>x<y>"`` (array coordinates), a spot file with columns
    ``x y pixel_x pixel_y selected`` (``pixel_x`` is the column and ``pixel_y`` the row in the full-resolution
    image), and the full-resolution H&E image (JPEG, PNG or TIFF).

    Parameters
    ----------
    counts
        Path to the count table (``.tsv`` or ``.tsv.gz``), or the table as a DataFrame.
    spots
        Path to the spot file, or the file as a DataFrame.
    image
        Path to the full-resolution H&E image.
    sample_id
        Name of the section; names the elements and the coordinate systems.
    pixel_size_um
        Size of an image pixel in µm when known. Otherwise derived from the spot pitch.
    spot_pitch_um
        Centre-to-centre distance of neighbouring spots in µm (200 for the legacy ST array).
    spot_diameter_um
        Spot diameter in µm (100 for legacy ST).
    donor_id
        Patient or donor of the section, stored in ``obs["donor_id"]`` so evaluation can split by donor.
    gene_names
        Gene id → symbol mapping, or a table with ``gene_id`` and ``gene_name`` columns (e.g.
        ``mouse_genes.tsv.gz`` beside Ensembl-indexed counts). Ids without a symbol keep the id.
    selected_only
        Keep only the spots flagged ``selected == 1`` (under the tissue).
    rgb
        Expect an RGB H&E image; ``False`` accepts a single-channel (e.g. nuclei-stained) image.
    chunks
        Chunk size of the image in pixels.
    scale_factors
        Downscaling factors of the image pyramid; by default halvings down to about 2,000 px.
    table_key
        Name of the table.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with

    - ``images[f"{sample_id}_image"]``: the H&E as a lazily read multiscale image;
    - ``shapes[f"{sample_id}_spots"]``: spots as circles of ``spot_diameter_um``;
    - ``tables[table_key]``: raw counts (sparse ``X``), ``obsm["spatial"]`` in full-resolution pixels,
      ``obs`` with ``sample_id``, ``donor_id``, array coordinates ``array_x``/``array_y``;
    - coordinate systems ``sample_id`` (full-resolution pixels) and ``f"{sample_id}_um"`` (µm);
    - ``attrs["histoseq"]["pixel_size_um"]`` recording how the pixel size was obtained.

    Examples
    --------
    >>> import histoseq as hs
    >>> root = "../shared/data/her2st"
    >>> sdata = hs.io.read_legacy_st(  # doctest: +SKIP
    ...     f"{root}/ST-cnts/C2.tsv.gz",
    ...     f"{root}/ST-spotfiles/C2_selection.tsv",
    ...     f"{root}/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    ...     sample_id="C2",
    ...     donor_id="C",
    ... )

    """
    import anndata as ad
    import scipy.sparse as sp
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if not sample_id or not isinstance(sample_id, str):
        raise ValueError("`sample_id` must be a non-empty string naming the section.")
    if not all(c.isalnum() or c in "_-." for c in sample_id) or sample_id.startswith("__") or sample_id in (".", ".."):
        fixed = "".join(c if c.isalnum() or c in "_-." else "_" for c in sample_id).lstrip("_") or "section"
        raise ValueError(
            f"`sample_id={sample_id!r}` names the section's elements and coordinate systems, whose names may hold "
            f"only letters, digits, '_', '-' and '.' (and not start with '__'); use e.g. `sample_id={fixed!r}`."
        )
    cnt = read_counts(counts)
    spot_df = read_spot_file(spots)
    img = read_image_lazy(image, chunks=chunks)
    _, height, width = img.shape

    # pixel size: from the user, or from the spot pitch measured on the whole array grid of the spot file
    if pixel_size_um is not None:
        if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise ValueError(f"`pixel_size_um` must be a positive number, got {pixel_size_um!r}.")
        provenance = {"method": "given"}
    else:
        nn = median_nn_distance(spot_df[["pixel_x", "pixel_y"]].to_numpy(float))
        pixel_size_um = spot_pitch_um / nn
        provenance = {"method": "spot_pitch", "spot_pitch_um": float(spot_pitch_um), "median_nn_px": nn}

    if selected_only and "selected" in spot_df.columns:
        spot_df = spot_df[spot_df["selected"] == 1]
    ids = cnt.index.intersection(spot_df.index)
    if len(ids) == 0:
        raise ValueError(
            f"No spot id of the counts (e.g. {cnt.index[:3].tolist()}) is in the spot file "
            f"(e.g. {spot_df.index[:3].tolist()}). Are the counts and the spot file of the same section? Ids must "
            "read '<x>x<y>' with the spot file's `x` and `y` columns."
        )
    n_counts_only = len(cnt.index.difference(spot_df.index))
    if n_counts_only:
        logger.info("%s: %d spots of the counts are not selected in the spot file; dropped.", sample_id, n_counts_only)
    cnt = cnt.loc[ids]
    spot_df = spot_df.loc[ids]
    xy = spot_df[["pixel_x", "pixel_y"]].to_numpy(float)
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} spot(s) of {sample_id!r} lie outside the {width}×{height} px image, e.g. "
            f"{ids[outside][:3].tolist()}. Is this the image of this section, at full resolution?"
        )

    var_names = cnt.columns.astype(str)
    if gene_names is not None:
        mapping = read_gene_names(gene_names)
        symbols = [mapping.get(g, mapping.get(g.split(".")[0], g)) for g in var_names]
        var = pd.DataFrame({"gene_ids": var_names.to_numpy()}, index=pd.Index(symbols))
    else:
        var = pd.DataFrame(index=var_names)
    obs = pd.DataFrame(
        {
            "array_x": spot_df["x"].to_numpy(int),
            "array_y": spot_df["y"].to_numpy(int),
            "sample_id": pd.Categorical([sample_id] * len(ids)),
        },
        index=pd.Index([f"{sample_id}_{i}" for i in ids]),
    )
    if donor_id is not None:
        obs["donor_id"] = pd.Categorical([str(donor_id)] * len(ids))
    shapes_key, image_key = f"{sample_id}_spots", f"{sample_id}_image"
    obs["region"] = pd.Categorical([shapes_key] * len(ids))
    obs["spot_id"] = np.arange(len(ids))
    x = sp.csr_matrix(cnt.to_numpy(dtype=np.float32))
    adata = ad.AnnData(X=x, obs=obs, var=var)
    if gene_names is not None:
        adata.var_names_make_unique()
    adata.obsm["spatial"] = xy

    um = um_coordinate_system_name(sample_id)
    image_element = parse_image(
        img,
        transformations={sample_id: Identity(), um: Scale([pixel_size_um, pixel_size_um], axes=("y", "x"))},
        chunks=chunks,
        scale_factors=scale_factors,
        rgb=rgb,
        name=str(image),
    )
    circles = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(ids), spot_diameter_um / 2 / pixel_size_um),
        index=pd.Index(np.arange(len(ids))),
        transformations={sample_id: Identity(), um: Scale([pixel_size_um, pixel_size_um], axes=("x", "y"))},
    )
    table = TableModel.parse(adata, region=shapes_key, region_key="region", instance_key="spot_id")
    sdata = SpatialData(images={image_key: image_element}, shapes={shapes_key: circles}, tables={table_key: table})
    sdata.attrs["histoseq"] = {"technology": "legacy_st"}
    record_pixel_size(sdata, image_key, pixel_size_um, coordinate_system=um, **provenance)
    logger.info(
        "Read %s: %d spots × %d genes, image %d×%d px at %.3f µm/px (%s).",
        sample_id,
        adata.n_obs,
        adata.n_vars,
        width,
        height,
        pixel_size_um,
        provenance["method"],
    )
    return sdata

"""Which genes to model: highly variable genes chosen on the training spots only."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._data import as_table, check_counts, train_mask

if TYPE_CHECKING:
    import anndata as ad
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

HVGFlavor = Literal["seurat", "cell_ranger", "seurat_v3", "mean"]
_FLAVORS = ("seurat", "cell_ranger", "seurat_v3", "mean")


def select_genes(
    adata_or_sdata: ad.AnnData | SpatialData,
    n: int = 50,
    *,
    train: Sequence[str] | np.ndarray | None = None,
    min_spot_fraction: float = 0.1,
    flavor: HVGFlavor = "seurat",
    groups: str | None = "sample_id",
    table_key: str | None = "table",
) -> list[str]:
    """The ``n`` most variable genes of the training spots, among genes detected in enough of them.

    Only the training spots are looked at, so that the genes of a model evaluated on held-out sections
    are not chosen with the help of those sections (a gene variable only in a test section would
    otherwise be picked because it is variable there, an optimistic and leaky choice).

    Genes are first restricted to those with a count above zero in at least ``min_spot_fraction`` of the
    training spots: on a few hundred or thousand spots, plain highly-variable-gene selection ranks sparse
    genes first (a handful of non-zero counts gives a huge dispersion), and such genes can neither be
    learnt nor evaluated. Among the remaining genes, :func:`scanpy.pp.highly_variable_genes` ranks them:

    - ``flavor="seurat"`` (default): on the log-normalised training counts (``normalize_total`` to
      10,000 over all genes of the table, then ``log1p``), the dispersion normalised within bins of
      mean expression. It needs nothing beyond scanpy, so the choice is the same everywhere.
    - ``flavor="cell_ranger"``: the same on the log-normalised counts with Cell Ranger's binning.
    - ``flavor="mean"``: not a variability score but the most expressed genes: the highest mean of the
      log-normalised training counts (the "top expressed genes" panels of HEST and ST-Net).
    - ``flavor="seurat_v3"``: the standardised variance of the raw counts; this is scanpy's
      recommendation for counts but needs the ``scikit-misc`` package (``pip install scikit-misc``).

    Parameters
    ----------
    adata_or_sdata
        A table with raw counts in ``X``, or a SpatialData whose table ``table_key`` has them.
    n
        Number of genes to return. When fewer genes pass the detection filter, all of them are returned
        (with a warning).
    train
        The training spots: ``None`` (all), a list of values of ``obs[groups]`` (e.g. sample ids), or a
        boolean mask over the table's rows.
    min_spot_fraction
        Minimum fraction of training spots in which a gene must be detected (count > 0).
    flavor
        Ranking of :func:`scanpy.pp.highly_variable_genes`, see above.
    groups
        Column of ``obs`` whose values ``train`` lists.
    table_key
        Table of a SpatialData.

    Returns
    -------
    The selected gene names, in the order of the table's ``var_names``.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> genes = hs.tl.select_genes(sdata, n=10, train=["section0"])
    >>> len(genes)
    10

    """
    table = as_table(adata_or_sdata, table_key)
    if not isinstance(n, int | np.integer) or isinstance(n, bool):
        raise TypeError(f"`n` must be a whole number of genes, got {n!r} ({type(n).__name__}).")
    if int(n) < 1:
        raise ValueError(f"`n` must be a positive number of genes, got {n!r}.")
    if not 0 <= min_spot_fraction <= 1:
        raise ValueError(f"`min_spot_fraction` must lie in [0, 1], got {min_spot_fraction!r}.")
    if flavor not in _FLAVORS:
        raise ValueError(f"Unknown `flavor` {flavor!r}; choose one of {list(_FLAVORS)}.")
    mask = train_mask(table, train, groups)
    rows = np.flatnonzero(mask)
    counts = table.X[rows]
    check_counts(counts)
    ranked = _rank_genes(counts, table.var_names.to_numpy(), min_spot_fraction=min_spot_fraction, flavor=flavor)
    if len(ranked) < n:
        logger.warning(
            "Only %d gene(s) are detected in at least %.0f%% of the %d training spots; using all of them "
            "instead of %d.",
            len(ranked),
            100 * min_spot_fraction,
            len(rows),
            n,
        )
    chosen = set(ranked[: int(n)])
    return [g for g in table.var_names if g in chosen]


def _rank_genes(counts: Any, names: np.ndarray, *, min_spot_fraction: float, flavor: str) -> list[str]:
    """Genes passing the detection filter, most variable first."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    from scipy import sparse

    n_spots = counts.shape[0]
    if n_spots < 2:
        raise ValueError(f"Gene selection needs at least two training spots, got {n_spots}.")
    detected = np.asarray((counts > 0).sum(axis=0)).ravel() / n_spots
    keep = detected >= min_spot_fraction
    keep &= detected > 0
    if not keep.any():
        raise ValueError(
            f"No gene is detected in at least {100 * min_spot_fraction:.0f}% of the {n_spots} training spots; "
            "lower `min_spot_fraction`."
        )
    counts = sparse.csr_matrix(counts, dtype=np.float64) if sparse.issparse(counts) else np.asarray(counts, float)
    adata = ad.AnnData(counts)
    adata.var_names = pd.Index(names.astype(str))
    if flavor == "seurat_v3":
        try:
            import skmisc  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "`flavor='seurat_v3'` needs the scikit-misc package: `pip install scikit-misc`, or use "
                "`flavor='seurat'`."
            ) from err
        sub = adata[:, keep].copy()
        res = sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=sub.n_vars, inplace=False)
        score = np.asarray(res["variances_norm"], dtype=float)
    else:
        # library sizes over all genes of the table, as in the model's target transform
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sub = adata[:, keep].copy()
        if flavor == "mean":
            score = np.asarray(sub.X.mean(axis=0), dtype=float).ravel()
        else:
            res = sc.pp.highly_variable_genes(sub, flavor=flavor, n_top_genes=sub.n_vars, inplace=False)
            score = np.asarray(res["dispersions_norm"], dtype=float)
    score = np.where(np.isfinite(score), score, -np.inf)
    order = np.argsort(-score, kind="stable")
    return sub.var_names.to_numpy()[order].tolist()


def resolve_genes(
    table: ad.AnnData,
    genes: int | Sequence[str],
    train_mask: np.ndarray,
    *,
    min_spot_fraction: float,
    flavor: str,
) -> list[str]:
    """The genes a model learns: the names given (checked), or a number selected by :func:`select_genes`."""
    if isinstance(genes, int | np.integer) and not isinstance(genes, bool):
        return select_genes(table, int(genes), train=train_mask, min_spot_fraction=min_spot_fraction, flavor=flavor)
    if isinstance(genes, str):
        genes = [genes]
    if isinstance(genes, bool | np.bool_ | float | np.floating) or not isinstance(genes, Iterable):
        hint = f" (`genes={int(genes)}`)" if isinstance(genes, float) and float(genes).is_integer() else ""
        raise TypeError(
            f"`genes` must be a whole number of genes to select{hint} or a list of gene names, got {genes!r} "
            f"({type(genes).__name__})."
        )
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("`genes` is empty; give gene names or a number of genes to select.")
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        raise ValueError(f"`genes` lists some genes more than once: {dup}.")
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        raise KeyError(
            f"{len(missing)} of the requested genes are not in the table's var_names: {missing[:20]}. Name genes of "
            "`table.var_names` (same spelling and case), or pass a number of genes to select."
        )
    return genes

"""Data assembly: the rows, counts, groups and embeddings that the expression methods read.

Everything here reads tables (AnnData, or the tables of SpatialData objects) and returns arrays; nothing
is learnt. The expression methods (:mod:`histoseq.tl.methods`) see the training spots through
:class:`histoseq.tl._training_set.TrainingSet`, which is built from these pieces.

- counts to targets: :func:`check_counts`, :func:`transform_counts`;
- which rows: :func:`train_mask`, :func:`group_labels`, :func:`region_labels`, :func:`section_labels`;
- embeddings: an embedding key names one ``obsm`` key or several joined by ``"+"`` (its parts):
  :func:`embedding_key`, :func:`embedding_parts`, :func:`embedding_matrix`, :func:`embedding_params`;
- several tables as one: :func:`concat_tables`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._sdata import get_table, table_keys
from .._utils import jsonable

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

TargetTransform = Literal["log1p_cp10k", "log1p"] | None
TARGET_TRANSFORMS = ("log1p_cp10k", "log1p", None)


def as_table(obj: Any, table_key: str | None) -> ad.AnnData:
    """The table of a SpatialData, or an AnnData itself."""
    import anndata as ad

    if isinstance(obj, ad.AnnData):
        return obj
    return get_table(obj, table_key)[1]


def check_counts(counts: Any) -> None:
    """Raise when counts hold NaN, infinite or negative values."""
    from scipy import sparse

    values = counts.data if sparse.issparse(counts) else np.asarray(counts)
    if values.size == 0:
        return
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"The counts (`X`) hold {int(bad.sum())} NaN or infinite value(s). Expression models need raw counts; "
            "remove or fill these entries first."
        )
    if values.min() < 0:
        raise ValueError(
            "The counts (`X`) hold negative values: they look normalised or scaled, not raw. Pass a table with raw "
            "counts in `X` (e.g. from `adata.layers['counts']`)."
        )


def warn_if_not_counts(counts: Any, transform: TargetTransform, stacklevel: int = 3) -> None:
    """Warn when counts about to be normalised are not whole numbers (already normalised or log-transformed)."""
    import warnings

    from scipy import sparse

    if transform is None:  # the values are the targets, as they are
        return
    values = counts.data if sparse.issparse(counts) else np.asarray(counts)
    values = np.asarray(values).ravel()[:1_000_000]
    if values.size == 0 or values.dtype.kind in "iub":
        return
    fractional = values[np.isfinite(values) & (values != np.round(values))]
    if fractional.size:
        warnings.warn(
            f"The counts (`X`) are not whole numbers (e.g. {float(fractional[0]):.4g}): they look normalised or "
            f"log-transformed already, and `target_transform={transform!r}` transforms them again. Pass the raw "
            "counts in `X` (e.g. `adata.X = adata.layers['counts']`), or `target_transform=None` to learn the "
            "values as they are.",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_table(table: ad.AnnData, what: str) -> None:
    """Raise when a table has no spots or no genes, or repeats gene names."""
    if table.n_obs == 0:
        raise ValueError(f"{what} has no rows (spots): there is nothing to learn from. Check how it was subset.")
    if table.n_vars == 0:
        raise ValueError(f"{what} has no genes (`n_vars` is 0): a table of measured counts is needed.")
    if table.var_names.has_duplicates:
        dup = table.var_names[table.var_names.duplicated()].unique()
        raise ValueError(
            f"{what} repeats {len(dup)} gene name(s) in `var_names`, e.g. {list(dup[:3])}, so a gene name does not "
            "say which column to read. Make them unique first: `table.var_names_make_unique()` (or sum the "
            "duplicated columns)."
        )


def transform_counts(
    counts: Any, transform: TargetTransform, columns: np.ndarray | None = None, *, check: bool = True
) -> np.ndarray:
    """Targets from raw counts: ``"log1p_cp10k"``, ``"log1p"`` or ``None`` (the counts), dense float64.

    ``"log1p_cp10k"`` scales each spot to 10,000 counts over **all** genes of ``counts`` (as
    :func:`scanpy.pp.normalize_total` does) and takes ``log1p``; only ``columns`` are returned.
    """
    from scipy import sparse

    if transform not in TARGET_TRANSFORMS:
        raise ValueError(f"Unknown `target_transform` {transform!r}; choose one of {list(TARGET_TRANSFORMS)}.")
    if check:
        check_counts(counts)
    cols = np.arange(counts.shape[1]) if columns is None else np.asarray(columns, dtype=int)
    sub = counts[:, cols]
    dense = np.asarray(sub.toarray() if sparse.issparse(sub) else sub, dtype=np.float64)
    if transform is None:
        return dense
    if transform == "log1p_cp10k":
        total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(1e4, total, out=np.zeros_like(total), where=total > 0)
        dense *= scale[:, None]
    return np.log1p(dense)


def group_labels(table: ad.AnnData, groups: str | None) -> np.ndarray | None:
    if groups is None:
        return None
    if groups not in table.obs:
        raise KeyError(
            f"`groups={groups!r}` is not a column of the table's obs (columns: {list(table.obs.columns)}). Name the "
            "column of section (or donor) labels, or pass `groups=None`."
        )
    return table.obs[groups].astype(str).to_numpy()


def train_mask(table: ad.AnnData, train: Any, groups: str | None) -> np.ndarray:
    """Boolean mask of training rows: ``None`` (all), values of ``obs[groups]``, or a boolean mask."""
    n = table.n_obs
    if train is None:
        return np.ones(n, dtype=bool)
    if isinstance(train, str):
        train = [train]
    arr = np.asarray(train)
    if arr.dtype.kind in "iuf" and n >= 3 and arr.shape == (n,) and np.isin(arr, (0, 1)).all():
        raise TypeError(
            f"`train` is an array of {n} zeros and ones, one per spot: a mask? Numbers are read as values of "
            f"obs[{groups!r}]. Pass booleans: `train=np.asarray(train, dtype=bool)`."
        )
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"A boolean `train` mask must have one value per table row ({n}), got shape {arr.shape}.")
        mask = arr.copy()
    else:
        labels = group_labels(table, groups)
        if labels is None:
            raise ValueError("`train` lists groups, which needs `groups` (the obs column that holds them).")
        wanted = [str(v) for v in arr.tolist()]
        missing = sorted(set(wanted) - set(labels))
        if missing:
            raise KeyError(
                f"`train` names {missing}, which are not values of obs[{groups!r}] (values: {sorted(set(labels))})."
            )
        mask = np.isin(labels, wanted)
    if not mask.any():
        raise ValueError("`train` selects no spot.")
    return mask


REGION_COL = "_histoseq_region"


def region_labels(table: ad.AnnData) -> np.ndarray | None:
    """The region (shapes element, i.e. section) of each row of a table, when it records them."""
    if REGION_COL in table.obs:
        return table.obs[REGION_COL].astype(str).to_numpy()
    if "spatialdata_attrs" not in table.uns:
        return None
    try:
        _, region_key, _ = table_keys(table)
    except Exception:  # malformed attrs: no regions
        return None
    return table.obs[region_key].astype(str).to_numpy() if region_key in table.obs else None


def section_labels(table: ad.AnnData, groups: str | None) -> np.ndarray | None:
    """The section of each row: its region (spots element) when the table records regions, else ``obs[groups]``."""
    regions = region_labels(table)
    if regions is not None:
        return regions
    if groups is not None and groups in table.obs:
        return group_labels(table, groups)
    return None


def embedding_name(key: str) -> str:
    """The ``uns`` name of an embedding's record (``"X_morphology"`` → ``"morphology"``)."""
    return key[2:] if key.startswith("X_") else key


#: Joins the ``obsm`` keys of an embedding made of several (``"X_morphology_context+X_imagenet"``).
PART_SEPARATOR = "+"


def embedding_parts(embedding: str) -> list[str]:
    """The ``obsm`` keys that make up an embedding key (one, or several joined by ``+``)."""
    return [p.strip() for p in embedding.split(PART_SEPARATOR)]


def embedding_key(embedding: str | Sequence[str]) -> str:
    """One embedding key from a key or a list of keys (checked: non-empty, no repeats)."""
    parts = embedding_parts(embedding) if isinstance(embedding, str) else [str(p).strip() for p in embedding]
    if not parts or any(not p or PART_SEPARATOR in p for p in parts) or len(set(parts)) < len(parts):
        raise ValueError(
            f"`embedding` must name one `obsm` key or several distinct ones (a list, or joined by "
            f"{PART_SEPARATOR!r}); got {embedding!r}."
        )
    return PART_SEPARATOR.join(parts)


def embedding_params(table: ad.AnnData, embedding: str) -> dict[str, Any]:
    parts = embedding_parts(embedding)
    if len(parts) > 1:
        return {"parts": {p: embedding_params(table, p) for p in parts}}
    entry = table.uns.get(embedding_name(embedding))
    if isinstance(entry, Mapping) and isinstance(entry.get("params"), Mapping):
        return jsonable(entry["params"])
    return {}


def missing_embedding_error(embedding: str, where: str) -> KeyError:
    return KeyError(
        f"{where} has no embedding `obsm[{embedding!r}]`. Compute it first with "
        f"`hs.tl.embed(sdata, encoder=...)` (which writes `obsm['X_<name>']`), or pass the key of an existing "
        "embedding as `embedding=`."
    )


def embedding_dims(table: ad.AnnData, embedding: str) -> list[int]:
    """Dimension of each part of an embedding (already read and checked by :func:`embedding_matrix`)."""
    return [int(np.shape(table.obsm[p])[1]) for p in embedding_parts(embedding)]


def embedding_matrix(table: ad.AnnData, embedding: str, where: str) -> np.ndarray:
    """The embedding as a float64 ``(spots, dims)`` array; an embedding of several parts is their concatenation."""
    parts = embedding_parts(embedding)
    if len(parts) > 1:
        return np.hstack([embedding_matrix(table, p, where) for p in parts])
    if embedding not in table.obsm:
        raise missing_embedding_error(embedding, where)
    x = table.obsm[embedding]
    x = x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(
            f"`obsm[{embedding!r}]` must be a 2-D (spots × features) array with at least one feature, got shape "
            f"{x.shape}. Recompute it with `hs.tl.embed`, or name another embedding with `embedding=`."
        )
    return np.asarray(x, dtype=np.float64)


def concat_tables(tables: list[ad.AnnData], embedding: str | None, groups: str | None) -> ad.AnnData:
    """Rows of several tables in one light AnnData (counts, embedding, groups and spot positions).

    ``embedding=None`` (image methods) concatenates no embedding.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    genes = tables[0].var_names
    for i, t in enumerate(tables[1:], start=1):
        if set(t.var_names) != set(genes):
            extra, lacking = sorted(set(t.var_names) - set(genes)), sorted(set(genes) - set(t.var_names))
            raise ValueError(
                f"The tables do not share their genes: table {i} has {len(extra)} gene(s) more (e.g. {extra[:3]}) "
                f"and {len(lacking)} fewer (e.g. {lacking[:3]}) than table 0. Subset them to common genes first."
            )
    parts = [] if embedding is None else embedding_parts(embedding)
    xs, obs, spatial = [], [], []
    embs: dict[str, list[np.ndarray]] = {p: [] for p in parts}
    for i, t in enumerate(tables):
        order = t.var_names.get_indexer(genes)
        x = t.X[:, order]
        xs.append(sparse.csr_matrix(x) if sparse.issparse(x) else np.asarray(x))
        for part in parts:
            embs[part].append(embedding_matrix(t, part, f"The table of SpatialData {i}"))
        columns = {} if groups is None else {groups: group_labels(t, groups)}
        regions = region_labels(t)
        if regions is not None:
            columns[REGION_COL] = [f"{i}:{r}" for r in regions]
        obs.append(pd.DataFrame(columns, index=[f"{i}:{name}" for name in t.obs_names]))
        spatial.append(np.asarray(t.obsm["spatial"], float)[:, :2] if "spatial" in t.obsm else None)
    params: dict[str, dict[str, Any]] = {}
    for part in parts:
        dims = {e.shape[1] for e in embs[part]}
        if len(dims) > 1:
            raise ValueError(f"The embeddings `obsm[{part!r}]` of the tables differ in dimension: {sorted(dims)}.")
        each = [embedding_params(t, part) for t in tables]
        if any(p != each[0] for p in each[1:]):
            logger.warning(
                "The embeddings `obsm[%r]` of the tables were made with different parameters; a model trained on "
                "them mixes encoders.",
                part,
            )
        params[part] = each[0]
    obs_df = pd.concat(obs)
    if groups is not None:
        per_object = [set(o[groups]) for o in obs]
        if sum(len(s) for s in per_object) > len(set().union(*per_object)):
            logger.warning(
                "Some values of obs[%r] occur in several SpatialData objects; they are treated as one group.", groups
            )
    X = sparse.vstack(xs, format="csr") if all(sparse.issparse(x) for x in xs) else np.vstack([dense(x) for x in xs])
    out = ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=genes.copy()))
    if all(s is not None for s in spatial):
        out.obsm["spatial"] = np.vstack(spatial)
    for part in parts:
        out.obsm[part] = np.vstack(embs[part])
        out.uns[embedding_name(part)] = {"params": params[part]}
    return out


def dense(x: Any) -> np.ndarray:
    """A dense array of a sparse or dense matrix."""
    from scipy import sparse

    return x.toarray() if sparse.issparse(x) else np.asarray(x)

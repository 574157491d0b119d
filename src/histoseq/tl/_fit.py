"""Expression models on spot embeddings: fit, predict, save and load.

The model maps a spot's embedding (``table.obsm[embedding]``, e.g. ``"X_morphology"`` written by
:func:`histoseq.tl.embed`) to the transformed expression of a set of genes. Three methods:

- ``"ridge"``: standardise the embedding, project it on its principal components, and fit a ridge
  regression whose penalty is chosen by cross-validation grouped by section, inside the training data;
- ``"ridge_hest"``: the same pipeline with the fixed penalty of the HEST benchmark, as a reference;
- ``"mlp"``: a small neural network (:class:`histoseq.models._heads.MLPHead`) trained with Lightning,
  with early stopping on a validation section taken from the training sections.

A fitted :class:`ExpressionModel` is saved to one file that holds only JSON text and tensors, and is
read back with ``torch.load(..., weights_only=True)``: loading a model never runs code.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._sdata import get_table, select_rows, store_element, table_keys

if TYPE_CHECKING:
    import anndata as ad
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

Method = Literal["ridge", "ridge_hest", "mlp"]
TargetTransform = Literal["log1p_cp10k", "log1p"] | None

METHODS = ("ridge", "ridge_hest", "mlp")
TARGET_TRANSFORMS = ("log1p_cp10k", "log1p", None)
#: Penalties tried by ``method="ridge"``: 33 values, 4 per decade, from 1e-2 to 1e6.
DEFAULT_ALPHAS = np.logspace(-2, 6, 33)
#: Largest number of principal components kept before the ridge regression.
MAX_COMPONENTS = 256

_FORMAT = "histoseq.ExpressionModel"
_FORMAT_VERSION = 1
_RIDGE_ARRAYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept")
_MLP_ARRAYS = ("scaler_mean", "scaler_scale", "target_mean", "target_scale")
# embedding parameters that do not change the embedding of a spot (compared with a warning only)
_RUN_PARAMS = {"batch_size", "progress", "device", "accelerator", "devices", "num_workers", "n_jobs", "key_added"}


# --------------------------------------------------------------------------------------------------
# Inputs: tables, counts, training spots
# --------------------------------------------------------------------------------------------------


def _as_table(obj: Any, table_key: str | None) -> ad.AnnData:
    """The table of a SpatialData, or an AnnData itself."""
    import anndata as ad

    if isinstance(obj, ad.AnnData):
        return obj
    return get_table(obj, table_key)[1]


def _check_counts(counts: Any) -> None:
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
        _check_counts(counts)
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


def _group_labels(table: ad.AnnData, groups: str | None) -> np.ndarray | None:
    if groups is None:
        return None
    if groups not in table.obs:
        raise KeyError(
            f"`groups={groups!r}` is not a column of the table's obs (columns: {list(table.obs.columns)}). Name the "
            "column of section (or donor) labels, or pass `groups=None`."
        )
    return table.obs[groups].astype(str).to_numpy()


def _train_mask(table: ad.AnnData, train: Any, groups: str | None) -> np.ndarray:
    """Boolean mask of training rows: ``None`` (all), values of ``obs[groups]``, or a boolean mask."""
    n = table.n_obs
    if train is None:
        return np.ones(n, dtype=bool)
    if isinstance(train, str):
        train = [train]
    arr = np.asarray(train)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"A boolean `train` mask must have one value per table row ({n}), got shape {arr.shape}.")
        mask = arr.copy()
    else:
        labels = _group_labels(table, groups)
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


_REGION_COL = "_histoseq_region"


def _region_labels(table: ad.AnnData) -> np.ndarray | None:
    """The region (shapes element, i.e. section) of each row of a table, when it records them."""
    if _REGION_COL in table.obs:
        return table.obs[_REGION_COL].astype(str).to_numpy()
    if "spatialdata_attrs" not in table.uns:
        return None
    try:
        _, region_key, _ = table_keys(table)
    except Exception:  # malformed attrs: no regions
        return None
    return table.obs[region_key].astype(str).to_numpy() if region_key in table.obs else None


def _embedding_name(key: str) -> str:
    return key[2:] if key.startswith("X_") else key


def _jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of (nested) parameters; unknown objects become their ``str``."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _embedding_params(table: ad.AnnData, embedding: str) -> dict[str, Any]:
    entry = table.uns.get(_embedding_name(embedding))
    if isinstance(entry, Mapping) and isinstance(entry.get("params"), Mapping):
        return _jsonable(entry["params"])
    return {}


def _missing_embedding_error(embedding: str, where: str) -> KeyError:
    return KeyError(
        f"{where} has no embedding `obsm[{embedding!r}]`. Compute it first with "
        f"`hs.tl.embed(sdata, encoder=...)` (which writes `obsm['X_<name>']`), or pass the key of an existing "
        "embedding as `embedding=`."
    )


def _embedding_matrix(table: ad.AnnData, embedding: str, where: str) -> np.ndarray:
    if embedding not in table.obsm:
        raise _missing_embedding_error(embedding, where)
    x = table.obsm[embedding]
    x = x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`obsm[{embedding!r}]` must be a 2-D (spots × features) array, got shape {x.shape}.")
    return np.asarray(x, dtype=np.float64)


def _concat_tables(tables: list[ad.AnnData], embedding: str, groups: str | None) -> ad.AnnData:
    """Rows of several tables in one light AnnData (counts, embedding, groups and spot positions)."""
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
    xs, embs, obs, spatial = [], [], [], []
    for i, t in enumerate(tables):
        order = t.var_names.get_indexer(genes)
        x = t.X[:, order]
        xs.append(sparse.csr_matrix(x) if sparse.issparse(x) else np.asarray(x))
        embs.append(_embedding_matrix(t, embedding, f"The table of SpatialData {i}"))
        columns = {} if groups is None else {groups: _group_labels(t, groups)}
        regions = _region_labels(t)
        if regions is not None:
            columns[_REGION_COL] = [f"{i}:{r}" for r in regions]
        obs.append(pd.DataFrame(columns, index=[f"{i}:{name}" for name in t.obs_names]))
        spatial.append(np.asarray(t.obsm["spatial"], float)[:, :2] if "spatial" in t.obsm else None)
    dims = {e.shape[1] for e in embs}
    if len(dims) > 1:
        raise ValueError(f"The embeddings `obsm[{embedding!r}]` of the tables differ in dimension: {sorted(dims)}.")
    params = [_embedding_params(t, embedding) for t in tables]
    if any(p != params[0] for p in params[1:]):
        logger.warning(
            "The embeddings `obsm[%r]` of the tables were made with different parameters; a model trained on them "
            "mixes encoders.",
            embedding,
        )
    obs_df = pd.concat(obs)
    if groups is not None:
        per_object = [set(o[groups]) for o in obs]
        if sum(len(s) for s in per_object) > len(set().union(*per_object)):
            logger.warning(
                "Some values of obs[%r] occur in several SpatialData objects; they are treated as one group.", groups
            )
    X = sparse.vstack(xs, format="csr") if all(sparse.issparse(x) for x in xs) else np.vstack([_dense(x) for x in xs])
    out = ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=genes.copy()))
    out.obsm[embedding] = np.vstack(embs)
    if all(s is not None for s in spatial):
        out.obsm["spatial"] = np.vstack(spatial)
    out.uns[_embedding_name(embedding)] = {"params": params[0]}
    return out


def _dense(x: Any) -> np.ndarray:
    from scipy import sparse

    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _resolve_genes(
    table: ad.AnnData,
    genes: int | Sequence[str],
    train_mask: np.ndarray,
    *,
    min_spot_fraction: float,
    flavor: str,
) -> list[str]:
    from ._genes import select_genes

    if isinstance(genes, int | np.integer) and not isinstance(genes, bool):
        return select_genes(table, int(genes), train=train_mask, min_spot_fraction=min_spot_fraction, flavor=flavor)
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("`genes` is empty; give gene names or a number of genes to select.")
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        raise ValueError(f"`genes` lists some genes more than once: {dup}.")
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        raise KeyError(f"{len(missing)} of the requested genes are not in the table's var_names: {missing[:20]}.")
    return genes


# --------------------------------------------------------------------------------------------------
# Cross-validation folds and the ridge regression
# --------------------------------------------------------------------------------------------------


def _spatial_blocks(
    coords: np.ndarray | None, regions: np.ndarray | None, k: int, random_state: int | None
) -> np.ndarray | None:
    """Block index (``0..k-1``) of each spot: k-means clusters of the spot positions, within each region.

    Positions of different regions (sections) are not comparable, so each region is split on its own and
    block ``b`` gathers cluster ``b`` of every region. ``None`` without usable positions.
    """
    if coords is None or not np.isfinite(coords).all():
        return None
    from sklearn.cluster import KMeans

    regions = np.zeros(len(coords), dtype=int) if regions is None else regions
    blocks = np.zeros(len(coords), dtype=int)
    for r in np.unique(regions):
        idx = np.flatnonzero(regions == r)
        n_clusters = min(k, len(idx))
        if n_clusters < 2:
            continue
        labels = KMeans(n_clusters=n_clusters, n_init=4, random_state=random_state).fit_predict(coords[idx])
        # order clusters by their first spot so that block numbers do not depend on k-means' labelling
        order = {c: i for i, c in enumerate(dict.fromkeys(labels.tolist()))}
        blocks[idx] = [order[c] for c in labels]
    return blocks


def _folds(
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    n: int,
    *,
    n_splits: int,
    random_state: int | None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Folds of the training spots for choosing the penalty.

    Leave one group out when the training spots span several groups; otherwise leave one region (section)
    out when they span several; otherwise spatial blocks of the section, or random K-fold without
    positions (both with a warning).
    """
    from sklearn.model_selection import KFold

    for values, what in ((labels, "group"), (regions, "region")):
        if values is not None and len(np.unique(values)) >= 2:
            folds = [(np.flatnonzero(values != g), np.flatnonzero(values == g)) for g in np.unique(values)]
            if what == "region":
                logger.info("The training spots form one group: the penalty is chosen leaving one region out.")
            return folds, f"leave-one-{what}-out"
    if n < 4:
        raise ValueError(f"Choosing the penalty by cross-validation needs at least 4 training spots, got {n}.")
    k = max(2, min(n_splits, n // 2))
    blocks = _spatial_blocks(coords, regions, k, random_state)
    if blocks is not None:
        folds = [(np.flatnonzero(blocks != b), np.flatnonzero(blocks == b)) for b in range(k)]
        folds = [f for f in folds if len(f[0]) and len(f[1])]
        if len(folds) >= 2:
            logger.warning(
                "The training spots form one group: the penalty is chosen by cross-validation over %d spatial blocks "
                "of it. Neighbouring spots share expression, so the choice may be less regularised than one made "
                "across sections; train on several sections where possible.",
                len(folds),
            )
            return folds, f"{len(folds)} spatial blocks (one training group)"
    logger.warning(
        "The training spots form one group and have no spot positions (`obsm['spatial']`): the penalty is chosen "
        "by %d-fold cross-validation over random spots, which neighbouring spots make optimistic.",
        k,
    )
    kf = KFold(n_splits=k, shuffle=True, random_state=random_state)
    return [(tr, va) for tr, va in kf.split(np.zeros(n))], f"{k}-fold (random spots, one training group)"


def _column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns; NaN where a column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = (a * b).sum(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    tiny = 1e-12 * np.maximum(1.0, den)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > tiny, num / np.where(den > 0, den, 1.0), np.nan)


def _ridge_cv(
    P: np.ndarray, Y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], alphas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out error and correlation of ridge regressions for all penalties, one SVD per fold.

    For a fold with centred training features ``P = U S Vᵀ``, the ridge coefficients for penalty ``a`` are
    ``V diag(s / (s² + a)) Uᵀ Y``, so all penalties cost one SVD and a few small products.

    Returns the mean squared error (pooled over folds, each gene divided by its variance so that all genes
    weigh the same) and the mean Pearson correlation (over folds and genes), one value per penalty.
    """
    var = Y.var(axis=0)
    var = np.where(var > 0, var, 1.0)
    sse = np.zeros(len(alphas))
    count = 0
    corr = np.zeros(len(alphas))
    corr_n = np.zeros(len(alphas))
    for tr, va in folds:
        p_mean, y_mean = P[tr].mean(axis=0), Y[tr].mean(axis=0)
        U, s, Vt = np.linalg.svd(P[tr] - p_mean, full_matrices=False)
        uty = U.T @ (Y[tr] - y_mean)
        a = (P[va] - p_mean) @ Vt.T
        for i, alpha in enumerate(alphas):
            pred = a @ ((s / (s * s + alpha))[:, None] * uty) + y_mean
            sse[i] += (((pred - Y[va]) ** 2) / var).sum()
            if len(va) > 1:
                r = _column_pearson(pred, Y[va])
                if np.isfinite(r).any():
                    corr[i] += np.nanmean(r)
                    corr_n[i] += 1
        count += Y[va].size
    with np.errstate(invalid="ignore"):
        return sse / max(count, 1), np.where(corr_n > 0, corr / np.maximum(corr_n, 1), np.nan)


def _ridge_solve(P: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients ``(k, G)`` and intercept ``(G,)`` of a ridge regression with an unpenalised intercept."""
    p_mean, y_mean = P.mean(axis=0), Y.mean(axis=0)
    U, s, Vt = np.linalg.svd(P - p_mean, full_matrices=False)
    coef = Vt.T @ ((s / (s * s + alpha))[:, None] * (U.T @ (Y - y_mean)))
    return coef, y_mean - p_mean @ coef


def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-12 * np.maximum(1.0, np.abs(mean))), scale, 1.0)
    return mean, scale


def _fit_ridge(
    X: np.ndarray,
    Y: np.ndarray,
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    *,
    hest: bool,
    random_state: int | None,
    alphas: Sequence[float] | None = None,
    alpha: float | None = None,
    n_components: int | float | None = None,
    alpha_scoring: str = "mse",
    n_splits: int = 5,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    from sklearn.decomposition import PCA

    n, d = X.shape
    if n < 3:
        raise ValueError(f"A ridge model needs at least 3 training spots, got {n}.")
    mean, scale = _standardise(X)
    Z = (X - mean) / scale
    limit = min(MAX_COMPONENTS, d, n - 1)
    if n_components is None:
        k: int | float = limit
    elif isinstance(n_components, float) and 0 < n_components < 1:
        k = n_components
    elif int(n_components) >= 1:
        k = min(int(n_components), limit)
        if k < int(n_components):
            logger.warning(
                "`n_components=%d` exceeds min(%d, n_features, n_train - 1); using %d.", n_components, MAX_COMPONENTS, k
            )
    else:
        raise ValueError(f"`n_components` must be a positive integer or a fraction in (0, 1), got {n_components!r}.")
    solver = "full" if isinstance(k, float) else "auto"
    pca = PCA(n_components=k, svd_solver=solver, random_state=random_state).fit(Z)
    if isinstance(k, float) and pca.n_components_ > limit:
        pca = PCA(n_components=limit, random_state=random_state).fit(Z)
    P = pca.transform(Z)
    n_comp = int(pca.n_components_)
    info: dict[str, Any] = {
        "n_components": n_comp,
        "explained_variance": float(pca.explained_variance_ratio_.sum()),
    }
    config: dict[str, Any] = {"n_components": n_components if n_components is None else _jsonable(n_components)}
    if hest:
        if alpha is not None or alphas is not None:
            raise TypeError("`method='ridge_hest'` uses HEST's fixed penalty; use `method='ridge'` to set `alpha(s)`.")
        chosen = 100.0 / (n_comp * Y.shape[1])
        info.update(alpha=chosen, alpha_rule="HEST: 100 / (n_components * n_genes)")
    elif alpha is not None:
        if alphas is not None:
            raise TypeError("Give either `alpha` (a fixed penalty) or `alphas` (penalties to choose from), not both.")
        chosen = float(alpha)
        if not (math.isfinite(chosen) and chosen >= 0):
            raise ValueError(f"`alpha` must be a non-negative number, got {alpha!r}.")
        info.update(alpha=chosen, alpha_rule="given")
    else:
        grid = np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=float).ravel()
        if grid.size == 0 or not np.all(np.isfinite(grid) & (grid >= 0)):
            raise ValueError("`alphas` must be non-negative finite numbers.")
        grid = np.unique(grid)
        if alpha_scoring not in ("mse", "pearson"):
            raise ValueError(f"`alpha_scoring` must be 'mse' or 'pearson', got {alpha_scoring!r}.")
        folds, scheme = _folds(labels, regions, coords, n, n_splits=n_splits, random_state=random_state)
        mse, corr = _ridge_cv(P, Y, folds, grid)
        best = int(np.nanargmin(mse)) if alpha_scoring == "mse" else int(np.nanargmax(corr))
        chosen = float(grid[best])
        if len(grid) > 1 and best in (0, len(grid) - 1):
            logger.warning(
                "The penalty chosen by cross-validation (alpha=%g) lies at the edge of the grid [%g, %g]; pass a "
                "wider `alphas=`.",
                chosen,
                grid[0],
                grid[-1],
            )
        info.update(
            alpha=chosen,
            alpha_rule=f"cross-validation ({scheme}, {len(folds)} folds, scoring={alpha_scoring})",
            cv={"alphas": grid.tolist(), "mse": _jsonable(mse), "pearson": _jsonable(corr), "n_folds": len(folds)},
        )
        config.update(alphas=grid.tolist(), alpha_scoring=alpha_scoring)
    coef, intercept = _ridge_solve(P, Y, chosen)
    arrays = {
        "scaler_mean": mean,
        "scaler_scale": scale,
        "pca_mean": pca.mean_.astype(np.float64),
        "pca_components": pca.components_.astype(np.float64),
        "coef": coef,
        "intercept": intercept,
    }
    return arrays, config, info


# --------------------------------------------------------------------------------------------------
# The MLP head
# --------------------------------------------------------------------------------------------------


def _validation_rows(
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    n: int,
    *,
    val_groups: Sequence[str] | None,
    val_fraction: float,
    random_state: int | None,
) -> tuple[np.ndarray, str]:
    """Training spots that early stopping watches: a training group, a region, a spatial block or random spots."""
    rng = np.random.default_rng(random_state)
    if val_groups is not None:
        if labels is None:
            raise ValueError("`val_groups` needs `groups` (the obs column that holds them).")
        val_groups = [str(g) for g in ([val_groups] if isinstance(val_groups, str) else val_groups)]
        missing = sorted(set(val_groups) - set(labels))
        if missing:
            raise KeyError(f"`val_groups` {missing} are not training groups ({sorted(set(labels))}).")
        return np.isin(labels, val_groups), f"groups {val_groups}"
    for values, what in ((labels, "group"), (regions, "region")):
        if values is not None and len(np.unique(values)) >= 2:
            chosen = str(rng.choice(np.unique(values)))
            return values == chosen, f"{what} {chosen!r}"
    k = max(2, round(1 / val_fraction))
    blocks = _spatial_blocks(coords, regions, k, random_state) if n >= 2 * k else None
    if blocks is not None and 0 < (blocks == 0).sum() < n:
        logger.warning(
            "The training spots form one group: early stopping watches a spatial block of %.0f%% of them.",
            100 * np.mean(blocks == 0),
        )
        return blocks == 0, "a spatial block of the single training group"
    logger.warning("Early stopping watches %.0f%% random training spots (one group, no positions).", 100 * val_fraction)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, max(1, round(val_fraction * n)), replace=False)] = True
    return mask, "random spots"


def _fit_mlp(
    X: np.ndarray,
    Y: np.ndarray,
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    *,
    random_state: int | None,
    progress: bool,
    max_epochs: int | None,
    accelerator: Any,
    devices: Any,
    strategy: Any,
    n_hidden: int = 256,
    n_layers: int = 1,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    patience: int = 20,
    val_groups: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import EarlyStopping
    from torch.utils.data import DataLoader, TensorDataset

    from ..models._heads import MLPHead, RegressionPlan

    n = len(X)
    val, val_desc = _validation_rows(
        labels, regions, coords, n, val_groups=val_groups, val_fraction=val_fraction, random_state=random_state
    )
    if val.all() or not val.any():
        raise ValueError("The validation spots for early stopping leave no spot to train on (or none to validate).")
    mean, scale = _standardise(X)
    y_mean, y_scale = _standardise(Y)
    Xs = ((X - mean) / scale).astype(np.float32)
    Ys = ((Y - y_mean) / y_scale).astype(np.float32)
    seed = int(random_state) if random_state is not None else int(np.random.SeedSequence().entropy % 2**31)
    epochs = 200 if max_epochs is None else int(max_epochs)
    config = {
        "n_hidden": int(n_hidden),
        "n_layers": int(n_layers),
        "dropout": float(dropout),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "patience": int(patience),
        "max_epochs": epochs,
    }
    quiet = [] if progress else ["lightning.pytorch", "lightning.fabric", "pytorch_lightning"]
    levels = {name: logging.getLogger(name).level for name in quiet}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning's own use of torch's pytree
        for name in quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            torch.manual_seed(seed)
            net = MLPHead(X.shape[1], Y.shape[1], n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
            plan = RegressionPlan(net, lr=lr, weight_decay=weight_decay)
            tr = np.flatnonzero(~val)
            va = np.flatnonzero(val)
            train_dl = DataLoader(
                TensorDataset(torch.from_numpy(Xs[tr]), torch.from_numpy(Ys[tr])),
                batch_size=min(int(batch_size), len(tr)),
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
            )
            val_dl = DataLoader(
                TensorDataset(torch.from_numpy(Xs[va]), torch.from_numpy(Ys[va])), batch_size=max(len(va), 1)
            )
            trainer = pl.Trainer(
                max_epochs=epochs,
                accelerator=accelerator,
                devices=devices,
                strategy=strategy,
                enable_checkpointing=False,
                logger=False,
                enable_progress_bar=progress,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                callbacks=[EarlyStopping(monitor="val_loss", patience=int(patience), mode="min")],
                **dict(trainer_kwargs or {}),
            )
            trainer.fit(plan, train_dataloaders=train_dl, val_dataloaders=val_dl)
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
    state = plan.best_state or {k: v.detach().cpu() for k, v in net.state_dict().items()}
    arrays = {"scaler_mean": mean, "scaler_scale": scale, "target_mean": y_mean, "target_scale": y_scale}
    arrays.update({f"net.{k}": v.numpy().copy() for k, v in state.items()})
    info = {
        "validation": val_desc,
        "n_validation_spots": int(val.sum()),
        "best_epoch": int(plan.best_epoch),
        "best_val_loss": float(plan.best_val_loss),
        "epochs_run": len(plan.history),
        "seed": seed,
    }
    return arrays, config, info


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class ExpressionModel:
    """A trained map from spot embeddings to gene expression.

    Made by :func:`histoseq.tl.fit`; applied by :meth:`predict` (or :func:`histoseq.tl.predict`);
    written to one file by :meth:`save` and read back by :meth:`load` (or :func:`histoseq.tl.load_model`).
    The file holds JSON text and tensors only and is read with ``torch.load(path, weights_only=True)``,
    so loading a model never runs code, and a loaded model predicts exactly what the saved one did.

    Attributes
    ----------
    method
        ``"ridge"``, ``"ridge_hest"`` or ``"mlp"``.
    genes
        The genes it predicts, in order.
    target_transform
        Transform of the counts it predicts (``"log1p_cp10k"``, ``"log1p"`` or ``None``).
    embedding
        The ``obsm`` key of the embedding it reads, and :attr:`embedding_params`, the parameters that
        made it (``uns[name]['params']``).
    provenance
        How it was trained: training groups and spots, penalty and cross-validation scores (ridge), best
        epoch and validation loss (MLP).

    """

    def __init__(
        self,
        *,
        method: str,
        genes: Sequence[str],
        target_transform: TargetTransform,
        embedding: str,
        embedding_params: Mapping[str, Any],
        n_features: int,
        arrays: Mapping[str, np.ndarray],
        config: Mapping[str, Any],
        provenance: Mapping[str, Any],
    ):
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
        if target_transform not in TARGET_TRANSFORMS:
            raise ValueError(f"Unknown target transform {target_transform!r}.")
        required = _RIDGE_ARRAYS if method != "mlp" else _MLP_ARRAYS
        missing = [a for a in required if a not in arrays]
        if missing:
            raise ValueError(f"A {method!r} model needs the arrays {missing}.")
        self._method = method
        self._genes = [str(g) for g in genes]
        self._target_transform = target_transform
        self._embedding = str(embedding)
        self._embedding_params = _jsonable(dict(embedding_params))
        self._n_features = int(n_features)
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._config = _jsonable(dict(config))
        self._provenance = _jsonable(dict(provenance))
        self._network: Any = None

    # -- properties ----------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """``"ridge"``, ``"ridge_hest"`` or ``"mlp"``."""
        return self._method

    @property
    def genes(self) -> list[str]:
        """The genes the model predicts, in the order of its outputs."""
        return list(self._genes)

    @property
    def target_transform(self) -> TargetTransform:
        """Transform of the counts that the model predicts."""
        return self._target_transform

    @property
    def embedding(self) -> str:
        """The ``obsm`` key of the embedding the model reads."""
        return self._embedding

    @property
    def embedding_params(self) -> dict[str, Any]:
        """Parameters of the embedding the model was trained on (``uns[name]['params']``)."""
        return json.loads(json.dumps(self._embedding_params))

    @property
    def n_features(self) -> int:
        """Dimension of the embedding."""
        return self._n_features

    @property
    def config(self) -> dict[str, Any]:
        """Options of the method (penalty grid, network size, ...)."""
        return json.loads(json.dumps(self._config))

    @property
    def provenance(self) -> dict[str, Any]:
        """How the model was trained."""
        return json.loads(json.dumps(self._provenance))

    @property
    def alpha(self) -> float | None:
        """Penalty of a ridge model (``None`` for an MLP)."""
        value = self._provenance.get("alpha")
        return None if value is None else float(value)

    # -- prediction ----------------------------------------------------------------------------------
    def _get_network(self) -> Any:
        if self._network is None:
            import torch

            from ..models._heads import MLPHead

            c = self._config
            net = MLPHead(
                self._n_features,
                len(self._genes),
                n_hidden=c["n_hidden"],
                n_layers=c["n_layers"],
                dropout=c["dropout"],
            )
            state = {k[4:]: torch.from_numpy(np.array(v)) for k, v in self._arrays.items() if k.startswith("net.")}
            net.load_state_dict(state)
            net.eval()
            self._network = net
        return self._network

    def predict_embeddings(self, X: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
        """Predictions ``(n_spots, n_genes)`` (float32) for an embedding matrix; NaN rows stay NaN.

        Parameters
        ----------
        X
            Embeddings, ``(n_spots, n_features)``.
        batch_size
            Spots per batch of the MLP.

        Returns
        -------
        Predicted (transformed) expression of :attr:`genes`.

        Examples
        --------
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
        >>> model.predict_embeddings(t.obsm["X_demo"][:3]).shape
        (3, 5)

        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self._n_features:
            raise ValueError(
                f"The model reads {self._n_features}-dimensional embeddings ({self._embedding!r}); got shape {X.shape}."
            )
        out = np.full((len(X), len(self._genes)), np.nan, dtype=np.float32)
        ok = np.isfinite(X).all(axis=1)
        if not ok.any():
            return out
        a = self._arrays
        Z = (X[ok] - a["scaler_mean"]) / a["scaler_scale"]
        if self._method != "mlp":
            P = (Z - a["pca_mean"]) @ a["pca_components"].T
            out[ok] = P @ a["coef"] + a["intercept"]
            return out
        import torch

        net = self._get_network()
        Zf = Z.astype(np.float32)
        parts = []
        with torch.no_grad():
            for start in range(0, len(Zf), batch_size):
                parts.append(net(torch.from_numpy(Zf[start : start + batch_size])).numpy().astype(np.float64))
        out[ok] = np.concatenate(parts) * a["target_scale"] + a["target_mean"]
        return out

    def predict(self, sdata: SpatialData, **kwargs: Any) -> ad.AnnData | None:
        """Predict expression for the spots of ``sdata``: :func:`histoseq.tl.predict` with this model.

        Parameters
        ----------
        sdata
            The SpatialData whose table holds (or can be given) the embedding.
        **kwargs
            Options of :func:`histoseq.tl.predict` (``key_added``, ``table_key``, ``spots``, ``inplace``).

        Returns
        -------
        See :func:`histoseq.tl.predict`.

        Examples
        --------
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
        >>> model.predict(sdata, inplace=False).shape == (t.n_obs, 5)
        True

        """
        return predict(sdata, self, **kwargs)

    # -- persistence ---------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "histoseq_version": __version__,
            "method": self._method,
            "genes": self._genes,
            "target_transform": self._target_transform,
            "embedding": self._embedding,
            "embedding_params": self._embedding_params,
            "n_features": self._n_features,
            "config": self._config,
            "provenance": self._provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write the model to one file.

        The file is ``torch.save({"meta": <JSON text>, "tensors": {name: tensor}})``: no Python object is
        pickled, so :meth:`load` can read it with ``torch.load(path, weights_only=True)``.

        Parameters
        ----------
        path
            Destination file (``.pt`` by convention); an existing file is replaced.

        Returns
        -------
        The path written.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
        >>> path = model.save(pathlib.Path(tempfile.mkdtemp()) / "model.pt")
        >>> hs.tl.load_model(path).genes == model.genes
        True

        """
        import torch

        path = Path(path)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self._arrays.items()}
        torch.save({"meta": json.dumps(self._meta()), "tensors": tensors}, path)
        logger.info("Saved %s model (%d genes) to %s.", self._method, len(self._genes), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpressionModel:
        """Read a model written by :meth:`save`, without unpickling any object.

        Parameters
        ----------
        path
            A file written by :meth:`save`.

        Returns
        -------
        The model.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> path = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False).save(
        ...     pathlib.Path(tempfile.mkdtemp()) / "model.pt"
        ... )
        >>> hs.tl.ExpressionModel.load(path).method
        'ridge'

        """
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No model file at {str(path)!r}.")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{str(path)!r} is not a histoseq model file: it holds Python objects other than tensors and plain "
                "data, and histoseq refuses to unpickle them (that could run code). Save models with "
                "`ExpressionModel.save`."
            ) from err
        except Exception as err:  # torch raises many kinds of errors on files it cannot parse
            raise ValueError(f"{str(path)!r} is not a histoseq model file (torch could not read it: {err}).") from err
        if not (isinstance(obj, dict) and set(obj) == {"meta", "tensors"} and isinstance(obj["meta"], str)):
            raise ValueError(f"{str(path)!r} is not a histoseq model file (expected the keys 'meta' and 'tensors').")
        try:
            meta = json.loads(obj["meta"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r}: the model metadata is not valid JSON.") from err
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a histoseq model file (format {meta.get('format')!r}).")
        if int(meta.get("format_version", 0)) > _FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} was written by a newer histoseq ({meta.get('histoseq_version')}, format version "
                f"{meta['format_version']}); upgrade histoseq to read it."
            )
        tensors = obj["tensors"]
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{str(path)!r}: 'tensors' must map names to tensors.")
        return cls(
            method=meta["method"],
            genes=meta["genes"],
            target_transform=meta["target_transform"],
            embedding=meta["embedding"],
            embedding_params=meta["embedding_params"],
            n_features=meta["n_features"],
            arrays={k: v.numpy().copy() for k, v in tensors.items()},
            config=meta["config"],
            provenance=meta["provenance"],
        )

    # -- display -------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        p = self._provenance
        genes = ", ".join(self._genes[:6]) + (", ..." if len(self._genes) > 6 else "")
        lines = [
            f"ExpressionModel({self._method!r}): {self._embedding!r} ({self._n_features} dims) -> "
            f"{len(self._genes)} genes, target {self._target_transform!r}",
        ]
        if self._method != "mlp":
            lines.append(
                f"    ridge: alpha={p.get('alpha', float('nan')):.4g} ({p.get('alpha_rule', '?')}), "
                f"{p.get('n_components', '?')} principal components"
            )
        else:
            c = self._config
            lines.append(
                f"    mlp: {c['n_layers']} hidden layer(s) of {c['n_hidden']}, dropout {c['dropout']}; best epoch "
                f"{p.get('best_epoch')} (validation: {p.get('validation')})"
            )
        groups = p.get("train_groups") or {}
        shown = ", ".join(list(groups)[:5]) + (", ..." if len(groups) > 5 else "")
        lines.append(f"    trained on {p.get('n_train_spots', '?')} spots" + (f" of {shown}" if shown else ""))
        lines.append(f"    genes: {genes}")
        return "\n".join(lines)


def load_model(path: str | Path) -> ExpressionModel:
    """Read an :class:`ExpressionModel` written by :meth:`ExpressionModel.save`.

    The file is read with ``torch.load(path, weights_only=True)``; a file holding pickled Python objects
    is refused with a ``ValueError``.

    Parameters
    ----------
    path
        The model file.

    Returns
    -------
    The model.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
    >>> model.save(pathlib.Path(tempfile.mkdtemp()) / "m.pt").exists()
    True

    """
    return ExpressionModel.load(path)


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------

_METHOD_OPTIONS = {
    "ridge": {"alphas", "alpha", "n_components", "alpha_scoring", "n_splits"},
    "ridge_hest": {"n_components"},
    "mlp": {
        "n_hidden",
        "n_layers",
        "dropout",
        "lr",
        "weight_decay",
        "batch_size",
        "patience",
        "val_groups",
        "val_fraction",
        "trainer_kwargs",
    },
}


def fit(
    sdata: SpatialData | Sequence[SpatialData] | ad.AnnData,
    *,
    genes: int | Sequence[str] = 50,
    method: Method = "ridge",
    embedding: str = "X_morphology",
    train: Sequence[str] | np.ndarray | None = None,
    table_key: str | None = "table",
    target_transform: TargetTransform = "log1p_cp10k",
    groups: str | None = "sample_id",
    min_spot_fraction: float = 0.1,
    hvg_flavor: str = "seurat",
    random_state: int | None = 0,
    progress: bool = True,
    max_epochs: int | None = None,
    accelerator: str | Any = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any = "auto",
    **method_kwargs: Any,
) -> ExpressionModel:
    """Learn gene expression from spot embeddings.

    The targets are the ``target_transform`` of the raw counts in ``X``; the inputs are the embeddings in
    ``obsm[embedding]``. Everything that is learnt (gene selection, scaling, principal components,
    penalty, early stopping) looks at the training spots only, so a model trained with ``train=`` can be
    evaluated honestly on the other sections. The methods:

    - ``"ridge"``: :class:`~sklearn.preprocessing.StandardScaler`-like standardisation, PCA to
      ``n_components`` (default ``min(256, n_features, n_train - 1)``; a float in (0, 1) keeps that
      fraction of variance), then ridge regression with an unpenalised intercept. The penalty is chosen
      from ``alphas`` (default ``logspace(-2, 6, 33)``; the objective is the *sum* of squared errors plus
      ``alpha`` times the squared norm, as in scikit-learn) by cross-validation inside the training data:
      leave one group (``groups``, e.g. section) out when the training spots span two or more groups;
      with a single group, spatial blocks of it (k-means on ``obsm['spatial']``) or, without positions,
      random K-fold (both with a warning: neighbouring spots share expression, so such folds are
      optimistic). Each fold costs one SVD for all penalties (closed form). The held-out mean squared
      error, each gene divided by its variance, picks the penalty (``alpha_scoring="pearson"`` picks
      the highest mean held-out Pearson instead). PCA and scaling are fitted once on all training spots
      (they use no expression, so the inner folds only share unsupervised structure). ``alpha=`` fixes
      the penalty.
    - ``"ridge_hest"``: the same pipeline with the fixed penalty of the HEST benchmark
      (Jaume et al., 2024), ``alpha = 100 / (n_components * n_genes)`` after standardisation and PCA to
      256 components. HEST fits no intercept on the centred PCA scores, which gives the same coefficients
      as fitting one; the predictions here are shifted by the gene means (HEST's are centred on zero),
      which changes the MSE but no correlation. HEST's targets are ``log1p`` counts:
      pass ``target_transform="log1p"`` to match it.
    - ``"mlp"``: a :class:`~histoseq.models._heads.MLPHead` (``n_layers`` hidden layers of
      ``n_hidden`` units, GELU, ``dropout``) on standardised embeddings, predicting standardised targets
      with a mean squared error, trained by AdamW (``lr``, ``weight_decay``, ``batch_size``) with a
      :class:`lightning.pytorch.Trainer`. Early stopping (``patience`` epochs) watches one training group
      chosen with ``random_state`` (or ``val_groups``), or a spatial block of a single group; the weights
      of the best validation epoch are kept. ``random_state`` makes training deterministic (on a given
      device) without touching the global random state.

    Parameters
    ----------
    sdata
        A SpatialData, a list of them (their tables' rows are concatenated; they must share genes and
        embedding), or an AnnData table.
    genes
        Gene names, or a number ``n`` of genes to select with :func:`histoseq.tl.select_genes` on the
        training spots (``min_spot_fraction``, ``hvg_flavor``).
    method
        ``"ridge"``, ``"ridge_hest"`` or ``"mlp"``.
    embedding
        Key of the embedding in ``obsm``.
    train
        Training spots: ``None`` (all), values of ``obs[groups]`` (e.g. sample ids), or a boolean mask over
        the rows (of the concatenated tables, for a list).
    table_key
        The table of the SpatialData.
    target_transform
        ``"log1p_cp10k"`` (counts scaled to 10,000 per spot over all genes, then ``log1p``), ``"log1p"`` or
        ``None`` (raw counts). Recorded in the model and applied identically by :func:`histoseq.tl.evaluate`.
    groups
        Column of ``obs`` with section (or donor) labels: what ``train`` lists and what the inner
        cross-validation leaves out. ``None``: the training spots are one group.
    min_spot_fraction
        Genes selected by number must be detected in this fraction of training spots.
    hvg_flavor
        Flavor of the gene selection (see :func:`histoseq.tl.select_genes`).
    random_state
        Seed of the PCA solver, the spatial blocks and the MLP (initialisation, batches, dropout).
    progress
        Show Lightning's progress bar and messages (MLP).
    max_epochs
        Maximal number of epochs of the MLP (default 200).
    accelerator
        Lightning accelerator of the MLP (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
    devices
        Lightning devices of the MLP.
    strategy
        Lightning strategy of the MLP (e.g. ``"ddp"`` on several GPUs).
    **method_kwargs
        Options of the method: ``alphas``, ``alpha``, ``n_components``, ``alpha_scoring``, ``n_splits``
        (ridge; ``n_components`` for ``ridge_hest``); ``n_hidden``, ``n_layers``, ``dropout``, ``lr``,
        ``weight_decay``, ``batch_size``, ``patience``, ``val_groups``, ``val_fraction``,
        ``trainer_kwargs`` (MLP).

    Returns
    -------
    The trained :class:`~histoseq.tl.ExpressionModel`; the table is not modified.

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 16))
    >>> model = hs.tl.fit(sdata, genes=20, embedding="X_demo", train=["section0", "section1"], progress=False)
    >>> len(model.genes), sorted(model.provenance["train_groups"])
    (20, ['section0', 'section1'])

    """
    import anndata as ad

    if method not in METHODS:
        raise ValueError(f"Unknown `method` {method!r}; choose one of {list(METHODS)}.")
    if target_transform not in TARGET_TRANSFORMS:
        raise ValueError(f"Unknown `target_transform` {target_transform!r}; choose one of {list(TARGET_TRANSFORMS)}.")
    unknown = sorted(set(method_kwargs) - _METHOD_OPTIONS[method])
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for method {method!r}; it takes {sorted(_METHOD_OPTIONS[method])}."
        )
    if method != "mlp" and max_epochs is not None:
        logger.warning("`max_epochs` only applies to `method='mlp'`; ignored.")

    if isinstance(sdata, ad.AnnData):
        table, source = sdata, "the AnnData"
    elif isinstance(sdata, Sequence) and not isinstance(sdata, str):
        if not sdata:
            raise ValueError("`sdata` is an empty list.")
        tables = [_as_table(s, table_key) for s in sdata]
        table = tables[0] if len(tables) == 1 else _concat_tables(tables, embedding, groups)
        source = f"{len(tables)} SpatialData objects"
    else:
        tkey, table = get_table(sdata, table_key)
        source = f"table {tkey!r}"
    X_all = _embedding_matrix(table, embedding, f"The {source}" if source.startswith("table") else source)
    labels = _group_labels(table, groups)
    mask = _train_mask(table, train, groups)
    finite = np.isfinite(X_all).all(axis=1)
    if (mask & ~finite).any():
        logger.warning(
            "%d training spot(s) have non-finite values in `obsm[%r]` (no image under them?); they are left out.",
            int((mask & ~finite).sum()),
            embedding,
        )
        mask &= finite
        if not mask.any():
            raise ValueError(f"No training spot has a finite embedding `obsm[{embedding!r}]`.")
    rows = np.flatnonzero(mask)
    gene_list = _resolve_genes(table, genes, mask, min_spot_fraction=min_spot_fraction, flavor=hvg_flavor)
    cols = table.var_names.get_indexer(gene_list)
    Y = transform_counts(table.X[rows], target_transform, cols)
    X = X_all[rows]
    lab = labels[rows] if labels is not None else None
    regions = _region_labels(table)
    reg = regions[rows] if regions is not None else None
    coords = np.asarray(table.obsm["spatial"], float)[rows, :2] if "spatial" in table.obsm else None
    logger.info(
        "Fitting a %s model: %d spots × %d embedding dims -> %d genes (%s).",
        method,
        len(rows),
        X.shape[1],
        len(gene_list),
        target_transform,
    )
    if method == "mlp":
        arrays, config, info = _fit_mlp(
            X,
            Y,
            lab,
            reg,
            coords,
            random_state=random_state,
            progress=progress,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            **method_kwargs,
        )
    else:
        arrays, config, info = _fit_ridge(
            X, Y, lab, reg, coords, hest=method == "ridge_hest", random_state=random_state, **method_kwargs
        )
    if lab is not None:
        uniq, counts = np.unique(lab, return_counts=True)
        train_groups = {str(g): int(c) for g, c in zip(uniq, counts)}
    else:
        train_groups = {}
    provenance = {
        "groups": groups,
        "train_groups": train_groups,
        "n_train_spots": len(rows),
        "source": source,
        "random_state": random_state,
        "gene_selection": (
            {"n": int(genes), "min_spot_fraction": float(min_spot_fraction), "flavor": hvg_flavor}
            if isinstance(genes, int | np.integer) and not isinstance(genes, bool)
            else "given"
        ),
        **info,
    }
    model = ExpressionModel(
        method=method,
        genes=gene_list,
        target_transform=target_transform,
        embedding=embedding,
        embedding_params=_embedding_params(table, embedding),
        n_features=X.shape[1],
        arrays=arrays,
        config=config,
        provenance=provenance,
    )
    logger.info(
        "Fitted a %s model on %d spots%s.",
        method,
        len(rows),
        f" (alpha={info['alpha']:.4g})" if "alpha" in info else f" (best epoch {info.get('best_epoch')})",
    )
    return model


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------


def _find_embed() -> Any:
    try:
        from ._embed import embed  # type: ignore[import-not-found]
    except ImportError:
        return None
    return embed


def _prediction_embedding(sdata: SpatialData, tkey: str, model: ExpressionModel) -> np.ndarray:
    """The model's embedding of the table's spots, computed with :func:`histoseq.tl.embed` when absent."""
    table = sdata.tables[tkey]
    key = model.embedding
    if key not in table.obsm:
        embed = _find_embed()
        params = model.embedding_params
        if embed is None or "encoder" not in params:
            raise _missing_embedding_error(key, f"Table {tkey!r}")
        accepted = inspect.signature(embed).parameters
        skip = {"sdata", "table_key", "inplace", "spots", "image_key", "shapes_key", "progress"}
        kwargs = {k: v for k, v in params.items() if k in accepted and k not in skip}
        logger.info(
            "Table %r has no `obsm[%r]`: computing it with hs.tl.embed(encoder=%r).", tkey, key, params["encoder"]
        )
        embed(sdata, table_key=tkey, **kwargs)
        table = sdata.tables[tkey]
        if key not in table.obsm:
            raise _missing_embedding_error(key, f"Table {tkey!r} (after hs.tl.embed)")
    X = _embedding_matrix(table, key, f"Table {tkey!r}")
    if X.shape[1] != model.n_features:
        raise ValueError(
            f"`obsm[{key!r}]` of table {tkey!r} has {X.shape[1]} dimensions, but the model was trained on "
            f"{model.n_features}: it was made by another encoder. Recompute it with the model's encoder "
            f"({model.embedding_params.get('encoder', 'see model.embedding_params')})."
        )
    here, there = _embedding_params(table, key), model.embedding_params
    if here and there and here != there:
        if "encoder" in here and "encoder" in there and here["encoder"] != there["encoder"]:
            raise ValueError(
                f"`obsm[{key!r}]` of table {tkey!r} was made by encoder {here['encoder']!r}, but the model was "
                f"trained on encoder {there['encoder']!r}. Recompute the embedding with the model's encoder."
            )
        diff = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k) and k not in _RUN_PARAMS)
        if diff:
            logger.warning(
                "The embedding `obsm[%r]` was made with other parameters than the model's training embedding "
                "(differing: %s); predictions may be off.",
                key,
                diff,
            )
    return X


def _prediction_info(model: ExpressionModel, **extra: Any) -> dict[str, Any]:
    p = model.provenance
    info = {
        "genes": model.genes,
        "target_transform": "none" if model.target_transform is None else model.target_transform,
        "method": model.method,
        "embedding": model.embedding,
        "groups": p.get("groups") or "",
        "train_groups": list(p.get("train_groups") or {}),
    }
    if model.alpha is not None:
        info["alpha"] = float(model.alpha)
    info.update(extra)
    return info


def predict(
    sdata: SpatialData,
    model: ExpressionModel,
    *,
    key_added: str = "predicted",
    table_key: str | None = "table",
    spots: Any = None,
    inplace: bool = True,
) -> ad.AnnData | None:
    """Predict expression from the embeddings of a table's spots.

    The embedding ``obsm[model.embedding]`` is read from the table; when it is absent and
    :func:`histoseq.tl.embed` is available, it is computed first with the encoder recorded in the model
    (and kept in the table). A table whose embedding was made by another encoder is refused.

    Parameters
    ----------
    sdata
        The SpatialData.
    model
        A fitted :class:`~histoseq.tl.ExpressionModel`.
    key_added
        Name of the layer (or of the new table) that receives the predictions.
    table_key
        The table whose spots are predicted.
    spots
        Spots to predict: ``None`` (all), a boolean mask, names or positions of table rows.
    inplace
        Write the predictions into ``sdata`` (``True``) or return them.

    Returns
    -------
    With ``inplace=False``, an AnnData with the predicted spots (``obs`` and ``obsm['spatial']`` of the
    table), ``var_names = model.genes`` and the predictions in ``X``. Otherwise ``None``, and:

    - when the table has all of the model's genes (a slide with measured expression):
      sets ``table.layers[key_added]`` (dense float32, table shape; predictions in the model's genes for
      the predicted spots, NaN elsewhere) and ``table.uns[key_added]`` (``genes``, ``target_transform``,
      ``method``, ``embedding``, ``groups``, ``train_groups``, what :func:`histoseq.tl.evaluate` reads);
    - when it lacks some of them (an H&E-only slide, whose table has no or other genes): adds the table
      ``sdata.tables[key_added]`` annotating the same spots (same ``obs``, region and instance keys,
      ``obsm['spatial']``), with ``var_names = model.genes``, the predictions in ``X`` and the same
      ``uns[key_added]``.

    A table backed by zarr is written back to disk.

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
    >>> hs.tl.predict(sdata, model)
    >>> t.layers["predicted"].shape == t.shape
    True

    """
    import anndata as ad
    import pandas as pd

    if not isinstance(model, ExpressionModel):
        raise TypeError(f"`model` must be an ExpressionModel (from hs.tl.fit or hs.tl.load_model), got {type(model)}.")
    tkey, table = get_table(sdata, table_key)
    rows = select_rows(table.n_obs, table.obs_names, spots)
    if rows.size == 0:
        raise ValueError("`spots` selects no spot.")
    X = _prediction_embedding(sdata, tkey, model)
    table = sdata.tables[tkey]
    pred = model.predict_embeddings(X[rows])
    n_nan = int(np.isnan(pred).all(axis=1).sum())
    if n_nan:
        logger.warning("%d spot(s) have no finite embedding; their predictions are NaN.", n_nan)
    has_genes = all(g in table.var_names for g in model.genes)
    info = _prediction_info(model, n_spots=len(rows), source_table=tkey)

    def new_table() -> ad.AnnData:
        obs = table.obs.iloc[rows].copy()
        out = ad.AnnData(X=pred, obs=obs, var=pd.DataFrame(index=pd.Index(model.genes)))
        if "spatial" in table.obsm:
            out.obsm["spatial"] = np.asarray(table.obsm["spatial"])[rows].copy()
        out.uns[key_added] = info
        return out

    if not inplace:
        return new_table()
    if has_genes:
        layer = np.full(table.shape, np.nan, dtype=np.float32)
        layer[np.ix_(rows, table.var_names.get_indexer(model.genes))] = pred
        table.layers[key_added] = layer
        table.uns[key_added] = info
        store_element(sdata, "tables", tkey)
        logger.info(
            "Predicted %d genes for %d spots: added layer %r of table %r.", pred.shape[1], len(rows), key_added, tkey
        )
        return None
    if key_added == tkey:
        raise ValueError(
            f"Table {tkey!r} lacks some of the model's genes, so the predictions go to a new table; `key_added` "
            f"must differ from {tkey!r}."
        )
    from spatialdata.models import TableModel

    regions, region_key, instance_key = table_keys(table)
    out = new_table()
    used = [r for r in regions if r in set(out.obs[region_key].astype(str))]
    out.obs[region_key] = pd.Categorical(out.obs[region_key].astype(str), categories=used)
    out.uns.pop("spatialdata_attrs", None)
    region = used[0] if len(used) == 1 else used
    parsed = TableModel.parse(out, region=region, region_key=region_key, instance_key=instance_key)
    store_element(sdata, "tables", key_added, parsed)
    logger.info(
        "Table %r lacks %d of the model's genes: added table %r with predictions of %d genes for %d spots.",
        tkey,
        sum(g not in table.var_names for g in model.genes),
        key_added,
        pred.shape[1],
        len(rows),
    )
    return None

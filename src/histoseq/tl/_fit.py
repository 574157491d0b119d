"""Expression models on spot embeddings or images: fit, predict, save and load.

The model maps a spot's embedding (``table.obsm[embedding]``, e.g. ``"X_morphology"`` written by
:func:`histoseq.tl.embed`), or the H&E patch around it, to the transformed expression of a set of genes.
Six methods:

- ``"kernel"`` (the default): kernel ridge regression, with the kernel width and penalty chosen by
  cross-validation grouped by section, inside the training data (:mod:`histoseq.tl._fit_kernel`);
- ``"ridge"``: standardise the embedding, project it on its principal components, and fit a ridge
  regression whose penalty is chosen by cross-validation grouped by section, inside the training data;
- ``"ridge_hest"``: the same pipeline with the fixed penalty of the HEST benchmark, as a reference;
- ``"mlp"``: a small neural network (:class:`histoseq.models._heads.MLPHead`) trained with Lightning,
  with early stopping on a validation section taken from the training sections;
- ``"cnn"``: an image encoder and a head trained end to end on the patches (ST-Net style), with dihedral
  augmentation and test-time augmentation (:mod:`histoseq.tl._fit_cnn`);
- ``"contrastive"``: BLEEP's contrastive image and expression projections and top-k retrieval of
  training spots (:mod:`histoseq.tl._fit_contrastive`).

This module is the dispatcher (inputs, targets, gene selection, the model class and its file); the
networks' training lives in the method modules. The embedding methods normalise the embedding
within each section first (``section_norm``: :func:`rank_sections` by default, or
:func:`standardise_sections`).

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

Method = Literal["kernel", "ridge", "ridge_hest", "mlp", "cnn", "contrastive"]
TargetTransform = Literal["log1p_cp10k", "log1p"] | None

METHODS = ("kernel", "ridge", "ridge_hest", "mlp", "cnn", "contrastive")
#: What :func:`fit` does without ``method=``: the most accurate method on the real-data folds of
#: ``benchmarks/accuracy.py``.
DEFAULT_METHOD = "kernel"
#: Methods trained with Lightning (``max_epochs``, ``accelerator``, ``devices``, ``strategy`` apply).
NETWORK_METHODS = ("mlp", "cnn", "contrastive")
#: Methods that read the images (patches) rather than an embedding.
IMAGE_METHODS = ("cnn",)
TARGET_TRANSFORMS = ("log1p_cp10k", "log1p", None)
#: Penalties tried by ``method="ridge"``: 33 values, 4 per decade, from 1e-2 to 1e6.
DEFAULT_ALPHAS = np.logspace(-2, 6, 33)
#: Largest number of principal components kept before the ridge regression.
MAX_COMPONENTS = 256
#: Embeddings that :func:`fit` computes by name when a table lacks them: ``obsm`` key -> :func:`embed` options.
#: ``"X_morphology_context"`` is the hand-crafted morphology of the spot's patch at three scales (224, 448
#: and 800 µm: the spot, its neighbours and its tissue context); ``"X_tissue_position"`` the spot's
#: offsets from the centroid of the tissue along its major and minor axes (:mod:`histoseq.tl._position`).
#: Read together, as two parts, they are the default embedding: the best on the real-data folds of
#: ``benchmarks/accuracy.py`` among those that need no optional extra (see the benchmark page of the docs).
EMBEDDING_PRESETS: dict[str, dict[str, Any]] = {
    "X_morphology_context": {"encoder": "morphology", "patch_size_um": [224.0, 448.0, 800.0], "patch_px": 224},
    "X_tissue_position": {"encoder": "tissue_position"},
    # ImageNet features at the spot and its context (needs histoseq[imagenet]); added to the default embedding,
    # ``embedding=["X_morphology_context", "X_imagenet_context", "X_tissue_position"]``, see the benchmark page
    "X_imagenet_context": {"encoder": "imagenet", "patch_size_um": [224.0, 448.0, 800.0], "patch_px": 224},
}
DEFAULT_EMBEDDING = "X_morphology_context+X_tissue_position"

_FORMAT = "histoseq.ExpressionModel"
_FORMAT_VERSION = 1
_RIDGE_ARRAYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept")
_MLP_ARRAYS = ("scaler_mean", "scaler_scale", "target_mean", "target_scale")
_CNN_ARRAYS = ("target_mean", "target_scale")
_CONTRASTIVE_ARRAYS = (*_MLP_ARRAYS, "reference_projection", "reference_expression")
_KERNEL_ARRAYS = ("scaler_mean", "scaler_scale", "landmarks", "dual_coef", "intercept")
_REQUIRED_ARRAYS = {
    "kernel": _KERNEL_ARRAYS,
    "ridge": _RIDGE_ARRAYS,
    "ridge_hest": _RIDGE_ARRAYS,
    "mlp": _MLP_ARRAYS,
    "cnn": _CNN_ARRAYS,
    "contrastive": _CONTRASTIVE_ARRAYS,
}
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


def _section_labels(table: ad.AnnData, groups: str | None) -> np.ndarray | None:
    """The section of each row: its region (spots element) when the table records regions, else ``obs[groups]``."""
    regions = _region_labels(table)
    if regions is not None:
        return regions
    if groups is not None and groups in table.obs:
        return _group_labels(table, groups)
    return None


#: Sections with fewer spots than this give noisy statistics to the per-section standardisation (warned).
MIN_SECTION_SPOTS = 30


def _per_section(X: np.ndarray, sections: np.ndarray | None, what_for: str, transform) -> np.ndarray:
    """Apply ``transform`` to the finite rows of ``X`` of each section (``None``: one section)."""
    X = np.array(X, dtype=np.float64)
    ok = np.isfinite(X).all(axis=1)
    labels = np.zeros(len(X), dtype=int) if sections is None else np.asarray(sections)
    if labels.shape != (len(X),):
        raise ValueError(f"`sections` must hold one label per row ({len(X)}), got shape {labels.shape}.")
    for section in np.unique(labels[ok]):
        idx = ok & (labels == section)
        n = int(idx.sum())
        what = "the spots" if sections is None else f"section {section!r}"
        if n < 2:
            raise ValueError(
                f"The model {what_for} the embedding within each section, but {what} hold(s) only {n} spot with "
                "an embedding. Predict a whole section at once (`spots=` selects which predictions are kept), or "
                "fit with `section_norm=False`."
            )
        if n < MIN_SECTION_SPOTS:
            logger.warning(
                "Normalising the embedding over only %d spots of %s: its statistics are noisy. Predict whole "
                "sections at once.",
                n,
                what,
            )
        X[idx] = transform(X[idx])
    return X


def standardise_sections(X: np.ndarray, sections: np.ndarray | None) -> np.ndarray:
    """Centre and scale each column of ``X`` within each section (``None``: all rows are one section).

    Slides differ in staining, scanner and thickness, which shift and stretch every image feature; the
    tissue varies *within* a slide. Standardising each feature over the spots of its own slide removes
    the slide's offset and scale, so that a model learns within-slide contrasts that carry over to a new
    slide. It reads images only (no expression), so it is as legitimate on a test slide as a stain
    normalisation. Rows with a non-finite value are left as they are and take no part in the statistics.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._fit import standardise_sections
    >>> X = np.array([[1.0], [3.0], [10.0], [30.0]])
    >>> standardise_sections(X, np.array(["a", "a", "b", "b"])).ravel().tolist()
    [-1.0, 1.0, -1.0, 1.0]

    """

    def standardise(A: np.ndarray) -> np.ndarray:
        mean, scale = _standardise(A)
        return (A - mean) / scale

    return _per_section(X, sections, "standardises", standardise)


def rank_sections(X: np.ndarray, sections: np.ndarray | None) -> np.ndarray:
    """Replace each column of ``X`` by normal scores of its ranks within each section.

    Within a section, a value of rank ``r`` (ties share their mean rank) among ``n`` becomes the standard
    normal quantile of ``(r - 1/2) / n``. Like :func:`standardise_sections` this removes a slide's offset
    and scale, and it also removes any monotone distortion of a feature between slides (a stain that
    saturates on one slide, a texture measure that bends with focus): only the order of the spots of a
    slide remains. It reads images only. Rows with a non-finite value are left as they are.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._fit import rank_sections
    >>> X = np.array([[1.0], [2.0], [100.0], [5.0], [6.0], [7.0]])
    >>> np.round(rank_sections(X, np.array(["a", "a", "a", "b", "b", "b"])).ravel(), 2).tolist()
    [-0.97, 0.0, 0.97, -0.97, 0.0, 0.97]

    """
    from scipy.special import ndtri
    from scipy.stats import rankdata

    def rank(A: np.ndarray) -> np.ndarray:
        return ndtri((rankdata(A, axis=0) - 0.5) / len(A))

    return _per_section(X, sections, "ranks", rank)


#: How :func:`fit` normalises the embedding within each section (``section_norm``).
SECTION_NORMS = {"standardise": standardise_sections, "rank": rank_sections}


def _section_norm_mode(section_norm: Any) -> str | None:
    """``section_norm`` of :func:`fit` (or of a saved model's configuration) as a mode, or ``None``."""
    if section_norm is True:
        return "standardise"
    if section_norm is False or section_norm is None:
        return None
    if isinstance(section_norm, str) and section_norm in SECTION_NORMS:
        return section_norm
    raise ValueError(
        f"`section_norm` must be one of {[*SECTION_NORMS, True, False]} (True = 'standardise'), got {section_norm!r}."
    )


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


#: Joins the ``obsm`` keys of an embedding made of several (``"X_morphology_context+X_imagenet"``).
PART_SEPARATOR = "+"


def _embedding_parts(embedding: str) -> list[str]:
    """The ``obsm`` keys that make up an embedding key (one, or several joined by ``+``)."""
    return [p.strip() for p in embedding.split(PART_SEPARATOR)]


def _embedding_key(embedding: str | Sequence[str]) -> str:
    """One embedding key from a key or a list of keys (checked: non-empty, no repeats)."""
    parts = _embedding_parts(embedding) if isinstance(embedding, str) else [str(p).strip() for p in embedding]
    if not parts or any(not p or PART_SEPARATOR in p for p in parts) or len(set(parts)) < len(parts):
        raise ValueError(
            f"`embedding` must name one `obsm` key or several distinct ones (a list, or joined by "
            f"{PART_SEPARATOR!r}); got {embedding!r}."
        )
    return PART_SEPARATOR.join(parts)


def _embedding_params(table: ad.AnnData, embedding: str) -> dict[str, Any]:
    parts = _embedding_parts(embedding)
    if len(parts) > 1:
        return {"parts": {p: _embedding_params(table, p) for p in parts}}
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


def _embedding_dims(table: ad.AnnData, embedding: str) -> list[int]:
    """Dimension of each part of an embedding (already read and checked by :func:`_embedding_matrix`)."""
    return [int(np.shape(table.obsm[p])[1]) for p in _embedding_parts(embedding)]


def _embedding_matrix(table: ad.AnnData, embedding: str, where: str) -> np.ndarray:
    """The embedding as a float64 ``(spots, dims)`` array; an embedding of several parts is their concatenation."""
    parts = _embedding_parts(embedding)
    if len(parts) > 1:
        return np.hstack([_embedding_matrix(table, p, where) for p in parts])
    if embedding not in table.obsm:
        raise _missing_embedding_error(embedding, where)
    x = table.obsm[embedding]
    x = x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`obsm[{embedding!r}]` must be a 2-D (spots × features) array, got shape {x.shape}.")
    return np.asarray(x, dtype=np.float64)


def _concat_tables(tables: list[ad.AnnData], embedding: str | None, groups: str | None) -> ad.AnnData:
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
    parts = [] if embedding is None else _embedding_parts(embedding)
    xs, obs, spatial = [], [], []
    embs: dict[str, list[np.ndarray]] = {p: [] for p in parts}
    for i, t in enumerate(tables):
        order = t.var_names.get_indexer(genes)
        x = t.X[:, order]
        xs.append(sparse.csr_matrix(x) if sparse.issparse(x) else np.asarray(x))
        for part in parts:
            embs[part].append(_embedding_matrix(t, part, f"The table of SpatialData {i}"))
        columns = {} if groups is None else {groups: _group_labels(t, groups)}
        regions = _region_labels(t)
        if regions is not None:
            columns[_REGION_COL] = [f"{i}:{r}" for r in regions]
        obs.append(pd.DataFrame(columns, index=[f"{i}:{name}" for name in t.obs_names]))
        spatial.append(np.asarray(t.obsm["spatial"], float)[:, :2] if "spatial" in t.obsm else None)
    params: dict[str, dict[str, Any]] = {}
    for part in parts:
        dims = {e.shape[1] for e in embs[part]}
        if len(dims) > 1:
            raise ValueError(f"The embeddings `obsm[{part!r}]` of the tables differ in dimension: {sorted(dims)}.")
        each = [_embedding_params(t, part) for t in tables]
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
    X = sparse.vstack(xs, format="csr") if all(sparse.issparse(x) for x in xs) else np.vstack([_dense(x) for x in xs])
    out = ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=genes.copy()))
    if all(s is not None for s in spatial):
        out.obsm["spatial"] = np.vstack(spatial)
    for part in parts:
        out.obsm[part] = np.vstack(embs[part])
        out.uns[_embedding_name(part)] = {"params": params[part]}
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
    P: np.ndarray,
    Y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    alphas: np.ndarray,
    fold_targets: Sequence[np.ndarray] | None = None,
    per_gene: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out error and correlation of ridge regressions for all penalties, one SVD per fold.

    For a fold with centred training features ``P = U S Vᵀ``, the ridge coefficients for penalty ``a`` are
    ``V diag(s / (s² + a)) Uᵀ Y``, so all penalties cost one SVD and a few small products.

    ``fold_targets``: the targets each fold trains on (e.g. smoothed within the fold's training spots,
    :mod:`histoseq.tl._targets`), one array per fold with the rows of its training spots; the held-out
    spots are always scored on ``Y``.

    Returns the mean squared error (pooled over folds, each gene divided by its variance so that all genes
    weigh the same) and the mean Pearson correlation (over folds and genes), one value per penalty; with
    ``per_gene=True``, one row per penalty and one column per gene (their means over genes are the
    pooled values).
    """
    var = Y.var(axis=0)
    var = np.where(var > 0, var, 1.0)
    shape = (len(alphas), Y.shape[1])
    sse = np.zeros(shape)
    count = 0
    corr = np.zeros(shape)
    corr_n = np.zeros(shape)
    for f, (tr, va) in enumerate(folds):
        Y_tr = Y[tr] if fold_targets is None else fold_targets[f]
        p_mean, y_mean = P[tr].mean(axis=0), Y_tr.mean(axis=0)
        U, s, Vt = np.linalg.svd(P[tr] - p_mean, full_matrices=False)
        uty = U.T @ (Y_tr - y_mean)
        a = (P[va] - p_mean) @ Vt.T
        for i, alpha in enumerate(alphas):
            pred = a @ ((s / (s * s + alpha))[:, None] * uty) + y_mean
            sse[i] += (((pred - Y[va]) ** 2) / var).sum(axis=0)
            if len(va) > 1:
                r = _column_pearson(pred, Y[va])
                ok = np.isfinite(r)
                corr[i, ok] += r[ok]
                corr_n[i, ok] += 1
        count += len(va)
    mse = sse / max(count, 1)
    with np.errstate(invalid="ignore"):
        corr = np.where(corr_n > 0, corr / np.maximum(corr_n, 1), np.nan)
    if per_gene:
        return mse, corr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a penalty whose genes are all constant: NaN
        return mse.mean(axis=1), np.nanmean(corr, axis=1)


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


def _validation_choice(
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
    """:func:`_validation_choice`, refused when it leaves no spot to train on or none to validate."""
    val, desc = _validation_choice(
        labels, regions, coords, n, val_groups=val_groups, val_fraction=val_fraction, random_state=random_state
    )
    if val.all() or not val.any():
        raise ValueError("The validation spots for early stopping leave no spot to train on (or none to validate).")
    return val, desc


def _train_plan(
    build: Any,
    train_ds: Any,
    val_ds: Any,
    *,
    seed: int,
    batch_size: int,
    val_batch_size: int,
    progress: bool,
    max_epochs: int,
    accelerator: Any,
    devices: Any,
    strategy: Any,
    patience: int,
    trainer_kwargs: Mapping[str, Any] | None,
    drop_last: bool = False,
) -> Any:
    """Train the plan made by ``build()`` with a Lightning ``Trainer`` and early stopping on ``val_loss``.

    The global torch random state is left alone (forked, then seeded with ``seed`` before ``build`` runs
    and the batches are shuffled), and Lightning's messages are silenced unless ``progress``. The plan
    keeps the best validation weights (``plan.best_state``); it is returned after training.
    """
    import torch
    from lightning.pytorch.callbacks import EarlyStopping
    from torch.utils.data import DataLoader

    from ..models._training import make_trainer, quiet_training

    with torch.random.fork_rng(devices=[]), quiet_training(progress):
        torch.manual_seed(seed)
        plan = build()
        train_dl = DataLoader(
            train_ds,
            batch_size=min(int(batch_size), len(train_ds)),
            shuffle=True,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
        )
        val_dl = DataLoader(val_ds, batch_size=max(1, min(int(val_batch_size), len(val_ds))))
        trainer = make_trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            progress=progress,
            trainer_kwargs=trainer_kwargs,
            num_sanity_val_steps=0,
            callbacks=[EarlyStopping(monitor="val_loss", patience=int(patience), mode="min")],
        )
        trainer.fit(plan, train_dataloaders=train_dl, val_dataloaders=val_dl)
    return plan


def _training_record(
    plan: Any, network: Any, val_desc: str, n_validation: int, seed: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Best weights and provenance of a network trained by :func:`_train_plan`.

    The weights are those of the best validation epoch, or the last ones when none was recorded.
    """
    state = plan.best_state or {k: v.detach().cpu() for k, v in network.state_dict().items()}
    info = {
        "validation": val_desc,
        "n_validation_spots": int(n_validation),
        "best_epoch": int(plan.best_epoch),
        "best_val_loss": float(plan.best_val_loss),
        "epochs_run": len(plan.history),
        "seed": seed,
    }
    return state, info


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
    import torch
    from torch.utils.data import TensorDataset

    from ..models._heads import MLPHead, RegressionPlan
    from ..models._training import training_seed

    n = len(X)
    val, val_desc = _validation_rows(
        labels, regions, coords, n, val_groups=val_groups, val_fraction=val_fraction, random_state=random_state
    )
    mean, scale = _standardise(X)
    y_mean, y_scale = _standardise(Y)
    Xs = ((X - mean) / scale).astype(np.float32)
    Ys = ((Y - y_mean) / y_scale).astype(np.float32)
    seed = training_seed(random_state)
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
    tr = np.flatnonzero(~val)
    va = np.flatnonzero(val)

    def build() -> RegressionPlan:
        net = MLPHead(X.shape[1], Y.shape[1], n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
        return RegressionPlan(net, lr=lr, weight_decay=weight_decay)

    plan = _train_plan(
        build,
        TensorDataset(torch.from_numpy(Xs[tr]), torch.from_numpy(Ys[tr])),
        TensorDataset(torch.from_numpy(Xs[va]), torch.from_numpy(Ys[va])),
        seed=seed,
        batch_size=int(batch_size),
        val_batch_size=max(len(va), 1),
        progress=progress,
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        patience=patience,
        trainer_kwargs=trainer_kwargs,
    )
    state, info = _training_record(plan, plan.network, val_desc, int(val.sum()), seed)
    arrays = {"scaler_mean": mean, "scaler_scale": scale, "target_mean": y_mean, "target_scale": y_scale}
    arrays.update({f"net.{k}": v.numpy().copy() for k, v in state.items()})
    return arrays, config, info


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class ExpressionModel:
    """A trained map from spot embeddings (or, for ``method="cnn"``, the spots' patches) to gene expression.

    Made by :func:`histoseq.tl.fit`; applied by :meth:`predict` (or :func:`histoseq.tl.predict`);
    written to one file by :meth:`save` and read back by :meth:`load` (or :func:`histoseq.tl.load_model`).
    The file holds JSON text and tensors only and is read with ``torch.load(path, weights_only=True)``,
    so loading a model never runs code, and a loaded model predicts exactly what the saved one did.

    Attributes
    ----------
    method
        ``"kernel"``, ``"ridge"``, ``"ridge_hest"``, ``"mlp"``, ``"cnn"`` or ``"contrastive"``.
    genes
        The genes it predicts, in order.
    target_transform
        Transform of the counts it predicts (``"log1p_cp10k"``, ``"log1p"`` or ``None``).
    embedding
        The ``obsm`` key of the embedding it reads (several joined by ``"+"``: their concatenation), and
        :attr:`embedding_params`, the parameters that made it (``uns[name]['params']``; for several, one
        entry per key under ``"parts"``); ``None`` for a ``"cnn"`` model, which reads patches (its
        encoder and patch size are in :attr:`config`).
    provenance
        How it was trained: training groups and spots, penalty and cross-validation scores (ridge), best
        epoch and validation loss (networks).

    """

    def __init__(
        self,
        *,
        method: str,
        genes: Sequence[str],
        target_transform: TargetTransform,
        embedding: str | None,
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
        missing = [a for a in _REQUIRED_ARRAYS[method] if a not in arrays]
        if missing:
            raise ValueError(f"A {method!r} model needs the arrays {missing}.")
        if (embedding is None) != (method in IMAGE_METHODS):
            raise ValueError(f"A {method!r} model reads {'patches' if method in IMAGE_METHODS else 'an embedding'}.")
        self._method = method
        self._genes = [str(g) for g in genes]
        self._target_transform = target_transform
        self._embedding = None if embedding is None else str(embedding)
        self._embedding_params = _jsonable(dict(embedding_params))
        self._n_features = int(n_features)
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._config = _jsonable(dict(config))
        self._provenance = _jsonable(dict(provenance))
        self._network: Any = None

    # -- properties ----------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """``"kernel"``, ``"ridge"``, ``"ridge_hest"``, ``"mlp"``, ``"cnn"`` or ``"contrastive"``."""
        return self._method

    @property
    def uses_images(self) -> bool:
        """Whether the model reads the spots' patches (``"cnn"``) rather than an embedding."""
        return self._method in IMAGE_METHODS

    @property
    def genes(self) -> list[str]:
        """The genes the model predicts, in the order of its outputs."""
        return list(self._genes)

    @property
    def target_transform(self) -> TargetTransform:
        """Transform of the counts that the model predicts."""
        return self._target_transform

    @property
    def embedding(self) -> str | None:
        """The ``obsm`` key of the embedding the model reads (``None`` for a ``"cnn"`` model)."""
        return self._embedding

    @property
    def embedding_params(self) -> dict[str, Any]:
        """Parameters of the embedding the model was trained on (``uns[name]['params']``)."""
        return json.loads(json.dumps(self._embedding_params))

    @property
    def n_features(self) -> int:
        """Dimension of the embedding (of the encoder's output, for a ``"cnn"`` model)."""
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
    def section_norm(self) -> str | None:
        """How the embedding is normalised within each section first: ``"rank"``, ``"standardise"`` or ``None``."""
        return _section_norm_mode(self._config.get("section_norm", False))

    @property
    def alpha(self) -> float | None:
        """Penalty of a ridge or kernel model (``None`` for the other methods)."""
        value = self._provenance.get("alpha")
        return None if value is None else float(value)

    # -- prediction ----------------------------------------------------------------------------------
    def _get_network(self) -> Any:
        if self._network is None:
            if self._method == "cnn":
                from ._fit_cnn import rebuild_network

                self._network = rebuild_network(self._config, len(self._genes), self._arrays)
            elif self._method == "contrastive":
                from ._fit_contrastive import rebuild_heads

                self._network = rebuild_heads(self._config, self._n_features, self._arrays)
            else:
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

    def predict_embeddings(
        self,
        X: np.ndarray,
        *,
        sections: np.ndarray | None = None,
        rows: np.ndarray | None = None,
        batch_size: int = 65536,
    ) -> np.ndarray:
        """Predictions ``(n_spots, n_genes)`` (float32) for an embedding matrix; NaN rows stay NaN.

        A model fitted with ``section_norm`` (``"rank"`` by default in :func:`fit`) first normalises each
        embedding dimension within each section (:func:`~histoseq.tl._fit.rank_sections`), so
        ``X`` should hold whole sections: all spots of one section when ``sections`` is ``None``.

        Parameters
        ----------
        X
            Embeddings, ``(n_spots, n_features)``.
        sections
            Section label of each row (for ``section_norm`` models); ``None``: the rows are one section.
        rows
            Predict only these rows (indices or a boolean mask) of ``X``; each section's statistics still
            come from all of its rows. ``None``: all rows.
        batch_size
            Spots per batch of the networks.

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
        if self.uses_images:
            raise TypeError(
                f"A {self._method!r} model reads the spots' patches, not an embedding: use "
                "`hs.tl.predict(sdata, model)` or `model.predict_patches(images)`."
            )
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self._n_features:
            raise ValueError(
                f"The model reads {self._n_features}-dimensional embeddings ({self._embedding!r}); got shape {X.shape}."
            )
        if self.section_norm:
            X = SECTION_NORMS[self.section_norm](X, sections)
        if rows is not None:
            X = X[np.asarray(rows)]
        out = np.full((len(X), len(self._genes)), np.nan, dtype=np.float32)
        ok = np.isfinite(X).all(axis=1)
        if not ok.any():
            return out
        a = self._arrays
        Z = (X[ok] - a["scaler_mean"]) / a["scaler_scale"]
        if self._method == "kernel":
            from ._fit_kernel import predict_kernel

            out[ok] = predict_kernel(Z, a, self._config)
            return out
        if self._method in ("ridge", "ridge_hest"):
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
        if self._method == "contrastive":
            from ._fit_contrastive import retrieve

            c = self._config
            out[ok] = retrieve(
                np.concatenate(parts),
                a["reference_projection"],
                a["reference_expression"],
                k=c["k"],
                weighting=c["weighting"],
                temperature=c["temperature"],
            )
            return out
        out[ok] = np.concatenate(parts) * a["target_scale"] + a["target_mean"]
        return out

    def predict_patches(
        self, images: np.ndarray, *, tta: bool | None = None, batch_size: int = 128, device: Any = "cpu"
    ) -> np.ndarray:
        """Predictions ``(n_spots, n_genes)`` (float32) of a ``"cnn"`` model for patches.

        Parameters
        ----------
        images
            ``(n, patch_px, patch_px, 3)`` uint8 patches of ``config['patch_size_um']`` µm, as cut by
            :func:`histoseq.pp.extract_patches` with the model's ``patch_size_um`` and ``patch_px``.
        tta
            Average the predictions over the 8 turns and flips of each patch (test-time augmentation);
            ``None``: the model's default (``config['tta']``).
        batch_size
            Patches per batch.
        device
            Torch device to run the network on.

        Returns
        -------
        Predicted (transformed) expression of :attr:`genes`.

        Examples
        --------
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
        >>> model = hs.tl.fit(
        ...     sdata, genes=4, method="cnn", patch_px=32, max_epochs=1, n_hidden=8, progress=False
        ... )
        >>> patches = hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=32, progress=False)
        >>> model.predict_patches(patches.images[:3]).shape
        (3, 4)

        """
        if not self.uses_images:
            raise TypeError(f"A {self._method!r} model reads embeddings: use `predict_embeddings`.")
        from ._fit_cnn import predict_images

        images = np.asarray(images)
        px = int(self._config["patch_px"])
        if images.ndim != 4 or images.shape[1:3] != (px, px) or images.shape[3] < 3 or images.dtype != np.uint8:
            raise ValueError(
                f"The model reads ({px}, {px}, 3) uint8 patches of {self._config['patch_size_um']} µm; got "
                f"{images.dtype} of shape {images.shape}."
            )
        use_tta = bool(self._config.get("tta", True)) if tta is None else bool(tta)
        raw = predict_images(self._get_network(), images, tta=use_tta, batch_size=batch_size, device=device)
        a = self._arrays
        if len(images) == 0:
            return np.zeros((0, len(self._genes)), dtype=np.float32)
        return (raw * a["target_scale"] + a["target_mean"]).astype(np.float32)

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
        'kernel'

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
        c = self._config
        source = (
            f"{c['patch_size_um']:g} µm patches at {c['patch_px']} px"
            if self.uses_images
            else f"{self._embedding!r} ({self._n_features} dims)"
        )
        lines = [
            f"ExpressionModel({self._method!r}): {source} -> {len(self._genes)} genes, target "
            f"{self._target_transform!r}",
        ]
        stopped = f"best epoch {p.get('best_epoch')} (validation: {p.get('validation')})"
        if self._method == "kernel":
            lines.append(
                f"    kernel ridge: {c['kernel']} kernel, gamma={c['gamma']:g}, "
                f"alpha={p.get('alpha', float('nan')):.4g} ({p.get('alpha_rule', '?')}), "
                f"{p.get('n_landmarks', '?')} landmarks"
                + (
                    f", dimensions weighted by expression relevance ** {p['relevance_power']:g}"
                    if p.get("relevance_power")
                    else ""
                )
                + (
                    f", parts weighted {', '.join(f'{w:.2g}' for w in c['part_weights'])}"
                    if c.get("part_weights")
                    else ""
                )
            )
        elif self._method in ("ridge", "ridge_hest"):
            lines.append(
                f"    ridge: alpha={p.get('alpha', float('nan')):.4g} ({p.get('alpha_rule', '?')}), "
                f"{p.get('n_components', '?')} principal components"
            )
        elif self._method == "mlp":
            lines.append(
                f"    mlp: {c['n_layers']} hidden layer(s) of {c['n_hidden']}, dropout {c['dropout']}; {stopped}"
            )
        elif self._method == "cnn":
            weights = f", weights {Path(c['weights']).name}" if c.get("weights") else ""
            lines.append(
                f"    cnn: {c['encoder']} ({c['encoder_dim']} dims{weights}) + {c['n_layers']} hidden layer(s) of "
                f"{c['n_hidden']}; test-time augmentation {'on' if c.get('tta', True) else 'off'}; {stopped}"
            )
        else:
            lines.append(
                f"    contrastive (BLEEP): {c['n_proj']}-d joint space, temperature {c['temperature']:g}; predicts "
                f"the {c['weighting']} of the top {c['k']} of {p.get('n_references', '?')} references; {stopped}"
            )
        if self.section_norm:
            how = "ranked (normal scores)" if self.section_norm == "rank" else "standardised"
            lines.append(f"    embedding {how} within each section")
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

_TRAINING_OPTIONS = {"lr", "weight_decay", "batch_size", "patience", "val_groups", "val_fraction", "trainer_kwargs"}
_METHOD_OPTIONS = {
    "kernel": {
        "kernel",
        "gammas",
        "gamma",
        "alphas",
        "alpha",
        "max_landmarks",
        "alpha_scoring",
        "n_splits",
        "target_neighbors",
        "relevance_power",
        "part_weights",
    },
    "ridge": {"alphas", "alpha", "n_components", "alpha_scoring", "n_splits"},
    "ridge_hest": {"n_components"},
    "mlp": {"n_hidden", "n_layers", "dropout", *_TRAINING_OPTIONS},
    "cnn": {
        "encoder",
        "weights",
        "patch_size_um",
        "patch_px",
        "n_hidden",
        "n_layers",
        "dropout",
        "encoder_lr",
        "flips",
        "stain_jitter",
        "tta",
        *_TRAINING_OPTIONS,
    },
    "contrastive": {"n_proj", "dropout", "temperature", "k", "weighting", *_TRAINING_OPTIONS},
}


def _undo_embeddings(added: list[tuple[Any, str, str, bool, Any]]) -> None:
    """Remove the embeddings that :func:`_ensure_embeddings` added (in memory and on disk), restoring ``uns``."""
    for obj, tkey, name, had_uns, old_uns in reversed(added):
        table = obj.tables[tkey]
        changed = f"X_{name}" in table.obsm or (name in table.uns) != had_uns or table.uns.get(name) is not old_uns
        if not changed:
            continue
        table.obsm.pop(f"X_{name}", None)
        if had_uns:
            table.uns[name] = old_uns
        else:
            table.uns.pop(name, None)
        try:
            store_element(obj, "tables", tkey)
        except Exception as err:  # pragma: no cover - disk errors while cleaning up must not hide the first error
            logger.warning("Could not write table %r back after removing the embedding: %s", tkey, err)


def _ensure_embeddings(
    objects: list[Any],
    table_key: str | None,
    embedding: str,
    embed_kwargs: Mapping[str, Any] | None,
    random_state: int | None,
    progress: bool,
) -> list[tuple[Any, str, str, bool, Any]]:
    """Compute ``obsm[embedding]`` with :func:`histoseq.tl.embed` for the SpatialData objects that lack it.

    The encoder is named by the key (``"X_morphology"`` → ``"morphology"``) or by
    :data:`EMBEDDING_PRESETS`, unless ``embed_kwargs`` gives ``encoder=``. Returns what was added, for
    :func:`_undo_embeddings`; on an error, what was added so far is removed before the error propagates.
    """
    import anndata as ad

    from ._embed import embed, list_encoders

    parts = _embedding_parts(embedding)
    if len(parts) > 1:
        per_part = dict(embed_kwargs or {})
        if any(k not in parts or not isinstance(v, Mapping) for k, v in per_part.items()):
            raise TypeError(
                f"`embedding` has several parts {parts}, so `embed_kwargs` maps parts to their options, e.g. "
                f"`embed_kwargs={{{parts[0]!r}: {{'patch_px': 112}}}}`; got keys {sorted(per_part)}."
            )
        done: list[tuple[Any, str, str, bool, Any]] = []
        try:
            for part in parts:
                done += _ensure_embeddings(objects, table_key, part, per_part.get(part), random_state, progress)
        except BaseException:
            _undo_embeddings(done)
            raise
        return done
    lacking = []
    for obj in objects:
        if isinstance(obj, ad.AnnData):
            continue
        tkey, table = get_table(obj, table_key)
        if embedding not in table.obsm:
            lacking.append((obj, tkey))
    if not lacking:
        return []
    kwargs = dict(embed_kwargs or {})
    name = _embedding_name(embedding)
    for bad in ("sdata", "table_key", "inplace"):
        if bad in kwargs:
            raise TypeError(f"`embed_kwargs` cannot set {bad!r}: fit sets it.")
    if not embedding.startswith("X_") or kwargs.get("key_added", name) != name:
        raise KeyError(
            f"{_missing_embedding_error(embedding, f'Table {lacking[0][1]!r}').args[0]} fit computes a missing "
            "embedding only under a key `X_<name>` (with `key_added=<name>`)."
        )
    kwargs["key_added"] = name
    kwargs = {**EMBEDDING_PRESETS.get(embedding, {}), **kwargs}
    encoder = kwargs.pop("encoder", name)
    if isinstance(encoder, str) and encoder == name and name not in list_encoders():
        raise KeyError(
            f"{_missing_embedding_error(embedding, f'Table {lacking[0][1]!r}').args[0]} {name!r} is not an encoder "
            f"name ({list_encoders()}), so fit cannot compute it: pass `embed_kwargs={{'encoder': ...}}`."
        )
    kwargs.setdefault("random_state", random_state)
    kwargs.setdefault("progress", progress)
    added: list[tuple[Any, str, str, bool, Any]] = []
    try:
        for obj, tkey in lacking:
            table = obj.tables[tkey]
            added.append((obj, tkey, name, name in table.uns, table.uns.get(name)))
            logger.info(
                "Table %r has no `obsm[%r]`: computing it with hs.tl.embed(encoder=%r).", tkey, embedding, encoder
            )
            embed(obj, encoder=encoder, table_key=tkey, **kwargs)
    except BaseException:
        _undo_embeddings(added)
        raise
    return added


def fit(
    sdata: SpatialData | Sequence[SpatialData] | ad.AnnData,
    *,
    genes: int | Sequence[str] = 50,
    method: Method = DEFAULT_METHOD,
    embedding: str | Sequence[str] = DEFAULT_EMBEDDING,
    section_norm: Literal["rank", "standardise"] | bool = "rank",
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
    embed_kwargs: Mapping[str, Any] | None = None,
    **method_kwargs: Any,
) -> ExpressionModel:
    """Learn gene expression from spot embeddings, or from the spots' H&E patches.

    The targets are the ``target_transform`` of the raw counts in ``X``; the inputs are the embeddings in
    ``obsm[embedding]`` (or, for ``method="cnn"``, the patches around the spots). Everything that is
    learnt (gene selection, scaling, principal components, penalty, early stopping) looks at the training
    spots only, so a model trained with ``train=`` can be evaluated honestly on the other sections.

    When ``obsm[embedding]`` is absent from a SpatialData's table, it is computed first with
    :func:`histoseq.tl.embed`, with the encoder named by the key (``"X_morphology"`` → ``"morphology"``,
    ``"X_resnet18"`` → ``"resnet18"``) and the options ``embed_kwargs`` (e.g. ``{"patch_px": 128}``, or
    ``{"encoder": "resnet18", "weights": "ssl.pt"}`` for another key). The default,
    ``"X_morphology_context+X_tissue_position"``, reads two parts: the morphology encoder at 224, 448 and
    800 µm around each spot, and the spot's offsets from the centroid of its tissue along the tissue's
    major and minor axes, which say where it lies in the tissue's organisation
    (``encoder="tissue_position"``; both in :data:`~histoseq.tl._fit.EMBEDDING_PRESETS`). Both come from
    the image alone. With ``method="kernel"`` it was the most accurate embedding on the real-data folds of
    ``benchmarks/accuracy.py`` among those that need no optional extra. So ``hs.tl.fit(sdata)`` then
    ``hs.tl.predict(other, model)`` is a whole workflow.

    Staining, thickness and scanning shift and bend every image feature of a slide, so the embedding
    methods first normalise each dimension of the embedding within each section (the spots element of a
    row, or ``obs[groups]`` for a table that records no regions), at training and again at prediction.
    ``section_norm="rank"`` (the default) replaces each value by the normal score of its rank among the
    section's spots (:func:`~histoseq.tl._fit.rank_sections`), which undoes any monotone distortion;
    ``"standardise"`` (or ``True``) centres and scales (:func:`~histoseq.tl._fit.standardise_sections`);
    ``False`` reads the embedding as it is. Both read images only. Predictions then need whole sections:
    the statistics of a section come from all of its spots, whichever ``spots=`` are predicted.

    The methods:

    - ``"kernel"`` (default): kernel ridge regression on the standardised embedding, with an exponential
      (Laplacian) kernel ``exp(-sqrt(gamma Σ w_j (x_j - y_j)²))`` (``kernel="exponential"``, the default)
      or an RBF kernel ``exp(-gamma Σ w_j (x_j - y_j)²)`` (``"rbf"``). The weights ``w_j`` sum to 1 and
      follow each dimension's relevance: its squared correlation with the main principal components of
      the training spots' expression, raised to ``relevance_power`` (default 2; ``0`` weighs every
      dimension ``1 / d``), so dimensions that follow nothing in the expression hardly move the
      distances. The width (``gammas``, default ``(0.01, 0.03, ..., 3, 10)``) and the penalty
      (``alphas``, as for ridge) are chosen together by the same cross-validation inside the training
      data as for ridge (``alpha_scoring``, ``n_splits``); ``gamma=``/``alpha=`` fix them. The same
      cross-validation weighs the parts of an embedding made of several (``part_weights``: by default all
      alike or, for each part after the first, without it, so that a part that says nothing about the
      training sections' expression is left out; :func:`~histoseq.tl._fit_kernel.default_part_weights`),
      and decides whether the model trains on each training spot's targets averaged over
      its nearest training spots in expression (``target_neighbors``, default ``(1, 10)``; ``1`` = the
      raw targets), which averages out counting noise: each inner fold smooths among its own training
      spots and is scored on raw held-out targets (:mod:`histoseq.tl._targets`). Beyond
      ``max_landmarks`` (3,000) training spots, a Nyström approximation on that many spots drawn at
      random keeps time and memory linear in the number of spots. See
      :mod:`histoseq.tl._fit_kernel`.
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
    - ``"cnn"``: end-to-end training of an image encoder and a head on the patches (as ST-Net and
      HistoSPACE do). The ``patch_size_um`` µm patch around each training spot is cut once at ``patch_px``
      pixels (default 112 µm at 64 px: quick on CPUs) and kept as uint8 in memory (12 kB per spot at
      64 px). The encoder (``encoder="small_cnn"`` by default, or ``"resnet18"``, any network of
      :func:`histoseq.tl.list_encoders` or ``"timm:<name>"``) is random-initialised, or loaded from the
      local state dict ``weights=`` (e.g. written by :func:`histoseq.tl.pretrain_encoder`); an
      :class:`~histoseq.models._heads.MLPHead` (``n_hidden``, ``n_layers``, ``dropout``) follows. It is
      trained like the MLP (standardised targets, MSE, AdamW with ``lr``, ``encoder_lr`` for the encoder,
      ``weight_decay``, ``batch_size``; early stopping as above, default ``patience=10``, ``max_epochs``
      100), with each training patch turned and flipped at random (``flips=True``: tissue has no
      orientation) and, with ``stain_jitter > 0`` (default 0), its haematoxylin and eosin concentrations
      scaled by up to ``± stain_jitter`` and shifted (:func:`histoseq.models._augment.hed_jitter`, against
      stain differences between slides). Prediction averages the 8 turns and flips of each patch
      (``tta=True``, the default stored in the model). Needs SpatialData (the images), not an AnnData;
      ``embedding`` is not used. Spots whose centre is outside their image are left out (with a warning).
    - ``"contrastive"``: BLEEP (Xie et al., 2023). Two projection heads map the standardised embedding
      and the standardised expression into an ``n_proj``-dimensional joint space (L2-normalised), trained
      with BLEEP's symmetric contrastive loss with soft targets (``temperature``; AdamW, ``batch_size``
      spots per batch; early stopping as above). A spot is predicted by retrieval: the ``k`` (default 50)
      training spots whose projected expression is most similar to its projected embedding, averaged
      with weights ``softmax(similarity / temperature)`` (``weighting="softmax"``) or equally
      (``"mean"``). The training spots' projections and transformed expression are stored in the model.
      See :mod:`histoseq.tl._fit_contrastive`.

    Parameters
    ----------
    sdata
        A SpatialData, a list of them (their tables' rows are concatenated; they must share genes and
        embedding), or an AnnData table (not for ``"cnn"``).
    genes
        Gene names, or a number ``n`` of genes to select with :func:`histoseq.tl.select_genes` on the
        training spots (``min_spot_fraction``, ``hvg_flavor``).
    method
        ``"kernel"``, ``"ridge"``, ``"ridge_hest"``, ``"mlp"``, ``"cnn"`` or ``"contrastive"``.
    embedding
        Key of the embedding in ``obsm`` (not used by ``"cnn"``), or several keys (a list, or joined by
        ``"+"``) read as one concatenated embedding, e.g. ``["X_morphology_context", "X_imagenet"]``: the
        hand-crafted features and a CNN's see different things. Each part is computed when absent (as
        above, with ``embed_kwargs[part]``) and recorded with its parameters. The kernel method weighs
        the parts by their share of the distance, whatever their dimensions, the shares chosen by
        cross-validation (``part_weights``, see above; :func:`~histoseq.tl._fit_kernel.kernel_matrix`);
        the other methods read the concatenation. Prediction needs all the parts.
    section_norm
        ``"rank"``, ``"standardise"`` (``True``) or ``False``: how the embedding is normalised within each
        section (see above; not used by ``"cnn"``).
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
        Seed of the PCA solver, the spatial blocks and the networks (initialisation, batches, dropout,
        augmentation).
    progress
        Show progress bars and Lightning's messages.
    max_epochs
        Maximal number of epochs of the networks (default 200; 100 for ``"cnn"``).
    accelerator
        Lightning accelerator of the networks (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
    devices
        Lightning devices of the networks.
    strategy
        Lightning strategy of the networks (e.g. ``"ddp"`` on several GPUs).
    embed_kwargs
        Options of :func:`histoseq.tl.embed` when the embedding is computed (see above); for an embedding of
        several parts, a mapping from part to options, e.g. ``{"X_morphology_context": {"patch_px": 112}}``.
    **method_kwargs
        Options of the method: ``kernel``, ``gammas``, ``gamma``, ``max_landmarks``, ``target_neighbors``,
        ``relevance_power``, ``part_weights`` (kernel); ``alphas``, ``alpha``, ``alpha_scoring``, ``n_splits``
        (kernel and ridge); ``n_components`` (ridge, ``ridge_hest``); ``n_hidden``, ``n_layers``, ``dropout``
        (MLP, cnn); ``encoder``, ``weights``, ``patch_size_um``, ``patch_px``, ``encoder_lr``, ``flips``,
        ``stain_jitter``, ``tta`` (cnn); ``n_proj``, ``dropout``, ``temperature``, ``k``, ``weighting``
        (contrastive); and ``lr``, ``weight_decay``, ``batch_size``, ``patience``, ``val_groups``,
        ``val_fraction``, ``trainer_kwargs`` (all networks).

    Returns
    -------
    The trained :class:`~histoseq.tl.ExpressionModel`. The tables are not modified, except that a missing
    embedding is added (``obsm[embedding]`` and ``uns[name]``, as :func:`histoseq.tl.embed` writes them);
    when the fit fails, embeddings it added are removed again (also from disk for backed objects).

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
    norm = _section_norm_mode(section_norm)
    unknown = sorted(set(method_kwargs) - _METHOD_OPTIONS[method])
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for method {method!r}; it takes {sorted(_METHOD_OPTIONS[method])}."
        )
    if method not in NETWORK_METHODS and max_epochs is not None:
        logger.warning("`max_epochs` only applies to the methods %s; ignored.", list(NETWORK_METHODS))
    images = method in IMAGE_METHODS
    if not images:
        embedding = _embedding_key(embedding)
    is_list = isinstance(sdata, Sequence) and not isinstance(sdata, str)
    objects = list(sdata) if is_list else [sdata]
    if is_list and not objects:
        raise ValueError("`sdata` is an empty list.")
    if images:
        if any(isinstance(o, ad.AnnData) for o in objects):
            raise TypeError(
                f"`method={method!r}` learns from the images, so it needs SpatialData objects (with the H&E images "
                "and the spots), not an AnnData table."
            )
        if embed_kwargs is not None:
            logger.warning("`embed_kwargs` is not used by `method=%r`, which reads the patches.", method)
        from ._fit_cnn import check_options

        check_options(**method_kwargs)
        added: list[tuple[Any, str, str, bool, Any]] = []
    else:
        added = _ensure_embeddings(objects, table_key, embedding, embed_kwargs, random_state, progress)
    try:
        return _fit(
            sdata,
            objects,
            is_list,
            genes=genes,
            method=method,
            embedding=None if images else embedding,
            section_norm=None if images else norm,
            train=train,
            table_key=table_key,
            target_transform=target_transform,
            groups=groups,
            min_spot_fraction=min_spot_fraction,
            hvg_flavor=hvg_flavor,
            random_state=random_state,
            progress=progress,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            method_kwargs=method_kwargs,
        )
    except BaseException:
        _undo_embeddings(added)
        raise


def _fit(
    sdata: Any,
    objects: list[Any],
    is_list: bool,
    *,
    genes: int | Sequence[str],
    method: str,
    embedding: str | None,
    section_norm: str | None,
    train: Any,
    table_key: str | None,
    target_transform: TargetTransform,
    groups: str | None,
    min_spot_fraction: float,
    hvg_flavor: str,
    random_state: int | None,
    progress: bool,
    max_epochs: int | None,
    accelerator: Any,
    devices: Any,
    strategy: Any,
    method_kwargs: dict[str, Any],
) -> ExpressionModel:
    """The body of :func:`fit`, once its options are checked and the embeddings exist."""
    import anndata as ad

    if isinstance(sdata, ad.AnnData):
        table, source = sdata, "the AnnData"
    elif is_list:
        tables = [_as_table(s, table_key) for s in objects]
        table = tables[0] if len(tables) == 1 else _concat_tables(tables, embedding, groups)
        source = f"{len(tables)} SpatialData objects"
    else:
        tkey, table = get_table(sdata, table_key)
        source = f"table {tkey!r}"
    labels = _group_labels(table, groups)
    mask = _train_mask(table, train, groups)
    X_all = None
    if embedding is not None:
        X_all = _embedding_matrix(table, embedding, f"The {source}" if source.startswith("table") else source)
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
        if section_norm:
            X_all = SECTION_NORMS[section_norm](X_all, _section_labels(table, groups))
    else:
        patch_images, patch_params, mask = _training_patches(objects, table_key, mask, method_kwargs, progress)
    rows = np.flatnonzero(mask)
    gene_list = _resolve_genes(table, genes, mask, min_spot_fraction=min_spot_fraction, flavor=hvg_flavor)
    cols = table.var_names.get_indexer(gene_list)
    Y = transform_counts(table.X[rows], target_transform, cols)
    lab = labels[rows] if labels is not None else None
    regions = _region_labels(table)
    reg = regions[rows] if regions is not None else None
    coords = np.asarray(table.obsm["spatial"], float)[rows, :2] if "spatial" in table.obsm else None
    X = X_all[rows] if X_all is not None else None
    logger.info(
        "Fitting a %s model: %d spots × %s -> %d genes (%s).",
        method,
        len(rows),
        "patches" if X is None else f"{X.shape[1]} embedding dims",
        len(gene_list),
        target_transform,
    )
    training = {
        "random_state": random_state,
        "progress": progress,
        "max_epochs": max_epochs,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
    }
    if method == "mlp":
        arrays, config, info = _fit_mlp(X, Y, lab, reg, coords, **training, **method_kwargs)
    elif method == "contrastive":
        from ._fit_contrastive import fit_contrastive

        arrays, config, info = fit_contrastive(X, Y, lab, reg, coords, **training, **method_kwargs)
    elif method == "cnn":
        from ._fit_cnn import fit_cnn

        arrays, config, info = fit_cnn(
            patch_images, Y, lab, reg, coords, patch_params=patch_params, **training, **method_kwargs
        )
    elif method == "kernel":
        from ._fit_kernel import DEFAULT_RELEVANCE_POWER, fit_kernel
        from ._targets import neighbor_genes, neighbor_grid

        blocks = _embedding_dims(table, embedding) if len(_embedding_parts(embedding)) > 1 else None
        expression = None
        smoothing = neighbor_grid(method_kwargs.get("target_neighbors"), len(rows)) != [1]
        power = method_kwargs.get("relevance_power")
        if smoothing or (DEFAULT_RELEVANCE_POWER if power is None else power):
            counts = table.X[rows]
            # the training spots' expression: each one's neighbours for target smoothing are found in it, and
            # the embedding's dimensions are weighted by how well they follow it
            expression = transform_counts(counts, "log1p_cp10k", neighbor_genes(counts), check=False)
        arrays, config, info = fit_kernel(
            X, Y, lab, reg, coords, random_state=random_state, blocks=blocks, expression=expression, **method_kwargs
        )
    else:
        arrays, config, info = _fit_ridge(
            X, Y, lab, reg, coords, hest=method == "ridge_hest", random_state=random_state, **method_kwargs
        )
    if X is not None:
        config["section_norm"] = section_norm or False
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
        embedding_params=_embedding_params(table, embedding) if embedding is not None else {},
        n_features=X.shape[1] if X is not None else config["encoder_dim"],
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


def _training_patches(
    objects: list[Any], table_key: str | None, mask: np.ndarray, options: Mapping[str, Any], progress: bool
) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Patches of the training spots of the (concatenated) tables; spots without a patch leave the mask."""
    from ._fit_cnn import DEFAULT_PATCH_PX, DEFAULT_PATCH_SIZE_UM, spot_patches

    size_um = float(options.get("patch_size_um", DEFAULT_PATCH_SIZE_UM))
    px = int(options.get("patch_px", DEFAULT_PATCH_PX))
    mask = mask.copy()
    parts, params = [], {}
    offset = 0
    for obj in objects:
        tkey, table = get_table(obj, table_key)
        local = np.flatnonzero(mask[offset : offset + table.n_obs])
        if len(local):
            imgs, found, p = spot_patches(obj, tkey, local, patch_size_um=size_um, patch_px=px, progress=progress)
            params = {**p, "images": {**params.get("images", {}), **p.get("images", {})}}
            if not found.all():
                logger.warning(
                    "%d training spot(s) of table %r have no patch (centre outside the image); they are left out.",
                    int((~found).sum()),
                    tkey,
                )
                mask[offset + local[~found]] = False
            parts.append(imgs[found])
        offset += table.n_obs
    if not mask.any():
        raise ValueError("No training spot has a patch: are the spots on their images?")
    return np.concatenate(parts), params, mask


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
    key = model.embedding
    parts = _embedding_parts(key)
    trained = model.embedding_params
    params_of = {key: trained} if len(parts) == 1 else dict(trained.get("parts", {}))
    for part in parts:
        _ensure_prediction_part(sdata, tkey, part, params_of.get(part, {}))
    table = sdata.tables[tkey]
    X = _embedding_matrix(table, key, f"Table {tkey!r}")
    if X.shape[1] != model.n_features:
        raise ValueError(
            f"`obsm[{key!r}]` of table {tkey!r} has {X.shape[1]} dimensions, but the model was trained on "
            f"{model.n_features}: it was made by another encoder. Recompute it with the model's encoder "
            f"({trained.get('encoder', 'see model.embedding_params')})."
        )
    for part in parts:
        here, there = _embedding_params(table, part), params_of.get(part, {})
        if here and there and here != there:
            if "encoder" in here and "encoder" in there and here["encoder"] != there["encoder"]:
                raise ValueError(
                    f"`obsm[{part!r}]` of table {tkey!r} was made by encoder {here['encoder']!r}, but the model was "
                    f"trained on encoder {there['encoder']!r}. Recompute the embedding with the model's encoder."
                )
            diff = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k) and k not in _RUN_PARAMS)
            if diff:
                logger.warning(
                    "The embedding `obsm[%r]` was made with other parameters than the model's training embedding "
                    "(differing: %s); predictions may be off.",
                    part,
                    diff,
                )
    return X


def _ensure_prediction_part(sdata: SpatialData, tkey: str, key: str, params: Mapping[str, Any]) -> None:
    """Compute ``obsm[key]`` with :func:`histoseq.tl.embed` and the training ``params`` when the table lacks it."""
    if key in sdata.tables[tkey].obsm:
        return
    embed = _find_embed()
    if embed is None or "encoder" not in params:
        raise _missing_embedding_error(key, f"Table {tkey!r}")
    accepted = inspect.signature(embed).parameters
    skip = {"sdata", "table_key", "inplace", "spots", "image_key", "shapes_key", "progress"}
    kwargs = {k: v for k, v in params.items() if k in accepted and k not in skip}
    logger.info("Table %r has no `obsm[%r]`: computing it with hs.tl.embed(encoder=%r).", tkey, key, params["encoder"])
    embed(sdata, table_key=tkey, **kwargs)
    if key not in sdata.tables[tkey].obsm:
        raise _missing_embedding_error(key, f"Table {tkey!r} (after hs.tl.embed)")


def _prediction_info(model: ExpressionModel, **extra: Any) -> dict[str, Any]:
    p = model.provenance
    info = {
        "genes": model.genes,
        "target_transform": "none" if model.target_transform is None else model.target_transform,
        "method": model.method,
        "embedding": model.embedding or "",
        "section_norm": model.section_norm or "none",
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
    tta: bool | None = None,
    device: Any = "cpu",
) -> ad.AnnData | None:
    """Predict expression from the embeddings (or the patches) of a table's spots.

    The embedding ``obsm[model.embedding]`` is read from the table; when it is absent and
    :func:`histoseq.tl.embed` is available, it is computed first with the encoder recorded in the model
    (and kept in the table). A table whose embedding was made by another encoder is refused.

    A ``"cnn"`` model reads images instead: the patches of its ``patch_size_um`` and ``patch_px`` are cut
    around the spots (:func:`histoseq.pp.extract_patches`) and run through its network, averaged over the
    8 turns and flips of each patch unless ``tta=False``; no embedding is needed. Spots whose centre lies
    outside their image get NaN.

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
    tta
        ``"cnn"`` models: test-time augmentation; ``None``: the model's default (``model.config['tta']``).
    device
        ``"cnn"`` models: the torch device that runs the network.

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
    if model.uses_images:
        from ._fit_cnn import spot_patches

        c = model.config
        images, found, _ = spot_patches(
            sdata, tkey, rows, patch_size_um=c["patch_size_um"], patch_px=c["patch_px"], progress=False
        )
        pred = np.full((len(rows), len(model.genes)), np.nan, dtype=np.float32)
        pred[found] = model.predict_patches(images[found], tta=tta, device=device)
        use_tta = bool(c.get("tta", True)) if tta is None else bool(tta)
        extra: dict[str, Any] = {
            "encoder": c["encoder"],
            "patch_size_um": c["patch_size_um"],
            "patch_px": c["patch_px"],
            "tta": use_tta,
        }
        missing_what = "patch (centre outside the image)"
    else:
        X = _prediction_embedding(sdata, tkey, model)
        table = sdata.tables[tkey]
        sections = _section_labels(table, model.provenance.get("groups")) if model.section_norm else None
        pred = model.predict_embeddings(X, sections=sections, rows=rows)
        extra, missing_what = {}, "finite embedding"
    table = sdata.tables[tkey]
    n_nan = int(np.isnan(pred).all(axis=1).sum())
    if n_nan:
        logger.warning("%d spot(s) have no %s; their predictions are NaN.", n_nan, missing_what)
    has_genes = all(g in table.var_names for g in model.genes)
    info = _prediction_info(model, n_spots=len(rows), source_table=tkey, **extra)

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

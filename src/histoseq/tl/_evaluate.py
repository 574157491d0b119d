"""Honest evaluation of expression predictions: per-gene scores by section, and cross-validation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, select_rows, store_element
from ._cohort import open_slides
from ._data import (
    embedding_key,
    embedding_matrix,
    group_labels,
    section_labels,
    transform_counts,
    warn_if_not_counts,
)
from ._fit import DEFAULT_EMBEDDING, DEFAULT_METHOD, ExpressionModel, fit, predict, views_of
from ._inputs import ensure_embeddings
from ._metrics import METRICS, gene_scores, log_depth, noise_ceiling
from ._prediction import check_prediction_key, prediction_record, prediction_table, read_predictions
from .methods import get_method

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Array layer
# --------------------------------------------------------------------------------------------------


def _score_table(
    pred: np.ndarray,
    truth: np.ndarray,
    depth: np.ndarray,
    genes: Sequence[str],
    labels: np.ndarray | None,
) -> pd.DataFrame:
    """Tidy scores: one row per gene and section, plus the section ``"all"`` (all spots pooled)."""
    import pandas as pd

    parts = []
    sections = [] if labels is None else list(dict.fromkeys(labels.tolist()))
    for section in [*sections, "all"]:
        rows = np.ones(len(pred), bool) if section == "all" else labels == section
        s = gene_scores(pred[rows], truth[rows], depth[rows])
        parts.append(
            pd.DataFrame(
                {"section": section, "gene": list(genes), "n_spots": s["n_spots"], **{m: s[m] for m in METRICS}}
            )
        )
    return pd.concat(parts, ignore_index=True)


def _summary(scores: pd.DataFrame) -> dict[str, Any]:
    """Means and medians over genes of the pooled (``"all"``) scores, and mean Pearson per section."""
    pooled = scores[scores["section"] == "all"]
    r = pooled["pearson"].to_numpy(float)
    out: dict[str, Any] = {
        "n_genes": len(pooled),
        "n_spots": int(pooled["n_spots"].max()) if len(pooled) else 0,
        "pearson_mean": _nan_stat(np.nanmean, r),
        "pearson_median": _nan_stat(np.nanmedian, r),
        "n_genes_pearson_positive": int(np.sum(r > 0)),
        "spearman_mean": _nan_stat(np.nanmean, pooled["spearman"].to_numpy(float)),
        "mse_mean": _nan_stat(np.nanmean, pooled["mse"].to_numpy(float)),
        "pearson_partial_depth_mean": _nan_stat(np.nanmean, pooled["pearson_partial_depth"].to_numpy(float)),
    }
    per_section = scores[scores["section"] != "all"].groupby("section", sort=False)["pearson"]
    out["pearson_mean_by_section"] = {str(k): _nan_stat(np.nanmean, v.to_numpy(float)) for k, v in per_section}
    return out


def _nan_stat(fn: Any, values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(fn(values)) if values.size else float("nan")


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------


def _transform_from_uns(value: Any) -> str | None:
    return None if value in (None, "none", "None", "") else str(value)


def evaluate(
    sdata: SpatialData | ad.AnnData,
    *,
    predicted: str = "predicted",
    table_key: str | None = "table",
    spots: Any = None,
    groups: str | None = "sample_id",
    key_added: str | None = None,
    ceiling: bool = False,
    layer: str | None = None,
) -> pd.DataFrame:
    """Score predicted expression against the measured counts, gene by gene and section by section.

    The predictions are the table ``predicted`` that :func:`histoseq.tl.predict` writes (matched to the
    measured table's spots by ``obs_names``). The truth is the model's target transform (recorded in
    ``uns[predicted]['target_transform']``) of the counts in ``X``, so predictions and truth are on the same
    scale. For each gene, over the chosen spots of each section (``obs[groups]``) and over all of them
    pooled (section ``"all"``):

    - ``pearson``: Pearson correlation of prediction and truth;
    - ``spearman``: Spearman rank correlation;
    - ``mse``: mean squared error (on the transformed scale);
    - ``pearson_partial_depth``: Pearson correlation after regressing the log total counts of each spot
      (``log1p`` of the sum over all genes) out of both prediction and truth. An image predicts
      cellularity (dense tissue, many nuclei), and cellularity predicts sequencing depth: dense spots
      yield more transcripts of nearly every gene. A model can therefore score well by predicting
      depth alone, even for genes whose normalised expression it does not know; the partial correlation
      removes what depth explains and keeps what the image says beyond it. With ``target_transform=None``
      or ``"log1p"`` (no depth normalisation), the gap between the two scores is the share of the
      raw score that is depth.

    With ``ceiling=True``, also ``pearson_ceiling``: the estimated highest Pearson r that any prediction
    could reach on those spots, given the counting noise of the measurement (:func:`noise_ceiling`, from
    two random halves of each spot's molecules). It needs raw integer counts. A mean r of 0.15 means little
    on its own; 0.15 against a ceiling of 0.4 says the model finds a good part of what the data can show.

    A gene constant over a section (in truth or prediction) gets NaN correlations there, not an error.
    Scores on training spots are optimistic: evaluating sections that the model was trained on is allowed
    but logged as a warning, and flagged in the ``in_training`` column.

    Parameters
    ----------
    sdata
        The SpatialData (or its table) holding the predictions and the counts.
    predicted
        The predictions: the table written by :func:`histoseq.tl.predict` (``key_added``), or a DataFrame in
        ``obsm`` (``predict(into_table=True)``) or a layer of the measured table (:func:`histoseq.tl.cross_validate`
        with ``key_added``; predictions written by histoseq before 0.4) of that name.
    table_key
        The measured table.
    spots
        Spots to score: ``None`` (every spot with a prediction), a boolean mask, names or positions.
    groups
        Column of ``obs`` with section labels, scored separately; ``None`` for the pooled score only.
    key_added
        Prefix of the written scores (default: ``predicted``).
    ceiling
        Also estimate each gene's noise ceiling (``pearson_ceiling``; five random splits, seed 0).
    layer
        Former name of ``predicted``.

    Returns
    -------
    A tidy :class:`pandas.DataFrame` with one row per section and gene (``section``, ``gene``,
    ``n_spots``, ``pearson``, ``spearman``, ``mse``, ``pearson_partial_depth``, ``in_training``), the
    pooled rows having ``section == "all"``. Also sets ``table.var[f"{key}_pearson"]``,
    ``[f"{key}_spearman"]``, ``[f"{key}_mse"]`` and ``[f"{key}_pearson_partial_depth"]`` (pooled scores;
    NaN for genes without predictions; with ``ceiling=True`` also ``[f"{key}_pearson_ceiling"]``) and
    ``table.uns[f"{key}_scores"]`` (``pearson_mean``,
    ``pearson_median``, ``n_genes_pearson_positive``, ``spearman_mean``, ``mse_mean``,
    ``pearson_partial_depth_mean``, ``n_genes``, ``n_spots``, ``pearson_mean_by_section``, ``params``; with
    ``ceiling=True`` also ``pearson_ceiling_mean``),
    with ``key = key_added or predicted``, in the measured table.

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=10, embedding="X_demo", train=["section0", "section1"], progress=False)
    >>> hs.tl.predict(sdata, model, spots=(t.obs["sample_id"] == "section2").to_numpy())
    >>> scores = hs.tl.evaluate(sdata)
    >>> sorted(scores["section"].unique())
    ['all', 'section2']
    >>> "predicted_pearson" in t.var
    True

    """
    if layer is not None:  # the name of this argument before predictions became tables of their own
        predicted = layer
    tkey, table, pred_all, info = read_predictions(sdata, table_key, predicted)
    if "target_transform" not in info:
        raise ValueError(
            f"The predictions {predicted!r} do not record their `target_transform` (as hs.tl.predict does)."
        )
    genes = [str(g) for g in np.asarray(info["genes"]).tolist()]
    cols = table.var_names.get_indexer(genes)
    if (cols < 0).all():
        raise ValueError(
            f"The table has none of the genes of the predictions {predicted!r} (an H&E-only slide?): there is no "
            "measured expression to evaluate them against."
        )
    if (cols < 0).any():
        raise KeyError(
            f"Genes of the predictions {predicted!r} are not measured in the table: {np.asarray(genes)[cols < 0][:10]}."
        )
    transform = _transform_from_uns(info["target_transform"])
    labels = group_labels(table, groups)
    if spots is None:
        rows = np.flatnonzero(np.isfinite(pred_all).any(axis=1))
        if rows.size == 0:
            raise ValueError(f"The predictions {predicted!r} hold no finite value for the table's spots.")
    else:
        rows = select_rows(table.n_obs, table.obs_names, spots)
        if rows.size == 0:
            raise ValueError("`spots` selects no spot.")
    counts = table.X[rows]
    truth = transform_counts(counts, transform, cols)  # raises on NaN counts, before anything is written
    warn_if_not_counts(counts, transform, stacklevel=2)
    scores = _score_table(pred_all[rows], truth, log_depth(counts), genes, None if labels is None else labels[rows])
    metrics = list(METRICS)
    if ceiling:
        sub_labels = None if labels is None else labels[rows]
        parts = []
        for section in scores["section"].unique():  # in the order of the table: sections, then "all"
            mask = slice(None) if section == "all" else sub_labels == section
            parts.append(noise_ceiling(counts[mask], transform, cols))  # raises on non-integer counts
        scores["pearson_ceiling"] = np.concatenate(parts)
        metrics.append("pearson_ceiling")

    # a list, or an array of numpy's variable-width strings when the table was read back from zarr
    trained_on = {str(g) for g in np.asarray(info.get("train_groups", [])).tolist()}
    same_groups = groups is not None and str(info.get("groups", "")) == groups
    if same_groups:
        scores["in_training"] = [
            bool(trained_on & set(labels[rows])) if s == "all" else s in trained_on for s in scores["section"]
        ]
        overlap = sorted(trained_on & set(labels[rows]))
        if overlap:
            logger.warning(
                "Evaluating spots of %s, which the model was trained on: their scores are optimistic.", overlap
            )
    else:
        scores["in_training"] = False

    key = key_added or predicted
    pooled = scores[scores["section"] == "all"].set_index("gene")
    for m in metrics:
        col = np.full(table.n_vars, np.nan)
        col[cols] = pooled.loc[genes, m].to_numpy(float)
        table.var[f"{key}_{m}"] = col
    summary = _summary(scores)
    if ceiling:
        summary["pearson_ceiling_mean"] = _nan_stat(np.nanmean, pooled["pearson_ceiling"].to_numpy(float))
    summary["params"] = {"predicted": predicted, "groups": groups or "", "target_transform": transform or "none"}
    table.uns[f"{key}_scores"] = summary
    if tkey is not None:
        store_element(sdata, "tables", tkey)
    logger.info(
        "Scored %d genes on %d spots: mean Pearson %.3f; added var['%s_pearson'] etc. and uns['%s_scores'].",
        len(genes),
        len(rows),
        summary["pearson_mean"],
        key,
        key,
    )
    return scores


# --------------------------------------------------------------------------------------------------
# cross_validate
# --------------------------------------------------------------------------------------------------


@dataclass
class CrossValidation:
    """Results of :func:`histoseq.tl.cross_validate`.

    Attributes
    ----------
    scores
        One row per fold and gene: ``fold``, ``test_group``, ``gene``, ``n_spots``, ``pearson``,
        ``spearman``, ``mse``, ``pearson_partial_depth`` (on the held-out group's spots).
    summary
        One row per fold: ``fold``, ``test_group``, ``n_train_spots``, ``n_test_spots``, ``n_genes``,
        ``alpha`` (ridge) or ``best_epoch`` (MLP), ``pearson_mean``, ``pearson_median``,
        ``n_genes_pearson_positive``, ``spearman_mean``, ``mse_mean``, ``pearson_partial_depth_mean``.
    params
        The options of the run.
    models
        The model of each fold when ``keep_models=True``, else ``None``.

    """

    scores: pd.DataFrame
    summary: pd.DataFrame
    params: dict[str, Any]
    models: list[ExpressionModel] | None = field(default=None, repr=False)

    @property
    def mean_pearson(self) -> float:
        """Mean over folds of the mean Pearson over genes."""
        return float(np.nanmean(self.summary["pearson_mean"].to_numpy(float)))

    def __repr__(self) -> str:
        s = self.summary["pearson_mean"].to_numpy(float)
        return (
            f"CrossValidation: {len(self.summary)} folds leaving out one {self.params['groups']!r} "
            f"({self.params['method']} on {self.params['embedding']!r}); mean Pearson over genes "
            f"{np.nanmean(s):.3f} ± {np.nanstd(s):.3f} across folds. See `.scores` (per fold and gene) "
            "and `.summary` (per fold)."
        )


def _write_fold_predictions(sdata: SpatialData, tkey: str, key: str, fold_preds: list, groups: str) -> None:
    """The held-out predictions of every fold as one table of predictions ``key`` (genes: the union of the folds')."""
    table = sdata.tables[tkey]
    genes = [g for g in table.var_names if any(g in m.genes for _, _, _, m in fold_preds)]
    where = {g: i for i, g in enumerate(genes)}
    pred = np.full((table.n_obs, len(genes)), np.nan, dtype=np.float32)
    for test, _, p, model in fold_preds:
        pred[np.ix_(test, [where[g] for g in model.genes])] = p
    rows = np.sort(np.concatenate([test for test, _, _, _ in fold_preds]))
    info = prediction_record(fold_preds[0][3], n_spots=len(rows), source_table=tkey)
    info.update(genes=genes, train_groups=[], cross_validated=True, cv_groups=groups)
    info.pop("alpha", None)
    store_element(sdata, "tables", key, prediction_table(table, rows, pred[rows], genes, key, info))
    logger.info("Added the held-out predictions of %d folds as table %r.", len(fold_preds), key)


def _check_donor_leakage(labels: np.ndarray, donors: np.ndarray, groups: str, donor_key: str) -> None:
    problems = []
    for g in np.unique(labels):
        held = labels == g
        shared = sorted(set(donors[held]) & set(donors[~held]))
        if shared:
            problems.append(f"holding out {g!r} leaves donor(s) {shared} in training")
    if problems:
        raise ValueError(
            f"Leave-one-{groups!r}-out would put sections of the same donor on both sides of a split ("
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + f"). Donor effects would leak into the scores: group the folds by donor (`groups={donor_key!r}`)."
        )


#: The ``obs`` column of donor (patient, animal) labels that the readers fill.
DONOR_KEY = "donor_id"


def _default_groups(table: Any) -> str:
    """What :func:`cross_validate` holds out by default: donors when the table has several, else sections."""
    if DONOR_KEY in table.obs:
        n_donors = table.obs[DONOR_KEY].nunique()
        if n_donors >= 2:
            logger.info("Cross-validating by donor (obs[%r], %d donors).", DONOR_KEY, n_donors)
            return DONOR_KEY
        logger.warning(
            "All spots come from one donor (obs[%r]): the folds hold out sections of that donor, which flatters "
            "the scores a new patient would get.",
            DONOR_KEY,
        )
    return "sample_id"


def cross_validate(
    sdata: SpatialData | str | Sequence[str],
    *,
    groups: str | None = None,
    donor_key: str | None = None,
    genes: int | Sequence[str] = 50,
    method: str = DEFAULT_METHOD,
    embedding: str | Sequence[str] = DEFAULT_EMBEDDING,
    table_key: str | None = "table",
    target_transform: str | None = "log1p_cp10k",
    key_added: str | None = None,
    keep_models: bool = False,
    random_state: int | None = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> CrossValidation:
    """Leave-one-group-out cross-validation of an expression model, leakage-free by construction.

    For each value of ``obs[groups]`` (a donor by default, or a section), a model is fitted by
    :func:`histoseq.tl.fit` with ``train=`` the other groups, so that everything learnt (gene selection,
    scaling, principal components, penalty, early stopping) sees the training groups only; it predicts
    the held-out group, which is scored as in :func:`histoseq.tl.evaluate`. With ``genes=n`` each fold
    selects its own genes.

    Sections of one donor share biology and handling; a fold that trains on one section of a donor and
    tests on another overestimates how the model does on a new patient. With ``donor_key``, such a split
    is refused unless the folds are the donors themselves (``groups == donor_key``).

    Parameters
    ----------
    sdata
        The SpatialData, with counts in the table's ``X`` and the embedding in ``obsm[embedding]``; or the paths
        of SpatialData zarr stores, opened lazily (images stay on disk) and concatenated
        (:func:`histoseq.io.concatenate`; ``key_added`` then needs that object: concatenate them yourself).
    groups
        Column of ``obs`` whose values are held out one at a time. Default: ``"donor_id"`` (which the readers
        fill) when the table has spots of two or more donors, so that every fold predicts a donor it was
        not trained on; else ``"sample_id"`` (sections), with a warning when they all come from one donor.
    donor_key
        Column of ``obs`` with donor labels, to check that no donor is on both sides of a split.
    genes
        Gene names, or the number of genes each fold selects on its training spots.
    method
        Any method of :func:`histoseq.tl.fit` (default ``"kernel"``).
    embedding
        Key of the embedding in ``obsm`` (or several, as in :func:`histoseq.tl.fit`). When the table lacks
        it, it is computed first for all spots, as
        :func:`histoseq.tl.fit` does (frozen encoders learn nothing from the data, so this leaks nothing;
        ``embed_kwargs=`` passes options). Ignored by ``method="cnn"``, which reads the patches.
    table_key
        The table.
    target_transform
        Transform of the counts (see :func:`histoseq.tl.fit`).
    key_added
        When given, write the held-out predictions of all folds as the table ``key_added`` (as
        :func:`histoseq.tl.predict` does; a gene that some folds did not select is NaN on their spots), ready
        for :func:`histoseq.tl.evaluate`. By default nothing is written.
    keep_models
        Keep each fold's model in the result.
    random_state
        Seed passed to :func:`histoseq.tl.fit`.
    progress
        Show a progress bar over folds.
    **fit_kwargs
        Further options of :func:`histoseq.tl.fit` (``min_spot_fraction``, ``max_epochs``, ``alphas``, ...).

    Returns
    -------
    A :class:`CrossValidation` with ``scores`` (per fold and gene), ``summary`` (per fold), ``params``
    and optionally ``models``. With ``key_added``, also adds the table ``sdata.tables[key_added]``.

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> cv = hs.tl.cross_validate(sdata, genes=10, embedding="X_demo", progress=False)  # by donor
    >>> cv.summary["test_group"].tolist()
    ['donor0', 'donor1']
    >>> by_section = hs.tl.cross_validate(sdata, groups="sample_id", genes=10, embedding="X_demo", progress=False)
    >>> by_section.summary["test_group"].tolist()
    ['section0', 'section1', 'section2']

    """
    import pandas as pd
    from tqdm.auto import tqdm

    for name in ("train", "spots"):
        if name in fit_kwargs:
            raise TypeError(f"`{name}` is set by cross_validate for each fold; it cannot be passed.")
    sdata = open_slides(sdata)
    if isinstance(sdata, list):  # slides in zarr stores (images stay on disk): one table over all of them
        from ..io import concatenate

        if key_added is not None:
            raise ValueError(
                "`key_added` writes the held-out predictions into a SpatialData, and paths give none to write "
                "into: open and concatenate the stores first (`hs.io.concatenate([sd.read_zarr(p) for p in "
                "paths])`) and pass that object, or leave `key_added=None`."
            )

        sdata = concatenate(sdata, table_key=table_key or "table")
    tkey, table = get_table(sdata, table_key)
    if groups is None:
        groups = _default_groups(table)
    labels = group_labels(table, groups)
    assert labels is not None
    uniq = list(dict.fromkeys(labels.tolist()))
    if len(uniq) < 2:
        raise ValueError(f"Cross-validation needs at least two values of obs[{groups!r}], found {uniq}.")
    if donor_key is not None and donor_key != groups:
        donors = group_labels(table, donor_key)
        assert donors is not None
        _check_donor_leakage(labels, donors, groups, donor_key)
    if key_added is not None:
        check_prediction_key(sdata, key_added, tkey, overwrite=False)
    if get_method(method).reads != "embedding":  # e.g. a network that reads the patches
        X_emb = None
    else:  # a frozen embedding learns nothing from the data: computing it for all spots at once leaks nothing
        embedding = embedding_key(embedding)
        ensure_embeddings([sdata], tkey, embedding, fit_kwargs.pop("embed_kwargs", None), random_state, progress)
        table = sdata.tables[tkey]
        X_emb = embedding_matrix(table, embedding, f"Table {tkey!r}")
        # the scan views of every spot, once for all folds (each fold trains on its own spots' views only)
        views = views_of(
            fit_kwargs.get("augment", "auto"),
            get_method(method),
            [sdata],
            True,
            embedding,
            None,
            tkey,
            groups,
            progress,
        )
        if views is not None:
            fit_kwargs["augment"] = views

    logger.info("Cross-validating a %s model over %d values of obs[%r].", method, len(uniq), groups)
    score_parts, summary_rows, models, fold_preds = [], [], [], []
    for i, g in enumerate(tqdm(uniq, desc="cross-validation folds", disable=not progress)):
        test = np.flatnonzero(labels == g)
        model = fit(
            sdata,
            genes=genes,
            method=method,
            embedding=embedding,
            train=[u for u in uniq if u != g],
            table_key=tkey,
            target_transform=target_transform,
            groups=groups,
            random_state=random_state,
            progress=False,
            **fit_kwargs,
        )
        cols = table.var_names.get_indexer(model.genes)
        if X_emb is None:
            pred = np.asarray(predict(sdata, model, table_key=tkey, spots=test, inplace=False).X, dtype=np.float64)
        else:
            sections = section_labels(table, groups) if model.section_norm else None
            pred = model.predict_embeddings(X_emb, sections=sections, rows=test).astype(np.float64)
        counts = table.X[test]
        truth = transform_counts(counts, model.target_transform, cols)
        s = gene_scores(pred, truth, log_depth(counts))
        part = pd.DataFrame(
            {"fold": i, "test_group": g, "gene": model.genes, "n_spots": s["n_spots"], **{m: s[m] for m in METRICS}}
        )
        score_parts.append(part)
        fold_summary = _summary(part.assign(section="all"))
        p = model.provenance
        summary_rows.append(
            {
                "fold": i,
                "test_group": g,
                "n_train_spots": p["n_train_spots"],
                "n_test_spots": len(test),
                "n_genes": len(model.genes),
                **({"alpha": model.alpha} if model.alpha is not None else {"best_epoch": p.get("best_epoch")}),
                **{k: v for k, v in fold_summary.items() if k not in ("n_genes", "n_spots", "pearson_mean_by_section")},
            }
        )
        if keep_models:
            models.append(model)
        if key_added is not None:
            fold_preds.append((test, cols, pred, model))
    scores = pd.concat(score_parts, ignore_index=True)
    summary = pd.DataFrame(summary_rows)
    params = {
        "groups": groups,
        "donor_key": donor_key,
        "genes": genes if isinstance(genes, int) else list(genes),
        "method": method,
        "embedding": embedding,
        "target_transform": target_transform,
        "random_state": random_state,
        **{k: v for k, v in fit_kwargs.items() if isinstance(v, int | float | str | bool)},
    }
    if key_added is not None:
        _write_fold_predictions(sdata, tkey, key_added, fold_preds, groups)
    result = CrossValidation(scores=scores, summary=summary, params=params, models=models if keep_models else None)
    logger.info("Cross-validation done: %r", result)
    return result

"""Classes of spots defined by expression, and how well a map of classes agrees with them.

- :func:`expression_classes`: a spot belongs to a gene's class where the gene is highly expressed (above a
  quantile of the training spots), to ``"tissue"`` otherwise: the labels that
  :func:`histoseq.tl.fit_classifier` learns from the image;
- :func:`dice`: per-class Dice coefficients and the confusion matrix of two class columns of a table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, select_rows, store_element
from ._data import as_table, group_labels, train_mask, transform_counts

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: The class of spots high in none of the genes, and that of the glass (off-tissue tiles).
TISSUE, BACKGROUND = "tissue", "background"


def train_masks(tables: list[ad.AnnData], train: Any, groups: str | None) -> list[np.ndarray]:
    """The training rows of each table: ``train`` as in :func:`histoseq.tl.fit` (a boolean mask runs over all rows).

    ``None``: all rows; values of ``obs[groups]``: the rows of those groups in every table; a boolean mask:
    one value per row of the tables, in order.
    """
    if len(tables) == 1:
        return [train_mask(tables[0], train, groups)]
    if train is None:
        return [np.ones(t.n_obs, dtype=bool) for t in tables]
    arr = np.asarray([train] if isinstance(train, str) else train)
    if arr.dtype == bool:
        n = sum(t.n_obs for t in tables)
        if arr.shape != (n,):
            raise ValueError(
                f"A boolean `train` mask must have one value per row of all tables ({n}), got {arr.shape}."
            )
        masks = np.split(arr, np.cumsum([t.n_obs for t in tables])[:-1])
    else:
        labels = [group_labels(t, groups) for t in tables]
        if labels[0] is None:
            raise ValueError("`train` lists groups, which needs `groups` (the obs column that holds them).")
        wanted = [str(v) for v in arr.tolist()]
        missing = sorted(set(wanted) - set().union(*(set(v) for v in labels)))
        if missing:
            raise KeyError(f"`train` names {missing}, which are not values of obs[{groups!r}] in any table.")
        masks = [np.isin(v, wanted) for v in labels]
    if not any(m.any() for m in masks):
        raise ValueError("`train` selects no spot.")
    return masks


def is_ours(record: Any, writer: str) -> bool:
    """Whether an ``uns`` (or ``attrs``) record was written by histoseq's function ``writer``, which may replace it."""
    return isinstance(record, dict) and record.get("histoseq") == writer


def expression_classes(
    sdata: SpatialData | ad.AnnData | Sequence[SpatialData],
    genes: Sequence[str],
    *,
    train: Any = None,
    quantile: float = 0.75,
    key_added: str = "expression_class",
    table_key: str | None = "table",
    groups: str | None = "sample_id",
    overwrite: bool = False,
    inplace: bool = True,
) -> pd.Series | list[pd.Series] | None:
    """Label each spot by the gene it expresses highly: the classes that :func:`fit_classifier` learns.

    Expression is ``log1p`` of the counts per 10,000 over all genes of the table
    (:func:`histoseq.tl._data.transform_counts`). A spot is *high* in a gene when its expression is above the
    ``quantile`` of that gene over the training spots (strictly above). A spot high in one gene gets that gene's
    class; a spot high in several gets the gene it is furthest above, in units of the **training spots'
    standard deviation** of each gene (``(x - threshold) / sd``; an exact tie goes to the gene listed first);
    a spot high in none is ``"tissue"``. Thresholds and standard deviations come from the training spots only,
    so held-out sections do not move them.

    Parameters
    ----------
    sdata
        SpatialData (or AnnData) whose table holds raw counts in ``X``; or a list of them (thresholds from the
        training spots of all of them together).
    genes
        Marker genes, one class each, in order.
    train
        Spots the thresholds are chosen on: ``None`` (all), values of ``obs[groups]``, or a boolean mask.
    quantile
        Quantile of the training spots above which a spot is high in a gene, in (0, 1).
    key_added
        The obs column and the ``uns`` record.
    table_key
        The table.
    groups
        obs column of the sections (or donors) that ``train`` names.
    overwrite
        Replace an obs column ``key_added`` that histoseq did not write.
    inplace
        Write into the table(s); ``False`` returns the classes.

    Returns
    -------
    With ``inplace=True`` ``None``, and sets in each table:

    - ``obs[key_added]``: categorical with categories ``[*genes, "tissue", "background"]`` (``"background"``
      is the class of off-tissue tiles, which spots never get);
    - ``uns[key_added]``: ``genes``, ``quantile``, ``thresholds`` and ``sd`` per gene, the ``rule``, the
      ``transform``, ``groups``, ``train_groups`` (training spots per group), ``n_train_spots`` and the
      ``counts`` per class of that table.

    With ``inplace=False``, the categorical Series (one per table for a list).

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=3, section_size_um=800, progress=False)
    >>> hs.tl.expression_classes(sdata, genes=["TUM1", "STRO1"], train=["section0", "section1"])
    >>> t = sdata.tables["table"]
    >>> list(t.obs["expression_class"].cat.categories)
    ['TUM1', 'STRO1', 'tissue', 'background']
    >>> sorted(t.uns["expression_class"]["thresholds"])
    ['STRO1', 'TUM1']

    """
    import pandas as pd

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes or len(set(genes)) < len(genes) or {TISSUE, BACKGROUND} & set(genes):
        raise ValueError(f"`genes` must be distinct gene names (not 'tissue' or 'background'), got {genes!r}.")
    if isinstance(quantile, bool) or not isinstance(quantile, int | float) or not 0 < quantile < 1:
        raise ValueError(f"`quantile` must lie strictly between 0 and 1, got {quantile!r}.")
    if not isinstance(key_added, str) or not re.fullmatch(r"[\w.\-]+", key_added):
        raise ValueError(f"`key_added` must be a name of letters, digits, '_', '.' or '-', got {key_added!r}.")
    is_list = isinstance(sdata, Sequence) and not isinstance(sdata, str)
    objects = list(sdata) if is_list else [sdata]
    if not objects:
        raise ValueError("`sdata` is an empty list.")
    tables = [as_table(o, table_key) for o in objects]
    for i, t in enumerate(tables):
        missing = [g for g in genes if g not in t.var_names]
        if missing:
            where = f"table {i}" if is_list else "the table"
            raise KeyError(f"Gene(s) {missing} are not in {where} (var_names such as {list(t.var_names[:5])}).")
        if key_added in t.obs and not overwrite and not is_ours(t.uns.get(key_added), "expression_classes"):
            raise ValueError(
                f"obs[{key_added!r}] exists and was not written by `hs.tl.expression_classes`; pass "
                "`overwrite=True` or another `key_added`."
            )
    masks = train_masks(tables, train, groups)
    expr = [transform_counts(t.X, "log1p_cp10k", t.var_names.get_indexer(genes)) for t in tables]
    train_expr = np.vstack([e[m] for e, m in zip(expr, masks)])
    thresholds = np.quantile(train_expr, quantile, axis=0)
    sd = train_expr.std(axis=0)
    flat = ~(sd > 0)
    if flat.any():
        logger.warning("Gene(s) %s do not vary over the training spots; their class is never given.", genes)
    sd = np.where(flat, 1.0, sd)
    categories = [*genes, TISSUE, BACKGROUND]
    train_groups: dict[str, int] = {}
    for t, m in zip(tables, masks):
        labels = group_labels(t, groups) if groups is not None and groups in t.obs else None
        for g in [] if labels is None else labels[m]:
            train_groups[g] = train_groups.get(g, 0) + 1
    out = []
    for t, e in zip(tables, expr):
        z = np.where(e > thresholds, (e - thresholds) / sd, -np.inf)
        cls = np.where(np.isfinite(z).any(axis=1), np.asarray(genes, dtype=object)[z.argmax(axis=1)], TISSUE)
        out.append(pd.Series(pd.Categorical(cls, categories=categories), index=t.obs_names, name=key_added))
    if not inplace:
        return out if is_list else out[0]
    record = {
        "histoseq": "expression_classes",
        "genes": genes,
        "quantile": float(quantile),
        "thresholds": {g: float(v) for g, v in zip(genes, thresholds)},
        "sd": {g: float(v) for g, v in zip(genes, sd)},
        "rule": "above the quantile of the training spots; several: furthest above in training sd; none: tissue",
        "transform": "log1p_cp10k",
        "groups": groups or "",
        "train_groups": train_groups,
        "n_train_spots": len(train_expr),
    }
    for obj, t, series in zip(objects, tables, out):
        t.obs[key_added] = series.values
        t.uns[key_added] = {**record, "counts": {c: int((series == c).sum()) for c in categories}}
        if obj is not t:
            store_element(obj, "tables", get_table(obj, table_key)[0])
    logger.info("Added obs[%r]: classes %s, thresholds from %d training spots.", key_added, categories, len(train_expr))
    return None


def dice(
    sdata: SpatialData | ad.AnnData,
    truth: str = "expression_class",
    pred: str = "predicted_class",
    *,
    table_key: str | None = "table",
    spots: Any = None,
    groups: str | None = "sample_id",
    section: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-class Dice coefficients of a predicted class column against a true one, and their confusion matrix.

    For each class, ``Dice = 2 |T ∩ P| / (|T| + |P|)`` over the evaluated spots (``T``: the spots of that true
    class, ``P``: those predicted in it). Spots with no class in either column (NaN) are left out.

    Parameters
    ----------
    sdata
        SpatialData or AnnData whose table holds both columns (a grid table works as well as spots).
    truth, pred
        The obs columns of the true and predicted classes.
    table_key
        The table.
    spots
        Rows to evaluate (boolean mask, ``obs_names`` or positions); default all.
    groups
        obs column of the sections, for ``section``.
    section
        Evaluate only the rows of these values of ``obs[groups]`` (e.g. one held-out section).

    Returns
    -------
    A DataFrame with one row per class (the categories of ``truth``, then any others of ``pred``) and a row
    ``"mean"``, with columns ``dice`` (NaN for a class in neither column), ``n_truth`` and ``n_pred``. The mean
    Dice is taken over the classes **present in the truth or the prediction** (those with a Dice); its counts
    are the totals. ``attrs["confusion"]`` holds the confusion matrix (rows: true class, columns: predicted
    class; it sums to the evaluated spots), ``attrs["n_spots"]`` and ``attrs["n_missing"]`` the number of rows
    evaluated and left out.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> import histoseq as hs
    >>> obs = pd.DataFrame({"truth": ["a", "a", "b", "b"], "pred": ["a", "b", "b", "b"]}, index=list("wxyz"))
    >>> scores = hs.tl.dice(ad.AnnData(np.zeros((4, 1)), obs=obs), "truth", "pred")
    >>> scores["dice"].round(3).tolist()
    [0.667, 0.8, 0.733]

    """
    import pandas as pd

    table = as_table(sdata, table_key)
    for col in (truth, pred):
        if col not in table.obs:
            raise KeyError(f"The table has no column obs[{col!r}] (columns: {list(table.obs.columns)}).")
    rows = select_rows(table.n_obs, table.obs_names, spots)
    if section is not None:
        labels = group_labels(table, groups)
        if labels is None:
            raise ValueError("`section` names values of obs[groups]; give `groups`.")
        wanted = [section] if isinstance(section, str) else [str(s) for s in section]
        unknown = sorted(set(wanted) - set(labels))
        if unknown:
            raise KeyError(f"`section` {unknown} are not values of obs[{groups!r}] ({sorted(set(labels))}).")
        rows = rows[np.isin(labels[rows], wanted)]

    def column(name: str) -> tuple[np.ndarray, list[str]]:
        col = table.obs[name]
        order = [str(c) for c in col.cat.categories] if hasattr(col, "cat") else sorted({str(v) for v in col.dropna()})
        values = col.astype(object).to_numpy()[rows]
        return np.where(pd.isna(values), None, values.astype(str)), order

    t, t_order = column(truth)
    p, p_order = column(pred)
    ok = (t != None) & (p != None)  # noqa: E711 - elementwise on object arrays
    t, p = t[ok].astype(str), p[ok].astype(str)
    classes = list(dict.fromkeys([*t_order, *p_order, *t.tolist(), *p.tolist()]))
    confusion = pd.crosstab(pd.Categorical(t, classes), pd.Categorical(p, classes), dropna=False)
    confusion = confusion.reindex(index=classes, columns=classes, fill_value=0)
    confusion.index.name, confusion.columns.name = "truth", "predicted"
    tp = np.diag(confusion.to_numpy())
    n_truth, n_pred = confusion.sum(axis=1).to_numpy(), confusion.sum(axis=0).to_numpy()
    denom = n_truth + n_pred
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(denom > 0, 2 * tp / denom, np.nan)
    out = pd.DataFrame({"dice": scores, "n_truth": n_truth, "n_pred": n_pred}, index=pd.Index(classes, name="class"))
    mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else np.nan
    out.loc["mean"] = [mean, int(n_truth.sum()), int(n_pred.sum())]
    out[["n_truth", "n_pred"]] = out[["n_truth", "n_pred"]].astype(int)
    out.attrs.update({"confusion": confusion, "n_spots": int(ok.sum()), "n_missing": int((~ok).sum())})
    return out

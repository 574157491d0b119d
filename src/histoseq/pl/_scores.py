"""Per-gene scores of an evaluation or a cross-validation, sorted, with the noise ceiling and the fold spread."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _per_gene(result: Any, metric: str) -> tuple[pd.DataFrame, str]:
    """One row per gene: ``score`` (mean over folds or the pooled score), ``low``/``high`` and ``ceiling``."""
    import pandas as pd

    scores = getattr(result, "scores", result)
    if not isinstance(scores, pd.DataFrame) or "gene" not in scores.columns:
        raise TypeError(
            "`result` must be the DataFrame of `hs.tl.evaluate` or the result of `hs.tl.cross_validate`, got "
            f"{type(result).__name__}."
        )
    if metric not in scores.columns:
        numeric = [c for c in scores.columns if c not in ("fold", "gene", "section", "test_group", "n_spots")]
        raise KeyError(f"No column {metric!r} in the scores; choose one of {numeric}.")
    if "fold" in scores.columns:  # cross-validation: one row per fold and gene
        by = scores.groupby("gene", sort=False)[metric]
        table = pd.DataFrame({"score": by.mean(), "low": by.min(), "high": by.max(), "n": by.count()})
        what = f"mean over {scores['fold'].nunique()} folds (bar: lowest to highest fold)"
    else:  # evaluate: the pooled section "all" when present, else the mean over sections
        pooled = scores[scores["section"] == "all"] if "section" in scores.columns else scores
        if pooled.empty:
            pooled = scores
        by = pooled.groupby("gene", sort=False)[metric]
        table = pd.DataFrame({"score": by.mean(), "low": by.min(), "high": by.max(), "n": by.count()})
        what = "all evaluated spots"
        sections = scores[scores["section"] != "all"] if "section" in scores.columns else scores.iloc[:0]
        if sections["section"].nunique() > 1 if len(sections) else False:
            per = sections.groupby("gene", sort=False)[metric]
            table["low"], table["high"] = per.min(), per.max()
            what += f" (bar: lowest to highest of {sections['section'].nunique()} sections)"
    ceiling = f"{metric}_ceiling"
    if ceiling in scores.columns:
        rows = scores[scores["section"] == "all"] if "section" in scores.columns else scores
        table["ceiling"] = rows.groupby("gene", sort=False)[ceiling].mean()
    return table.sort_values("score", ascending=False, na_position="last"), what


def scores(
    result: Any,
    *,
    metric: str = "pearson",
    n: int | None = 40,
    ax: Axes | None = None,
    title: str | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Per-gene scores, best first, with the spread between folds (or sections) and the noise ceiling.

    Parameters
    ----------
    result
        The DataFrame of :func:`histoseq.tl.evaluate` (the pooled section ``"all"`` is drawn, and the bar
        spans the sections), or the result of :func:`histoseq.tl.cross_validate` (the mean over folds is
        drawn, the bar spans the folds).
    metric
        Column to draw (``"pearson"``, ``"spearman"``, ``"pearson_partial_depth"``, ...).
    n
        Draw the ``n`` best genes (``None``: all).
    ax
        Axes to draw on; a new figure otherwise.
    title
        Title; by default it names the metric and the mean over the genes drawn.
    show
        Call ``plt.show()``; by default only in interactive sessions.
    save
        Write the figure to this file.

    Returns
    -------
    The matplotlib figure. Each gene is a dot (its score) with a bar (the spread); a grey tick marks its noise
    ceiling when the scores have one (``evaluate(..., ceiling=True)``), the highest score the measurement's
    counting noise allows.

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", train=["section0"], progress=False)
    >>> hs.tl.predict(sdata, model)
    >>> fig = hs.pl.scores(hs.tl.evaluate(sdata, spots=t.obs["sample_id"] == "section1", ceiling=True))

    """
    import matplotlib.pyplot as plt

    if n is not None and (isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1):
        raise ValueError(f"`n` must be a positive number of genes or None, got {n!r}.")
    table, what = _per_gene(result, metric)
    table = table[np.isfinite(table["score"].to_numpy(float))]
    if table.empty:
        raise ValueError(f"No gene has a finite {metric!r} score to draw.")
    if n is not None:
        table = table.iloc[: int(n)]
    y = np.arange(len(table))[::-1]
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, max(2.0, 0.8 + 0.22 * len(table))))
    else:
        fig = ax.figure
    score = table["score"].to_numpy(float)
    ax.hlines(y, table["low"].to_numpy(float), table["high"].to_numpy(float), color="tab:blue", alpha=0.4, lw=3)
    ax.scatter(score, y, color="tab:blue", zorder=3, s=18, label=metric)
    if "ceiling" in table.columns:
        ax.scatter(table["ceiling"].to_numpy(float), y, marker="|", s=120, color="0.4", zorder=2, label="noise ceiling")
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_yticks(y, table.index.astype(str), fontsize=7)
    ax.set_xlabel(f"{metric} ({what})")
    ax.set_title(title or f"{metric}: mean {np.nanmean(score):.3f} over the {len(table)} genes shown", fontsize=9)
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return fig

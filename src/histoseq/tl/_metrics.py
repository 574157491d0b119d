"""Per-gene scores of predictions against measured expression, and the noise ceiling of a measurement.

The array layer of :func:`histoseq.tl.evaluate`: Pearson and Spearman correlations, mean squared error and
the depth-partial Pearson (:func:`gene_scores`), and :func:`noise_ceiling`, the highest correlation that
the counting noise of a measurement allows. Also :func:`column_pearson`, which the inner cross-validation
of the ridge and kernel methods scores with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._data import check_counts, transform_counts

#: Per-gene scores, in the order of the columns of :func:`histoseq.tl.evaluate`'s result.
METRICS = ("pearson", "spearman", "mse", "pearson_partial_depth")


def column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns; NaN where a column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = (a * b).sum(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    tiny = 1e-12 * np.maximum(1.0, den)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > tiny, num / np.where(den > 0, den, 1.0), np.nan)


def residuals(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Residuals of the columns of ``a`` after a least-squares fit on ``d`` (with an intercept)."""
    a = a - a.mean(axis=0)
    dc = d - d.mean()
    dd = float(dc @ dc)
    if dd <= 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0))) ** 2:
        return a  # constant depth: nothing to regress out
    return a - np.outer(dc, (dc @ a) / dd)


def _scores_finite(pred: np.ndarray, truth: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
    from scipy.stats import rankdata

    n, g = pred.shape
    if n < 2:
        nan = np.full(g, np.nan)
        mse = ((pred - truth) ** 2).mean(axis=0) if n else nan
        return {"pearson": nan, "spearman": nan.copy(), "mse": mse, "pearson_partial_depth": nan.copy()}
    return {
        "pearson": column_pearson(pred, truth),
        "spearman": column_pearson(rankdata(pred, axis=0), rankdata(truth, axis=0)),
        "mse": ((pred - truth) ** 2).mean(axis=0),
        "pearson_partial_depth": column_pearson(residuals(pred, depth), residuals(truth, depth)),
    }


def gene_scores(pred: np.ndarray, truth: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene Pearson, Spearman, MSE and depth-partial Pearson of predictions against truth.

    ``pred`` and ``truth`` are ``(n_spots, n_genes)``, ``depth`` is ``(n_spots,)`` (log total counts).
    A gene is scored on the spots where its prediction is finite; a gene that is constant (in
    prediction or truth) gets NaN correlations.
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    depth = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(pred)
    if ok.all():
        out = _scores_finite(pred, truth, depth)
        out["n_spots"] = np.full(pred.shape[1], pred.shape[0])
        return out
    out = {m: np.full(pred.shape[1], np.nan) for m in METRICS}
    out["n_spots"] = ok.sum(axis=0)
    # genes sharing a pattern of finite spots are scored together
    patterns: dict[bytes, list[int]] = {}
    for j in range(pred.shape[1]):
        patterns.setdefault(np.packbits(ok[:, j]).tobytes(), []).append(j)
    for cols in patterns.values():
        rows = ok[:, cols[0]]
        if not rows.any():
            continue
        part = _scores_finite(pred[np.ix_(rows, cols)], truth[np.ix_(rows, cols)], depth[rows])
        for m in METRICS:
            out[m][cols] = part[m]
    return out


def log_depth(counts: Any) -> np.ndarray:
    """``log1p`` of the total counts of each spot (over all genes of the table)."""
    return np.log1p(np.asarray(counts.sum(axis=1), dtype=np.float64).ravel())


def noise_ceiling(
    counts: Any,
    transform: str | None,
    columns: np.ndarray | None = None,
    *,
    n_repeats: int = 5,
    random_state: int | None = 0,
) -> np.ndarray:
    """Estimated highest Pearson r that any prediction could reach on these spots, gene by gene.

    Sequencing samples a few molecules of each gene in each spot, so the measured expression of a spot is its
    true expression plus counting noise, and no prediction, however good, correlates with the measurement
    better than the true expression does. That bound is estimated from the counts alone by splitting
    them in two: every molecule goes to one half or the other with probability ½ (binomial thinning),
    which gives two independent measurements of the same spots at half the depth. Their correlation
    ``r_half`` (after ``transform``, each half normalised by its own total), stepped up to full depth
    with the Spearman–Brown formula, is the reliability ``ρ = 2 r_half / (1 + r_half)``, and the ceiling
    is ``√ρ``, the correlation of a measurement with its own noise-free value.

    It is an estimate: it assumes independent (Poisson-like) sampling of the counted molecules, and it is a
    little optimistic for very shallow genes. A gene constant over the spots gets NaN.

    Parameters
    ----------
    counts
        Raw integer counts, ``(n_spots, n_genes)``, dense or sparse (all genes: ``"log1p_cp10k"`` normalises
        by each spot's total).
    transform
        The target transform (``"log1p_cp10k"``, ``"log1p"`` or ``None``), as in the model.
    columns
        Genes to score (column positions); all by default.
    n_repeats
        Random splits averaged.
    random_state
        Seed of the splits.

    Returns
    -------
    ``(n_genes,)`` ceilings in [0, 1] (NaN where undefined).

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._metrics import noise_ceiling
    >>> rng = np.random.default_rng(0)
    >>> rate = np.exp(rng.normal(size=(500, 1)) + np.zeros((1, 20)))  # one pattern, 20 genes
    >>> counts = rng.poisson(20 * rate)  # deep: little counting noise
    >>> bool(noise_ceiling(counts, None).mean() > 0.9)
    True

    """
    from scipy import sparse

    check_counts(counts)
    values = counts.data if sparse.issparse(counts) else np.asarray(counts)
    if values.size and not np.array_equal(values, np.round(values)):
        raise ValueError(
            "The noise ceiling splits the counted molecules in two, so it needs raw integer counts; these counts "
            "are not integers (normalised?). Put the raw counts in `X` (e.g. `adata.X = adata.layers['counts']`)."
        )
    if int(n_repeats) < 1:
        raise ValueError(f"`n_repeats` must be at least 1, got {n_repeats!r}.")
    cols = np.arange(counts.shape[1]) if columns is None else np.asarray(columns, dtype=int)
    if counts.shape[0] < 3:
        return np.full(len(cols), np.nan)
    rng = np.random.default_rng(random_state)
    total = np.zeros(len(cols))
    found = np.zeros(len(cols))
    for _ in range(int(n_repeats)):
        if sparse.issparse(counts):
            a = sparse.csr_matrix(counts, dtype=np.float64, copy=True)
            a.data = rng.binomial(np.round(a.data).astype(np.int64), 0.5).astype(np.float64)
            b = sparse.csr_matrix(counts, dtype=np.float64) - a
        else:
            full = np.round(np.asarray(counts, dtype=np.float64)).astype(np.int64)
            a = rng.binomial(full, 0.5).astype(np.float64)
            b = full - a
        r = column_pearson(
            transform_counts(a, transform, cols, check=False), transform_counts(b, transform, cols, check=False)
        )
        ok = np.isfinite(r)
        total[ok] += r[ok]
        found[ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        r_half = np.where(found > 0, total / np.maximum(found, 1), np.nan)
        rho = 2 * r_half / (1 + r_half)
    return np.sqrt(np.clip(rho, 0.0, 1.0))

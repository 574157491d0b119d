"""The ridge algebra that the ridge and kernel methods share: one SVD per fold for a whole grid of penalties.

A ridge regression with an unpenalised intercept on centred features ``P = U S Vᵀ`` has the coefficients
``V diag(s / (s² + a)) Uᵀ Y`` for the penalty ``a``, so a grid of penalties costs one SVD and a few small
products per fold (:func:`ridge_cv`) and the final fit one more (:func:`ridge_solve`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._metrics import column_pearson

logger = logging.getLogger(__name__)

#: Penalties tried by the ridge and kernel methods: 33 values, 4 per decade, from 1e-2 to 1e6.
DEFAULT_ALPHAS = np.logspace(-2, 6, 33)
#: How the inner cross-validation scores a penalty: held-out squared error, or held-out Pearson.
ALPHA_SCORINGS = ("mse", "pearson")


def grid(values: Any, default: Any, name: str, *, positive: bool) -> np.ndarray:
    """The sorted unique values of a grid of hyper-parameters (``values``, else ``default``), checked."""
    g = np.unique(np.asarray(default if values is None else values, dtype=float).ravel())
    ok = g > 0 if positive else g >= 0
    if g.size == 0 or not np.all(np.isfinite(g) & ok):
        raise ValueError(f"`{name}` must be {'positive' if positive else 'non-negative'} finite numbers.")
    return g


def check_scoring(alpha_scoring: str) -> None:
    """Refuse an unknown ``alpha_scoring``."""
    if alpha_scoring not in ALPHA_SCORINGS:
        raise ValueError(f"`alpha_scoring` must be 'mse' or 'pearson', got {alpha_scoring!r}.")


def warn_at_edge(alpha: float, alphas: np.ndarray) -> None:
    """Say when the penalty chosen by cross-validation lies at the edge of its grid.

    At the smallest penalty the fit is nearly unpenalised: a smaller one changes little, so this is information,
    not a warning (widening the grid only moves the choice to the new edge). At the largest, the model shrinks
    towards the training mean: the features explain little of the targets, which deserves a warning.
    """
    if len(alphas) < 2 or alpha not in (alphas[0], alphas[-1]):
        return
    if alpha == alphas[0]:
        logger.info(
            "The penalty chosen by cross-validation is the smallest tried (alpha=%g): the fit is nearly "
            "unpenalised; `alphas=` with smaller values would change it little.",
            alpha,
        )
    else:
        logger.warning(
            "The penalty chosen by cross-validation is the largest tried (alpha=%g): the predictions shrink "
            "towards the training mean, so the embedding explains little of these genes. Check the genes and "
            "the embedding, or pass larger `alphas=` to confirm.",
            alpha,
        )


def svd(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``A = U diag(s) Vt``; LAPACK's slower ``gesvd`` when the default ``gesdd`` does not converge.

    ``gesdd`` can fail on degenerate matrices (repeated rows, as when the same spots are given twice) with
    some OpenBLAS builds; ``gesvd`` is the robust driver.
    """
    try:
        return np.linalg.svd(A, full_matrices=False)
    except np.linalg.LinAlgError:
        from scipy.linalg import svd as scipy_svd

        return scipy_svd(A, full_matrices=False, lapack_driver="gesvd")


def ridge_cv(
    P: np.ndarray | Sequence[np.ndarray],
    Y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    alphas: np.ndarray,
    fold_targets: Sequence[np.ndarray] | None = None,
    per_gene: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out error and correlation of ridge regressions for all penalties, one SVD per fold.

    For a fold with centred training features ``P = U S Vᵀ``, the ridge coefficients for penalty ``a`` are
    ``V diag(s / (s² + a)) Uᵀ Y``, so all penalties cost one SVD and a few small products.

    ``P`` is one feature matrix for all folds, or one per fold (features that a fold learns from its own
    training spots, e.g. weighted by the relevance of each dimension there), each with all rows.

    ``fold_targets``: the targets each fold trains on (e.g. smoothed within the fold's training spots,
    :mod:`histoseq.tl._targets`), one array per fold with the rows of its training spots; the held-out
    spots are always scored on ``Y``.

    Returns the mean squared error (pooled over folds, each gene divided by its variance so that all genes
    weigh the same) and the mean Pearson correlation (over folds and genes), one value per penalty; with
    ``per_gene=True``, one row per penalty and one column per gene (their means over genes are the
    pooled values). :func:`ridge_cv_sets` scores several sets of training targets on one SVD per fold.
    """
    return ridge_cv_sets(P, Y, folds, alphas, [fold_targets], per_gene=per_gene)[0]


def ridge_cv_sets(
    P: np.ndarray | Sequence[np.ndarray],
    Y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    alphas: np.ndarray,
    target_sets: Sequence[Sequence[np.ndarray] | None],
    per_gene: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`ridge_cv` for each of ``target_sets`` (each a ``fold_targets``, or ``None`` for ``Y``), one SVD per fold.

    The features, and so the SVD of each fold, are the same for every set of training targets (e.g. the raw and
    the smoothed targets of the kernel method), so they share it.
    """
    var = Y.var(axis=0)
    var = np.where(var > 0, var, 1.0)
    shape = (len(alphas), Y.shape[1])
    n_sets = len(target_sets)
    sse = [np.zeros(shape) for _ in range(n_sets)]
    corr = [np.zeros(shape) for _ in range(n_sets)]
    corr_n = [np.zeros(shape) for _ in range(n_sets)]
    count = 0
    per_fold = isinstance(P, list | tuple)
    if per_fold and len(P) != len(folds):
        raise ValueError(f"`P` holds {len(P)} feature matrices for {len(folds)} folds.")
    for f, (tr, va) in enumerate(folds):
        Pf = P[f] if per_fold else P
        p_mean = Pf[tr].mean(axis=0)
        U, s, Vt = svd(Pf[tr] - p_mean)
        a = (Pf[va] - p_mean) @ Vt.T
        for t, fold_targets in enumerate(target_sets):
            Y_tr = Y[tr] if fold_targets is None else fold_targets[f]
            y_mean = Y_tr.mean(axis=0)
            uty = U.T @ (Y_tr - y_mean)
            for i, alpha in enumerate(alphas):
                pred = a @ ((s / (s * s + alpha))[:, None] * uty) + y_mean
                sse[t][i] += (((pred - Y[va]) ** 2) / var).sum(axis=0)
                if len(va) > 1:
                    r = column_pearson(pred, Y[va])
                    ok = np.isfinite(r)
                    corr[t][i, ok] += r[ok]
                    corr_n[t][i, ok] += 1
        count += len(va)
    out = []
    for t in range(n_sets):
        mse = sse[t] / max(count, 1)
        with np.errstate(invalid="ignore"):
            c = np.where(corr_n[t] > 0, corr[t] / np.maximum(corr_n[t], 1), np.nan)
        if per_gene:
            out.append((mse, c))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a penalty whose genes are all constant: NaN
            out.append((mse.mean(axis=1), np.nanmean(c, axis=1)))
    return out


def ridge_solve(P: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients ``(k, G)`` and intercept ``(G,)`` of a ridge regression with an unpenalised intercept."""
    p_mean, y_mean = P.mean(axis=0), Y.mean(axis=0)
    U, s, Vt = svd(P - p_mean)
    coef = Vt.T @ ((s / (s * s + alpha))[:, None] * (U.T @ (Y - y_mean)))
    return coef, y_mean - p_mean @ coef

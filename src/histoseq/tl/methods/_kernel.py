"""``method="kernel"`` (the default): kernel ridge regression on embeddings.

The morphology of a spot tells its expression through interactions that a linear probe cannot draw
(dense nuclei *and* little eosin, say). Kernel ridge regression is the smallest step beyond the linear
probe: it is still one closed-form solve, with a penalty chosen by section-grouped cross-validation, and
no epochs, learning rates or seeds.

Scaling to many spots uses the Nyström method. With landmarks ``L`` (all training spots when there are
at most ``max_landmarks`` of them, else that many drawn at random) and ``K_LL = V Λ Vᵀ``, each spot gets
the features ``φ(x) = k(x, L) V Λ^{-1/2}``, and a ridge regression with an intercept runs on them. When
every training spot is a landmark, ``φ(xᵢ)·φ(xⱼ) = k(xᵢ, xⱼ)`` on the training spots, so this *is* kernel
ridge regression (with the kernel centred by the intercept); with fewer landmarks it is its low-rank
approximation. The cost is one ``n × m`` kernel block and one SVD of it per inner fold and kernel width.

The model stores the standardised landmarks and the coefficients ``α = V Λ^{-1/2} β`` on them, so a
prediction is ``k(x, L) α + b``.

Not every dimension of an embedding tells about expression (a stain's DAB channel, a texture measure at
the wrong scale), yet an isotropic kernel lets each move distances as much as any other. Each dimension
is therefore weighted by its *relevance*: its squared correlation with the leading principal components
of the training spots' expression (all measured genes, not only the targets), averaged with the
components' variances as weights, raised to ``relevance_power``. The model's weights come from all its
training spots and are stored with it; inside the cross-validation, each inner fold computes them from its
own training spots (as it smooths its own targets), so the held-out spots' expression never shapes the
kernel they are scored with.

Shallow genes are mostly counting noise at one spot. The cross-validation therefore also decides, gene by
gene, whether the model trains on the raw targets or on each training spot's targets averaged over its
nearest training spots in expression (:mod:`histoseq.tl._targets`); width and penalty stay shared. Since
ridge regression is linear in its targets, genes trained either way share one solve.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._utils import jsonable, standardise
from .._linalg import DEFAULT_ALPHAS, check_scoring, grid, ridge_cv_sets, ridge_solve, warn_at_edge
from .._splits import cv_folds
from .._targets import expression_components, neighbor_grid, smooth_targets
from ._base import ExpressionMethod, Fitted, standardised

if TYPE_CHECKING:
    from .._training_set import TrainingSet

logger = logging.getLogger(__name__)

KERNELS = ("exponential", "rbf")
#: The kernel of :func:`fit_kernel` unless ``kernel=`` says otherwise.
DEFAULT_KERNEL = "exponential"
#: Exponent of the expression relevance of each embedding dimension in its kernel weight (``0``: equal
#: weights); see :func:`feature_relevance`.
DEFAULT_RELEVANCE_POWER = 2.0
#: Principal components of the training spots' expression that define the relevance of a dimension.
RELEVANCE_COMPONENTS = 10
#: Kernel widths tried, relative to the dimension ``d`` of the (standardised) embedding: the kernel reads
#: ``exp(-gamma * |x - y|² / d)`` (``"rbf"``) or ``exp(-sqrt(gamma * |x - y|² / d))`` (``"exponential"``);
#: with column weights summing to 1, ``Σ w_j (x_j - y_j)²`` takes the place of ``|x - y|² / d``. Two
#: standardised spots lie about ``2 d`` apart (squared), so ``gamma = 1`` puts a typical pair at ``exp(-2)``
#: (``exp(-sqrt(2))`` for the exponential kernel).
DEFAULT_GAMMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: Largest number of landmarks (training spots) of the Nyström features.
MAX_LANDMARKS = 3000
_EIG_FLOOR = 1e-8


def _sq_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = (A * A).sum(axis=1)[:, None] + (B * B).sum(axis=1)[None, :] - 2.0 * (A @ B.T)
    return np.maximum(d, 0.0, out=d)


def _part_shares(n_parts: int, part_weights: Sequence[float] | None) -> np.ndarray:
    """The share of each part in the kernel's distance: ``part_weights`` normalised to sum 1 (default equal)."""
    if part_weights is None:
        return np.full(n_parts, 1.0 / n_parts)
    w = np.asarray(part_weights, dtype=np.float64).ravel()
    if len(w) != n_parts or not np.all(np.isfinite(w) & (w >= 0)) or w.sum() <= 0:
        raise ValueError(
            f"Part weights must be {n_parts} non-negative numbers, not all zero (one per part), got {part_weights!r}."
        )
    return w / w.sum()


def _column_weights(
    d: int, blocks: Sequence[int] | None, part_weights: Sequence[float] | None = None
) -> np.ndarray | None:
    """Weights of the squared differences per column: ``share_b / d_b`` for a column of block ``b``.

    ``share_b`` is ``1 / n_blocks`` unless ``part_weights`` says otherwise (see :func:`_part_shares`).
    """
    if not blocks:
        return None
    sizes = np.asarray(blocks, dtype=int)
    if (sizes < 1).any() or sizes.sum() != d:
        raise ValueError(f"The embedding's parts {list(sizes)} do not add up to its {d} dimensions.")
    return np.repeat(_part_shares(len(sizes), part_weights) / sizes, sizes)


def kernel_matrix(
    A: np.ndarray,
    B: np.ndarray,
    *,
    kernel: str,
    gamma: float,
    blocks: Sequence[int] | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The kernel between the rows of ``A`` and ``B`` (standardised embeddings of dimension ``d``).

    With ``blocks`` (the dimensions of the parts of an embedding made of several, in order), each part's
    squared distance is divided by its own dimension and the parts are averaged, so that every part weighs
    the same whatever its size (a 2,560-dimensional CNN embedding does not drown 168 morphology features).
    Without, the squared distance is divided by ``d``; one block is the same. ``weights`` (one per column,
    non-negative, summing to 1) weigh the squared differences of the columns instead of either.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl.methods._kernel import kernel_matrix
    >>> x = np.zeros((1, 4))
    >>> float(kernel_matrix(x, x + 1, kernel="rbf", gamma=1.0)[0, 0])  # exp(-1 * 4 / 4)
    0.36787944117144233
    >>> y = np.c_[np.ones((1, 1)), np.zeros((1, 3))]  # parts of 1 and 3 dims: the first differs entirely
    >>> round(float(kernel_matrix(x, y, kernel="rbf", gamma=1.0, blocks=[1, 3])[0, 0]), 6)  # exp(-(1/1 + 0/3) / 2)
    0.606531

    """
    if weights is None:
        weights = _column_weights(A.shape[1], blocks)
    elif len(weights) != A.shape[1]:
        raise ValueError(f"`weights` must have one value per column ({A.shape[1]}), got {len(weights)}.")
    if weights is None:
        scaled = _sq_dist(A, B) * (float(gamma) / A.shape[1])
    else:
        root = np.sqrt(weights)
        scaled = _sq_dist(A * root, B * root) * float(gamma)
    if kernel == "rbf":
        return np.exp(-scaled)
    if kernel == "exponential":
        return np.exp(-np.sqrt(scaled))
    raise ValueError(f"Unknown `kernel` {kernel!r}; choose one of {list(KERNELS)}.")


def feature_relevance(Z: np.ndarray, expression: np.ndarray, n_components: int = RELEVANCE_COMPONENTS) -> np.ndarray:
    """How much each column of the embedding ``Z`` follows the main axes of ``expression`` (same rows).

    The squared Pearson correlation of each column with each of the first ``n_components`` principal
    components of the standardised expression (:func:`histoseq.tl._targets.expression_components`),
    averaged with the components' variances as weights: a value in [0, 1]; 0 for a column that is
    constant or uncorrelated with every component.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl.methods._kernel import feature_relevance
    >>> rng = np.random.default_rng(0)
    >>> state = rng.normal(size=200)  # one axis of expression, seen by the first column only
    >>> expression = np.outer(state, rng.normal(size=30)) + 0.1 * rng.normal(size=(200, 30))
    >>> Z = np.c_[state + 0.1 * rng.normal(size=200), rng.normal(size=200)]
    >>> np.round(feature_relevance(Z, expression, n_components=1), 2).tolist()
    [0.99, 0.0]

    """
    S = expression_components(expression, n_components)
    if S.shape[1] == 0:
        return np.zeros(Z.shape[1])
    Zc = Z - Z.mean(axis=0)
    Sc = S - S.mean(axis=0)
    z_norm = np.sqrt((Zc * Zc).sum(axis=0))
    s_norm = np.sqrt((Sc * Sc).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (Zc.T @ Sc) / np.outer(z_norm, s_norm)
    corr = np.where(np.isfinite(corr), corr, 0.0)
    var = s_norm**2
    return (corr**2 @ var) / var.sum()


def relevance_weights(
    relevance: np.ndarray,
    power: float,
    blocks: Sequence[int] | None = None,
    part_weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Column weights of the kernel ``∝ relevance ** power``, each part of the embedding summing to the same.

    Within each part (``blocks``, see :func:`kernel_matrix`) the weights are normalised so that every part
    still weighs ``1 / n_parts`` in total (or its share of ``part_weights``); a part whose columns are all
    irrelevant keeps equal weights. ``power=0`` gives the weights of :func:`kernel_matrix` without ``weights``.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl.methods._kernel import relevance_weights
    >>> relevance_weights(np.array([0.4, 0.1, 0.1, 0.2]), 1.0, blocks=[2, 2]).tolist()
    [0.4, 0.1, 0.16666666666666666, 0.3333333333333333]

    """
    relevance = np.clip(np.asarray(relevance, dtype=np.float64), 0.0, None)
    sizes = [len(relevance)] if not blocks else [int(b) for b in blocks]
    shares = _part_shares(len(sizes), part_weights)
    out = np.empty_like(relevance)
    start = 0
    for size, share in zip(sizes, shares, strict=True):
        part = relevance[start : start + size] ** float(power)
        total = part.sum()
        part = part / total if total > 0 and np.isfinite(total) else np.full(size, 1.0 / size)
        out[start : start + size] = part * share
        start += size
    return out


def default_part_weights(n_parts: int) -> list[list[float]]:
    """The weightings of an embedding's parts that :func:`fit_kernel` chooses from by default.

    The first part is the base (the default embedding's morphology); every other part is an addition that
    must earn its place: the candidates are all parts weighing the same, and each of the added parts left
    out. An addition that carries nothing about expression on the training sections (the tissue position
    of a tissue without a centre-related organisation) is dropped by the cross-validation, not averaged in.

    Examples
    --------
    >>> from histoseq.tl.methods._kernel import default_part_weights
    >>> default_part_weights(3)
    [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]

    """
    out = [[1.0] * n_parts]
    for b in range(1, n_parts):
        out.append([0.0 if i == b else 1.0 for i in range(n_parts)])
    return out


def _nystrom_map(K_LL: np.ndarray) -> np.ndarray:
    """``V Λ^{-1/2}`` over the eigenvalues of ``K_LL`` that are not negligible."""
    lam, V = np.linalg.eigh(K_LL)
    keep = lam > _EIG_FLOOR * max(float(lam[-1]), 1e-300)
    return V[:, keep] / np.sqrt(lam[keep])


def fit_kernel(
    X: np.ndarray,
    Y: np.ndarray,
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    *,
    random_state: int | None,
    kernel: str = DEFAULT_KERNEL,
    gammas: Sequence[float] | None = None,
    gamma: float | None = None,
    alphas: Sequence[float] | None = None,
    alpha: float | None = None,
    max_landmarks: int = MAX_LANDMARKS,
    alpha_scoring: str = "mse",
    n_splits: int = 5,
    blocks: Sequence[int] | None = None,
    target_neighbors: int | Sequence[int] | None = None,
    expression: np.ndarray | None = None,
    relevance_power: float | None = None,
    part_weights: Sequence[Sequence[float]] | None = None,
    views: Sequence[np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Kernel ridge regression with the width and penalty chosen by cross-validation on the training spots.

    ``blocks``: the dimensions of the parts of an embedding made of several (see :func:`kernel_matrix`).

    ``target_neighbors`` and ``expression``: the model may train on targets averaged over each training
    spot's nearest training spots in ``expression`` (:func:`histoseq.tl._targets.smooth_targets`). The
    number of neighbours is chosen from ``target_neighbors`` (default ``(1, 10)``; ``1`` = the raw targets)
    by the same cross-validation as the width and penalty: each inner fold smooths among its own training
    spots and is scored on the raw targets of its held-out spots. Without ``expression`` the targets are
    used as they are.

    ``part_weights``: for an embedding of several parts, the weightings of the parts (one weight per part)
    that the cross-validation chooses from, with the width and penalty; default
    :func:`default_part_weights`: all parts alike, or without one of the added parts. One weighting (a flat
    list such as ``[2, 1]``, or ``[[2, 1]]``) fixes it.

    ``relevance_power``: each dimension of the standardised embedding weighs ``relevance ** power`` in the
    kernel's distances (:func:`feature_relevance` against ``expression``, :func:`relevance_weights`);
    default :data:`DEFAULT_RELEVANCE_POWER` when ``expression`` is given, equal weights without it; ``0``
    turns the weighting off.

    ``views``: embeddings of the same training spots (rows aligned with ``X``) as other scans would show them
    (:mod:`histoseq.tl._views`: a less sharp scan, say). Each view is one more training row per spot, with
    the spot's targets, group and section: the relevance of each dimension is computed on the spots and their
    views together, so a dimension that moves with the scan more than with the expression weighs less, and
    the regression learns to give a spot and its views the same prediction. The standardisation and the
    Nyström landmarks are drawn from the spots and their views (the function needs support where a less sharp
    scan puts a spot); the standardisation stays that of the spots. The cross-validation trains each inner fold
    on its training spots and their views and scores it on the held-out spots as scanned (a held-out spot's
    views are never trained on in its own fold, nor scored: the penalty and width are chosen for real slides).
    With views there are at most twice as many landmarks as spots (drawn at random from the spots and their
    views), so that four views cost about five times the time of the spots alone, not twenty-five.

    Returns the model's arrays (``scaler_mean``, ``scaler_scale``, ``landmarks``, ``dual_coef``,
    ``intercept`` and, when weighted, ``column_weights``), its configuration and what was chosen (for the provenance).
    """
    n = len(X)
    if n < 3:
        raise ValueError(f"A kernel model needs at least 3 training spots, got {n}.")
    if kernel not in KERNELS:
        raise ValueError(f"Unknown `kernel` {kernel!r}; choose one of {list(KERNELS)}.")
    if int(max_landmarks) < 2:
        raise ValueError(f"`max_landmarks` must be at least 2, got {max_landmarks!r}.")
    check_scoring(alpha_scoring)
    _column_weights(X.shape[1], blocks)  # checks them
    blocks = [int(b) for b in blocks] if blocks and len(blocks) > 1 else None
    if part_weights is not None and blocks is None:
        raise ValueError("`part_weights` weigh the parts of an embedding made of several; this one has one part.")
    candidates: list[np.ndarray | None] = [None]
    if blocks is not None:
        weightings = default_part_weights(len(blocks)) if part_weights is None else list(part_weights)
        if weightings and all(isinstance(w, int | float | np.number) for w in weightings):
            weightings = [weightings]  # one weighting given as a flat list fixes it
        candidates = [_part_shares(len(blocks), w) for w in weightings]
        if not candidates:
            raise ValueError("`part_weights` must hold at least one weighting of the parts.")

    if gamma is not None and gammas is not None:
        raise TypeError("Give either `gamma` (a fixed kernel width) or `gammas` (widths to choose from), not both.")
    if alpha is not None and alphas is not None:
        raise TypeError("Give either `alpha` (a fixed penalty) or `alphas` (penalties to choose from), not both.")
    gamma_grid = grid([gamma] if gamma is not None else gammas, DEFAULT_GAMMAS, "gamma(s)", positive=True)
    alpha_grid = grid([alpha] if alpha is not None else alphas, DEFAULT_ALPHAS, "alpha(s)", positive=False)
    if expression is None:
        if target_neighbors is not None and neighbor_grid(target_neighbors, n) != [1]:
            raise ValueError("`target_neighbors` above 1 needs the training spots' `expression`.")
        k_grid = [1]
    else:
        if len(expression) != n:
            raise ValueError(f"`expression` must have one row per training spot ({n}), got {len(expression)}.")
        k_grid = neighbor_grid(target_neighbors, n)
    if relevance_power is not None and (
        isinstance(relevance_power, bool) or not np.isfinite(float(relevance_power)) or float(relevance_power) < 0
    ):
        raise ValueError(
            f"`relevance_power` must be a non-negative number (0 = equal weights), got {relevance_power!r}."
        )
    if expression is None and relevance_power:
        raise ValueError("`relevance_power` above 0 needs the training spots' `expression`.")
    power = float(DEFAULT_RELEVANCE_POWER if relevance_power is None else relevance_power)

    mean, scale = standardise(X)
    Z = (X - mean) / scale
    n_views = 0
    if views is not None and len(views):
        views = [np.asarray(v, dtype=np.float64) for v in views]
        if any(v.shape != X.shape for v in views):
            raise ValueError(
                f"Every view must have the shape of the embedding {X.shape}, got {[v.shape for v in views]}."
            )
        if not all(np.isfinite(v).all() for v in views):
            raise ValueError("The views of the training spots hold non-finite values.")
        n_views = len(views)
        # the spots, then each view's copy of them: row i + v * n is spot i as view v shows it
        Z = np.vstack([Z, *((v - mean) / scale for v in views)])

    def stacked(rows: np.ndarray) -> np.ndarray:
        """The rows of training spots ``rows`` and of their views in the stacked embedding."""
        return np.concatenate([rows + v * n for v in range(n_views + 1)])

    def tiled(A: np.ndarray) -> np.ndarray:
        return np.tile(A, (n_views + 1,) + (1,) * (A.ndim - 1)) if n_views else A

    relevance = feature_relevance(Z, tiled(expression)) if expression is not None and power > 0 else None

    def weights_for(shares: np.ndarray | None) -> np.ndarray | None:
        if relevance is not None:
            return relevance_weights(relevance, power, blocks, shares)
        return None if shares is None else _column_weights(Z.shape[1], blocks, shares)

    # the landmarks are drawn from the spots and their views alike: the function must have support where a
    # less sharp scan puts a spot, not only where the training scans did; there are at most twice as many as
    # spots (and max_landmarks), so views cost time in proportion to the rows, not to their square
    n_rows = len(Z)
    m = min(n_rows, 2 * n, int(max_landmarks))
    if m < n_rows:
        rng = np.random.default_rng(random_state)
        landmark_rows = np.sort(rng.choice(n_rows, size=m, replace=False))
        logger.info("Kernel model: %d of %d training rows serve as Nyström landmarks.", m, n_rows)
    else:
        landmark_rows = np.arange(n_rows)
    L = Z[landmark_rows]

    def features(g: float, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # the landmarks' own block is rows of it
        K = kernel_matrix(Z, L, kernel=kernel, gamma=g, blocks=blocks, weights=weights)
        T = _nystrom_map(K[landmark_rows])
        return K @ T, T

    info: dict[str, Any] = {"n_landmarks": m, "relevance_power": power if relevance is not None else 0.0}
    if n_views:
        info["n_views"] = n_views
    config: dict[str, Any] = {"kernel": kernel, "max_landmarks": int(max_landmarks)}
    if blocks:
        config["blocks"] = blocks
    gene_k = np.full(Y.shape[1], k_grid[0])
    best_c = 0
    if gamma_grid.size == 1 and alpha_grid.size == 1 and len(k_grid) == 1 and len(candidates) == 1:
        best_gamma, best_alpha = float(gamma_grid[0]), float(alpha_grid[0])
        info.update(gamma=best_gamma, alpha=best_alpha, alpha_rule="given")
    else:
        folds, scheme = cv_folds(labels, regions, coords, n, n_splits=n_splits, random_state=random_state)
        # the targets each inner fold trains on, smoothed among that fold's training spots only (a view
        # trains on the targets of its spot)
        fold_targets = {
            k: [tiled(smooth_targets(Y[tr], expression[tr], k)) for tr, _ in folds] for k in k_grid if k > 1
        }
        # held-out error and correlation per (neighbours, part weighting, width, penalty, gene)
        mse = np.full((len(k_grid), len(candidates), len(gamma_grid), len(alpha_grid), Y.shape[1]), np.nan)
        corr = np.full_like(mse, np.nan)
        # the relevance of each dimension, like the smoothed targets, comes from each inner fold's own
        # training spots: the held-out section's expression never shapes the kernel it is scored with
        fold_relevance = (
            [feature_relevance(Z[stacked(tr)], tiled(expression[tr])) for tr, _ in folds]
            if relevance is not None
            else None
        )
        # each fold trains on its spots and their views, and is scored on its held-out spots as scanned
        view_folds = [(stacked(tr), va) for tr, va in folds] if n_views else folds
        for c, shares in enumerate(candidates):
            weights = weights_for(shares) if fold_relevance is None else None  # the same in every fold
            fold_weights = (
                None
                if fold_relevance is None
                else [relevance_weights(r, power, blocks, shares) for r in fold_relevance]
            )
            for i, g in enumerate(gamma_grid):
                Phi = features(g, weights)[0] if fold_weights is None else [features(g, w)[0] for w in fold_weights]
                # one SVD per fold for every neighbour count: only the training targets differ
                sets = ridge_cv_sets(
                    Phi, tiled(Y), view_folds, alpha_grid, [fold_targets.get(k) for k in k_grid], per_gene=True
                )
                for h, (set_mse, set_corr) in enumerate(sets):
                    mse[h, c, i], corr[h, c, i] = set_mse, set_corr
        raw = mse if alpha_scoring == "mse" else -corr
        per_gene = np.where(np.isfinite(raw), raw, np.inf)
        # each gene takes the neighbour count that suits it best; the weighting, width and penalty are shared
        gene_best = per_gene.min(axis=0)  # (weightings, widths, penalties, genes)
        finite = np.isfinite(gene_best)
        if not finite.any():
            raise ValueError("Cross-validation found no usable penalty.")
        with np.errstate(invalid="ignore"):
            score = np.where(finite.any(axis=-1), np.where(finite, gene_best, 0).sum(-1) / finite.sum(-1), np.inf)
        best_c, i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        best_gamma, best_alpha = float(gamma_grid[i]), float(alpha_grid[j])
        gene_k = np.asarray(k_grid)[np.argmin(per_gene[:, best_c, i, j], axis=0)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # genes that are constant in a fold: NaN
            raw_mse, raw_corr = np.nanmean(mse[0, best_c], axis=-1), np.nanmean(corr[0, best_c], axis=-1)
        warn_at_edge(best_alpha, alpha_grid)
        if len(gamma_grid) > 1 and best_gamma in (gamma_grid[0], gamma_grid[-1]):
            # not a failure: the widest kernel is nearly a linear model, the narrowest nearly nearest neighbours
            logger.info(
                "The kernel width chosen by cross-validation (gamma=%g) lies at the edge of the grid [%g, %g]%s; "
                "`gammas=` widens it.",
                best_gamma,
                gamma_grid[0],
                gamma_grid[-1],
                ": the data look nearly linear in the embedding" if best_gamma == gamma_grid[0] else "",
            )
        info.update(
            gamma=best_gamma,
            alpha=best_alpha,
            alpha_rule=f"cross-validation ({scheme}, {len(folds)} folds, scoring={alpha_scoring})",
            cv={
                "gammas": gamma_grid.tolist(),
                "alphas": alpha_grid.tolist(),
                # of the models on the targets with the fewest neighbours (the raw ones by default)
                "mse": jsonable(raw_mse),
                "pearson": jsonable(raw_corr),
                "n_folds": len(folds),
                "target_neighbors": k_grid,
                # the score of the chosen width and penalty, each gene with its best neighbour count
                "score": float(score[best_c, i, j]),
            },
        )
        config.update(gammas=gamma_grid.tolist(), alphas=alpha_grid.tolist(), alpha_scoring=alpha_scoring)
    if not math.isfinite(best_alpha):
        raise ValueError("Cross-validation found no usable penalty.")
    if (gene_k > 1).any():
        Y = Y.copy()
        for k in np.unique(gene_k[gene_k > 1]):
            cols = gene_k == k
            Y[:, cols] = smooth_targets(Y[:, cols], expression, int(k))
        logger.info(
            "Kernel model: %d of %d genes train on targets averaged over their expression neighbours.",
            int((gene_k > 1).sum()),
            len(gene_k),
        )
    info["target_neighbors"] = [int(k) for k in gene_k]
    column_weights = weights_for(candidates[best_c])
    if candidates[best_c] is not None:
        config["part_weights"] = candidates[best_c].tolist()
        if len(candidates) > 1:
            info["cv"]["part_weights"] = [w.tolist() for w in candidates]
            info["cv"]["part_weight_scores"] = jsonable(score.reshape(len(candidates), -1).min(axis=1))
    Phi, T = features(best_gamma, column_weights)
    coef, intercept = ridge_solve(Phi, tiled(Y), best_alpha)
    config["gamma"] = best_gamma
    arrays = {
        "scaler_mean": mean,
        "scaler_scale": scale,
        "landmarks": L,
        "dual_coef": T @ coef,
        "intercept": intercept,
    }
    if column_weights is not None:
        arrays["column_weights"] = column_weights
    return arrays, config, info


def predict_kernel(Z: np.ndarray, arrays: dict[str, np.ndarray], config: dict[str, Any], *, batch: int = 4096):
    """Predictions for standardised embeddings ``Z``, in batches of rows (the kernel block stays small)."""
    L, coef, b = arrays["landmarks"], arrays["dual_coef"], arrays["intercept"]
    out = np.empty((len(Z), coef.shape[1]), dtype=np.float64)
    for start in range(0, len(Z), batch):
        K = kernel_matrix(
            Z[start : start + batch],
            L,
            kernel=config["kernel"],
            gamma=config["gamma"],
            blocks=config.get("blocks"),
            weights=arrays.get("column_weights"),
        )
        out[start : start + batch] = K @ coef + b
    return out


class Kernel(ExpressionMethod):
    """Kernel ridge regression, width, penalty, part weights and target smoothing chosen by section-grouped CV."""

    name = "kernel"
    description = "kernel ridge regression on a relevance-weighted embedding, chosen by section-grouped CV"
    options = frozenset(
        {
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
        }
    )
    arrays = ("scaler_mean", "scaler_scale", "landmarks", "dual_coef", "intercept")
    learns_views = True

    def fit(self, data: TrainingSet, **options: Any) -> Fitted:
        """:func:`fit_kernel` on the training set, with its expression when smoothing or weighting needs it."""
        smoothing = neighbor_grid(options.get("target_neighbors"), data.n) != [1]
        power = options.get("relevance_power")
        # the training spots' expression: each one's neighbours for target smoothing are found in it, and the
        # embedding's dimensions are weighted by how well they follow it
        needs = smoothing or (DEFAULT_RELEVANCE_POWER if power is None else power)
        arrays, config, info = fit_kernel(
            data.X,
            data.Y,
            data.labels,
            data.regions,
            data.coords,
            random_state=data.random_state,
            blocks=data.blocks,
            expression=data.expression() if needs else None,
            views=data.views,
            **options,
        )
        return Fitted(arrays, config, info, n_features=data.X.shape[1])

    def predict(self, fitted: Fitted, predictor: Any, inputs: np.ndarray, **options: Any) -> np.ndarray:
        """``k(x, landmarks) @ dual_coef + intercept`` on the standardised embedding."""
        return predict_kernel(standardised(fitted, inputs), fitted.arrays, fitted.config)

    def summary(self, fitted: Fitted) -> str:
        """Kernel, width, penalty, landmarks and weights."""
        c, p = fitted.config, fitted.info
        return (
            f"kernel ridge: {c['kernel']} kernel, gamma={c['gamma']:g}, "
            f"alpha={p.get('alpha', float('nan')):.4g} ({p.get('alpha_rule', '?')}), "
            f"{p.get('n_landmarks', '?')} landmarks"
            + (
                f", dimensions weighted by expression relevance ** {p['relevance_power']:g}"
                if p.get("relevance_power")
                else ""
            )
            + (f", parts weighted {', '.join(f'{w:.2g}' for w in c['part_weights'])}" if c.get("part_weights") else "")
        )


METHOD = Kernel()

"""Training targets averaged over expression neighbours (kNN smoothing of the training spots).

A spot of legacy ST or Visium counts a few thousand molecules, so the expression of one gene at one spot
is mostly counting noise (``hs.tl.evaluate(..., ceiling=True)`` measures how much). A model trained on
those raw values spends its capacity on noise. Replacing each training spot's targets by the mean over
its ``k`` nearest training spots *in expression space* (the spot itself included), like the kNN
smoothing of single-cell data, keeps what the neighbours share (the spot's cell types and state) and
averages out what they do not (the counting). Neighbours are found in the principal components of the
standardised log-normalised expression of the most expressed genes, which are the least noisy.

Only the training targets are smoothed, and only from training spots: a validation or test spot's
expression never enters them, and predictions are always scored against the raw targets. The kernel
method chooses ``k`` (``1`` = no smoothing) by its section-grouped cross-validation, which smooths
inside each inner training fold and scores on the raw held-out targets
(:func:`histoseq.tl.methods._kernel.fit_kernel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Number of nearest training spots (itself included) whose targets are averaged, tried by the kernel
#: method's cross-validation: ``1`` keeps the raw targets.
DEFAULT_TARGET_NEIGHBORS = (1, 10)
#: Most expressed training genes whose expression defines the neighbours.
NEIGHBOR_GENES = 2000
#: Principal components of that expression in which the neighbours are found.
NEIGHBOR_COMPONENTS = 30


def neighbor_genes(counts, n: int = NEIGHBOR_GENES) -> np.ndarray:
    """Columns of the ``n`` genes with the highest mean count over the rows of ``counts``."""
    mean = np.asarray(counts.mean(axis=0), dtype=np.float64).ravel()
    order = np.argsort(-mean, kind="stable")
    return np.sort(order[: min(int(n), len(order))])


def neighbor_grid(target_neighbors: int | Sequence[int] | None, n_spots: int) -> list[int]:
    """The checked, sorted neighbour counts to try (``None``: :data:`DEFAULT_TARGET_NEIGHBORS`)."""
    values = DEFAULT_TARGET_NEIGHBORS if target_neighbors is None else target_neighbors
    values = [values] if np.isscalar(values) else list(values)
    if not values or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"`target_neighbors` must be positive integers (1 = no smoothing), got {target_neighbors!r}.")
    return sorted({min(int(v), max(n_spots, 1)) for v in values})


def smooth_targets(
    Y: np.ndarray, expression: np.ndarray, k: int, *, n_components: int = NEIGHBOR_COMPONENTS
) -> np.ndarray:
    """Each row of ``Y`` replaced by the mean of the rows of its ``k`` nearest neighbours in expression.

    Parameters
    ----------
    Y
        ``(n, genes)`` targets of ``n`` training spots.
    expression
        ``(n, m)`` log-normalised expression of the same spots (many genes; see :func:`neighbor_genes`).
        Each gene is standardised over these spots, and neighbours are Euclidean in its first
        ``n_components`` principal components (scaled by their singular values).
    k
        Neighbours averaged, the spot itself included; ``1`` returns a copy of ``Y``.
    n_components
        Principal components in which the neighbours are found.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._targets import smooth_targets
    >>> E = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> smooth_targets(np.array([[1.0], [3.0], [10.0], [20.0]]), E, 2).ravel().tolist()
    [2.0, 2.0, 15.0, 15.0]

    """
    from scipy.spatial import cKDTree

    Y = np.asarray(Y, dtype=np.float64)
    n = len(Y)
    E = np.asarray(expression)
    if E.ndim != 2 or len(E) != n:
        raise ValueError(f"`expression` must have one row per target row ({n}), got shape {E.shape}.")
    k = min(int(k), n)
    if k <= 1:
        return Y.copy()
    scores = expression_components(E, n_components)
    if scores.shape[1] == 0:  # no gene varies: every spot is everyone's neighbour
        return np.repeat(Y.mean(axis=0, keepdims=True), n, axis=0)
    _, idx = cKDTree(scores).query(scores, k)
    return Y[idx].mean(axis=1)


def expression_components(expression: np.ndarray, n_components: int = NEIGHBOR_COMPONENTS) -> np.ndarray:
    """Scores ``(n, r)`` of the first principal components of the standardised ``expression`` ``(n, m)``.

    Each gene is centred and scaled over the ``n`` spots (genes that do not vary are dropped, and with no
    gene left ``r`` is 0); the scores are scaled by their singular values, so Euclidean distances between
    rows approximate those of the standardised expression.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._targets import expression_components
    >>> rng = np.random.default_rng(0)
    >>> E = np.outer(rng.normal(size=50), [1.0, 2.0, -1.0]) + 0.01 * rng.normal(size=(50, 3))
    >>> S = expression_components(E, 2)
    >>> S.shape, bool(S[:, 0].var() > 100 * S[:, 1].var())  # one component carries nearly everything
    ((50, 2), True)

    """
    E = np.asarray(expression, dtype=np.float64)
    E = E - E.mean(axis=0)
    sd = E.std(axis=0)
    E = E[:, sd > 1e-12] / sd[sd > 1e-12]
    n = len(E)
    if E.shape[1] == 0 or n == 0:
        return np.zeros((n, 0))
    r = max(1, min(int(n_components), E.shape[1], n))
    # from the smaller of the two Gram matrices: (spots × spots) for few spots, (genes × genes) for many,
    # so neither time nor memory grows with the product
    if n <= E.shape[1]:
        evals, evecs = np.linalg.eigh(E @ E.T)
        return evecs[:, ::-1][:, :r] * np.sqrt(np.clip(evals[::-1][:r], 0, None))
    _, evecs = np.linalg.eigh(E.T @ E)
    return E @ evecs[:, ::-1][:, :r]

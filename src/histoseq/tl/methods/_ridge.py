"""``method="ridge"``: a linear probe on the principal components of the standardised embedding.

Standardise each dimension, project on at most :data:`MAX_COMPONENTS` principal components, and fit a ridge
regression with an unpenalised intercept, its penalty chosen from ``alphas`` by cross-validation inside the
training spots (:func:`histoseq.tl._splits.cv_folds`: leave one training section out). PCA and scaling are
fitted once on all training spots (they use no expression). :mod:`~histoseq.tl.methods._ridge_hest` is the
same pipeline with HEST's fixed penalty.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._utils import jsonable, standardise
from .._linalg import DEFAULT_ALPHAS, check_scoring, grid, ridge_cv, ridge_solve, warn_at_edge
from .._splits import cv_folds
from ._base import ExpressionMethod, Fitted, standardised

if TYPE_CHECKING:
    from .._training_set import TrainingSet

logger = logging.getLogger(__name__)

#: Largest number of principal components kept before the ridge regression.
MAX_COMPONENTS = 256


class Ridge(ExpressionMethod):
    """Standardisation, PCA and a ridge regression whose penalty is chosen by section-grouped CV."""

    name = "ridge"
    description = "ridge regression on principal components, penalty chosen by section-grouped CV"
    options = frozenset({"alphas", "alpha", "n_components", "alpha_scoring", "n_splits"})
    arrays = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept")

    def penalty(
        self,
        data: TrainingSet,
        P: np.ndarray,
        n_comp: int,
        *,
        alphas: Sequence[float] | None = None,
        alpha: float | None = None,
        alpha_scoring: str = "mse",
        n_splits: int = 5,
    ) -> tuple[float, dict[str, Any], dict[str, Any]]:
        """The penalty (given, or chosen by CV on the PCA scores ``P``), its record and the options used."""
        if alpha is not None:
            if alphas is not None:
                raise TypeError(
                    "Give either `alpha` (a fixed penalty) or `alphas` (penalties to choose from), not both."
                )
            chosen = float(alpha)
            if not (math.isfinite(chosen) and chosen >= 0):
                raise ValueError(f"`alpha` must be a non-negative number, got {alpha!r}.")
            return chosen, {"alpha": chosen, "alpha_rule": "given"}, {}
        alpha_grid = grid(alphas, DEFAULT_ALPHAS, "alphas", positive=False)
        check_scoring(alpha_scoring)
        folds, scheme = cv_folds(
            data.labels, data.regions, data.coords, data.n, n_splits=n_splits, random_state=data.random_state
        )
        mse, corr = ridge_cv(P, data.Y, folds, alpha_grid)
        best = int(np.nanargmin(mse)) if alpha_scoring == "mse" else int(np.nanargmax(corr))
        chosen = float(alpha_grid[best])
        warn_at_edge(chosen, alpha_grid)
        info = {
            "alpha": chosen,
            "alpha_rule": f"cross-validation ({scheme}, {len(folds)} folds, scoring={alpha_scoring})",
            "cv": {
                "alphas": alpha_grid.tolist(),
                "mse": jsonable(mse),
                "pearson": jsonable(corr),
                "n_folds": len(folds),
            },
        }
        return chosen, info, {"alphas": alpha_grid.tolist(), "alpha_scoring": alpha_scoring}

    def fit(self, data: TrainingSet, *, n_components: int | float | None = None, **options: Any) -> Fitted:
        """Standardise, project on principal components, and solve the ridge regression."""
        from sklearn.decomposition import PCA

        X, Y = data.X, data.Y
        n, d = X.shape
        if n < 3:
            raise ValueError(f"A ridge model needs at least 3 training spots, got {n}.")
        mean, scale = standardise(X)
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
                    "`n_components=%d` exceeds min(%d, n_features, n_train - 1); using %d.",
                    n_components,
                    MAX_COMPONENTS,
                    k,
                )
        else:
            raise ValueError(
                f"`n_components` must be a positive integer or a fraction in (0, 1), got {n_components!r}."
            )
        solver = "full" if isinstance(k, float) else "auto"
        pca = PCA(n_components=k, svd_solver=solver, random_state=data.random_state).fit(Z)
        if isinstance(k, float) and pca.n_components_ > limit:
            pca = PCA(n_components=limit, random_state=data.random_state).fit(Z)
        P = pca.transform(Z)
        n_comp = int(pca.n_components_)
        info: dict[str, Any] = {
            "n_components": n_comp,
            "explained_variance": float(pca.explained_variance_ratio_.sum()),
        }
        config: dict[str, Any] = {"n_components": n_components if n_components is None else jsonable(n_components)}
        chosen, penalty_info, penalty_config = self.penalty(data, P, n_comp, **options)
        info.update(penalty_info)
        config.update(penalty_config)
        coef, intercept = ridge_solve(P, Y, chosen)
        arrays = {
            "scaler_mean": mean,
            "scaler_scale": scale,
            "pca_mean": pca.mean_.astype(np.float64),
            "pca_components": pca.components_.astype(np.float64),
            "coef": coef,
            "intercept": intercept,
        }
        return Fitted(arrays, config, info, n_features=d)

    def predict(self, fitted: Fitted, predictor: Any, inputs: np.ndarray, **options: Any) -> np.ndarray:
        """The linear map: scaling, principal components, coefficients."""
        a = fitted.arrays
        P = (standardised(fitted, inputs) - a["pca_mean"]) @ a["pca_components"].T
        return P @ a["coef"] + a["intercept"]

    def summary(self, fitted: Fitted) -> str:
        """Penalty and components."""
        p = fitted.info
        return (
            f"ridge: alpha={p.get('alpha', float('nan')):.4g} ({p.get('alpha_rule', '?')}), "
            f"{p.get('n_components', '?')} principal components"
        )


METHOD = Ridge()

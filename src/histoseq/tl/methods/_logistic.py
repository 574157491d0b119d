"""``method="logistic"``: multinomial logistic regression on the standardised embedding, for classes.

The classification method of :func:`histoseq.tl.fit_classifier`. Its :class:`~histoseq.tl._training_set.TrainingSet`
follows one convention: ``Y`` is the **one-hot class matrix** ``(n, K)`` (one 1 per row) and ``genes`` the
``K`` class names, in the order of ``Y``'s columns; :meth:`LogisticMethod.predict` returns class
probabilities ``(n, K)`` in that order.

Each embedding dimension is standardised on the training rows, and a multinomial logistic regression with an
L2 penalty and class weights inversely proportional to the class frequencies (``class_weight="balanced"``)
is fitted with scikit-learn. Its inverse penalty ``C`` is chosen from ``Cs`` by cross-validation inside the
training rows (:func:`histoseq.tl._splits.cv_folds`: leave one training section out), scored by the
*balanced* log-loss (the mean over classes of the held-out rows' mean ``-log p(true class)``), so that a rare
class counts as much as a common one. Only arrays are kept (scaler, coefficients, intercepts); prediction is
numpy, so a model file holds no scikit-learn object.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._utils import jsonable, standardise
from .._linalg import grid
from .._splits import cv_folds
from ._base import ExpressionMethod, Fitted, standardised

if TYPE_CHECKING:
    from .._training_set import TrainingSet

logger = logging.getLogger(__name__)

#: Inverse L2 penalties tried by the inner cross-validation: one per decade from 1e-4 to 100.
DEFAULT_CS = np.logspace(-4, 2, 7)
#: How the inner cross-validation scores a penalty.
SCORINGS = ("balanced_log_loss", "balanced_accuracy")
_EPS = 1e-12


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


def class_indices(Y: np.ndarray) -> np.ndarray:
    """The class index of each row of a one-hot matrix, checked."""
    Y = np.asarray(Y)
    if Y.ndim != 2 or Y.shape[1] < 2:
        raise ValueError(f"A classifier needs a one-hot class matrix with at least 2 columns, got shape {Y.shape}.")
    if not (np.isin(Y, (0, 1)).all() and (Y.sum(axis=1) == 1).all()):
        raise ValueError("`Y` must be a one-hot class matrix: one 1 per row, zeros elsewhere.")
    return Y.argmax(axis=1)


def _full_arrays(clf: Any, K: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K, d)`` coefficients and ``(K,)`` intercepts of a fitted scikit-learn model over all ``K`` classes.

    A binary model has one row (the log-odds of its second class): the first class gets zeros, so the
    softmax of the two rows is the model's sigmoid. A class the model never saw gets a very low intercept.
    """
    coef, intercept = np.asarray(clf.coef_, float), np.asarray(clf.intercept_, float)
    seen = np.asarray(clf.classes_, dtype=int)
    if len(seen) == 2:
        coef = np.vstack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, intercept[0]])
    full_coef = np.zeros((K, coef.shape[1]))
    full_int = np.full(K, -1e3)  # a class absent from the fold's training rows is never predicted
    full_coef[seen], full_int[seen] = coef, intercept
    return full_coef, full_int


def fit_path(
    X: np.ndarray, y: np.ndarray, K: int, Cs: Sequence[float], class_weight: str | None, max_iter: int, seed: Any
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``(coef, intercept, iterations)`` of a logistic regression for each ``C`` of ``Cs``.

    One scikit-learn model is refitted along the increasing ``Cs``, each fit warm-started from the last (the
    weakly penalised fits, which take the most iterations, start near their solution). The solver is Newton-CG:
    image features are strongly correlated, and on them L-BFGS takes hundreds of iterations where Newton-CG
    takes about ten (30–50 times faster on the olfactory bulb's morphology features).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(
        class_weight=class_weight, max_iter=max_iter, random_state=seed, warm_start=True, solver="newton-cg"
    )
    out: dict[float, tuple[np.ndarray, np.ndarray, int]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in sorted(float(c) for c in Cs):
            clf.set_params(C=C).fit(X, y)
            out[C] = (*_full_arrays(clf, K), int(np.max(clf.n_iter_)))
    return [out[float(c)] for c in Cs]


def balanced_scores(y: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """Balanced log-loss and balanced accuracy of class probabilities, over the classes present in ``y``."""
    losses, hits = [], []
    pred = proba.argmax(axis=1)
    for k in np.unique(y):
        rows = y == k
        losses.append(float(-np.log(np.clip(proba[rows, k], _EPS, 1.0)).mean()))
        hits.append(float((pred[rows] == k).mean()))
    return float(np.mean(losses)), float(np.mean(hits))


class LogisticMethod(ExpressionMethod):
    """Standardisation and a class-balanced multinomial logistic regression, ``C`` chosen by section-grouped CV."""

    name = "logistic"
    description = "multinomial logistic regression on the standardised embedding, L2 penalty chosen by grouped CV"
    task = "classification"
    reads = "embedding"
    options = frozenset({"Cs", "C", "scoring", "class_weight", "n_splits", "max_iter"})
    arrays = ("scaler_mean", "scaler_scale", "coef", "intercept")

    def check_options(self, options: Any) -> None:
        """Refuse unknown options and bad values before any work."""
        super().check_options(options)
        if "scoring" in options and options["scoring"] not in SCORINGS:
            raise ValueError(f"`scoring` must be one of {list(SCORINGS)}, got {options['scoring']!r}.")
        if options.get("class_weight", "balanced") not in ("balanced", None):
            raise ValueError(f"`class_weight` must be 'balanced' or None, got {options['class_weight']!r}.")
        if "Cs" in options and options["Cs"] is not None:
            grid(options["Cs"], DEFAULT_CS, "Cs", positive=True)
        C = options.get("C")
        if C is not None and not (isinstance(C, int | float) and math.isfinite(C) and C > 0):
            raise ValueError(f"`C` must be a positive number, got {C!r}.")

    def choose_C(
        self,
        data: TrainingSet,
        Z: np.ndarray,
        y: np.ndarray,
        *,
        Cs: Sequence[float] | None,
        scoring: str,
        class_weight: str | None,
        n_splits: int,
        max_iter: int,
    ) -> tuple[float, dict[str, Any]]:
        """The ``C`` of ``Cs`` with the best held-out score, and the record of the cross-validation."""
        c_grid = grid(Cs, DEFAULT_CS, "Cs", positive=True)
        K = data.Y.shape[1]
        folds, scheme = cv_folds(
            data.labels, data.regions, data.coords, data.n, n_splits=n_splits, random_state=data.random_state
        )
        loss = np.full((len(folds), len(c_grid)), np.nan)
        acc = np.full_like(loss, np.nan)
        for f, (tr, te) in enumerate(folds):
            if len(np.unique(y[tr])) < 2:
                continue
            path = fit_path(Z[tr], y[tr], K, c_grid, class_weight, max_iter, data.random_state)
            for j, (coef, intercept, _) in enumerate(path):
                loss[f, j], acc[f, j] = balanced_scores(y[te], softmax(Z[te] @ coef.T + intercept))
        if np.isnan(loss).all():
            raise ValueError("No inner cross-validation fold has two classes to train on; pass a fixed `C=`.")
        mean_loss, mean_acc = np.nanmean(loss, axis=0), np.nanmean(acc, axis=0)
        # ties go to the smaller C (the stronger penalty)
        best = int(np.argmin(mean_loss)) if scoring == "balanced_log_loss" else int(np.argmax(mean_acc))
        chosen = float(c_grid[best])
        if len(c_grid) > 1 and best in (0, len(c_grid) - 1):
            logger.info("The C chosen by cross-validation (%g) lies at the edge of the grid %s.", chosen, c_grid)
        info = {
            "C": chosen,
            "C_rule": f"cross-validation ({scheme}, {len(folds)} folds, scoring={scoring})",
            "cv": {
                "Cs": c_grid.tolist(),
                "balanced_log_loss": jsonable(mean_loss),
                "balanced_accuracy": jsonable(mean_acc),
                "n_folds": len(folds),
            },
        }
        return chosen, info

    def fit(
        self,
        data: TrainingSet,
        *,
        Cs: Sequence[float] | None = None,
        C: float | None = None,
        scoring: str = "balanced_log_loss",
        class_weight: str | None = "balanced",
        n_splits: int = 5,
        max_iter: int = 1000,
        **options: Any,
    ) -> Fitted:
        """Standardise, choose ``C`` (unless given) and fit on all training rows.

        ``data.Y`` is the one-hot class matrix and ``data.genes`` the class names (see the module).
        """
        self.check_options({"Cs": Cs, "C": C, "scoring": scoring, "class_weight": class_weight, **options})
        if data.X is None:
            raise ValueError("The logistic method reads an embedding; the training set has none.")
        y = class_indices(data.Y)
        K = data.Y.shape[1]
        missing = [data.genes[k] for k in range(K) if not (y == k).any()]
        if missing:
            raise ValueError(f"The classes {missing} have no training row; drop them from the class matrix.")
        X = np.asarray(data.X, dtype=np.float64)
        mean, scale = standardise(X)
        Z = (X - mean) / scale
        if C is not None:
            if Cs is not None:
                raise TypeError("Give either `C` (a fixed penalty) or `Cs` (penalties to choose from), not both.")
            chosen, info = float(C), {"C": float(C), "C_rule": "given"}
        else:
            chosen, info = self.choose_C(
                data, Z, y, Cs=Cs, scoring=scoring, class_weight=class_weight, n_splits=n_splits, max_iter=max_iter
            )
        ((coef, intercept, n_iter),) = fit_path(Z, y, K, [chosen], class_weight, max_iter, data.random_state)
        train_acc = balanced_scores(y, softmax(Z @ coef.T + intercept))[1]
        info.update({"n_iter": n_iter, "train_balanced_accuracy": train_acc})
        config = {
            "classes": list(data.genes),
            "scoring": scoring,
            "class_weight": class_weight,
            "max_iter": int(max_iter),
        }
        if C is None:
            config["Cs"] = info["cv"]["Cs"]
        arrays = {"scaler_mean": mean, "scaler_scale": scale, "coef": coef, "intercept": intercept}
        return Fitted(arrays, config, info, n_features=X.shape[1])

    def predict(self, fitted: Fitted, predictor: Any, inputs: np.ndarray, **options: Any) -> np.ndarray:
        """Class probabilities ``(n, K)``: the softmax of the linear map of the standardised inputs."""
        a = fitted.arrays
        return softmax(standardised(fitted, np.asarray(inputs, dtype=np.float64)) @ a["coef"].T + a["intercept"])

    def summary(self, fitted: Fitted) -> str:
        """Penalty and classes."""
        p = fitted.info
        return (
            f"logistic: C={p.get('C', float('nan')):.4g} ({p.get('C_rule', '?')}), "
            f"{len(fitted.config.get('classes', []))} classes"
        )


METHOD = LogisticMethod()

"""Per-section normalisation of an embedding (``fit(section_norm=...)``).

Each dimension of an embedding is normalised over the spots of its own section, at training and again at
prediction: :func:`standardise_sections` centres and scales, :func:`rank_sections` replaces values by normal
scores of their ranks. Both read images only, and both assume that every section holds the same mix of
tissue: a section with more tumour than the training sections has its tumour features pulled towards the
training sections' average.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._utils import standardise

logger = logging.getLogger(__name__)

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
    >>> from histoseq.tl._sections import standardise_sections
    >>> X = np.array([[1.0], [3.0], [10.0], [30.0]])
    >>> standardise_sections(X, np.array(["a", "a", "b", "b"])).ravel().tolist()
    [-1.0, 1.0, -1.0, 1.0]

    """

    def centre_and_scale(A: np.ndarray) -> np.ndarray:
        mean, scale = standardise(A)
        return (A - mean) / scale

    return _per_section(X, sections, "standardises", centre_and_scale)


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
    >>> from histoseq.tl._sections import rank_sections
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


def section_norm_mode(section_norm: Any) -> str | None:
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

"""``method="ridge_hest"``: the HEST benchmark's linear probe (Jaume et al., 2024), as a reference.

The pipeline of :mod:`~histoseq.tl.methods._ridge` (standardisation, PCA to at most 256 components, ridge
regression) with HEST's fixed penalty ``alpha = 100 / (n_components * n_genes)``. HEST fits no intercept on
the centred PCA scores, which gives the same coefficients as fitting one; the predictions here are shifted
by the gene means (HEST's are centred on zero), which changes the MSE but no correlation. HEST's targets are
``log1p`` counts: pass ``target_transform="log1p"`` to match it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._ridge import Ridge

if TYPE_CHECKING:
    from .._training_set import TrainingSet


class RidgeHest(Ridge):
    """The ridge pipeline with HEST's fixed penalty."""

    name = "ridge_hest"
    description = "HEST's linear probe: ridge on principal components with a fixed penalty"
    options = frozenset({"n_components"})

    def penalty(
        self, data: TrainingSet, P: np.ndarray, n_comp: int, **options: Any
    ) -> tuple[float, dict[str, Any], dict[str, Any]]:
        """HEST's penalty, ``100 / (n_components * n_genes)``."""
        chosen = 100.0 / (n_comp * data.Y.shape[1])
        return chosen, {"alpha": chosen, "alpha_rule": "HEST: 100 / (n_components * n_genes)"}, {}


METHOD = RidgeHest()

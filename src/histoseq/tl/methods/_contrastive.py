"""``method="contrastive"``: BLEEP (Xie et al., 2023), contrastive image–expression retrieval.

Two projection heads (:class:`~histoseq.models._heads.ContrastiveHeads`) map a spot's standardised
embedding and its standardised expression profile into one joint space, where both are L2-normalised.
They are trained with BLEEP's symmetric loss (:func:`~histoseq.models._plans.bleep_loss`): cross-entropy
of the expression–image similarities, in both directions, against *soft* targets, the softmax of the
mean of the image–image and expression–expression similarities, so that alike spots are not pushed apart.

Prediction is retrieval, not regression: a query spot's embedding is projected, the ``k`` training spots
(the *references*) whose projected expression is most similar are found, and their measured (transformed)
expression is averaged, weighted by a softmax of the similarities (``weighting="softmax"``) or uniformly
(``weighting="mean"``, BLEEP's average). The model file stores the heads, the references' projected
expression and their transformed expression. Predictions are therefore always mixtures of real expression
profiles: they keep the gene–gene structure of the references, and their range is that of the references.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._utils import standardise, unpack_state
from .._network_fit import NETWORK_OPTIONS, NetworkOptions, fit_network
from ._base import ExpressionMethod, Fitted, standardised
from ._mlp import run_network

if TYPE_CHECKING:
    from .._training_set import TrainingSet

logger = logging.getLogger(__name__)

WEIGHTINGS = ("softmax", "mean")


class Contrastive(ExpressionMethod):
    """BLEEP: contrastive image and expression projections, prediction by retrieval of training spots."""

    name = "contrastive"
    description = "BLEEP: contrastive projections of embedding and expression, prediction by retrieval"
    network = True
    options = frozenset({"n_proj", "dropout", "temperature", "k", "weighting", *NETWORK_OPTIONS})
    arrays = (
        "scaler_mean",
        "scaler_scale",
        "target_mean",
        "target_scale",
        "reference_projection",
        "reference_expression",
    )

    def fit(
        self,
        data: TrainingSet,
        *,
        n_proj: int = 256,
        dropout: float = 0.1,
        temperature: float = 0.1,
        k: int = 50,
        weighting: str = "softmax",
        **network: Any,
    ) -> Fitted:
        """Train BLEEP's heads; the arrays hold the scalings, the heads (``net.*``) and the references.

        The references are the training spots: ``reference_projection`` (unit-norm projections of their
        expression) and ``reference_expression`` (their transformed expression), both float32. ``network``:
        :class:`~histoseq.tl._network_fit.NetworkOptions` (here ``weight_decay=1e-3`` and ``batch_size=256``
        by default; a batch holds at least 2 spots).
        """
        import torch

        from ...models._heads import ContrastiveHeads
        from ...models._plans import ContrastivePlan

        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {list(WEIGHTINGS)}, got {weighting!r}.")
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}.")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
        X, Y, n = data.X, data.Y, data.n
        mean, scale = standardise(X)
        Xs = ((X - mean) / scale).astype(np.float32)
        opts = NetworkOptions(**{"weight_decay": 1e-3, "batch_size": 256, **network})
        opts = replace(opts, batch_size=max(2, int(opts.batch_size)))

        def make_plan(seed: int) -> ContrastivePlan:
            heads = ContrastiveHeads(X.shape[1], Y.shape[1], n_proj=n_proj, dropout=dropout)
            return ContrastivePlan(heads, lr=opts.lr, weight_decay=opts.weight_decay, temperature=temperature)

        run = fit_network(
            data,
            torch.from_numpy(Xs),
            make_plan,
            opts,
            default_epochs=200,
            val_batch_size=max(opts.batch_size, 1024),
            drop_last=True,  # a last batch of one spot has nothing to contrast
            min_train_spots=2,  # the contrastive loss needs pairs
        )
        net = run.plan.network
        net.load_state_dict(run.state)
        net.cpu().eval()
        with torch.no_grad():
            ref = net.expression(torch.from_numpy(run.targets)).numpy()
        k_used = min(int(k), n)
        if k_used < int(k):
            logger.warning("`k=%d` exceeds the %d reference spots; predictions average all of them.", k, n)
        config = {
            "n_proj": int(n_proj),
            "dropout": float(dropout),
            "temperature": float(temperature),
            **opts.record(),
            "max_epochs": run.epochs,
            "k": k_used,
            "weighting": weighting,
        }
        arrays = run.arrays(
            scaler_mean=mean,
            scaler_scale=scale,
            reference_projection=ref.astype(np.float32),
            reference_expression=Y.astype(np.float32),
        )
        return Fitted(arrays, config, {**run.info, "n_references": n}, n_features=X.shape[1])

    def load(self, fitted: Fitted) -> Any:
        """The trained heads."""
        from ...models._heads import ContrastiveHeads

        c = fitted.config
        n_genes = fitted.arrays["reference_expression"].shape[1]
        heads = ContrastiveHeads(fitted.n_features, n_genes, n_proj=c["n_proj"], dropout=c["dropout"])
        heads.load_state_dict(unpack_state(fitted.arrays), strict=True)
        return heads.eval()

    def predict(
        self, fitted: Fitted, predictor: Any, inputs: np.ndarray, *, batch_size: int = 65536, **options: Any
    ) -> np.ndarray:
        """Retrieval: the weighted mean expression of the references nearest to each projected embedding."""
        a, c = fitted.arrays, fitted.config
        query = run_network(predictor, standardised(fitted, inputs), batch_size)
        return retrieve(
            query,
            a["reference_projection"],
            a["reference_expression"],
            k=c["k"],
            weighting=c["weighting"],
            temperature=c["temperature"],
        )

    def summary(self, fitted: Fitted) -> str:
        """Joint space, retrieval and early stopping."""
        c, p = fitted.config, fitted.info
        return (
            f"contrastive (BLEEP): {c['n_proj']}-d joint space, temperature {c['temperature']:g}; predicts "
            f"the {c['weighting']} of the top {c['k']} of {p.get('n_references', '?')} references; "
            f"best epoch {p.get('best_epoch')} (validation: {p.get('validation')})"
        )


def retrieve(
    query: np.ndarray,
    references: np.ndarray,
    expression: np.ndarray,
    *,
    k: int,
    weighting: str,
    temperature: float,
    batch_size: int = 4096,
) -> np.ndarray:
    """Weighted mean expression of the ``k`` references most similar to each query (all unit-norm, float64).

    The similarity is the dot product (cosine) of the projections. ``weighting="softmax"`` weighs the
    ``k`` neighbours by ``exp(similarity / temperature)`` (normalised to sum to one), ``"mean"`` equally.
    """
    query = np.asarray(query, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    expression = np.asarray(expression, dtype=np.float64)
    k = min(int(k), len(references))
    out = np.empty((len(query), expression.shape[1]), dtype=np.float64)
    for start in range(0, len(query), batch_size):
        sim = query[start : start + batch_size] @ references.T
        if k < sim.shape[1]:
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        else:
            idx = np.broadcast_to(np.arange(sim.shape[1]), sim.shape).copy()
        top = np.take_along_axis(sim, idx, axis=1)
        if weighting == "mean":
            w = np.full(top.shape, 1.0 / k)
        else:
            z = (top - top.max(axis=1, keepdims=True)) / temperature
            w = np.exp(z)
            w /= w.sum(axis=1, keepdims=True)
        out[start : start + batch_size] = np.einsum("nk,nkg->ng", w, expression[idx])
    return out


METHOD = Contrastive()

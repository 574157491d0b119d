"""``method="mlp"``: a small neural network on the standardised embedding, trained with Lightning.

A :class:`~histoseq.models._heads.MLPHead` (``n_layers`` hidden layers of ``n_hidden`` units, GELU,
``dropout``) predicts standardised targets under a mean squared error (:class:`~histoseq.models._plans.
RegressionPlan`, AdamW), with early stopping on a validation section taken from the training sections and
the weights of the best validation epoch kept (:func:`histoseq.tl._network_fit.fit_network`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..._utils import standardise, unpack_state
from .._network_fit import NETWORK_OPTIONS, NetworkOptions, fit_network
from ._base import ExpressionMethod, Fitted, standardised

if TYPE_CHECKING:
    from .._training_set import TrainingSet


def run_network(network: Any, Z: np.ndarray, batch_size: int) -> np.ndarray:
    """Outputs ``(n, out)`` (float64) of a network for the standardised embedding ``Z``, in batches."""
    import torch

    Zf = Z.astype(np.float32)
    parts = []
    with torch.no_grad():
        for start in range(0, len(Zf), batch_size):
            parts.append(network(torch.from_numpy(Zf[start : start + batch_size])).numpy().astype(np.float64))
    return np.concatenate(parts)


class MLP(ExpressionMethod):
    """An MLP head on the embedding, with early stopping on a training section."""

    name = "mlp"
    description = "a small neural network on the embedding, early stopping on a training section"
    network = True
    options = frozenset({"n_hidden", "n_layers", "dropout", *NETWORK_OPTIONS})
    arrays = ("scaler_mean", "scaler_scale", "target_mean", "target_scale")

    def fit(
        self,
        data: TrainingSet,
        *,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        **network: Any,
    ) -> Fitted:
        """Train the head; see :func:`histoseq.tl.fit`.

        ``network``: the options of :class:`~histoseq.tl._network_fit.NetworkOptions`.
        """
        import torch

        from ...models._heads import MLPHead
        from ...models._plans import RegressionPlan

        opts = NetworkOptions(**network)
        X = data.X
        mean, scale = standardise(X)
        Xs = ((X - mean) / scale).astype(np.float32)

        def make_plan(seed: int) -> RegressionPlan:
            net = MLPHead(X.shape[1], data.Y.shape[1], n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
            return RegressionPlan(net, lr=opts.lr, weight_decay=opts.weight_decay)

        run = fit_network(
            data,
            torch.from_numpy(Xs),
            make_plan,
            opts,
            default_epochs=200,
        )
        config = {
            "n_hidden": int(n_hidden),
            "n_layers": int(n_layers),
            "dropout": float(dropout),
            **opts.record(),
            "max_epochs": run.epochs,
        }
        return Fitted(run.arrays(scaler_mean=mean, scaler_scale=scale), config, run.info, n_features=X.shape[1])

    def load(self, fitted: Fitted) -> Any:
        """The trained head."""
        from ...models._heads import MLPHead

        c = fitted.config
        net = MLPHead(
            fitted.n_features,
            len(fitted.arrays["target_mean"]),
            n_hidden=c["n_hidden"],
            n_layers=c["n_layers"],
            dropout=c["dropout"],
        )
        net.load_state_dict(unpack_state(fitted.arrays))
        return net.eval()

    def predict(
        self, fitted: Fitted, predictor: Any, inputs: np.ndarray, *, batch_size: int = 65536, **options: Any
    ) -> np.ndarray:
        """The head's output, scaled back to the targets."""
        a = fitted.arrays
        return run_network(predictor, standardised(fitted, inputs), batch_size) * a["target_scale"] + a["target_mean"]

    def summary(self, fitted: Fitted) -> str:
        """Architecture and early stopping."""
        c, p = fitted.config, fitted.info
        return (
            f"mlp: {c['n_layers']} hidden layer(s) of {c['n_hidden']}, dropout {c['dropout']}; "
            f"best epoch {p.get('best_epoch')} (validation: {p.get('validation')})"
        )


METHOD = MLP()

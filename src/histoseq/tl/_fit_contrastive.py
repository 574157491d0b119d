"""``fit(method="contrastive")``: BLEEP (Xie et al., 2023), contrastive image–expression retrieval.

Two projection heads (:class:`~histoseq.models._heads.ContrastiveHeads`) map a spot's standardised
embedding and its standardised expression profile into one joint space, where both are L2-normalised.
They are trained with BLEEP's symmetric loss (:func:`~histoseq.models._heads.bleep_loss`): cross-entropy
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
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WEIGHTINGS = ("softmax", "mean")


def fit_contrastive(
    X: np.ndarray,
    Y: np.ndarray,
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    *,
    random_state: int | None,
    progress: bool,
    max_epochs: int | None,
    accelerator: Any,
    devices: Any,
    strategy: Any,
    n_proj: int = 256,
    dropout: float = 0.1,
    temperature: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    batch_size: int = 256,
    patience: int = 20,
    val_groups: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    k: int = 50,
    weighting: str = "softmax",
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Train BLEEP's heads on embeddings ``X`` and targets ``Y``; see :func:`histoseq.tl.fit`.

    Returns ``(arrays, config, info)`` for :class:`~histoseq.tl.ExpressionModel`: the scalings, the heads'
    state dict (``net.*``) and the references (``reference_projection``: unit-norm projections of the
    training spots' expression, ``reference_expression``: their transformed expression, both float32).
    """
    import torch
    from torch.utils.data import TensorDataset

    from ..models._heads import ContrastiveHeads, ContrastivePlan
    from ..models._training import training_seed
    from ._fit import _standardise, _train_plan, _training_record, _validation_rows

    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {list(WEIGHTINGS)}, got {weighting!r}.")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
    n = len(X)
    val, val_desc = _validation_rows(
        labels, regions, coords, n, val_groups=val_groups, val_fraction=val_fraction, random_state=random_state
    )
    if (~val).sum() < 2:
        raise ValueError("The contrastive loss needs at least 2 training spots outside the validation spots.")
    mean, scale = _standardise(X)
    y_mean, y_scale = _standardise(Y)
    Xs = ((X - mean) / scale).astype(np.float32)
    Ys = ((Y - y_mean) / y_scale).astype(np.float32)
    seed = training_seed(random_state)
    epochs = 200 if max_epochs is None else int(max_epochs)
    tr, va = np.flatnonzero(~val), np.flatnonzero(val)
    batch = max(2, int(batch_size))
    plan = _train_plan(
        lambda: ContrastivePlan(
            ContrastiveHeads(X.shape[1], Y.shape[1], n_proj=n_proj, dropout=dropout),
            lr=lr,
            weight_decay=weight_decay,
            temperature=temperature,
        ),
        TensorDataset(torch.from_numpy(Xs[tr]), torch.from_numpy(Ys[tr])),
        TensorDataset(torch.from_numpy(Xs[va]), torch.from_numpy(Ys[va])),
        seed=seed,
        batch_size=batch,
        val_batch_size=max(batch, 1024),
        drop_last=len(tr) > batch,  # a last batch of one spot has nothing to contrast
        progress=progress,
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        patience=patience,
        trainer_kwargs=trainer_kwargs,
    )
    net = plan.network
    state, info = _training_record(plan, net, val_desc, int(val.sum()), seed)
    net.load_state_dict(state)
    net.cpu().eval()
    with torch.no_grad():
        ref = net.expression(torch.from_numpy(Ys)).numpy()
    arrays = {
        "scaler_mean": mean,
        "scaler_scale": scale,
        "target_mean": y_mean,
        "target_scale": y_scale,
        "reference_projection": ref.astype(np.float32),
        "reference_expression": Y.astype(np.float32),
    }
    arrays.update({f"net.{key}": v.numpy().copy() for key, v in state.items()})
    k_used = min(int(k), n)
    if k_used < int(k):
        logger.warning("`k=%d` exceeds the %d reference spots; predictions average all of them.", k, n)
    config = {
        "n_proj": int(n_proj),
        "dropout": float(dropout),
        "temperature": float(temperature),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": batch,
        "patience": int(patience),
        "max_epochs": epochs,
        "k": k_used,
        "weighting": weighting,
    }
    info["n_references"] = n
    return arrays, config, info


def rebuild_heads(config: Mapping[str, Any], n_features: int, arrays: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """The trained heads of a saved ``"contrastive"`` model."""
    import torch

    from ..models._heads import ContrastiveHeads

    n_genes = arrays["reference_expression"].shape[1]
    with torch.random.fork_rng(devices=[]):  # initialisation draws (replaced below) leave the global state alone
        heads = ContrastiveHeads(n_features, n_genes, n_proj=config["n_proj"], dropout=config["dropout"])
    state = {key[4:]: torch.from_numpy(np.array(v)) for key, v in arrays.items() if key.startswith("net.")}
    heads.load_state_dict(state, strict=True)
    heads.eval()
    return heads


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

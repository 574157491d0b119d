"""Gated attention pooling over bags of tile embeddings, one attention vector per gene (``method="attention"``).

A spot is a *bag* of tiles: the tiles of the square region around it, each embedded by a fixed encoder.
:class:`GatedAttentionRegressor` follows the gated attention pooling of Ilse et al. (2018), used for
interpretable expression regression by Graziani et al.: a small tile network ``h = MLP(x)``, a gated score
per tile and gene ``s_g = w_g · (tanh(V h) ⊙ sigmoid(U h))`` (``V`` and ``U`` shared, one ``w_g`` per gene),
attention ``a = softmax_T(s)``, the pooled tile representation ``z_g = Σ_t a_tg h_t`` per gene and a linear
read-out per gene ``y_g = β_g · z_g + b_g``. Each gene thus has its own view of which tiles matter, and the
scores ``s`` of a tile depend on that tile alone, so they can be mapped over a whole slide.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._plans import RegressionPlan


class GatedAttentionRegressor(nn.Module):
    """Gated attention pooling of tile embeddings with one attention vector and one read-out per gene.

    Parameters
    ----------
    n_features
        Dimension of the tile embeddings.
    n_genes
        Number of genes (outputs).
    n_hidden
        Width of the tile network (the pooled representation).
    n_attention
        Width of the gated attention layer.
    dropout
        Dropout after the tile network.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models._attention import GatedAttentionRegressor
    >>> net = GatedAttentionRegressor(8, 3, n_hidden=16, n_attention=4).eval()
    >>> x = torch.randn(5, 16, 8)  # 5 bags of 16 tiles
    >>> net(x).shape, net.scores(x).shape
    (torch.Size([5, 3]), torch.Size([5, 16, 3]))
    >>> bool(torch.allclose(net.attention(x).sum(dim=1), torch.ones(5, 3)))
    True

    """

    def __init__(
        self, n_features: int, n_genes: int, *, n_hidden: int = 64, n_attention: int = 32, dropout: float = 0.1
    ):
        super().__init__()
        for name, value in (("n_features", n_features), ("n_genes", n_genes), ("n_hidden", n_hidden)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(n_attention, bool) or int(n_attention) != n_attention or n_attention < 1:
            raise ValueError(f"`n_attention` must be a positive integer, got {n_attention!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        self.n_features, self.n_genes = int(n_features), int(n_genes)
        self.tile = nn.Sequential(nn.Linear(self.n_features, int(n_hidden)), nn.GELU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(int(n_hidden), int(n_attention))
        self.attention_u = nn.Linear(int(n_hidden), int(n_attention))
        # zero: every gene starts from uniform attention and moves away from it only as far as its targets ask
        self.attention_w = nn.Parameter(torch.zeros(self.n_genes, int(n_attention)))
        self.readout = nn.Parameter(torch.zeros(self.n_genes, int(n_hidden)))
        self.bias = nn.Parameter(torch.zeros(self.n_genes))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.n_features:
            raise ValueError(
                f"The network reads bags of tile embeddings (B, T, {self.n_features}); got shape {tuple(x.shape)}."
            )

    def _scores(self, h: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))  # (B, T, A)
        return torch.einsum("bta,ga->btg", gate, self.attention_w)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Gated scores ``(B, T, G)`` before the softmax; a tile's scores depend on that tile only."""
        self._check(x)
        return self._scores(self.tile(x))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention ``(B, T, G)`` of each gene over the tiles of each bag (sums to 1 over ``T``)."""
        return torch.softmax(self.scores(x), dim=1)

    def predict_with_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions ``(B, G)`` and the scores ``(B, T, G)`` they come from, in one pass."""
        self._check(x)
        h = self.tile(x)  # (B, T, H)
        s = self._scores(h)
        z = torch.einsum("btg,bth->bgh", torch.softmax(s, dim=1), h)  # pooled per gene
        return torch.einsum("bgh,gh->bg", z, self.readout) + self.bias, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``(B, G)`` for bags ``(B, T, n_features)`` of tile embeddings."""
        return self.predict_with_scores(x)[0]


class AttentionRegressionPlan(RegressionPlan):
    """Mean squared error of a :class:`GatedAttentionRegressor`, plus a penalty on uneven attention in training.

    ``attention_penalty`` times the mean variance of each gene's scores within a bag is added to the training
    loss (not to the validation loss that early stopping reads): attention moves away from uniform only as far
    as it lowers the error, so genes that the tiles do not explain keep flat attention maps.

    Parameters
    ----------
    network
        The network to train.
    lr
        Learning rate of AdamW.
    weight_decay
        Decoupled weight decay of AdamW.
    attention_penalty
        Weight of the penalty (``0``: plain mean squared error).

    """

    def __init__(
        self, network: GatedAttentionRegressor, *, lr: float = 1e-3, weight_decay: float = 1e-4, attention_penalty=0.0
    ):
        super().__init__(network, lr=lr, weight_decay=weight_decay)
        if not attention_penalty >= 0:
            raise ValueError(f"`attention_penalty` must be non-negative, got {attention_penalty!r}.")
        self.attention_penalty = float(attention_penalty)

    def loss(self, batch: Any, *, training: bool) -> tuple[torch.Tensor, int]:
        """Mean squared error on a batch (and in training the attention penalty)."""
        x, y = batch
        pred, s = self.network.predict_with_scores(x)
        loss = nn.functional.mse_loss(pred, y)
        if training and self.attention_penalty > 0:
            loss = loss + self.attention_penalty * s.var(dim=1, unbiased=False).mean()
        return loss, len(x)

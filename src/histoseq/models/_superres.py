"""A network that predicts expression per tile and learns it from spots (``method="superres"``).

Super-resolution with weak supervision (as iStar does): the spots measure the *mean* expression of the tissue
they cover, so a tile network ``f`` that maps one tile's embedding to expression is trained so that the mean of
``f`` over the tiles that make up a spot matches the spot's measurement. Once trained, ``f`` of a single tile is
the expression at the tile's scale, wherever the tile lies.

:class:`TileRegressor` is ``f`` applied to bags ``(B, T, D)``; :class:`SuperResolutionPlan` trains it with the
mean squared error of the bag means and an optional smoothness penalty on neighbouring tiles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._plans import RegressionPlan


class TileRegressor(nn.Module):
    """Expression per tile from a tile's embedding; a bag's prediction is the mean over its tiles.

    Parameters
    ----------
    n_features
        Dimension of the tile embeddings.
    n_genes
        Number of genes (outputs).
    n_hidden
        Width of the hidden layer (``0``: a linear map).
    dropout
        Dropout after the hidden layer.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models._superres import TileRegressor
    >>> net = TileRegressor(8, 3, n_hidden=16).eval()
    >>> x = torch.randn(5, 4, 8)  # 5 spots of 2 × 2 tiles
    >>> net.tiles(x).shape, net(x).shape
    (torch.Size([5, 4, 3]), torch.Size([5, 3]))
    >>> bool(torch.allclose(net(x), net.tiles(x).mean(dim=1)))
    True

    """

    def __init__(self, n_features: int, n_genes: int, *, n_hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        for name, value in (("n_features", n_features), ("n_genes", n_genes)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(n_hidden, bool) or int(n_hidden) != n_hidden or n_hidden < 0:
            raise ValueError(f"`n_hidden` must be a non-negative integer, got {n_hidden!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        self.n_features, self.n_genes = int(n_features), int(n_genes)
        if n_hidden:
            self.net = nn.Sequential(
                nn.Linear(self.n_features, int(n_hidden)),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(int(n_hidden), self.n_genes),
            )
        else:
            self.net = nn.Sequential(nn.Linear(self.n_features, self.n_genes))

    def tiles(self, x: torch.Tensor) -> torch.Tensor:
        """Expression ``(B, T, G)`` of each tile of bags ``(B, T, D)``; a tile's depends on that tile only."""
        if x.ndim != 3 or x.shape[-1] != self.n_features:
            raise ValueError(
                f"The network reads bags of tile embeddings (B, T, {self.n_features}); got shape {tuple(x.shape)}."
            )
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean expression ``(B, G)`` of the tiles of each bag: what a spot over them measures."""
        return self.tiles(x).mean(dim=1)


def neighbour_pairs(grid: int) -> torch.Tensor:
    """``(P, 2)`` indices of the 4-neighbour tile pairs of a ``grid × grid`` bag laid out row by row."""
    pairs = []
    for i in range(grid):
        for j in range(grid):
            t = i * grid + j
            if j + 1 < grid:
                pairs.append((t, t + 1))
            if i + 1 < grid:
                pairs.append((t, t + grid))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


class SuperResolutionPlan(RegressionPlan):
    """Mean squared error of the bag means, plus in training ``smoothness`` × the mean squared tile differences.

    Parameters
    ----------
    network
        The :class:`TileRegressor` to train.
    grid
        Tiles per side of a bag (for the neighbours of the smoothness penalty).
    lr
        Learning rate of AdamW.
    weight_decay
        Decoupled weight decay of AdamW.
    smoothness
        Weight of the penalty on the squared difference between the (standardised) expression of 4-neighbour
        tiles; ``0``: none. It is added to the training loss only, not to the validation loss that early
        stopping reads.

    """

    def __init__(
        self, network: TileRegressor, *, grid: int, lr: float = 1e-3, weight_decay: float = 1e-4, smoothness=0.0
    ):
        super().__init__(network, lr=lr, weight_decay=weight_decay)
        if not smoothness >= 0:
            raise ValueError(f"`smoothness` must be non-negative, got {smoothness!r}.")
        self.smoothness = float(smoothness)
        self.register_buffer("pairs", neighbour_pairs(int(grid)), persistent=False)

    def loss(self, batch: Any, *, training: bool) -> tuple[torch.Tensor, int]:
        """Mean squared error of the bag means (and in training the smoothness penalty)."""
        x, y = batch
        tiles = self.network.tiles(x)
        loss = nn.functional.mse_loss(tiles.mean(dim=1), y)
        if training and self.smoothness > 0 and len(self.pairs):
            diff = tiles[:, self.pairs[:, 0]] - tiles[:, self.pairs[:, 1]]
            loss = loss + self.smoothness * diff.pow(2).mean()
        return loss, len(x)

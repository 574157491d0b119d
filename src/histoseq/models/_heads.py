"""Heads on spot embeddings and images: the networks that the expression methods train and save.

Following the scvi-tools split, the networks are plain :class:`torch.nn.Module` objects (what is saved and
used for prediction); the Lightning plans that train them are in :mod:`histoseq.models._plans`. The
user-facing class is :class:`histoseq.tl.ExpressionModel`.

- :class:`MLPHead`: embeddings → expression (``method="mlp"``);
- :class:`ImageRegressor`: an image encoder and a head trained end to end on patches (``method="cnn"``);
- :class:`ContrastiveHeads`: BLEEP's image and expression projection heads (``method="contrastive"``),
  each a :class:`ResidualProjection`.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """A small multilayer perceptron from embeddings to (standardised) expression.

    ``n_layers`` hidden layers of ``n_hidden`` units, each followed by a GELU and dropout, then a linear
    output layer; ``n_layers=0`` is a linear model.

    Parameters
    ----------
    n_input
        Dimension of the embeddings.
    n_output
        Number of genes.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout
        Dropout probability after each hidden layer.

    """

    def __init__(self, n_input: int, n_output: int, *, n_hidden: int = 256, n_layers: int = 1, dropout: float = 0.1):
        super().__init__()
        if n_input < 1 or n_output < 1 or n_hidden < 1 or n_layers < 0:
            raise ValueError("`n_input`, `n_output` and `n_hidden` must be positive and `n_layers` non-negative.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        layers: list[nn.Module] = []
        width = n_input
        for _ in range(n_layers):
            layers += [nn.Linear(width, n_hidden), nn.GELU(), nn.Dropout(dropout)]
            width = n_hidden
        layers.append(nn.Linear(width, n_output))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, n_input)`` embeddings to ``(B, n_output)`` predictions."""
        return self.layers(x)


class ImageRegressor(nn.Module):
    """An image encoder followed by a regression head: ``(B, 3, H, W)`` in [0, 1] → ``(B, n_output)``.

    Parameters
    ----------
    encoder
        A module mapping ``(B, 3, H, W)`` floats in [0, 1] to ``(B, D)`` (e.g.
        :class:`~histoseq.models.SmallCNN`), with its output size as ``out_dim``.
    head
        A module mapping ``(B, D)`` to ``(B, n_output)`` (e.g. :class:`MLPHead`).

    Examples
    --------
    >>> import torch
    >>> from histoseq.models import SmallCNN
    >>> from histoseq.models._heads import ImageRegressor, MLPHead
    >>> net = ImageRegressor(SmallCNN(out_dim=16, width=8), MLPHead(16, 3, n_hidden=8))
    >>> net.eval()(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 3])

    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions for a batch of images in [0, 1]."""
        h = self.encoder(x)
        if h.ndim > 2:
            h = h.flatten(1)
        return self.head(h)


class ResidualProjection(nn.Module):
    """A residual projection to the joint space: linear, GELU, linear, dropout, skip connection, layer norm.

    Parameters
    ----------
    n_input
        Input dimension.
    n_proj
        Dimension of the joint space.
    dropout
        Dropout probability before the skip connection.

    """

    def __init__(self, n_input: int, n_proj: int, *, dropout: float = 0.1):
        super().__init__()
        if n_input < 1 or n_proj < 1:
            raise ValueError("`n_input` and `n_proj` must be positive.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        self.project = nn.Linear(n_input, n_proj)
        self.mix = nn.Sequential(nn.GELU(), nn.Linear(n_proj, n_proj), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(n_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_input)`` → ``(B, n_proj)`` (not normalised)."""
        p = self.project(x)
        return self.norm(p + self.mix(p))


class ContrastiveHeads(nn.Module):
    """BLEEP's two projection heads: image embeddings and expression profiles into one joint space.

    Both outputs are L2-normalised, so their dot products are cosine similarities.

    Parameters
    ----------
    n_image
        Dimension of the (standardised) image embeddings.
    n_genes
        Number of genes of the (standardised) expression profiles.
    n_proj
        Dimension of the joint space.
    dropout
        Dropout of the heads.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models._heads import ContrastiveHeads
    >>> heads = ContrastiveHeads(16, 5, n_proj=8).eval()
    >>> heads.image(torch.randn(3, 16)).norm(dim=1).allclose(torch.ones(3))
    True

    """

    def __init__(self, n_image: int, n_genes: int, *, n_proj: int = 256, dropout: float = 0.1):
        super().__init__()
        self.image_head = ResidualProjection(n_image, n_proj, dropout=dropout)
        self.expression_head = ResidualProjection(n_genes, n_proj, dropout=dropout)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections of image embeddings."""
        return nn.functional.normalize(self.image_head(x), dim=-1)

    def expression(self, y: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections of expression profiles."""
        return nn.functional.normalize(self.expression_head(y), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projections of image embeddings (what prediction needs)."""
        return self.image(x)

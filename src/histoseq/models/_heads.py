"""Heads on spot embeddings and images: the networks and their Lightning training plans.

Following the scvi-tools split, the networks are plain :class:`torch.nn.Module` objects (what is saved and
used for prediction) and the plans are :class:`lightning.pytorch.LightningModule` objects that train them
(loss, optimiser, and the best weights seen on the validation data). The user-facing class is
:class:`histoseq.tl.ExpressionModel`.

- :class:`MLPHead` with :class:`RegressionPlan`: embeddings → expression (``method="mlp"``);
- :class:`ImageRegressor` with :class:`ImageRegressionPlan`: an image encoder and a head trained end to
  end on uint8 patches with dihedral augmentation (``method="cnn"``);
- :class:`ContrastiveHeads` with :class:`ContrastivePlan`: BLEEP's image and expression projection heads
  trained with its soft-target contrastive loss (``method="contrastive"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
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


class _BestWeightsPlan(pl.LightningModule):
    """Base of the training plans: AdamW, a loss per batch, and the best validation weights.

    Lightning's early stopping ends training some epochs after the best one; the plan keeps a copy of
    the network's weights at the lowest validation loss (:attr:`best_state`, on the CPU), so that the
    model returned is the best one seen rather than the last. Subclasses define :meth:`loss`.
    """

    def __init__(self, network: nn.Module, *, lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.network = network
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_val_loss = math.inf
        self.best_epoch = -1
        self.history: list[float] = []
        self._val_sum = 0.0
        self._val_n = 0

    def loss(self, batch: Any, *, training: bool) -> tuple[torch.Tensor, int]:
        """The loss of a batch and the batch size."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the network."""
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The loss on a training batch."""
        loss, n = self.loss(batch, training=True)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The loss on validation data (accumulated over the epoch, weighted by batch size)."""
        loss, n = self.loss(batch, training=False)
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=n)
        self._val_sum += float(loss.detach()) * n
        self._val_n += n
        return loss

    def on_validation_epoch_end(self) -> None:
        """Record the epoch's validation loss and keep the weights if it is the best so far."""
        if self._val_n == 0 or self.trainer.sanity_checking:
            self._val_sum, self._val_n = 0.0, 0
            return
        value = self._val_sum / self._val_n
        self._val_sum, self._val_n = 0.0, 0
        self.history.append(value)
        if value < self.best_val_loss:
            self.best_val_loss = value
            self.best_epoch = int(self.current_epoch)
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the network's parameters."""
        return torch.optim.AdamW(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class RegressionPlan(_BestWeightsPlan):
    """Training plan of a regression head: mean squared error, AdamW, and the best validation weights.

    Lightning's early stopping ends training some epochs after the best one; the plan keeps a copy of
    the network's weights at the lowest validation loss (:attr:`best_state`, on the CPU), so that the
    model returned is the best one seen rather than the last.

    Parameters
    ----------
    network
        The module to train.
    lr
        Learning rate.
    weight_decay
        Decoupled weight decay of AdamW.

    """

    def loss(self, batch: Any, *, training: bool) -> tuple[torch.Tensor, int]:
        """Mean squared error on a batch."""
        x, y = batch
        return nn.functional.mse_loss(self.network(x), y), len(x)


# --------------------------------------------------------------------------------------------------
# Images: an encoder and a head trained end to end
# --------------------------------------------------------------------------------------------------


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


class ImageRegressionPlan(_BestWeightsPlan):
    """Training plan of an :class:`ImageRegressor` on uint8 patches: MSE, dihedral augmentation, AdamW.

    Batches hold ``(B, 3, H, W)`` uint8 images (a quarter of the memory of floats, also on the way to the
    device); they are scaled to [0, 1] here. During training each image is turned and flipped at random
    (the 8 symmetries of the square: tissue has no orientation) and then passed to ``augment`` when given
    (e.g. stain jitter, on ``(B, 3, H, W)`` floats in [0, 1]).

    Parameters
    ----------
    network
        The :class:`ImageRegressor`.
    lr
        Learning rate of the head (and of the encoder unless ``encoder_lr`` is given).
    weight_decay
        Decoupled weight decay of AdamW.
    encoder_lr
        Learning rate of the encoder (e.g. lower for pretrained weights); ``None``: ``lr``.
    flips
        Apply the random dihedral transforms.
    augment
        Further augmentation of the training batches.

    """

    def __init__(
        self,
        network: ImageRegressor,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        encoder_lr: float | None = None,
        flips: bool = True,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(network, lr=lr, weight_decay=weight_decay)
        self.encoder_lr = self.lr if encoder_lr is None else float(encoder_lr)
        self.flips = bool(flips)
        self.augment = augment

    def loss(self, batch: Any, *, training: bool) -> tuple[torch.Tensor, int]:
        """Mean squared error on a batch of uint8 images (augmented during training)."""
        x, y = batch
        x = x.float().div_(255.0)
        if training:
            if self.flips:
                from ._augment import dihedral

                x = dihedral(x)  # a random turn and flip per patch
            if self.augment is not None:
                x = self.augment(x)
        return nn.functional.mse_loss(self.network(x), y), len(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with one learning rate for the encoder and one for the head."""
        groups = [
            {"params": list(self.network.encoder.parameters()), "lr": self.encoder_lr},
            {"params": list(self.network.head.parameters()), "lr": self.lr},
        ]
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)


# --------------------------------------------------------------------------------------------------
# BLEEP: contrastive image and expression projections
# --------------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
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
        self.image_head = ProjectionHead(n_image, n_proj, dropout=dropout)
        self.expression_head = ProjectionHead(n_genes, n_proj, dropout=dropout)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections of image embeddings."""
        return nn.functional.normalize(self.image_head(x), dim=-1)

    def expression(self, y: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections of expression profiles."""
        return nn.functional.normalize(self.expression_head(y), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projections of image embeddings (what prediction needs)."""
        return self.image(x)


def bleep_loss(image: torch.Tensor, expression: torch.Tensor, temperature: float) -> torch.Tensor:
    """BLEEP's symmetric contrastive loss with soft targets, on unit-norm projections ``(B, P)``.

    The logits are ``expression @ image.T / temperature``. The targets are not the identity (as in CLIP)
    but ``softmax((image @ image.T + expression @ expression.T) / 2 / temperature)`` row-wise, so two spots
    that look alike and express alike are not pushed apart. The loss is the mean of the cross-entropies of
    the rows (expression → image) and of the columns (image → expression).
    """
    logits = expression @ image.T / temperature
    with torch.no_grad():
        similar = (image @ image.T + expression @ expression.T) / (2 * temperature)
        targets = torch.softmax(similar, dim=-1)
    rows = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    cols = -(targets.T * torch.log_softmax(logits.T, dim=-1)).sum(dim=-1)
    return (rows + cols).mean() / 2


class ContrastivePlan(_BestWeightsPlan):
    """Training plan of :class:`ContrastiveHeads` with :func:`bleep_loss`.

    Parameters
    ----------
    network
        The heads.
    lr
        Learning rate.
    weight_decay
        Decoupled weight decay of AdamW.
    temperature
        Temperature of the logits and of the soft targets.

    """

    def __init__(
        self, network: ContrastiveHeads, *, lr: float = 1e-3, weight_decay: float = 1e-3, temperature: float = 0.1
    ):
        super().__init__(network, lr=lr, weight_decay=weight_decay)
        if not temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
        self.temperature = float(temperature)

    def loss(self, batch: Any, *, training: bool) -> tuple[torch.Tensor, int]:
        """BLEEP's loss on a batch of (embedding, expression) pairs."""
        x, y = batch
        return bleep_loss(self.network.image(x), self.network.expression(y), self.temperature), len(x)

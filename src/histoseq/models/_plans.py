"""Lightning training plans of the expression networks (:mod:`histoseq.models._heads`).

A plan is a :class:`lightning.pytorch.LightningModule` that trains a network: its loss, its optimiser, and a
copy of the best weights seen on the validation data. :func:`histoseq.models._training.train_plan` runs one
with early stopping.

- :class:`RegressionPlan`: mean squared error of a head on embeddings (``method="mlp"``);
- :class:`ImageRegressionPlan`: an image encoder and a head end to end on uint8 patches with dihedral
  augmentation (``method="cnn"``);
- :class:`ContrastivePlan`: BLEEP's soft-target contrastive loss, :func:`bleep_loss`
  (``method="contrastive"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ._augment import dihedral
from ._heads import ContrastiveHeads, ImageRegressor


class BestWeightsPlan(pl.LightningModule):
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
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The loss on validation data (accumulated over the epoch, weighted by batch size)."""
        loss, n = self.loss(batch, training=False)
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self._val_sum += float(loss.detach()) * n
        self._val_n += n
        return loss

    def on_validation_epoch_end(self) -> None:
        """Record the epoch's validation loss and keep the weights if it is the best so far."""
        if self.trainer.sanity_checking:
            self._val_sum, self._val_n = 0.0, 0
            return
        # under a distributed strategy each process saw a share of the validation spots: all add up the same total
        total, n = self.trainer.strategy.reduce(
            torch.tensor([self._val_sum, float(self._val_n)], dtype=torch.float64), reduce_op="sum"
        ).tolist()
        self._val_sum, self._val_n = 0.0, 0
        if n == 0:
            return
        value = total / n
        self.history.append(value)
        if value < self.best_val_loss:
            self.best_val_loss = value
            self.best_epoch = int(self.current_epoch)
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the network's parameters."""
        return torch.optim.AdamW(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class RegressionPlan(BestWeightsPlan):
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


class ImageRegressionPlan(BestWeightsPlan):
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


class ContrastivePlan(BestWeightsPlan):
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

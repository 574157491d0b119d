"""Regression heads on spot embeddings: the network and its Lightning training plan.

Following the scvi-tools split, :class:`MLPHead` is a plain :class:`torch.nn.Module` (what is saved and
used for prediction) and :class:`RegressionPlan` is the :class:`lightning.pytorch.LightningModule` that
trains it (loss, optimiser, and the best weights seen on the validation data). The user-facing class is
:class:`histoseq.tl.ExpressionModel`.
"""

from __future__ import annotations

import math
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


class RegressionPlan(pl.LightningModule):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions of the network."""
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean squared error on a batch."""
        x, y = batch
        loss = nn.functional.mse_loss(self.network(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean squared error on validation data (accumulated over the epoch, weighted by batch size)."""
        x, y = batch
        loss = nn.functional.mse_loss(self.network(x), y)
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        self._val_sum += float(loss.detach()) * len(x)
        self._val_n += len(x)
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

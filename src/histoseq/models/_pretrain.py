"""Networks and the Lightning plan of self-supervised pretraining (:func:`histoseq.tl.pretrain_encoder`).

- :class:`SimCLRProjection` and :func:`nt_xent`: SimCLR's projection MLP and loss;
- :class:`TileDecoder`: the decoder of the autoencoder (HistoSPACE style);
- :class:`PretrainPlan`: trains an encoder with either objective.

Only the encoder is kept after pretraining; the projection and the decoder are thrown away.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from ._augment import Augment, dihedral


class SimCLRProjection(nn.Module):
    """SimCLR projection MLP: ``Linear → BatchNorm → ReLU → Linear`` from the embedding to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` → ``(B, out_dim)``."""
        return self.layers(x)


class TileDecoder(nn.Module):
    """Decodes an embedding back into a ``patch_px`` RGB tile in [0, 1].

    A linear map to a 4 × 4 × 128 grid, then ``ceil(log2(patch_px / 4))`` stages of 2× nearest upsampling, 3×3
    convolution, batch norm and ReLU (channels halving down to 16), a 3×3 convolution to RGB and a sigmoid; the
    result is resized (bilinear) to ``patch_px`` when that is not a power of two.
    """

    def __init__(self, in_dim: int, patch_px: int, base: int = 128):
        super().__init__()
        self.patch_px = int(patch_px)
        self.base = int(base)
        n_up = max(1, math.ceil(math.log2(self.patch_px / 4)))
        self.fc = nn.Linear(in_dim, self.base * 16)
        layers: list[nn.Module] = []
        c_in = self.base
        for _ in range(n_up):
            c_out = max(16, c_in // 2)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 3, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` → ``(B, 3, patch_px, patch_px)`` in [0, 1]."""
        h = F.relu(self.fc(z)).view(len(z), self.base, 4, 4)
        x = torch.sigmoid(self.layers(h))
        if x.shape[-1] != self.patch_px:
            x = F.interpolate(x, size=(self.patch_px, self.patch_px), mode="bilinear", align_corners=False)
        return x


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) of SimCLR.

    ``z`` holds ``2n`` projections: rows ``i`` and ``i + n`` are the two views of tile ``i``. Each row must pick
    its partner among the ``2n - 1`` others by cosine similarity divided by ``temperature``.
    """
    n2 = z.shape[0]
    if n2 < 2 or n2 % 2:
        raise ValueError(f"NT-Xent needs an even number (at least 2) of projections, got {n2}.")
    n = n2 // 2
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / float(temperature)
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class PretrainPlan(pl.LightningModule):
    """Training plan of self-supervised pretraining (SimCLR or autoencoder); see :func:`pretrain_encoder`.

    Batches are ``(B, H, W, 3)`` uint8 tiles; they are scaled to [0, 1] and augmented on the training device.
    Augmentation parameters come from a CPU generator seeded with ``seed + global_rank``, so a run is
    reproducible on a given device. :attr:`history` holds the mean training loss of every epoch.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        *,
        method: str,
        augment: Augment,
        lr: float,
        weight_decay: float,
        temperature: float,
        seed: int,
    ):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.method = method
        self.augment = augment
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.history: list[float] = []
        self._generator: torch.Generator | None = None
        self._sum = 0.0
        self._n = 0

    def on_fit_start(self) -> None:
        """Seed the augmentation generator (one stream per process)."""
        self._generator = torch.Generator().manual_seed(self.seed + int(self.global_rank))

    def _loss(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).float().div(255.0)
        if self.method == "simclr":
            views = torch.cat([self.augment(x, generator=self._generator), self.augment(x, generator=self._generator)])
            return nt_xent(self.head(self.encoder(views)), self.temperature)
        x = dihedral(x, generator=self._generator)
        return F.mse_loss(self.head(self.encoder(x)), x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The loss of one batch of tiles."""
        tiles = batch[0] if isinstance(batch, list | tuple) else batch
        loss = self._loss(tiles)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(tiles))
        self._sum += float(loss.detach()) * len(tiles)
        self._n += len(tiles)
        return loss

    def on_train_epoch_end(self) -> None:
        """Record the epoch's mean loss."""
        if self._n:
            self.history.append(self._sum / self._n)
        self._sum, self._n = 0.0, 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the encoder and the head."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

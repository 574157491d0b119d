"""How every network method trains, written once: split, standardised targets, seed, Lightning, best weights.

:func:`fit_network` holds out the validation spots that early stopping watches
(:func:`histoseq.tl._splits.validation_rows`: a training section, never a test one), standardises the
targets, trains the plan that ``make_plan(seed)`` builds with :func:`histoseq.models._training.train_plan`,
and keeps the weights of the best validation epoch. The methods (``mlp``, ``cnn``, ``contrastive``) only
say what goes in and which plan trains it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .._utils import pack_state, standardise, training_seed
from ._splits import validation_rows

if TYPE_CHECKING:
    from ._training_set import TrainingSet


@dataclass(frozen=True)
class NetworkOptions:
    """The options that every network method takes (each method has its own defaults).

    Attributes
    ----------
    lr
        Learning rate of AdamW.
    weight_decay
        Decoupled weight decay of AdamW.
    batch_size
        Spots per training batch.
    patience
        Epochs without a better validation loss before training stops.
    val_groups
        Training groups that early stopping watches; default: one drawn with ``random_state``.
    val_fraction
        Share of a single training group that early stopping watches (spatial blocks or random spots).
    trainer_kwargs
        Further arguments of the :class:`lightning.pytorch.Trainer`.

    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    patience: int = 20
    val_groups: Sequence[str] | str | None = None
    val_fraction: float = 0.2
    trainer_kwargs: Mapping[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The options a model's configuration records."""
        return {
            "lr": float(self.lr),
            "weight_decay": float(self.weight_decay),
            "batch_size": int(self.batch_size),
            "patience": int(self.patience),
        }


#: Options that every network method takes.
NETWORK_OPTIONS = frozenset(f.name for f in fields(NetworkOptions))


@dataclass
class NetworkFit:
    """A trained network: its plan, best weights, the training record and the target scaling."""

    plan: Any
    state: dict[str, Any]
    info: dict[str, Any]
    target_mean: np.ndarray
    target_scale: np.ndarray
    targets: np.ndarray  # the standardised training targets, float32
    epochs: int

    def arrays(self, **extra: np.ndarray) -> dict[str, np.ndarray]:
        """The model arrays: ``extra``, the target scaling and the network's weights (``net.*``)."""
        return {**extra, "target_mean": self.target_mean, "target_scale": self.target_scale, **pack_state(self.state)}


def fit_network(
    data: TrainingSet,
    inputs: Any,
    make_plan: Callable[[int], Any],
    options: NetworkOptions,
    *,
    default_epochs: int,
    val_batch_size: int | None = None,
    drop_last: bool = False,
    min_train_spots: int = 1,
) -> NetworkFit:
    """Train a network on ``inputs`` (a tensor, one row per training spot) and the standardised targets.

    ``make_plan(seed)`` builds the Lightning plan (network included) inside the seeded block, so the
    initial weights depend on ``data.random_state`` only. ``val_batch_size`` defaults to all validation
    spots at once; ``drop_last`` drops a last incomplete training batch when there is more than one.
    """
    import torch
    from torch.utils.data import TensorDataset

    from ..models._training import train_plan

    val, val_desc = validation_rows(
        data.labels,
        data.regions,
        data.coords,
        data.n,
        val_groups=options.val_groups,
        val_fraction=options.val_fraction,
        random_state=data.random_state,
    )
    if (~val).sum() < min_train_spots:
        raise ValueError(
            f"Training needs at least {min_train_spots} spots outside the validation spots, got {int((~val).sum())}."
        )
    y_mean, y_scale = standardise(data.Y)
    Ys = ((data.Y - y_mean) / y_scale).astype(np.float32)
    seed = training_seed(data.random_state)
    epochs = default_epochs if data.trainer.max_epochs is None else int(data.trainer.max_epochs)
    tr, va = np.flatnonzero(~val), np.flatnonzero(val)
    batch = int(options.batch_size)
    plan = train_plan(
        lambda: make_plan(seed),
        TensorDataset(inputs[tr].contiguous(), torch.from_numpy(Ys[tr])),
        TensorDataset(inputs[va].contiguous(), torch.from_numpy(Ys[va])),
        seed=seed,
        batch_size=batch,
        val_batch_size=max(len(va), 1) if val_batch_size is None else int(val_batch_size),
        drop_last=drop_last and len(tr) > batch,
        progress=data.progress,
        max_epochs=epochs,
        accelerator=data.trainer.accelerator,
        devices=data.trainer.devices,
        strategy=data.trainer.strategy,
        patience=options.patience,
        trainer_kwargs=options.trainer_kwargs,
    )
    # the weights of the best validation epoch, or the last ones when none was recorded
    state = plan.best_state or {k: v.detach().cpu() for k, v in plan.network.state_dict().items()}
    info = {
        "validation": val_desc,
        "n_validation_spots": int(val.sum()),
        "best_epoch": int(plan.best_epoch),
        "best_val_loss": float(plan.best_val_loss),
        "epochs_run": len(plan.history),
        "seed": seed,
    }
    return NetworkFit(plan, state, info, y_mean, y_scale, Ys, epochs)

"""What every Lightning training in histoseq shares: quiet logs, one way to build the trainer, one training loop.

:func:`train_plan` is the loop of every network that histoseq trains (the expression heads, the end-to-end
CNN, BLEEP's projections and the self-supervised pretraining): a seeded plan, shuffled batches from a seeded
generator, a :class:`lightning.pytorch.Trainer` and, with validation data, early stopping.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl

from .._utils import seeded

#: loggers that print Lightning's start-up lines (devices, precision, model summary)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")
_ROUTINE_WARNINGS = (
    ".*does not have many workers.*",
    ".*smaller than the logging interval.*",
    ".*GPU available but not used.*",
    ".*LeafSpec.*",  # lightning's own use of torch's pytree
)


@contextmanager
def quiet_loggers(names: Sequence[str]) -> Iterator[None]:
    """Raise the given loggers to WARNING for the duration of the block."""
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def quiet_training(progress: bool, extra_loggers: Sequence[str] = ()) -> Iterator[None]:
    """Lightning's routine warnings and start-up lines (devices, tips) hushed; ``extra_loggers`` unless ``progress``.

    The progress bar, when asked for, is the Trainer's own (``enable_progress_bar``), not a log line.
    """
    names = [*LIGHTNING_LOGGERS] if progress else [*LIGHTNING_LOGGERS, *extra_loggers]
    with warnings.catch_warnings(), quiet_loggers(names):
        for message in _ROUTINE_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def make_trainer(
    *,
    max_epochs: int,
    accelerator: Any,
    devices: Any,
    strategy: Any,
    progress: bool,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> pl.Trainer:
    """A :class:`lightning.pytorch.Trainer` without checkpoints, loggers or model summary.

    ``accelerator``, ``devices`` and ``strategy`` pass through unchanged (so GPUs and distributed
    strategies work as in Lightning); ``options`` (e.g. callbacks) and then ``trainer_kwargs`` add to or
    override the defaults.
    """
    kwargs: dict[str, Any] = {
        "max_epochs": int(max_epochs),
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "enable_checkpointing": False,
        "logger": False,
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        **options,
        **dict(trainer_kwargs or {}),
    }
    return pl.Trainer(**kwargs)


def train_plan(
    build: Callable[[], pl.LightningModule],
    train_ds: Any,
    val_ds: Any | None,
    *,
    seed: int,
    batch_size: int,
    val_batch_size: int | None = None,
    progress: bool,
    max_epochs: int,
    accelerator: Any,
    devices: Any,
    strategy: Any,
    patience: int | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    drop_last: bool = False,
) -> pl.LightningModule:
    """Train the plan made by ``build()`` with a Lightning ``Trainer``; early stopping on ``val_loss``.

    torch's global random state is left alone (:func:`histoseq._utils.seeded`: forked, then seeded with
    ``seed`` before ``build`` runs and the batches are shuffled), and Lightning's messages are silenced
    unless ``progress``. With ``val_ds``, training stops ``patience`` epochs after the best validation loss
    (a plan of :mod:`histoseq.models._plans` keeps the best weights, ``plan.best_state``); without, it runs
    ``max_epochs``. The trained plan is returned.
    """
    import torch
    from lightning.pytorch.callbacks import EarlyStopping
    from torch.utils.data import DataLoader

    with seeded(seed), quiet_training(progress):
        plan = build()
        train_dl = DataLoader(
            train_ds,
            batch_size=min(int(batch_size), len(train_ds)),
            shuffle=True,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
        )
        options: dict[str, Any] = {}
        val_dl = None
        if val_ds is not None:
            size = int(batch_size if val_batch_size is None else val_batch_size)
            val_dl = DataLoader(val_ds, batch_size=max(1, min(size, len(val_ds))))
            options = {
                "num_sanity_val_steps": 0,
                "callbacks": [EarlyStopping(monitor="val_loss", patience=int(patience or 0), mode="min")],
            }
        trainer = make_trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            progress=progress,
            trainer_kwargs=trainer_kwargs,
            **options,
        )
        trainer.fit(plan, train_dataloaders=train_dl, val_dataloaders=val_dl)
    return plan

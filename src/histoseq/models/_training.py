"""What every Lightning training in histoseq shares: quiet logs and one way to build the trainer."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np

#: loggers that print Lightning's start-up lines (devices, precision, model summary)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")
_ROUTINE_WARNINGS = (
    ".*does not have many workers.*",
    ".*smaller than the logging interval.*",
    ".*GPU available but not used.*",
    ".*LeafSpec.*",  # lightning's own use of torch's pytree
)


def training_seed(random_state: int | None) -> int:
    """The seed of a training run: ``random_state``, or a fresh one from the operating system."""
    return int(random_state) if random_state is not None else int(np.random.SeedSequence().entropy % 2**31)


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
    """Lightning's routine warnings silenced; its log lines (and ``extra_loggers``) too unless ``progress``."""
    names = [] if progress else [*LIGHTNING_LOGGERS, *extra_loggers]
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

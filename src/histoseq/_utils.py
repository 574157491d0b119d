"""Small helpers that every layer of histoseq shares: JSON records, seeds, standardising, packed weights.

This module is the bottom of the package: it imports nothing from histoseq, and torch only inside the
functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

#: Prefix of a network's weights among a model's arrays (``"net.<parameter name>"``).
STATE_PREFIX = "net."


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of (nested) parameters; unknown objects become their ``str``.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq._utils import jsonable
    >>> jsonable({"a": np.float32(0.5), "b": (1, np.arange(2)), "c": float("nan")})
    {'a': 0.5, 'b': [1, [0, 1]], 'c': 'nan'}

    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def training_seed(random_state: int | None) -> int:
    """The seed of a training run: ``random_state``, or a fresh one from the operating system."""
    return int(random_state) if random_state is not None else int(np.random.SeedSequence().entropy % 2**31)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block on a fork of torch's CPU random state, seeded with ``seed`` unless it is ``None``.

    Whatever the block draws (initial weights, shuffles, dropout), torch's global random state is as it was
    afterwards; with a seed, the draws are the same on every run.

    Examples
    --------
    >>> import torch
    >>> from histoseq._utils import seeded
    >>> with seeded(0):
    ...     a = torch.rand(2)
    >>> with seeded(0):
    ...     b = torch.rand(2)
    >>> bool((a == b).all())
    True

    """
    import torch

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        yield


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of each column of ``X``; constant (or non-finite) columns get the scale 1.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq._utils import standardise
    >>> mean, scale = standardise(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> mean.tolist(), scale.tolist()
    ([2.0, 5.0], [1.0, 1.0])

    """
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-12 * np.maximum(1.0, np.abs(mean))), scale, 1.0)
    return mean, scale


def pack_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A network's state dict as model arrays: ``"net.<name>"`` → numpy copy (see :func:`unpack_state`)."""
    return {f"{STATE_PREFIX}{k}": v.detach().cpu().numpy().copy() for k, v in state.items()}


def unpack_state(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The state dict (tensors) packed among a model's arrays by :func:`pack_state`."""
    import torch

    n = len(STATE_PREFIX)
    return {k[n:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(STATE_PREFIX)}


def squidpy_image_tools() -> Any:
    """``squidpy.experimental.im``, imported without the docstring helper's notices.

    squidpy's docstring templates make ``docrep`` emit ``SyntaxWarning: '...' is not a valid key!`` on first
    import: nothing a user of histoseq can act on, so it is hushed here, for this import only.
    """
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not a valid key", category=SyntaxWarning)
        return importlib.import_module("squidpy.experimental.im")

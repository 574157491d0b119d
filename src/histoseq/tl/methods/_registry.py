"""The registry of expression methods: names to methods, for ``fit``, ``predict`` and the model file.

The built-in methods are listed here by module and imported on first use (the network methods import torch
only when they run); :func:`register` adds a method of one's own. Nothing else in histoseq names a concrete
method.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._base import ExpressionMethod

#: Built-in methods: name -> module of :mod:`histoseq.tl.methods` whose ``METHOD`` implements it.
BUILTIN = {
    "kernel": "._kernel",
    "ridge": "._ridge",
    "ridge_hest": "._ridge_hest",
    "mlp": "._mlp",
    "cnn": "._cnn",
    "contrastive": "._contrastive",
    "attention": "._attention",
    "superres": "._superres",
    "logistic": "._logistic",
}
_registered: dict[str, ExpressionMethod] = {}


def register(method: ExpressionMethod | type[ExpressionMethod], *, overwrite: bool = False) -> ExpressionMethod:
    """Make a method available to ``hs.tl.fit(method=method.name)`` (and to models saved with it).

    Parameters
    ----------
    method
        An :class:`~histoseq.tl.methods.ExpressionMethod` (or its class, which is instantiated).
    overwrite
        Replace a method of the same name (built-in ones included).

    Returns
    -------
    The registered method.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl.methods import ExpressionMethod, Fitted, get_method, register
    >>> class MeanMethod(ExpressionMethod):
    ...     name, description, arrays = "mean_doc", "the training mean of each gene", ("mean",)
    ...     def fit(self, data, **options):
    ...         return Fitted({"mean": data.Y.mean(axis=0)}, {}, n_features=data.X.shape[1])
    ...     def predict(self, fitted, predictor, inputs, **options):
    ...         return np.tile(fitted.arrays["mean"], (len(inputs), 1))
    >>> register(MeanMethod).name, get_method("mean_doc").task
    ('mean_doc', 'regression')

    """
    if isinstance(method, type):
        method = method()
    if not isinstance(method, ExpressionMethod):
        raise TypeError(f"`method` must be an ExpressionMethod, got {type(method).__name__}.")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("A method needs a `name` (a non-empty string).")
    if not overwrite and (name in _registered or name in BUILTIN):
        raise ValueError(f"A method {name!r} is already registered; pass `overwrite=True` to replace it.")
    _registered[name] = method
    return method


def list_methods(*, reads: str | None = None, task: str | None = None) -> list[str]:
    """Names of the available methods, built-in first; ``reads``/``task`` keep those that read or learn that.

    Examples
    --------
    >>> from histoseq.tl.methods import list_methods
    >>> list_methods(reads="patches")
    ['cnn']

    """
    names = list(dict.fromkeys([*BUILTIN, *_registered]))
    if reads is None and task is None:
        return names
    return [
        n
        for n in names
        if (reads is None or get_method(n).reads == reads) and (task is None or get_method(n).task == task)
    ]


def get_method(name: Any) -> ExpressionMethod:
    """The method called ``name``; a clear error naming the available ones otherwise.

    Examples
    --------
    >>> from histoseq.tl.methods import get_method
    >>> ridge = get_method("ridge")
    >>> ridge.name, ridge.reads, ridge.task
    ('ridge', 'embedding', 'regression')
    >>> get_method("cnn").reads, get_method("cnn").network
    ('patches', True)

    """
    if isinstance(name, str) and name in _registered:
        return _registered[name]
    if not (isinstance(name, str) and name in BUILTIN):
        raise ValueError(f"Unknown `method` {name!r}; choose one of {list_methods()}.")
    method = importlib.import_module(BUILTIN[name], __package__).METHOD
    if method.name != name:  # pragma: no cover - a mislabelled built-in module
        raise RuntimeError(f"Module {BUILTIN[name]} implements {method.name!r}, not {name!r}.")
    _registered[name] = method
    return method

"""Plotting: patches; expression, class and attention maps on the H&E; per-gene scores."""

import importlib

from ._patches import patches

#: Plots that live in their own module, imported on first use (matplotlib loads only when a plot is drawn).
_PLOTS = {"classes": "._classes", "attention": "._attention", "scores": "._scores", "expression": "._expression"}
__all__ = ["attention", "classes", "expression", "patches", "scores"]


def __getattr__(name: str):
    if name in _PLOTS:
        value = getattr(importlib.import_module(_PLOTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

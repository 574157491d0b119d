"""Plotting."""

from ._patches import patches

__all__ = ["patches"]

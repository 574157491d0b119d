"""Example data: a synthetic tissue generator with known ground truth, and readers for the real datasets."""

from ._real import her2st, mouse_olfactory_bulb
from ._synthetic import synthetic

__all__ = ["her2st", "mouse_olfactory_bulb", "synthetic"]

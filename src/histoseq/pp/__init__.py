"""Preprocessing: patches around spots and on dense grids, tissue detection."""

from ._grid import detect_tissue, make_grid
from ._patches import Patches, extract_patches, iter_patches

__all__ = ["PatchDataset", "Patches", "detect_tissue", "extract_patches", "iter_patches", "make_grid"]


def __getattr__(name: str):
    # the torch Dataset imports torch: load it on first use only
    if name == "PatchDataset":
        from ._torch import PatchDataset

        return PatchDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

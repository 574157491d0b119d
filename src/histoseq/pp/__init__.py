"""Preprocessing: patches around spots and on dense grids, tissue detection, stain normalisation."""

from ._grid import detect_tissue, make_grid
from ._patches import Patches, extract_patches, iter_patches
from ._stain import estimate_stain, normalize_stain

__all__ = [
    "PatchDataset",
    "Patches",
    "detect_tissue",
    "estimate_stain",
    "extract_patches",
    "iter_patches",
    "make_grid",
    "normalize_stain",
]


def __getattr__(name: str):
    # the torch Dataset imports torch: load it on first use only
    if name == "PatchDataset":
        from ._torch import PatchDataset

        return PatchDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

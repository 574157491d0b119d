"""histoseq: learn what tissue morphology says about gene expression, on SpatialData objects.

The namespaces follow scanpy and squidpy::

    import histoseq as hs

    sdata = hs.datasets.synthetic()
    patches = hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=224)

Sub-packages are imported on first use, so ``import histoseq`` stays quick (spatialdata, torch and
lightning load only when a function needs them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

_SUBMODULES = ("datasets", "io", "pl", "pp", "tl", "models")
__all__ = [*_SUBMODULES, "__version__"]

if TYPE_CHECKING:  # pragma: no cover - for static analysis only
    from . import datasets, io, models, pl, pp, tl  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'histoseq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

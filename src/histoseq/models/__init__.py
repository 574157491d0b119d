"""Torch modules (networks) used by :mod:`histoseq.tl`.

Imported on first use (they import torch), so that ``import histoseq.models`` itself stays quick.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "SmallCNN": "._encoders",
    "ResNet18": "._encoders",
    "EfficientNetLite": "._efficientnet",
    "efficientnet_lite": "._efficientnet",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        value = getattr(importlib.import_module(_MODULES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

"""Tools: embeddings, expression models and their evaluation.

Each tool lives in its own module and is imported on first use, so that ``hs.tl`` stays quick to import
(torch and lightning load only with the tools that need them).
"""

from __future__ import annotations

import importlib

_TOOLS = {
    "embed": "._embed",
    "list_encoders": "._embed",
    "pretrain_encoder": "._pretrain",
    "fit": "._fit",
    "predict": "._fit",
    "load_model": "._model",
    "ExpressionModel": "._model",
    "ScanShift": "._views",
    "select_genes": "._genes",
    "evaluate": "._evaluate",
    "cross_validate": "._evaluate",
    "expression_classes": "._classes",
    "dice": "._classes",
    "fit_classifier": "._classifier",
    "classify": "._classifier",
    "ClassifierModel": "._classifier",
    "load_classifier": "._classifier",
    "attention_maps": "._attention",
    "hotspots": "._attention",
    "expression_map": "._maps",
}
__all__ = sorted([*_TOOLS, "methods"])


def __getattr__(name: str):
    if name == "methods":  # the registry of expression methods (a subpackage)
        value = importlib.import_module(".methods", __name__)
        globals()[name] = value
        return value
    if name in _TOOLS:
        value = getattr(importlib.import_module(_TOOLS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

"""Expression methods: one module each, behind one protocol and one registry.

Each method (``kernel``, ``ridge``, ``ridge_hest``, ``mlp``, ``cnn``, ``contrastive``) is a module of this
package that implements :class:`ExpressionMethod`; :func:`get_method` finds one by name and
:func:`register` adds one. :func:`histoseq.tl.fit` and :class:`histoseq.tl.ExpressionModel` read the
registry. See the architecture page of the docs for where a new method goes.
"""

from __future__ import annotations

from ._base import ExpressionMethod, Fitted
from ._registry import get_method, list_methods, register

__all__ = ["ExpressionMethod", "Fitted", "get_method", "list_methods", "register"]

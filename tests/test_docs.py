"""Every public function and class of histoseq shows an example in its docstring.

The public API is what the namespaces list in ``__all__``: ``hs.io``, ``hs.datasets``, ``hs.pp``, ``hs.tl`` (and
``hs.tl.methods``), ``hs.pl`` and ``hs.models``. Names that a namespace imports on first use (most of ``hs.tl``:
they load torch and Lightning) are read from the source with :mod:`ast` instead of being imported, so that the test
stays quick; the docstring it reads is the one that ``help()`` shows.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from functools import cache
from pathlib import Path

import pytest

import histoseq

SRC = Path(histoseq.__file__).resolve().parents[1]
NAMESPACES = ("io", "datasets", "pp", "tl", "tl.methods", "pl", "models")
#: A numpydoc "Examples" section header (after ``inspect.cleandoc``), followed somewhere by a doctest line.
EXAMPLES = re.compile(r"^Examples[ \t]*\n-{8,}[ \t]*$(?P<body>.*)", re.M | re.S)


@cache
def _definitions(package_dir: Path) -> dict[str, list[tuple[Path, str | None]]]:
    """Top-level functions and classes of the modules of one package folder: name -> [(file, docstring)]."""
    found: dict[str, list[tuple[Path, str | None]]] = {}
    for path in sorted(package_dir.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.setdefault(node.name, []).append((path, ast.get_docstring(node, clean=True)))
    return found


def _own_doc(obj: object) -> str | None:
    """The object's own docstring (a class's, not one inherited from its bases), cleaned."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


def _public_api() -> list[tuple[str, str | None, str]]:
    """``(qualified name, docstring, where)`` of every public function and class."""
    out = []
    for namespace in NAMESPACES:
        module = importlib.import_module(f"histoseq.{namespace}")
        package_dir = Path(module.__file__).resolve().parent
        for name in module.__all__:
            qualname = f"histoseq.{namespace}.{name}"
            if importlib.util.find_spec(f"{module.__name__}.{name}") is not None:
                continue  # a sub-namespace (hs.tl.methods): walked on its own
            obj = vars(module).get(name)
            if obj is None:  # imported on first use: read the definition without importing it
                defs = _definitions(package_dir).get(name, [])
                if len(defs) == 1:
                    path, doc = defs[0]
                    out.append((qualname, doc, str(path.relative_to(SRC))))
                    continue
                obj = getattr(module, name)  # defined elsewhere (or twice): import it after all
            if inspect.ismodule(obj):
                continue
            assert callable(obj), f"{qualname} is listed in __all__ but is neither a function nor a class"
            src = inspect.getsourcefile(obj) or "?"
            out.append((qualname, _own_doc(obj), str(Path(src).resolve().relative_to(SRC))))
    return out


def _has_examples(doc: str | None) -> bool:
    match = EXAMPLES.search(doc or "")
    return match is not None and ">>> " in match["body"]


def test_every_public_function_and_class_has_an_example():
    api = _public_api()
    names = {q for q, _, _ in api}
    assert len(api) >= 40, f"the walk found only {len(api)} public names: {sorted(names)}"
    assert {"histoseq.tl.fit", "histoseq.tl.ExpressionModel", "histoseq.pp.PatchDataset"} <= names
    missing = [f"{q} ({where})" for q, doc, where in api if not _has_examples(doc)]
    assert not missing, (
        f"{len(missing)} public docstring(s) have no numpydoc 'Examples' section with '>>> ' lines:\n  "
        + "\n  ".join(missing)
    )


@pytest.mark.parametrize("namespace", ["io", "datasets", "pp"])
def test_the_source_reader_sees_the_imported_docstrings(namespace):
    """What the walk reads from the source of lazily imported names is what the imported objects carry."""
    module = importlib.import_module(f"histoseq.{namespace}")
    defs = _definitions(Path(module.__file__).parent)
    checked = 0
    for name in module.__all__:
        obj = vars(module).get(name)
        if obj is None or len(defs.get(name, [])) != 1:
            continue
        assert defs[name][0][1] == _own_doc(obj), name
        checked += 1
    assert checked >= 3


def test_examples_pattern():
    assert _has_examples("Do it.\n\nExamples\n--------\n>>> 1 + 1\n2\n")
    assert not _has_examples("Do it.\n\nExamples\n--------\nSee the tutorial.\n")
    assert not _has_examples("Do it.\n\n>>> 1 + 1\n2\n")
    assert not _has_examples(None)

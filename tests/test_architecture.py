"""The package's layout stays readable: imports flow one way, modules stay short, methods live behind the registry.

See ``docs/architecture.md``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import histoseq as hs
from histoseq.tl.methods import ExpressionMethod, Fitted, get_method, list_methods, register
from histoseq.tl.methods._registry import BUILTIN

PACKAGE = Path(hs.__file__).parent
MAX_LINES = 900


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_init else parts)] = (f, is_init)
    return out


def import_graph() -> dict[str, set[str]]:
    """Edges module -> modules of histoseq it imports, function-local imports included.

    A package's ``__init__`` is a lazy face (it imports its modules on first use, or re-exports them), so an
    import of a package counts as an edge to the package itself, and an ``__init__`` has no outgoing edges
    of its own.
    """
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_init) in mods.items():
        if is_init:
            continue
        base = name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    target = ".".join(anchor + (node.module.split(".") if node.module else []))
                else:
                    target = node.module or ""
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                if c in mods and c != name:
                    if not mods[c][1]:
                        edges[name].add(c)
                    break
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return cycles


def test_the_import_graph_finds_a_cycle_when_there_is_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    edges = import_graph()
    # module-level imports are edges (the kernel method imports the splits), and so are function-local ones
    # (the MLP method imports its network inside `fit`, to keep torch out of `import histoseq`)
    assert "histoseq.tl._splits" in edges["histoseq.tl.methods._kernel"]
    assert "histoseq.models._heads" in edges["histoseq.tl.methods._mlp"]
    assert "histoseq.tl.methods._base" in edges["histoseq.tl.methods._registry"]


def test_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_no_module_over_900_lines():
    long = {m: n for m, (f, _) in _modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_imports_flow_down_the_layers():
    """Lower layers never import the ones above them (docs/architecture.md)."""
    edges = import_graph()
    layers = [
        ("histoseq._utils",),
        ("histoseq.tl._data", "histoseq.tl._sections", "histoseq.tl._splits", "histoseq.tl._metrics"),
        ("histoseq.tl.methods.",),
        ("histoseq.tl._model", "histoseq.tl._model_file"),
        ("histoseq.tl._fit",),
        ("histoseq.tl._evaluate",),
    ]

    def layer(module: str) -> int | None:
        for i, prefixes in enumerate(layers):
            if any(module == p or (p.endswith(".") and module.startswith(p)) for p in prefixes):
                return i
        return None

    upward = [
        (src, dst)
        for src, targets in edges.items()
        for dst in targets
        if layer(src) is not None and layer(dst) is not None and layer(dst) > layer(src)
    ]
    assert upward == []
    # the models package (networks) never reaches into the tools
    assert not [(s, d) for s, t in edges.items() if s.startswith("histoseq.models") for d in t if ".tl." in d]


def test_only_the_method_modules_name_a_method():
    """No ``method == "cnn"`` (or ``in ("ridge", ...)``) outside histoseq/tl/methods: the registry decides."""
    names = set(BUILTIN)
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                hits = [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
                if hits:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {hits}")
    assert found == []


def test_registry_lists_the_methods_and_names_them_in_errors():
    assert list_methods()[:6] == ["kernel", "ridge", "ridge_hest", "mlp", "cnn", "contrastive"]
    assert hs.tl.methods.list_methods() == list_methods()
    assert list_methods(reads="patches") == ["cnn"]
    assert list_methods(task="classification") == ["logistic"]
    for name in BUILTIN:
        method = get_method(name)
        assert method.name == name and method.task == ("classification" if name == "logistic" else "regression")
        assert method.options and method.arrays and method.description
    with pytest.raises(ValueError, match=r"Unknown `method` 'nope'; choose one of \['kernel', 'ridge'"):
        get_method("nope")
    with pytest.raises(ValueError, match="Unknown `method`"):
        hs.tl.fit(hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False), method="nope")
    with pytest.raises(ValueError, match="already registered"):
        register(type(get_method("ridge")))


class _NearestMean(ExpressionMethod):
    """A method written outside histoseq: each spot gets the mean targets of its nearest training spots."""

    name = "nearest_mean_test"
    description = "mean targets of the k nearest training spots in the embedding"
    options = frozenset({"k"})
    arrays = ("reference_embedding", "reference_targets")

    def fit(self, data, *, k=5):
        return Fitted(
            {"reference_embedding": data.X, "reference_targets": data.Y}, {"k": int(k)}, {}, n_features=data.X.shape[1]
        )

    def predict(self, fitted, predictor, inputs, **options):
        ref = fitted.arrays["reference_embedding"]
        d = ((inputs[:, None, :] - ref[None]) ** 2).sum(-1)
        idx = np.argsort(d, axis=1)[:, : fitted.config["k"]]
        return fitted.arrays["reference_targets"][idx].mean(axis=1)

    def summary(self, fitted):
        return f"nearest mean of {fitted.config['k']} spots"


def test_a_new_method_is_one_class_and_fits_predicts_saves_and_loads(tmp_path):
    register(_NearestMean, overwrite=True)
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    table = sdata.tables["table"]
    table.obsm["X_demo"] = np.random.default_rng(0).normal(size=(table.n_obs, 4))
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['alpha'\] for method 'nearest_mean_test'"):
        hs.tl.fit(sdata, method="nearest_mean_test", embedding="X_demo", genes=3, alpha=1.0, progress=False)
    model = hs.tl.fit(sdata, method="nearest_mean_test", embedding="X_demo", genes=3, k=3, progress=False)
    assert "nearest mean of 3 spots" in repr(model)
    pred = model.predict_embeddings(table.obsm["X_demo"])
    assert pred.shape == (table.n_obs, 3) and np.isfinite(pred).all()
    loaded = hs.tl.load_model(model.save(tmp_path / "m.pt"))
    np.testing.assert_array_equal(loaded.predict_embeddings(table.obsm["X_demo"]), pred)

"""What the ``histoseq`` subcommands do: ``fit``, ``predict``, ``evaluate`` and ``embed``.

The arguments are parsed in :mod:`histoseq._cli`; each ``run_*`` function here takes them and the stream that
receives its summary (the real stdout: the library's own output is sent to stderr while a command runs), does
the work with the public API (:func:`histoseq.tl.fit`, :func:`~histoseq.tl.predict`, :func:`~histoseq.tl.evaluate`,
:func:`~histoseq.tl.embed`) and returns the exit status. Bad input surfaces as one of :data:`USER_ERRORS`, which
the command line reports in one line (exit status 2).

Stores are read with :func:`spatialdata.read_zarr`, so the SpatialData objects are backed: the library writes every
element it adds or changes into the store itself. A command that fails removes again the elements it added to a
store (:func:`keep_store_listing`), so that a store's elements are those it had before.

Heavy libraries (spatialdata, torch, ``histoseq.tl``) are imported inside the functions: importing this module
is cheap.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import argparse

    from spatialdata import SpatialData

logger = logging.getLogger("histoseq.cli")

#: Exceptions that report bad input (a missing file, an unknown name, a wrong value): exit status 2.
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError)

#: The element kinds of a SpatialData, as the folders of its zarr store.
KINDS = ("images", "labels", "points", "shapes", "tables")

#: How an element of each kind is named in messages.
_SINGULAR = {"images": "image", "labels": "labels", "points": "points", "shapes": "shapes", "tables": "table"}

#: The column of ``obs`` that names a spot's section (what ``--train`` and ``--spots-of`` select).
SECTION_COLUMN = "sample_id"

#: Per command, the command-line flag of each keyword argument of the library (to name them in error messages).
FLAGS: dict[str, dict[str, str]] = {
    "fit": {
        "genes": "--genes",
        "method": "--method",
        "train": "--train",
        "table_key": "--table",
        "random_state": "--seed",
        "max_epochs": "--max-epochs",
    },
    "predict": {
        "key_added": "--key-added",
        "table_key": "--table",
        "shapes_key": "--shapes",
        "image_key": "--image",
        "spacing_um": "--grid-um",
        "overwrite": "--overwrite",
    },
    "evaluate": {"predicted": "--table", "table_key": "--measured", "spots": "--spots-of"},
    "embed": {
        "encoder": "--encoder",
        "key_added": "--key-added",
        "patch_size_um": "--patch-size-um",
        "patch_px": "--patch-px",
        "table_key": "--table",
        "shapes_key": "--shapes",
        "weights": "--weights",
        "device": "--device",
    },
}


# --------------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------------


def error_message(err: BaseException, command: str) -> str:
    """The message of an exception, with the library's argument names replaced by the command's flags.

    ``KeyError`` keeps its text without the quotes that ``str()`` adds; "pass `image_key=...`" becomes
    "pass `--image ...`", so that the message names the fix on the command line.
    """
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err) or type(err).__name__
    flags = FLAGS.get(command, {})

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if name not in flags:
            return match.group(0)
        if not value or value == "True":
            return f"`{flags[name]}`"
        return f"`{flags[name]} {value.strip(chr(39) + chr(34))}`"

    return re.sub(r"`(\w+)(?:=([^`]*))?`", flag, text)


# --------------------------------------------------------------------------------------------------
# stores and files
# --------------------------------------------------------------------------------------------------


def check_store(path: Path) -> Path:
    """``path`` if it is a folder (a zarr store); a ``FileNotFoundError`` that says what is expected otherwise."""
    if not path.exists():
        raise FileNotFoundError(
            f"No SpatialData store at {str(path)!r}: give the path of a zarr store (a folder written by "
            "`sdata.write('sample.zarr')` or by a reader of spatialdata-io)."
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} is a file, not a SpatialData zarr store (a folder written by `sdata.write(...)`)."
        )
    return path


def read_store(path: Path) -> SpatialData:
    """The SpatialData of a zarr store, backed by it (the library writes what it adds into the store)."""
    import spatialdata as sd

    check_store(path)
    sdata = sd.read_zarr(path)
    if not sdata.is_backed():  # pragma: no cover - read_zarr always backs the object
        raise ValueError(f"{str(path)!r} could not be opened as a backed SpatialData store.")
    return sdata


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file without ``--overwrite``, and a folder in any case."""
    if path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a folder; give the path of a file to write.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass --overwrite to replace it, or choose another path.")
    if not path.parent.exists():
        raise FileNotFoundError(f"The folder of {str(path)!r} does not exist; create it first.")


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` when the block succeeds, removed otherwise.

    A pipeline never sees a half-written output file under its final name.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def stored_names(store: Path, kind: str) -> list[str]:
    """The names of the elements of a kind in a zarr store, from its folders (no library needed)."""
    folder = store / kind
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_element(store: Path, kind: str, key: str | None, flag: str) -> None:
    """A ``KeyError`` naming the elements of the store when ``key`` is not one of them."""
    names = stored_names(store, kind)
    if key is not None and key not in names:
        raise KeyError(f"{flag} {key!r}: no such {_SINGULAR[kind]} in {store}; its {kind}: {names or 'none'}.")


def table_of(sdata: SpatialData, key: str, store: Path) -> Any:
    """The table ``key`` of a store, or a ``KeyError`` naming the tables it has."""
    if key not in sdata.tables:
        raise KeyError(f"The store {str(store)!r} has no table {key!r}; its tables: {sorted(sdata.tables) or 'none'}.")
    return sdata.tables[key]


def sections_of(table: Any, flag: str, store: Path) -> list[str]:
    """The section names of a table (``obs["sample_id"]``), for ``flag`` to select from."""
    if SECTION_COLUMN not in table.obs:
        raise ValueError(
            f"{flag} selects sections by `obs[{SECTION_COLUMN!r}]`, which the table of {str(store)!r} lacks."
        )
    return sorted(map(str, table.obs[SECTION_COLUMN].unique()))


def check_names(wanted: Sequence[str], known: Sequence[str], what: str, flag: str, where: str) -> None:
    """Refuse names that are not in ``known``, with close matches as suggestions."""
    missing = [w for w in wanted if w not in set(known)]
    if not missing:
        return
    hints = []
    for name in missing[:5]:
        close = difflib.get_close_matches(name, known, n=3)
        if close:
            hints.append(f"{name!r}: did you mean {', '.join(map(repr, close))}?")
    shown = ", ".join(map(str, list(known)[:10])) + (", ..." if len(known) > 10 else "")
    raise KeyError(
        f"{flag}: unknown {what}{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} in {where} "
        f"(it has {len(known)}: {shown}). " + " ".join(hints)
    )


@contextmanager
def keep_store_listing(sdata: SpatialData) -> Iterator[None]:
    """Remove from the store the elements added in the block when the block fails.

    The library removes from the object what it added when it fails; elements that it had already written to the
    store on the way (a grid, the table of a grid with its embedding) are deleted here, so that the store's list of
    elements is the one it had before the command.
    """
    before = set(sdata.elements_paths_on_disk())
    try:
        yield
    except BaseException:
        try:
            for path in sorted(set(sdata.elements_paths_on_disk()) - before):
                sdata.delete_element_from_disk(path.split("/", 1)[1])
        except Exception as err:  # pragma: no cover - the first error is the one to report
            logger.warning("Could not remove what the failed command added to %s: %s", sdata.path, err)
        raise


# --------------------------------------------------------------------------------------------------
# reporting what was written
# --------------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """References to the elements of a SpatialData and to the parts of its tables, to tell what a command wrote."""

    elements: dict[tuple[str, str], Any] = field(default_factory=dict)
    parts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    var: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, sdata: SpatialData) -> Snapshot:
        """What ``sdata`` holds now."""
        snap = cls()
        for kind in KINDS:
            for key, element in getattr(sdata, kind).items():
                snap.elements[(kind, key)] = element
        for key, table in sdata.tables.items():
            snap.parts[key] = {
                "obsm": dict(table.obsm.items()),
                "uns": dict(table.uns.items()),
                "layers": dict(table.layers.items()),
            }
            snap.var[key] = set(map(str, table.var.columns))
        return snap


def changes(before: Snapshot, sdata: SpatialData) -> list[str]:
    """One line for each element that was added to ``sdata``, or rewritten, since ``before``."""
    after = Snapshot.of(sdata)
    lines = []
    for (kind, key), element in after.elements.items():
        what = f"{_SINGULAR[kind]} {key!r}"
        if kind == "tables":
            what += f" ({element.n_obs} × {element.n_vars})"
        if (kind, key) not in before.elements:
            lines.append(f"added {what}")
            continue
        if kind != "tables":
            if element is not before.elements[(kind, key)]:
                lines.append(f"rewrote {what}")
            continue
        written = []
        for part, values in after.parts[key].items():
            old = before.parts.get(key, {}).get(part, {})
            written += [f"{part}[{k!r}]" for k, v in values.items() if k not in old or old[k] is not v]
        written += [f"var[{c!r}]" for c in sorted(after.var[key] - before.var.get(key, set()))]
        if written or element is not before.elements[(kind, key)]:
            lines.append(f"updated {what}" + (f": {', '.join(written)}" if written else ""))
    return lines


class Report:
    """The summary of a command, printed to ``out`` (stdout) line by line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, line: str) -> None:
        """Print one line of the summary."""
        print(line, file=self.out, flush=True)

    def store(self, path: Path, before: Snapshot, sdata: SpatialData) -> None:
        """What was written into the store ``path`` since ``before``."""
        lines = changes(before, sdata)
        if lines:
            self(f"Wrote to {path}:")
            for line in lines:
                self(f"  {line}")
        else:
            self(f"Nothing written to {path}.")


def shorten(names: Sequence[str], n: int = 8) -> str:
    """``"A, B, C, ... (12)"``."""
    names = list(map(str, names))
    return ", ".join(names[:n]) + (f", ... ({len(names)})" if len(names) > n else "")


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------

#: Keyword arguments of :func:`histoseq.tl.fit` that have their own flag.
_FIT_FLAGGED = {**FLAGS["fit"], "progress": "--quiet", "sdata": "STORE"}


def split_fit_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--option``s as ``(keyword arguments of hs.tl.fit, options of the method)``."""
    import inspect

    from .tl._fit import fit

    taken = [k for k in options if k in _FIT_FLAGGED]
    if taken:
        raise ValueError(f"--option {taken[0]}=...: use {_FIT_FLAGGED[taken[0]]} instead.")
    params = inspect.signature(fit).parameters
    named = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {k: v for k, v in options.items() if k in named}, {k: v for k, v in options.items() if k not in named}


def run_fit(args: argparse.Namespace, out: TextIO) -> int:
    """``histoseq fit``: train an expression model on the spots of one or several stores and save it."""
    from .tl._fit import fit
    from .tl.methods import get_method

    say = Report(out)
    impl = get_method(args.method)  # an unknown method fails here, before any store is read
    fit_kwargs, method_kwargs = split_fit_options(dict(args.option or []))
    impl.check_options(method_kwargs)
    model_path = Path(args.output)
    check_output(model_path, args.overwrite)
    paths = [Path(p) for p in args.stores]
    for path in paths:
        check_store(path)
    stores = [read_store(p) for p in paths]
    sections: set[str] = set()
    for path, sdata in zip(paths, stores):
        table = table_of(sdata, args.table, path)
        if isinstance(args.genes, list):
            check_names(
                args.genes, list(map(str, table.var_names)), "gene", "--genes", f"table {args.table!r} of {path}"
            )
        if args.train:
            sections |= set(sections_of(table, "--train", path))
    if args.train:
        check_names(args.train, sorted(sections), "section", "--train", "the stores' `obs['sample_id']`")
    before = [Snapshot.of(s) for s in stores]
    with _keep_all(stores):
        model = fit(
            stores if len(stores) > 1 else stores[0],
            genes=args.genes,
            method=args.method,
            train=args.train,
            table_key=args.table,
            random_state=args.seed,
            max_epochs=args.max_epochs,
            progress=not args.quiet,
            **fit_kwargs,
            **method_kwargs,
        )
    with replaced_atomically(model_path) as tmp, _quiet_logger("histoseq.tl._model"):
        model.save(tmp)  # its log line would name the temporary file
    p = model.provenance
    groups = ", ".join(f"{g} ({n})" for g, n in (p.get("train_groups") or {}).items())
    inputs = f"embedding {model.embedding!r} ({model.n_features} dims)" if model.embedding else "the H&E patches"
    say(f"Fitted a {model.method} model on {p.get('n_train_spots')} spots{f' of {groups}' if groups else ''}.")
    say(f"  {len(model.genes)} genes: {shorten(model.genes)}")
    say(f"  inputs: {inputs}")
    for path, snap, sdata in zip(paths, before, stores):
        lines = changes(snap, sdata)
        if lines:
            say.store(path, snap, sdata)
    say(f"Wrote model {model_path}")
    return 0


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


@contextmanager
def _keep_all(stores: Sequence[SpatialData]) -> Iterator[None]:
    if not stores:
        yield
        return
    with keep_store_listing(stores[0]), _keep_all(stores[1:]):
        yield


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------


def run_predict(args: argparse.Namespace, out: TextIO) -> int:
    """``histoseq predict``: write a table of predictions into a store."""
    from .tl._fit import predict
    from .tl._model import load_model
    from .tl._prediction import is_prediction_table

    say = Report(out)
    if args.image is not None and args.grid_um is None and args.shapes is None:
        raise ValueError("--image needs --grid-um UM (the spacing of the grid laid on the image's tissue).")
    model_path, store = Path(args.model), Path(args.store)
    if not model_path.is_file():
        raise FileNotFoundError(f"No model file at {str(model_path)!r}; write one with `histoseq fit ... -o MODEL`.")
    check_store(store)
    check_element(store, "images", args.image, "--image")  # before the libraries load: a quick answer
    if args.grid_um is None:
        check_element(store, "shapes", args.shapes, "--shapes")
    model = load_model(model_path)
    sdata = read_store(store)
    before = Snapshot.of(sdata)
    with keep_store_listing(sdata):
        predict(
            sdata,
            model,
            key_added=args.key_added,
            table_key=args.table,
            shapes_key=args.shapes,
            image_key=args.image,
            spacing_um=args.grid_um,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    written = [
        k
        for k, t in sdata.tables.items()
        if is_prediction_table(t, k)
        and (("tables", k) not in before.elements or before.elements[("tables", k)] is not t)
    ]
    for key in written:
        t = sdata.tables[key]
        source = t.uns[key].get("source_table")
        what = "spots" if source == args.table else f"shapes of table {source!r}"
        say(
            f"Predicted {t.n_vars} genes with the {model.method} model {model_path} for {t.n_obs} {what}: "
            f"table {key!r}."
        )
        n_nan = int((~_finite_rows(t.X)).sum())
        if n_nan:
            say(f"  {n_nan} shape(s) could not be predicted (NaN).")
    say.store(store, before, sdata)
    return 0


def _finite_rows(X: Any) -> Any:
    import numpy as np

    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X)
    return np.isfinite(X).any(axis=1)


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace, out: TextIO) -> int:
    """``histoseq evaluate``: score predictions against the measured counts; write a CSV."""
    import numpy as np

    from .tl._evaluate import evaluate

    say = Report(out)
    store = check_store(Path(args.store))
    csv = Path(args.output) if args.output is not None else None
    if csv is not None:
        check_output(csv, args.overwrite)
    sdata = read_store(store)
    table = table_of(sdata, args.measured, store)
    if args.table not in sdata.tables and args.table not in table.obsm and args.table not in table.layers:
        tables = sorted(k for k in sdata.tables if k != args.measured)
        raise KeyError(
            f"--table {args.table!r}: no such table of predictions in {store}; its other tables: {tables or 'none'} "
            "(write predictions with `histoseq predict MODEL STORE`)."
        )
    spots = None
    if args.spots_of:
        known = sections_of(table, "--spots-of", store)
        check_names(args.spots_of, known, "section", "--spots-of", f"`obs['sample_id']` of {store}")
        spots = table.obs[SECTION_COLUMN].astype(str).isin(args.spots_of).to_numpy()
    before = Snapshot.of(sdata)
    with keep_store_listing(sdata):
        scores = evaluate(sdata, predicted=args.table, table_key=args.measured, spots=spots)
    if csv is not None:
        with replaced_atomically(csv) as tmp:
            scores.to_csv(tmp, index=False)
    n_genes = scores["gene"].nunique()
    say(f"Scored the predictions {args.table!r} on {n_genes} genes against table {args.measured!r}.")
    say("  mean Pearson r per section (over genes):")
    width = max(len(str(s)) for s in scores["section"].unique())
    for section, rows in scores.groupby("section", sort=False):
        r = rows["pearson"].to_numpy(float)
        mean = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
        train = " (trained on: optimistic)" if rows["in_training"].any() else ""
        say(f"    {section!s:<{width}}  {mean:+.3f}  ({int(rows['n_spots'].max())} spots){train}")
    say.store(store, before, sdata)
    if csv is not None:
        say(f"Wrote scores {csv}")
    return 0


# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------


def run_embed(args: argparse.Namespace, out: TextIO) -> int:
    """``histoseq embed``: write an embedding of the spots (or shapes) into a store."""
    from .tl._embed import embed

    say = Report(out)
    store = check_store(Path(args.store))
    if args.weights is not None and not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights {args.weights!r}: no such file.")
    check_element(store, "shapes", args.shapes, "--shapes")
    sdata = read_store(store)
    if args.shapes is None:
        table_of(sdata, args.table, store)
    sizes = args.patch_size_um
    before = Snapshot.of(sdata)
    with keep_store_listing(sdata):
        embed(
            sdata,
            encoder=args.encoder,
            patch_size_um=sizes[0] if len(sizes) == 1 else sizes,
            patch_px=args.patch_px,
            table_key=args.table,
            shapes_key=args.shapes,
            weights=args.weights,
            device=args.device,
            key_added=args.key_added,
            progress=not args.quiet,
        )
    for key, table in sdata.tables.items():
        old = before.parts.get(key, {}).get("obsm", {})
        for name, value in table.obsm.items():
            if name not in old or old[name] is not value:
                n = int(_finite_rows(value).sum()) if hasattr(value, "shape") and len(value.shape) == 2 else None
                dims = value.shape[1] if hasattr(value, "shape") and len(value.shape) == 2 else "?"
                say(f"Embedded {n} of {table.n_obs} rows of table {key!r} with {args.encoder!r} ({dims} dims).")
    say.store(store, before, sdata)
    return 0


#: The commands by name.
COMMANDS = {"fit": run_fit, "predict": run_predict, "evaluate": run_evaluate, "embed": run_embed}

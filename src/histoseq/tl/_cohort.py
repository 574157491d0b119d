"""Cohorts of slides in zarr stores: one task per slide, in this process or on a dask cluster.

:func:`histoseq.tl.embed` and :func:`histoseq.tl.predict` accept the path of a SpatialData zarr store, or a list
of them, in place of a SpatialData (they are wrapped by :func:`over_slides`). Each slide is opened lazily
(:func:`spatialdata.read_zarr`: its images stay on disk and are read chunk by chunk), processed, and its result
written back into its own store (atomically, element by element: :func:`histoseq._sdata.store_element`) before
the next slide is opened. Memory holds one slide's tables and one batch of patches, however many slides there
are.

With a :class:`dask.distributed.Client` (``client=``), each slide is one task on the cluster and the workers
write the results into the stores, which must therefore be on a file system the workers share. A model travels
to the workers in histoseq's own file format (JSON and tensors, :mod:`histoseq.tl._model_file`), never as a
pickled object, and is loaded there as :func:`histoseq.tl.load_model` loads a file. Without a client the slides
run one after the other in this process, with the same results.

:func:`histoseq.tl.fit` and :func:`histoseq.tl.cross_validate` accept paths too (:func:`open_slides`): the
stores are opened lazily and read as a list of SpatialData objects (``fit``) or one concatenated SpatialData
(``cross_validate``), so their images are never all in memory either.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("histoseq")


def _is_path(obj: Any) -> bool:
    return isinstance(obj, str | os.PathLike)


def _is_sdata(obj: Any) -> bool:
    from spatialdata import SpatialData

    return isinstance(obj, SpatialData)


def is_slides(obj: Any) -> bool:
    """Whether ``obj`` names slides rather than being one SpatialData: a path, or a list of paths/SpatialData."""
    if _is_path(obj):
        return True
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return bool(obj) and all(_is_path(o) or _is_sdata(o) for o in obj) and any(_is_path(o) for o in obj)
    return False


def _check_store(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"No SpatialData zarr store at {str(p)!r}. Give the path of a store written by `sdata.write(path)`."
        )
    if not any((p / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs")):
        raise ValueError(
            f"{str(p)!r} is a folder but not a zarr store (no zarr.json or .zgroup in it). Give the path of a "
            "store written by `sdata.write(path)`."
        )
    return p


def slide_items(obj: Any) -> list[Any]:
    """The slides of ``obj`` (a path or a list of paths/SpatialData), stores checked, repeats refused."""
    items = [obj] if _is_path(obj) else list(obj)
    out: list[Any] = []
    for item in items:
        out.append(_check_store(item) if _is_path(item) else item)
    paths = [str(p.resolve()) for p in out if isinstance(p, Path)]
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"The same store is listed more than once: {repeated}. List each slide once.")
    return out


def open_slides(obj: Any) -> Any:
    """``obj`` with every zarr path opened lazily as a SpatialData (a list stays a list); other values unchanged."""
    import spatialdata as sd

    if _is_path(obj):
        return sd.read_zarr(_check_store(obj))
    if is_slides(obj):
        return [sd.read_zarr(item) if isinstance(item, Path) else item for item in slide_items(obj)]
    return obj


class ModelFile:
    """A model carried as the bytes of its file (histoseq's format, no pickled object), loaded where it is used."""

    def __init__(self, cls: type, data: bytes):
        self.cls = cls  # the class travels by name (module and qualified name), not as code
        self.data = data

    @classmethod
    def of(cls, model: Any) -> ModelFile:
        with tempfile.TemporaryDirectory(prefix="histoseq-model-") as tmp:
            path = Path(tmp) / "model.pt"
            model.save(path)
            return cls(type(model), path.read_bytes())

    def load(self) -> Any:
        with tempfile.TemporaryDirectory(prefix="histoseq-model-") as tmp:
            path = Path(tmp) / "model.pt"
            path.write_bytes(self.data)
            return self.cls.load(path)


def _is_model(value: Any) -> bool:
    cls = type(value)
    return cls.__module__.startswith("histoseq.") and callable(getattr(value, "save", None)) and hasattr(cls, "load")


def _worker_threads() -> int | None:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def run_slide(func: Callable[..., Any] | tuple[str, str], item: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Open one slide (a path) and call ``func`` on it; models given as :class:`ModelFile` are loaded first.

    ``func`` may be given by name, ``(module, name)``, as it is sent to dask workers (which import it rather than
    receive code). On a dask worker the slide's own dask arrays are computed in the task's thread (no nested
    scheduling) and torch uses the worker's threads only.
    """
    import importlib

    import dask
    import spatialdata as sd

    if isinstance(func, tuple):
        module, name = func
        func = getattr(importlib.import_module(module), name)
    sdata = sd.read_zarr(item) if _is_path(item) else item
    args = tuple(a.load() if isinstance(a, ModelFile) else a for a in args)
    kwargs = {k: v.load() if isinstance(v, ModelFile) else v for k, v in kwargs.items()}
    threads = _worker_threads()
    if threads is None:
        return func(sdata, *args, **kwargs)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with dask.config.set(scheduler="synchronous"):
            return func(sdata, *args, **kwargs)
    finally:
        torch.set_num_threads(before)


def _label(item: Any, i: int) -> str:
    return str(item) if isinstance(item, Path) else f"SpatialData #{i}"


def run_slides(
    func: Callable[..., Any], items: list[Any], args: tuple, kwargs: dict[str, Any], *, client: Any = None
) -> list[Any]:
    """Call ``func(slide, *args, **kwargs)`` for each slide, in order here or as tasks of ``client``.

    Returns the results in the order of ``items``. A slide that fails names itself in the error; the slides
    done before it (here) or alongside it (on a cluster) keep what was written into their stores.
    """
    from tqdm.auto import tqdm

    progress = bool(kwargs.get("progress", True))
    if client is None:
        results = []
        for i, item in enumerate(tqdm(items, desc="slides", unit="slide", disable=not progress or len(items) < 2)):
            try:
                results.append(run_slide(func, item, args, kwargs))
            except Exception as err:
                err.add_note(
                    f"histoseq: while processing slide {_label(item, i)} ({i + 1} of {len(items)}); "
                    f"the {i} slide(s) before it were processed and written."
                )
                raise
        return results
    in_memory = [_label(item, i) for i, item in enumerate(items) if not isinstance(item, Path)]
    if in_memory:
        raise TypeError(
            f"With `client=`, give the slides as paths of zarr stores (the workers open them); {in_memory} are "
            "in-memory objects. Write them first (`sdata.write(path)`), or leave `client=None`."
        )
    from distributed import as_completed

    remote_args = tuple(ModelFile.of(a) if _is_model(a) else a for a in args)
    remote_kwargs = {k: ModelFile.of(v) if _is_model(v) else v for k, v in kwargs.items()}
    if "progress" in remote_kwargs:
        remote_kwargs["progress"] = False  # a worker's bars would go to its log; the bar over slides is here
    by_name = (func.__module__, func.__name__)  # the public function, imported on the worker
    futures = [
        client.submit(run_slide, by_name, str(item), remote_args, remote_kwargs, pure=False, key=f"histoseq-slide-{i}")
        for i, item in enumerate(items)
    ]
    order = {f.key: i for i, f in enumerate(futures)}
    failed: list[tuple[int, BaseException]] = []
    with tqdm(total=len(items), desc="slides", unit="slide", disable=not progress) as bar:
        for future in as_completed(futures):
            if future.status == "error":
                failed.append((order[future.key], future.exception()))
            bar.update()
    if failed:
        failed.sort(key=lambda x: x[0])
        i, first = failed[0]
        names = [_label(items[j], j) for j, _ in failed]
        raise RuntimeError(
            f"{len(failed)} of {len(items)} slides failed on the cluster: {names}. The first ({names[0]}) failed "
            f"with {type(first).__name__}: {first}. The other slides were processed and written."
        ) from first
    return [f.result() for f in futures]


def over_slides(func: Callable[..., Any]) -> Callable[..., Any]:
    """Let ``func(sdata, ...)`` take a zarr path or a list of slides as ``sdata``, and a dask ``client=``.

    One SpatialData goes straight to ``func``. A path or a list goes through :func:`run_slides`, and the call
    returns ``None`` when every slide's result is ``None`` (results written into the stores), else the list of
    results in the order of the slides.
    """

    @functools.wraps(func)
    def wrapper(sdata: Any, *args: Any, client: Any = None, **kwargs: Any) -> Any:
        if not is_slides(sdata):
            if client is not None:
                raise TypeError(
                    "`client=` runs a cohort of slides given as zarr paths, one task per slide; for one "
                    f"in-memory SpatialData, call `{func.__name__}` without it."
                )
            return func(sdata, *args, **kwargs)
        results = run_slides(func, slide_items(sdata), args, kwargs, client=client)
        return None if all(r is None for r in results) else results

    return wrapper

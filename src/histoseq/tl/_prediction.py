"""Predictions written back into SpatialData: the body of :func:`histoseq.tl.predict`, and reading them back.

:func:`predict_table` reads a model's inputs for the shapes it is asked about (a measured table's spots, any
shapes element such as a grid, or a grid it lays on an image-only slide), asks the model for predictions and
writes them as a **table of their own**: one row per predicted shape, only the model's genes, annotating the same
shapes, so that scanpy and squidpy read it as it is (no NaN padding). :func:`read_predictions` gives
:func:`histoseq.tl.evaluate` the predictions aligned with a measured table, whichever way they were stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import (
    annotating_tables,
    get_table,
    select_rows,
    shape_sizes_um,
    shapes_table,
    store_element,
    table_keys,
    warn_duplicated_names,
)
from ._data import section_labels
from ._inputs import prediction_embedding, spot_patches

if TYPE_CHECKING:
    import anndata as ad
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Where :func:`predict_table` puts the predictions of a measured table's spots by default.
DEFAULT_KEY = "predicted"


def prediction_record(model: Any, **extra: Any) -> dict[str, Any]:
    """What a table records of the model that predicted it (``uns[key_added]``), for :func:`histoseq.tl.evaluate`."""
    p = model.provenance
    info = {
        "genes": model.genes,
        "target_transform": "none" if model.target_transform is None else model.target_transform,
        "method": model.method,
        "embedding": model.embedding or "",
        "section_norm": model.section_norm or "none",
        "groups": p.get("groups") or "",
        "train_groups": list(p.get("train_groups") or {}),
    }
    if model.alpha is not None:
        info["alpha"] = float(model.alpha)
    info.update(extra)
    return info


def prediction_table(
    source: ad.AnnData, rows: np.ndarray, pred: np.ndarray, genes: list[str], key: str, info: dict[str, Any]
) -> ad.AnnData:
    """A table of predictions for rows ``rows`` of ``source``, annotating the same shapes (parsed with TableModel).

    ``obs`` (names and columns) and ``obsm["spatial"]`` are those of the source rows; ``X`` holds ``pred``
    (float32, one column per gene of ``genes``); ``uns[key]`` holds ``info``.
    """
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    regions, region_key, instance_key = table_keys(source)
    obs = source.obs.iloc[rows].copy()
    out = ad.AnnData(X=np.asarray(pred, dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    if "spatial" in source.obsm:
        out.obsm["spatial"] = np.asarray(source.obsm["spatial"])[rows].copy()
    out.uns[key] = info
    for col in out.obs.columns:  # as anndata's subsets: categories of rows not predicted are dropped
        if isinstance(out.obs[col].dtype, pd.CategoricalDtype):
            out.obs[col] = out.obs[col].cat.remove_unused_categories()
    used = [r for r in regions if r in set(out.obs[region_key].astype(str))]
    out.obs[region_key] = pd.Categorical(out.obs[region_key].astype(str), categories=used)
    return TableModel.parse(
        out, region=used[0] if len(used) == 1 else used, region_key=region_key, instance_key=instance_key
    )


def _model_inputs(sdata, model, tkey, rows, *, tta, device, progress) -> tuple[np.ndarray, dict[str, Any], str]:
    """The model's predictions for rows ``rows`` of table ``tkey``, what they record, and what a NaN row lacks."""
    if model.uses_images:
        size = None
        if model.patches_follow_shapes:  # the patch is made of the tiles that cover a shape
            sizes = shape_sizes_um(sdata, tkey, rows)
            size = float(np.nanmedian(sizes)) if np.isfinite(sizes).any() else None
        images, found, _ = spot_patches(sdata, tkey, rows, **model.patch_options(size), progress=progress)
        pred = np.full((len(rows), len(model.genes)), np.nan, dtype=np.float32)
        pred[found] = model.predict_patches(images[found], tta=tta, device=device)
        return pred, model.prediction_info(tta=tta), "patch (centre outside the image)"
    X = prediction_embedding(sdata, tkey, model.embedding, model.embedding_params, model.n_features, progress=progress)
    table = sdata.tables[tkey]
    sections = section_labels(table, model.provenance.get("groups")) if model.section_norm else None
    return model.predict_embeddings(X, sections=sections, rows=rows), {}, "finite embedding"


def _target(sdata, table_key, shapes_key, image_key, spacing_um, added) -> tuple[str, str | None]:
    """The table whose rows are predicted and the shapes they are (``None``: all of the table's regions).

    Lays a grid on ``image_key`` when ``spacing_um`` is given, and makes the table of a shapes element that no
    table annotates; what it adds to ``sdata`` is listed in ``added`` (``(kind, key)``) so that a failure can
    remove it.
    """
    from .._sdata import resolve_image_key

    if spacing_um is not None:
        from ..pp import make_grid

        image_key = resolve_image_key(sdata, image_key)
        grid_key = shapes_key or f"{image_key}_grid"
        if grid_key in sdata.shapes:
            raise ValueError(
                f"Shapes {grid_key!r} exist already: predict on them with `shapes_key={grid_key!r}` (without "
                "`spacing_um`), or name a new grid with `shapes_key=`."
            )
        sdata.shapes[grid_key] = make_grid(sdata, image_key=image_key, spacing_um=spacing_um, inplace=False)
        added.append(("shapes", grid_key))
        shapes_key = grid_key
    elif image_key is not None and shapes_key is None:
        raise ValueError("`image_key` needs `spacing_um` (the grid to lay on the image) or `shapes_key`.")
    if shapes_key is None:
        return get_table(sdata, table_key)[0], None
    if shapes_key not in sdata.shapes:
        raise KeyError(f"Shapes {shapes_key!r} not found (shapes: {sorted(sdata.shapes)}).")
    if table_key in annotating_tables(sdata, shapes_key):  # spots of the measured table
        return table_key, shapes_key
    tkey, created = shapes_table(sdata, shapes_key)  # the table that annotates them, made when there is none
    if created:
        added.append(("tables", tkey))
    return tkey, shapes_key


def _undo(sdata: SpatialData, added: list[tuple[str, str]]) -> None:
    for kind, key in reversed(added):
        getattr(sdata, kind).pop(key, None)


def predict_table(
    sdata: SpatialData,
    model: Any,
    *,
    key_added: str | None = None,
    table_key: str | None = "table",
    shapes_key: str | None = None,
    image_key: str | None = None,
    spacing_um: float | None = None,
    spots: Any = None,
    into_table: bool = False,
    overwrite: bool = False,
    inplace: bool = True,
    progress: bool = True,
    tta: bool | None = None,
    device: Any = "cpu",
) -> ad.AnnData | None:
    """Predict shapes with ``model`` and write or return the table of predictions (:func:`histoseq.tl.predict`)."""
    import pandas as pd

    if into_table and not inplace:
        raise ValueError("`into_table=True` writes into the measured table; it needs `inplace=True`.")
    added: list[tuple[str, str]] = []
    try:
        tkey, shapes = _target(sdata, table_key, shapes_key, image_key, spacing_um, added)
        measured = shapes is None or tkey == table_key
        key = key_added or (DEFAULT_KEY if measured else f"{shapes}_{DEFAULT_KEY}")
        if inplace:
            check_prediction_key(sdata, key, tkey, overwrite=overwrite, into_table=into_table)
        table = sdata.tables[tkey]
        rows = select_rows(table.n_obs, table.obs_names, spots)
        warn_duplicated_names(table, f"Table {tkey!r}", stacklevel=4)
        if shapes is not None:  # the table's rows of those shapes only
            region_key = table_keys(table)[1]
            rows = rows[table.obs[region_key].astype(str).to_numpy()[rows] == shapes]
        if rows.size == 0:
            raise ValueError("`spots` selects no spot." if spots is not None else f"Table {tkey!r} has no rows.")
        pred, extra, missing_what = _model_inputs(sdata, model, tkey, rows, tta=tta, device=device, progress=progress)
        table = sdata.tables[tkey]  # an embedding computed on the way replaced it on a backed object
        n_nan = int(np.isnan(pred).all(axis=1).sum())
        if n_nan:
            logger.warning("%d spot(s) have no %s; their predictions are NaN.", n_nan, missing_what)
        info = prediction_record(model, n_spots=len(rows), source_table=tkey, **extra)
        out = prediction_table(table, rows, pred, list(model.genes), key, info)
    except BaseException:
        _undo(sdata, added)
        raise
    if not inplace:
        _undo(sdata, added)
        return out
    for kind, element_key in added:
        store_element(sdata, kind, element_key)
    if into_table:
        frame = pd.DataFrame(np.nan, index=table.obs_names, columns=list(model.genes), dtype=np.float32)
        frame.iloc[rows] = pred
        table.obsm[key] = frame
        store_element(sdata, "tables", tkey)
    store_element(sdata, "tables", key, out)
    logger.info(
        "Predicted %d genes for %d %s: added table %r annotating %s.",
        pred.shape[1],
        len(rows),
        "shapes" if shapes is not None else "spots",
        key,
        shapes or f"the regions of table {tkey!r}",
    )
    return None


def is_prediction_table(table: Any, key: str) -> bool:
    """Whether table ``key`` holds predictions written by histoseq (it records a model in ``uns[key]``)."""
    info = table.uns.get(key)
    return isinstance(info, dict) and "method" in info and "genes" in info


def check_prediction_key(sdata: SpatialData, key: str, tkey: str, *, overwrite: bool, into_table: bool = False) -> None:
    """Refuse a ``key_added`` that would replace the user's element, or predictions without ``overwrite``.

    With ``into_table``, ``obsm[key]`` of table ``tkey`` is written too: an entry there is replaced only when it came
    with predictions of the same name (``hs.tl.predict(..., into_table=True)`` wrote both) and ``overwrite`` is set.
    """
    if key == tkey:
        raise ValueError(f"`key_added` must differ from the table of the spots ({tkey!r}).")
    ours = key in sdata.tables and is_prediction_table(sdata.tables[key], key)
    if key in sdata.tables:
        if not ours:
            raise ValueError(f"Table {key!r} exists and was not written by hs.tl.predict; choose another `key_added`.")
        if not overwrite:
            raise ValueError(f"Table {key!r} holds predictions already; pass `overwrite=True` to replace them.")
    if into_table and key in sdata.tables[tkey].obsm and not ours:
        raise ValueError(
            f"Table {tkey!r} has an entry `obsm[{key!r}]` that hs.tl.predict did not write; `into_table=True` would "
            "replace it. Choose another `key_added`."
        )
    if any(key in getattr(sdata, kind) for kind in ("images", "labels", "points", "shapes")):
        raise ValueError(f"An element {key!r} exists; choose another `key_added`.")


def read_predictions(sdata: Any, table_key: str | None, key: str) -> tuple[str | None, Any, np.ndarray, dict]:
    """Predictions ``key`` aligned with the rows of the measured table: ``(tkey, table, pred (n_obs, genes), info)``.

    ``key`` names a table of predictions (what :func:`predict_table` writes; rows matched by ``obs_names``,
    rows it lacks are NaN), a DataFrame in ``obsm`` (``into_table=True``), or a layer (written by histoseq
    before 0.4, or by :func:`histoseq.tl.cross_validate`).
    """
    import anndata as ad

    if isinstance(sdata, ad.AnnData):
        tkey, table, tables = None, sdata, {}
    else:
        tkey, table = get_table(sdata, table_key)
        tables = sdata.tables
    if key in tables and key != tkey:
        pt = tables[key]
        info = pt.uns.get(key)
        if not isinstance(info, dict) or "genes" not in info:
            raise ValueError(f"Table {key!r} is not a table of predictions (no `uns[{key!r}]['genes']`).")
        for name, t in ((tkey, table), (key, pt)):
            if t.obs_names.has_duplicates:
                dup = t.obs_names[t.obs_names.duplicated()].unique()
                raise ValueError(
                    f"Table {name!r} repeats {len(dup)} spot name(s) in `obs_names`, e.g. {list(dup[:3])}: the "
                    f"predictions cannot be matched to the spots by name. Make the measured table's names unique "
                    f"(`sdata.tables[{tkey!r}].obs_names_make_unique()`) and predict again."
                )
        pos = pt.obs_names.get_indexer(table.obs_names)
        if (pos < 0).all():
            raise ValueError(
                f"Table {key!r} predicts other spots than table {tkey!r} (a grid or an H&E-only slide?): there is "
                "no measured expression to evaluate it against."
            )
        X = np.asarray(pt.X.toarray() if hasattr(pt.X, "toarray") else pt.X, dtype=np.float64)
        pred = np.full((table.n_obs, pt.n_vars), np.nan)
        pred[pos >= 0] = X[pos[pos >= 0]]
        cols = pt.var_names.get_indexer([str(g) for g in info["genes"]])
        return tkey, table, pred[:, cols], info
    info = table.uns.get(key)
    if key in table.obsm and hasattr(table.obsm[key], "columns"):
        frame = table.obsm[key]
        genes = [str(g) for g in (info or {}).get("genes", list(frame.columns))]
        return tkey, table, frame[genes].to_numpy(np.float64), info or {}
    if key in table.layers:
        if not isinstance(info, dict) or "genes" not in info:
            raise ValueError(f"`uns[{key!r}]` must record the predicted `genes` (as histoseq writes them).")
        cols = table.var_names.get_indexer([str(g) for g in info["genes"]])
        if (cols < 0).any():
            raise KeyError(f"Genes of `uns[{key!r}]['genes']` are not in the table.")
        return tkey, table, np.asarray(table.layers[key][:, cols], dtype=np.float64), info
    raise KeyError(
        f"No predictions {key!r}: no such table (tables: {sorted(tables)}), nor a DataFrame in `obsm` or a layer of "
        "the measured table. Write predictions first with `hs.tl.predict(sdata, model)`."
    )

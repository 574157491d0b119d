"""Predictions written back into SpatialData: the body of :func:`histoseq.tl.predict`.

:func:`predict_table` reads a model's inputs for a table's spots (its embedding, computed when absent, or the
patches), asks the model for predictions and writes them as a layer of the table or as a new table. It takes
the model as it is (an :class:`~histoseq.tl.ExpressionModel`), so that :meth:`ExpressionModel.predict` and
:func:`histoseq.tl.predict` share it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, select_rows, store_element, table_keys
from ._data import section_labels
from ._inputs import prediction_embedding, spot_patches

if TYPE_CHECKING:
    import anndata as ad
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


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


def predict_table(
    sdata: SpatialData,
    model: Any,
    *,
    key_added: str = "predicted",
    table_key: str | None = "table",
    spots: Any = None,
    inplace: bool = True,
    tta: bool | None = None,
    device: Any = "cpu",
) -> ad.AnnData | None:
    """Predict the spots of a table with ``model`` and write or return the predictions (:func:`histoseq.tl.predict`)."""
    import anndata as ad
    import pandas as pd

    tkey, table = get_table(sdata, table_key)
    rows = select_rows(table.n_obs, table.obs_names, spots)
    if rows.size == 0:
        raise ValueError("`spots` selects no spot.")
    if model.uses_images:
        c = model.config
        images, found, _ = spot_patches(
            sdata,
            tkey,
            rows,
            patch_size_um=c["patch_size_um"],
            patch_px=c["patch_px"],
            stain_norm=c.get("stain_norm", False),  # models saved before stain normalisation: as scanned
            progress=False,
        )
        pred = np.full((len(rows), len(model.genes)), np.nan, dtype=np.float32)
        pred[found] = model.predict_patches(images[found], tta=tta, device=device)
        extra: dict[str, Any] = model.prediction_info(tta=tta)
        missing_what = "patch (centre outside the image)"
    else:
        X = prediction_embedding(sdata, tkey, model.embedding, model.embedding_params, model.n_features)
        table = sdata.tables[tkey]
        sections = section_labels(table, model.provenance.get("groups")) if model.section_norm else None
        pred = model.predict_embeddings(X, sections=sections, rows=rows)
        extra, missing_what = {}, "finite embedding"
    table = sdata.tables[tkey]
    n_nan = int(np.isnan(pred).all(axis=1).sum())
    if n_nan:
        logger.warning("%d spot(s) have no %s; their predictions are NaN.", n_nan, missing_what)
    has_genes = all(g in table.var_names for g in model.genes)
    info = prediction_record(model, n_spots=len(rows), source_table=tkey, **extra)

    def new_table() -> ad.AnnData:
        obs = table.obs.iloc[rows].copy()
        out = ad.AnnData(X=pred, obs=obs, var=pd.DataFrame(index=pd.Index(model.genes)))
        if "spatial" in table.obsm:
            out.obsm["spatial"] = np.asarray(table.obsm["spatial"])[rows].copy()
        out.uns[key_added] = info
        return out

    if not inplace:
        return new_table()
    if has_genes:
        layer = np.full(table.shape, np.nan, dtype=np.float32)
        layer[np.ix_(rows, table.var_names.get_indexer(model.genes))] = pred
        table.layers[key_added] = layer
        table.uns[key_added] = info
        store_element(sdata, "tables", tkey)
        logger.info(
            "Predicted %d genes for %d spots: added layer %r of table %r.", pred.shape[1], len(rows), key_added, tkey
        )
        return None
    if key_added == tkey:
        raise ValueError(
            f"Table {tkey!r} lacks some of the model's genes, so the predictions go to a new table; `key_added` "
            f"must differ from {tkey!r}."
        )
    from spatialdata.models import TableModel

    regions, region_key, instance_key = table_keys(table)
    out = new_table()
    used = [r for r in regions if r in set(out.obs[region_key].astype(str))]
    out.obs[region_key] = pd.Categorical(out.obs[region_key].astype(str), categories=used)
    out.uns.pop("spatialdata_attrs", None)
    region = used[0] if len(used) == 1 else used
    parsed = TableModel.parse(out, region=region, region_key=region_key, instance_key=instance_key)
    store_element(sdata, "tables", key_added, parsed)
    logger.info(
        "Table %r lacks %d of the model's genes: added table %r with predictions of %d genes for %d spots.",
        tkey,
        sum(g not in table.var_names for g in model.genes),
        key_added,
        pred.shape[1],
        len(rows),
    )
    return None

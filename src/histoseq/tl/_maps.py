"""Predictions on a grid as an image: one channel per gene, aligned with the H&E.

A table of predictions on grid tiles (:func:`histoseq.tl.predict` on :func:`histoseq.pp.make_grid` shapes, e.g.
a super-resolved ``method="superres"`` model) becomes a float image element whose pixel ``(i, j)`` is grid
tile ``(i, j)``: what spatialdata-plot, napari and ``hs.pl`` draw over the H&E at any zoom.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._sdata import centers_in_image, check_spatialdata, pick_image, store_element, table_keys, transformations

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_GRID_COLUMNS = ("grid_row", "grid_col")


def _grid_step(centres: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """The grid step in level-0 pixels from tile centres ``(x, y) = ((col + 0.5) s, (row + 0.5) s)``."""
    a = np.concatenate([cols + 0.5, rows + 0.5])
    b = np.concatenate([centres[:, 0], centres[:, 1]])
    step = float(a @ b / (a @ a))
    if not np.allclose(a * step, b, atol=max(1e-6, 0.01 * step)):
        raise ValueError(
            "The grid's tiles do not lie at ((grid_col + 0.5) · step, (grid_row + 0.5) · step) of the image; only "
            "grids made by `hs.pp.make_grid` on that image can be written as a raster."
        )
    return step


def expression_map(
    sdata: SpatialData,
    predicted: str,
    genes: str | Sequence[str] | None = None,
    *,
    image_key: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> xr.DataArray | None:
    """Write a table of predictions on grid tiles as an image: one channel per gene, aligned with the H&E.

    Parameters
    ----------
    sdata
        SpatialData with the predictions and the grid they annotate.
    predicted
        The table of predictions (:func:`histoseq.tl.predict` on a grid made by :func:`histoseq.pp.make_grid`,
        e.g. ``f"{image_key}_grid_predicted"``).
    genes
        Gene(s) to write; default all the table's genes.
    image_key
        The image the grid lies on; inferred from the grid's coordinate systems when there is one.
    key_added
        Name of the image element; default ``f"{predicted}_map"``.
    overwrite
        Replace an existing element of that name.
    inplace
        Add the image to ``sdata`` (and its zarr store when backed); ``False`` returns it.

    Returns
    -------
    With ``inplace=True``, ``None``; adds ``sdata.images[key_added]``, float32 ``(c=genes, y=grid rows,
    x=grid columns)``, NaN where the grid has no tile (off tissue), on every coordinate system of the image (a
    scale by the grid step in level-0 pixels, then the image's transformation). Otherwise the image.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    >>> model = hs.tl.fit(sdata, genes=3, method="superres", max_epochs=2, progress=False)
    >>> hs.tl.predict(sdata, model, image_key="section0_image", spacing_um=model.config["tile_um"], progress=False)
    >>> hs.tl.expression_map(sdata, "section0_image_grid_predicted")
    >>> sdata.images["section0_image_grid_predicted_map"].sizes["c"]
    3

    """
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale
    from spatialdata.transformations import Sequence as Chain

    check_spatialdata(sdata)
    if predicted not in sdata.tables:
        raise KeyError(f"No table {predicted!r} (tables: {sorted(sdata.tables)}). Run `hs.tl.predict` on a grid first.")
    table = sdata.tables[predicted]
    regions, _, instance_key = table_keys(table)
    if len(regions) != 1:
        raise ValueError(
            f"Table {predicted!r} annotates {regions}; a raster needs the predictions of one grid. Predict on a grid "
            "of one image first: `hs.tl.predict(sdata, model, image_key=..., spacing_um=...)`."
        )
    grid_key = regions[0]
    shapes = sdata.shapes[grid_key]
    missing = [c for c in _GRID_COLUMNS if c not in shapes.columns]
    if missing:
        raise ValueError(
            f"Shapes {grid_key!r} have no {missing} columns: predictions on spots are not a grid. Make one with "
            "`hs.pp.make_grid` and predict on it."
        )
    names = [str(g) for g in table.var_names]
    genes = names if genes is None else [genes] if isinstance(genes, str) else list(genes)
    absent = [g for g in genes if g not in names]
    if absent:
        raise KeyError(f"Genes {absent[:5]} are not in table {predicted!r} (it holds {names[:5]}...).")
    key = key_added or f"{predicted}_map"
    if inplace and key in sdata.images and not overwrite:
        raise ValueError(f"Image element {key!r} exists; pass `overwrite=True` to replace it, or another `key_added`.")
    image_key = pick_image(sdata, shapes, image_key, f"shapes {grid_key!r}")
    centres, _ = centers_in_image(sdata, grid_key, image_key)
    step = _grid_step(centres, shapes["grid_row"].to_numpy(float), shapes["grid_col"].to_numpy(float))
    pos = shapes.index.get_indexer(table.obs[instance_key].to_numpy())
    if (pos < 0).any():
        raise KeyError(f"{int((pos < 0).sum())} rows of table {predicted!r} have no tile in {grid_key!r}.")
    row = shapes["grid_row"].to_numpy(int)[pos]
    col = shapes["grid_col"].to_numpy(int)[pos]
    X = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    X = np.asarray(X, dtype=np.float32)[:, [names.index(g) for g in genes]]
    raster = np.full((len(genes), int(shapes["grid_row"].max()) + 1, int(shapes["grid_col"].max()) + 1), np.nan)
    raster[:, row, col] = X.T
    chains = {
        cs: Chain([Scale([step, step], axes=("y", "x")), t])
        for cs, t in transformations(sdata.images[image_key]).items()
    }
    element = Image2DModel.parse(
        raster.astype(np.float32), dims=("c", "y", "x"), c_coords=genes, transformations=chains
    )
    if not inplace:
        return element
    store_element(sdata, "images", key, element)
    logger.info("Added image %r: %d gene(s) on a %d × %d raster of %r.", key, len(genes), *raster.shape[1:], grid_key)
    return None

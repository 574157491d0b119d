"""Attention maps and hotspots of ``method="attention"`` models: where on the slide each gene's model looks.

:func:`attention_maps` tiles an image with the model's tiles, embeds each tile once, scores it with each
gene's gated attention (:func:`histoseq.tl.methods._attention.tile_scores`) and writes, per gene, the
attention a tile receives relative to a uniform attention in the bags (the model's ``grid × grid`` windows of
tiles) that contain it, as a float image element aligned with the H&E. :func:`hotspots` lists the tiles of
highest attention of a gene as square shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import (
    affine_xy,
    image_ref,
    resolve_image_key,
    shared_coordinate_systems,
    store_element,
    transformations,
)
from .methods import get_method
from .methods._attention import AttentionMethod, embed_tiles, tile_scores

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr
    from spatialdata import SpatialData

    from ._model import ExpressionModel

logger = logging.getLogger(__name__)

#: Tiles per batch when a slide is embedded (bounds memory).
BATCH_TILES = 1024
#: Genes per block of the window sums (bounds memory on whole slides).
GENE_BLOCK = 4


def relative_attention(scores: np.ndarray, tissue: np.ndarray, grid: int) -> np.ndarray:
    """The attention each tile receives relative to uniform, averaged over the windows of tiles that hold it.

    For ``scores`` ``(G, rows, cols)`` (``s_t`` of each gene and tile) and the ``tissue`` tiles, the bags are
    all ``grid × grid`` windows of the tile grid (those reaching beyond it hold fewer tiles); a window ``b`` of
    ``k_b`` tissue tiles gives tile ``t`` the attention ``exp(s_t) / Z_b``, ``Z_b = Σ_{t' ∈ b} exp(s_t')``,
    which is ``k_b`` times that of a uniform attention. The result is ``exp(s_t) · mean_{b ∋ t} k_b / Z_b``
    (1 everywhere for flat scores), NaN off tissue. Each window's sum is taken after subtracting the
    window's largest score, so no exponential overflows or underflows to a wrong value.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._attention import relative_attention
    >>> tissue = np.ones((6, 6), dtype=bool)
    >>> flat = relative_attention(np.zeros((1, 6, 6)), tissue, grid=3)
    >>> bool(np.allclose(flat, 1.0))
    True
    >>> s = np.zeros((1, 6, 6))
    >>> s[0, 2, 2] = 3.0  # one tile stands out
    >>> w = relative_attention(s, tissue, grid=3)
    >>> bool(w[0, 2, 2] > 3 and w[0, 0, 5] == 1.0 and w[0, 2, 3] < 1)
    True

    """
    scores = np.asarray(scores)
    n_genes, n_rows, n_cols = scores.shape
    tissue = np.asarray(tissue, dtype=bool)
    g = int(grid)
    # float64 within each block of genes; the result in the scores' precision (float32 for a whole slide)
    out = np.full(scores.shape, np.nan, dtype=np.result_type(scores.dtype, np.float32))
    if not tissue.any():
        return out
    pad = ((g - 1, g - 1), (g - 1, g - 1))
    # windows anchored at each position of the padded grid that holds at least one tile
    n_r, n_c = n_rows + g - 1, n_cols + g - 1
    mask_p = np.pad(tissue, pad)
    views = [(dy, dx) for dy in range(g) for dx in range(g)]
    k = sum(mask_p[dy : dy + n_r, dx : dx + n_c].astype(np.float64) for dy, dx in views)
    for start in range(0, n_genes, GENE_BLOCK):
        s = np.where(tissue, scores[start : start + GENE_BLOCK].astype(np.float64), -np.inf)
        s_p = np.pad(s, ((0, 0), *pad), constant_values=-np.inf)
        m = np.full((s.shape[0], n_r, n_c), -np.inf)
        for dy, dx in views:
            np.maximum(m, s_p[:, dy : dy + n_r, dx : dx + n_c], out=m)
        m = np.where(np.isfinite(m), m, 0.0)  # windows without tissue
        z = sum(np.exp(s_p[:, dy : dy + n_r, dx : dx + n_c] - m) for dy, dx in views)
        ratio = np.divide(k, z, out=np.zeros_like(z), where=z > 0)
        # tile (r, c) is at offset (g - 1 - dy, g - 1 - dx) of the window anchored at (r + dy, c + dx)
        acc = sum(
            ratio[:, dy : dy + n_rows, dx : dx + n_cols] * np.exp(s - m[:, dy : dy + n_rows, dx : dx + n_cols])
            for dy, dx in views
        )
        out[start : start + GENE_BLOCK] = np.where(tissue, acc / len(views), np.nan)
    return out


def _attention_model(model: Any) -> tuple[Any, Any]:
    """The fitted state and predictor of an attention model; a clear error for any other model."""
    method = getattr(model, "method", None)
    if method is None or not isinstance(get_method(method), AttentionMethod):
        raise TypeError(
            f"Attention maps need a model fitted with `method='attention'`; got a {method!r} model. Fit one with "
            "`hs.tl.fit(sdata, method='attention')`."
        )
    # the model's fitted state and its rebuilt network and encoder (cached by the model)
    return model._fitted, model._get_predictor()


def _genes(model: Any, genes: str | Sequence[str] | None) -> list[str]:
    if genes is None:
        return model.genes
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    missing = [g for g in genes if g not in model.genes]
    if missing or not genes:
        raise KeyError(f"The model does not predict {missing or 'any gene'}; it predicts {model.genes}.")
    return list(dict.fromkeys(genes))


def _map_name(image_key: str, key: str) -> str:
    return f"{image_key}_{key}"


def attention_maps(
    sdata: SpatialData,
    model: ExpressionModel,
    genes: str | Sequence[str] | None = None,
    *,
    image_key: str | None = None,
    table_key: str | None = "table",
    key_added: str = "attention",
    tissue: bool | str = True,
    progress: bool = True,
    inplace: bool = True,
    overwrite: bool = False,
) -> xr.DataArray | None:
    """Map, per gene, the attention an attention model gives each tile of an H&E image.

    The tissue of the image is tiled with the model's tiles (:func:`histoseq.pp.make_grid` with
    ``spacing_um=model.config["tile_um"]``), every tile is cut once at the model's ``tile_px`` (stain-normalised
    as the model's training patches were), embedded with the model's encoder, streamed in batches, and scored
    with each gene's gated attention ``s_tg``. The map holds the attention a tile receives relative to uniform
    attention in the bags that contain it: with bags the model's ``grid × grid`` windows of tiles,
    ``exp(s_t) · mean_{b ∋ t} k_b / Z_b`` (:func:`relative_attention`). 1 is what every tile of a bag gets
    when the gene's model attends evenly; 3 is three times that.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image.
    model
        An :class:`~histoseq.tl.ExpressionModel` fitted with ``method="attention"``.
    genes
        Gene(s) to map; default all the model's genes.
    image_key
        The image; inferred when there is one (maps and other float images are never taken for the scan).
    table_key
        Table whose ``uns[key_added]`` records what was done; ``sdata.attrs["histoseq"]`` when there is none.
    key_added
        The map is the image element ``f"{image_key}_{key_added}"``.
    tissue
        Map only tiles on tissue: ``True`` detects it (:func:`histoseq.pp.detect_tissue`), a string names a
        labels element holding a tissue mask, ``False`` maps the whole image.
    progress
        Show a progress bar.
    inplace
        Add the map to ``sdata``; ``False`` returns it and writes nothing.
    overwrite
        Replace an existing element of that name.

    Returns
    -------
    With ``inplace=True``, ``None``; adds ``sdata.images[f"{image_key}_{key_added}"]``: float32
    ``(c=genes, y=tile rows, x=tile columns)``, NaN off tissue, on every coordinate system of the image (a
    scale by the tile step in level-0 pixels, then the image's transformation: raster pixel ``(i, j)`` covers
    tile ``(i, j)``), and records the parameters under ``uns[key_added][image_key]``. Otherwise the map.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    >>> model = hs.tl.fit(sdata, genes=3, method="attention", max_epochs=2, n_hidden=8, progress=False)
    >>> hs.tl.attention_maps(sdata, model, image_key="section0_image", progress=False)
    >>> att = sdata.images["section0_image_attention"]
    >>> att.sizes["c"] == 3 and att.dtype == "float32"
    True

    """
    from spatialdata import SpatialData as SD
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale
    from spatialdata.transformations import Sequence as Chain
    from tqdm.auto import tqdm

    from ..pp import iter_patches, make_grid
    from ..pp._stain import estimate_stains, normalize_stain, stain_norm_mode

    fitted, predictor = _attention_model(model)
    genes = _genes(model, genes)
    image_key = resolve_image_key(sdata, image_key)
    name = _map_name(image_key, key_added)
    if name in sdata.images and inplace and not overwrite:
        raise ValueError(f"Image element {name!r} exists; pass `overwrite=True` to replace it, or another `key_added`.")
    c = model.config
    tile_um, tile_px, grid = float(c["tile_um"]), int(c["tile_px"]), int(c["grid"])
    ref = image_ref(sdata, image_key)
    step = tile_um / ref.pixel_size_um
    h, w = ref.shape
    n_rows, n_cols = len(np.arange(step / 2, h, step)), len(np.arange(step / 2, w, step))
    tiles = make_grid(sdata, spacing_um=tile_um, image_key=image_key, tissue=tissue, inplace=False)
    # the tiles are cut from a SpatialData that holds only the image (by reference) and the grid
    view = SD(images={image_key: sdata.images[image_key]}, shapes={"tiles": tiles})
    mode = stain_norm_mode(c.get("stain_norm", False))
    stain = estimate_stains(sdata, [image_key])[image_key] if mode else None
    cols = np.asarray(model.genes, dtype=object)
    pick = np.array([model.genes.index(g) for g in genes])
    scores = np.full((len(genes), n_rows, n_cols), np.nan, dtype=np.float32)
    tile_rows, tile_cols = tiles["grid_row"].to_numpy(), tiles["grid_col"].to_numpy()
    logger.info("Scoring %d tiles of %g µm on %r for %d gene(s).", len(tiles), tile_um, image_key, len(genes))
    with tqdm(total=len(tiles), desc="attention", unit="tile", disable=not progress) as bar:
        batches = iter_patches(
            view,
            table_key=None,
            shapes_key="tiles",
            image_key=image_key,
            patch_size_um=tile_um,
            patch_px=tile_px,
            pixel_size_um=ref.pixel_size_um,
            batch_size=BATCH_TILES,
            progress=False,
        )
        for batch in batches:
            images = batch.images[..., :3]
            if stain is not None:
                images = normalize_stain(images, stain, amount=mode == "amount")
            s = tile_scores(fitted, predictor, embed_tiles(fitted, predictor, images))[:, pick]
            scores[:, tile_rows[batch.rows], tile_cols[batch.rows]] = s.T
            bar.update(len(batch))
    on_tissue = np.isfinite(scores[0])
    raster = relative_attention(scores, on_tissue, grid)
    chains = {
        cs: Chain([Scale([step, step], axes=("y", "x")), t])
        for cs, t in transformations(sdata.images[image_key]).items()
    }
    element = Image2DModel.parse(raster, dims=("c", "y", "x"), c_coords=list(cols[pick]), transformations=chains)
    if not inplace:
        return element
    store_element(sdata, "images", name, element)
    record = {
        "element": name,
        "genes": list(genes),
        "method": model.method,
        "encoder": c["encoder"],
        "region_um": float(c["region_um"]),
        "tile_um": tile_um,
        "tile_px": tile_px,
        "grid": grid,
        "n_tiles": int(on_tissue.sum()),
        "tissue": tissue if isinstance(tissue, str) else bool(tissue),
        "stain_norm": mode or False,
        "weight": "exp(s_t) * mean over the grid x grid windows b holding t of k_b / sum_{t' in b} exp(s_t')",
    }
    _record(sdata, table_key, key_added, image_key, record)
    logger.info("Added image %r: attention of %d gene(s) over %d tiles.", name, len(genes), record["n_tiles"])
    return None


def _record(sdata: SpatialData, table_key: str | None, key: str, image_key: str, record: dict[str, Any]) -> None:
    """Record a map under ``uns[key][image_key]`` of the table, or under ``attrs["histoseq"][key]`` without one."""
    if table_key is not None and table_key in sdata.tables:
        table = sdata.tables[table_key]
        entry = dict(table.uns.get(key, {})) if isinstance(table.uns.get(key), dict) else {}
        entry[image_key] = record
        table.uns[key] = entry
        store_element(sdata, "tables", table_key)
        return
    attrs = sdata.attrs.setdefault("histoseq", {})
    attrs.setdefault(key, {})[image_key] = record
    if sdata.is_backed():
        sdata.write_attrs()


def top_tiles(sdata: SpatialData, gene: str, *, n: int, image_key: str, attention_key: str) -> gpd.GeoDataFrame:
    """The ``n`` tiles of highest attention of ``gene`` in an existing map, as square polygons.

    Polygons are in the image's level-0 pixel coordinates, with columns ``gene``, ``attention``, ``rank``
    (1 = highest), ``x_um`` and ``y_um`` (the tile centre), parsed with the image's transformations.
    """
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"`n` must be a positive number of tiles, got {n!r}.")
    name = _map_name(image_key, attention_key)
    if name not in sdata.images:
        raise KeyError(
            f"No attention map {name!r}: compute it with `hs.tl.attention_maps(sdata, model, image_key={image_key!r}, "
            f"key_added={attention_key!r})`."
        )
    att, image = sdata.images[name], sdata.images[image_key]
    genes = [str(g) for g in att.coords["c"].values]
    if gene not in genes:
        raise KeyError(f"The attention map {name!r} has no gene {gene!r}; it has {genes}.")
    values = np.asarray(att.sel(c=gene).values, dtype=np.float64)
    common = shared_coordinate_systems(att, image)
    if not common:
        raise ValueError(f"The attention map {name!r} shares no coordinate system with image {image_key!r}.")
    to_image = np.linalg.inv(affine_xy(transformations(image)[common[0]])) @ affine_xy(transformations(att)[common[0]])
    order = np.argsort(np.where(np.isfinite(values), -values, np.inf), axis=None, kind="stable")
    order = order[: min(int(n), int(np.isfinite(values).sum()))]
    r, q = np.unravel_index(order, values.shape)
    corners = np.stack([np.column_stack([q + dx, r + dy]) for dx, dy in ((0, 0), (1, 0), (1, 1), (0, 1))], axis=1)
    px = corners @ to_image[:2, :2].T + to_image[:2, 2]  # (n, 4, 2) in level-0 pixels
    centre = px.mean(axis=1)
    um = image_ref(sdata, image_key).pixel_size_um
    gdf = gpd.GeoDataFrame(
        {
            "gene": np.full(len(order), gene, dtype=object),
            "attention": values[r, q],
            "rank": np.arange(1, len(order) + 1),
            "x_um": centre[:, 0] * um,
            "y_um": centre[:, 1] * um,
        },
        geometry=shapely.polygons(px) if len(order) else gpd.GeoSeries([]),
    )
    return ShapesModel.parse(gdf, transformations=transformations(image))


def hotspots(
    sdata: SpatialData,
    model: ExpressionModel,
    gene: str,
    *,
    n: int = 20,
    image_key: str | None = None,
    attention_key: str = "attention",
    key_added: str | None = None,
    table_key: str | None = "table",
) -> gpd.GeoDataFrame:
    """The tiles that a gene's attention model looks at most: the ``n`` tiles of highest attention.

    Reads the map ``f"{image_key}_{attention_key}"`` written by :func:`attention_maps`, and computes it first
    (for all the model's genes) when it is missing.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image.
    model
        An :class:`~histoseq.tl.ExpressionModel` fitted with ``method="attention"``.
    gene
        One of the model's genes.
    n
        Number of tiles.
    image_key
        The image; inferred when there is one.
    attention_key
        ``key_added`` of the map.
    key_added
        Also store the tiles as the shapes element ``key_added``.
    table_key
        Table that records a map computed here (see :func:`attention_maps`).

    Returns
    -------
    A GeoDataFrame of square polygons in the image's level-0 pixel coordinates (on the image's coordinate
    systems), highest attention first, with columns ``gene``, ``attention`` (relative to uniform, as in
    the map), ``rank``, ``x_um`` and ``y_um`` (the tile centres).

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    >>> model = hs.tl.fit(sdata, genes=3, method="attention", max_epochs=2, n_hidden=8, progress=False)
    >>> top = hs.tl.hotspots(sdata, model, model.genes[0], n=5, image_key="section0_image")
    >>> len(top), list(top["rank"])
    (5, [1, 2, 3, 4, 5])

    """
    _attention_model(model)
    (gene,) = _genes(model, [gene])
    image_key = resolve_image_key(sdata, image_key)
    if _map_name(image_key, attention_key) not in sdata.images:
        attention_maps(sdata, model, image_key=image_key, key_added=attention_key, table_key=table_key, progress=False)
    shapes = top_tiles(sdata, gene, n=n, image_key=image_key, attention_key=attention_key)
    if key_added is not None:
        store_element(sdata, "shapes", key_added, shapes)
        logger.info("Added shapes %r: the %d tiles of highest attention of %s.", key_added, len(shapes), gene)
    return shapes

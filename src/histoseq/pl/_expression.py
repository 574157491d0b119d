"""Measured beside predicted expression over the H&E, one row per gene, for spots and grids alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, pick_image, table_keys
from ._classes import _coarse_image, _section, _shape_artists

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _measured(table: Any, genes: list[str], rows: np.ndarray, transform: str | None) -> np.ndarray:
    from ..tl._data import transform_counts

    cols = table.var_names.get_indexer(genes)
    return transform_counts(table.X[rows], transform, cols)


def expression(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    predicted: str = "predicted",
    measured: bool = True,
    table_key: str | None = "table",
    section: str | None = None,
    groups: str | None = "sample_id",
    image_key: str | None = None,
    cmap: str = "viridis",
    max_px: int = 1500,
    panel_size: float = 3.6,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Measured and predicted expression over the H&E: one row per gene, one colour scale per gene.

    Works for any table of predictions written by :func:`histoseq.tl.predict`: a measured table's spots (then the
    measurement is drawn beside the prediction), a grid, or an image-only slide (prediction only). The measured
    values are transformed as the model's targets are (``uns[predicted]["target_transform"]``, e.g. log1p of
    counts per 10,000), so both panels share a scale: the colours span the 1st to 99th percentile of both.
    Spots are drawn as their circles and grid tiles as their squares, at their true size, over a coarse level of
    the image (level 0 of a large slide is never read whole).

    Parameters
    ----------
    sdata
        The SpatialData holding the predictions.
    genes
        One gene or several, among those predicted.
    predicted
        The table of predictions.
    measured
        Draw the measured expression beside the prediction, when the measured table ``table_key`` has the genes
        and the predicted spots.
    table_key
        The measured table.
    section
        The section to draw (a value of ``obs[groups]`` or a shapes element); needed when the predictions span
        several.
    groups
        Column of ``obs`` naming the sections.
    image_key
        The image under the shapes; by default the scan that shares their coordinate system.
    cmap
        Colour map.
    max_px
        Longest side in pixels of the image drawn.
    panel_size
        Size of one panel in inches.
    show
        Call ``plt.show()``; by default only in interactive sessions.
    save
        Write the figure to this file.

    Returns
    -------
    The matplotlib figure: ``len(genes)`` rows of one (prediction) or two (measured, predicted) panels, each with a
    colour bar; titles name the gene and the panel.

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
    >>> hs.tl.predict(sdata, model)
    >>> fig = hs.pl.expression(sdata, model.genes[:2], section="section1")

    """
    import matplotlib.pyplot as plt

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if predicted not in sdata.tables:
        raise KeyError(f"No table of predictions {predicted!r} (tables: {sorted(sdata.tables)}); run hs.tl.predict.")
    pt = sdata.tables[predicted]
    missing = [g for g in genes if g not in pt.var_names]
    if missing or not genes:
        raise KeyError(f"Genes {missing} are not predicted in {predicted!r}; it has {list(pt.var_names[:10])}...")
    region, rows = _section(pt, section, groups)
    if rows.size == 0:
        raise ValueError(f"No prediction for section {section!r}.")
    instances = pt.obs[table_keys(pt)[2]].to_numpy()[rows]
    image_key = pick_image(sdata, sdata.shapes[region], image_key, f"shapes {region!r}")
    pred = np.asarray(pt[:, genes].X if not hasattr(pt.X, "toarray") else pt[:, genes].X.toarray(), float)[rows]
    panels = [("predicted", pred)]
    info = pt.uns.get(predicted, {})
    if measured and table_key in sdata.tables and table_key != predicted:
        _, mt = get_table(sdata, table_key)
        pos = mt.obs_names.get_indexer(pt.obs_names[rows])
        if (pos >= 0).all() and all(g in mt.var_names for g in genes):
            transform = info.get("target_transform", "log1p_cp10k")
            transform = None if transform in (None, "none", "") else transform
            panels.insert(0, ("measured", _measured(mt, genes, pos, transform)))
    image, extent = _coarse_image(sdata, image_key, max_px)
    fig, axes = plt.subplots(
        len(genes), len(panels), figsize=(panel_size * len(panels) + 0.8, panel_size * len(genes)), squeeze=False
    )
    for i, gene in enumerate(genes):
        both = np.concatenate([v[:, i] for _, v in panels])
        both = both[np.isfinite(both)]
        vmin, vmax = np.percentile(both, [1, 99]) if both.size else (0.0, 1.0)
        for j, (name, values) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(image if image.shape[-1] != 1 else image[..., 0], extent=extent, cmap="gray")
            coll = _shape_artists(sdata, region, image_key, instances, values[:, i], ax)
            coll.set_cmap(cmap)
            coll.set_clim(vmin, vmax)
            ax.add_collection(coll)
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            ax.set_axis_off()
            ax.set_title(f"{gene}: {name}", fontsize=9)
            fig.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{region} ({info.get('method', '?')} model; {info.get('target_transform', '')})", fontsize=10)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return fig

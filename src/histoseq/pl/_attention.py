"""Plot of an attention map of ``method="attention"`` models over the H&E, with the hotspot tiles outlined."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import affine_xy, resolve_image_key, shared_coordinate_systems, transformations
from ..tl._attention import top_tiles
from ._classes import _coarse_image

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Longest side in pixels of the H&E drawn under the map (a coarse level of a big slide, never level 0 of it).
MAX_BACKGROUND_SIDE = 1500


def attention(
    sdata: SpatialData,
    gene: str,
    *,
    image_key: str | None = None,
    attention_key: str = "attention",
    hotspots: int = 20,
    ax: Axes | None = None,
    cmap: str = "magma",
    alpha: float = 0.6,
    show: bool | None = None,
) -> Figure:
    """Show a gene's attention map over the H&E, with its tiles of highest attention outlined.

    Parameters
    ----------
    sdata
        SpatialData with the image and its map from :func:`histoseq.tl.attention_maps`.
    gene
        A gene of the map.
    image_key
        The image; inferred when there is one.
    attention_key
        ``key_added`` of :func:`histoseq.tl.attention_maps`: the map is ``f"{image_key}_{attention_key}"``.
    hotspots
        Outline this many tiles of highest attention (:func:`histoseq.tl.hotspots`); ``0``: none.
    ax
        Axes to draw on; a new figure by default.
    cmap
        Colour map of the attention.
    alpha
        Opacity of the map over the H&E.
    show
        Call ``plt.show()``; by default only in interactive sessions.

    Returns
    -------
    The matplotlib figure. The axes are in the image's level-0 pixels; the H&E is read from a coarse
    pyramid level.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    >>> model = hs.tl.fit(sdata, genes=3, method="attention", max_epochs=2, n_hidden=8, progress=False)
    >>> hs.tl.attention_maps(sdata, model, image_key="section0_image", progress=False)
    >>> fig = hs.pl.attention(sdata, model.genes[0], image_key="section0_image", hotspots=5)
    >>> len(fig.axes[0].patches)
    5

    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    if isinstance(hotspots, bool) or not isinstance(hotspots, int | np.integer) or hotspots < 0:
        raise ValueError(f"`hotspots` must be a number of tiles (0 for none), got {hotspots!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha!r}.")
    image_key = resolve_image_key(sdata, image_key)
    name = f"{image_key}_{attention_key}"
    if name not in sdata.images:
        raise KeyError(
            f"No attention map {name!r}: compute it first with `hs.tl.attention_maps(sdata, model, "
            f"image_key={image_key!r}, key_added={attention_key!r})`."
        )
    att = sdata.images[name]
    genes = [str(g) for g in att.coords["c"].values]
    if gene not in genes:
        raise KeyError(f"The attention map {name!r} has no gene {gene!r}; it has {genes}.")
    common = shared_coordinate_systems(att, sdata.images[image_key])
    if not common:
        raise ValueError(f"The attention map {name!r} shares no coordinate system with image {image_key!r}.")
    cs = common[0]
    to_image = np.linalg.inv(affine_xy(transformations(sdata.images[image_key])[cs])) @ affine_xy(
        transformations(att)[cs]
    )
    values = np.asarray(att.sel(c=gene).values, dtype=float)
    rows, cols = values.shape
    x0, y0 = to_image[0, 2], to_image[1, 2]
    extent = (x0, x0 + cols * to_image[0, 0], y0 + rows * to_image[1, 1], y0)

    own = ax is None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 6))
    else:
        fig = ax.figure
    rgb, bg_extent = _coarse_image(sdata, image_key, MAX_BACKGROUND_SIDE)
    ax.imshow(rgb[..., :3] if rgb.shape[-1] >= 3 else rgb[..., 0], extent=bg_extent, cmap="gray")
    layer = ax.imshow(
        np.ma.masked_invalid(values), extent=extent, cmap=cmap, alpha=alpha, interpolation="nearest", zorder=2
    )
    fig.colorbar(layer, ax=ax, fraction=0.046, pad=0.04, label="attention (× uniform)")
    if hotspots:
        top = top_tiles(sdata, gene, n=int(hotspots), image_key=image_key, attention_key=attention_key)
        for geom in top.geometry:
            xy: Any = np.asarray(geom.exterior.coords)
            ax.add_patch(Polygon(xy, closed=True, fill=False, edgecolor="cyan", linewidth=1.2, zorder=3))
    ax.set_xlim(bg_extent[0], bg_extent[1])
    ax.set_ylim(bg_extent[2], bg_extent[3])
    ax.set_title(f"{gene}: attention" + (f", {hotspots} hotspots" if hotspots else ""))
    ax.set_axis_off()
    if own:
        fig.tight_layout()
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return fig

"""Plots of class maps: the classes from expression beside those painted from the H&E."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import (
    ImageRef,
    affine_xy,
    centers_in_image,
    get_table,
    image_levels,
    median_nn_distance,
    pick_image,
    shared_coordinate_systems,
    table_keys,
    transformations,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Colours of the classes that are not genes.
FIXED_COLOURS = {"tissue": "#b4b4b4", "background": "#ffffff"}


def _categories(col: Any) -> list[str]:
    return [str(c) for c in col.cat.categories] if hasattr(col, "cat") else sorted({str(v) for v in col.dropna()})


def _palette(classes: list[str], palette: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, Any]:
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    if isinstance(palette, Mapping):
        missing = [c for c in classes if c not in palette]
        if missing:
            raise ValueError(f"`palette` has no colour for the classes {missing}.")
        return {c: to_rgba(palette[c]) for c in classes}
    if palette is not None:
        colours = list(palette)
        if len(colours) < len(classes):
            raise ValueError(f"`palette` gives {len(colours)} colours for {len(classes)} classes {classes}.")
        return {c: to_rgba(v) for c, v in zip(classes, colours)}
    cycle = iter(colormaps["tab10"].colors)
    return {c: to_rgba(FIXED_COLOURS[c]) if c in FIXED_COLOURS else to_rgba(next(cycle)) for c in classes}


def _section(table: Any, section: str | None, groups: str | None) -> tuple[str, np.ndarray]:
    """The region (spots element) of ``section`` and its table rows."""
    regions, region_key, _ = table_keys(table)
    region_col = table.obs[region_key].astype(str).to_numpy()
    group_col = table.obs[groups].astype(str).to_numpy() if groups and groups in table.obs else None
    if section is None:
        if len(regions) > 1:
            names = sorted(set(group_col)) if group_col is not None else sorted(regions)
            raise ValueError(f"The table holds several sections; choose one with `section=` among {names}.")
        return regions[0], np.flatnonzero(region_col == regions[0])
    if section in regions:
        return section, np.flatnonzero(region_col == section)
    if group_col is None or section not in set(group_col):
        known = sorted(set(group_col)) if group_col is not None else sorted(regions)
        raise KeyError(f"Unknown `section` {section!r}; choose among {known}.")
    rows = np.flatnonzero(group_col == section)
    found = sorted(set(region_col[rows]))
    if len(found) > 1:
        raise ValueError(f"Section {section!r} spans the regions {found}; pass one of them as `section`.")
    return found[0], rows


def _coarse_image(sdata: SpatialData, key: str, max_px: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A coarse pyramid level of an image (``(y, x, c)``) and its extent in level-0 pixels.

    The finest level within ``max_px`` pixels a side, or the coarsest one subsampled to that size: level 0 of a
    large image is never read whole.
    """
    levels = image_levels(sdata.images[key])
    fits = [i for i, lvl in enumerate(levels) if max(lvl.sizes["y"], lvl.sizes["x"]) <= max_px]
    lvl = fits[0] if fits else len(levels) - 1
    data = levels[lvl].data
    stride = max(1, int(np.ceil(max(data.shape[1:]) / max_px)))
    arr = np.moveaxis(np.asarray(data[:, ::stride, ::stride]), 0, -1)
    m = ImageRef(key, tuple(levels), 1.0, "plot").level_to_level0(lvl)
    h, w = data.shape[1:]
    return arr, (m[0, 2], m[0, 2] + m[0, 0] * w, m[1, 2] + m[1, 1] * h, m[1, 2])


def _labels_overlay(sdata: SpatialData, labels_key: str, image_key: str, colours: dict, classes: list[str], table):
    """RGBA of a dense class map and its extent in level-0 pixels of the image."""
    element = sdata.labels[labels_key]
    codes = np.asarray(image_levels(element)[0].data)
    record = sdata.attrs.get("histoseq", {}).get("class_maps", {}).get(labels_key)
    names = record["classes"] if isinstance(record, Mapping) else classes
    lut = np.zeros((len(names) + 1, 4))
    for k, name in enumerate(names, start=1):
        if name in colours and name != "background":  # the glass stays visible
            lut[k] = colours[name]
    rgba = lut[np.clip(codes, 0, len(names))]
    common = shared_coordinate_systems(element, sdata.images[image_key])
    if not common:
        raise ValueError(f"Labels {labels_key!r} share no coordinate system with image {image_key!r}.")
    cs = common[0]
    m = np.linalg.inv(affine_xy(transformations(sdata.images[image_key])[cs])) @ affine_xy(transformations(element)[cs])
    h, w = codes.shape
    return rgba, (m[0, 2], m[0, 2] + m[0, 0] * w, m[1, 2] + m[1, 1] * h, m[1, 2])


def _shape_artists(
    sdata: SpatialData, region: str, image_key: str, instances: np.ndarray, values: np.ndarray | None, ax: Any
):
    """A collection of the shapes ``instances`` of ``region`` in level-0 pixels of the image, coloured by ``values``.

    Circles are placed in ``ax``'s data coordinates (their offsets follow ``ax.transData``), as polygons are.
    """
    from matplotlib.collections import EllipseCollection, PolyCollection

    shapes = sdata.shapes[region].loc[instances]
    cs = shared_coordinate_systems(shapes, sdata.images[image_key])
    if not cs:
        raise ValueError(f"Shapes {region!r} share no coordinate system with image {image_key!r}.")
    m = np.linalg.inv(affine_xy(transformations(sdata.images[image_key])[cs[0]])) @ affine_xy(
        transformations(sdata.shapes[region])[cs[0]]
    )
    geom = shapes.geometry
    if (geom.geom_type == "Point").all():
        xy = np.column_stack([geom.x, geom.y]) @ m[:2, :2].T + m[:2, 2]
        radius = shapes["radius"].to_numpy(float) if "radius" in shapes else np.full(len(shapes), 1.0)
        d = 2 * radius * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        return EllipseCollection(
            d, d, np.zeros(len(d)), units="xy", offsets=xy, offset_transform=ax.transData, array=values
        )
    polys = [np.asarray(g.exterior.coords) @ m[:2, :2].T + m[:2, 2] for g in geom]
    return PolyCollection(polys, array=values, edgecolors="none")


def classes(
    sdata: SpatialData,
    truth: str | None = "expression_class",
    pred: str = "predicted_class",
    *,
    table_key: str | None = "table",
    section: str | None = None,
    groups: str | None = "sample_id",
    image_key: str | None = None,
    labels_key: str | None = None,
    palette: Mapping[str, Any] | Sequence[Any] | None = None,
    alpha: float = 0.45,
    max_px: int = 1500,
    ax_size: float = 5.0,
    show: bool | None = None,
) -> Figure:
    """The classes of one section over its H&E: from the expression (left) beside those painted from the image.

    Spots are drawn at their size, coloured by class, over a coarse pyramid level of the image (at most
    ``max_px`` pixels a side; the full-resolution array is never read). When a dense class map of the image
    exists (``labels_key``, or ``f"{image_key}_{pred}"`` as :func:`histoseq.tl.classify` names it), the
    prediction panel shows it semi-transparent under the spots (background tiles uncoloured). One legend serves
    both panels, with the same colour for a class in each.

    Parameters
    ----------
    sdata
        SpatialData with the image, spots and a table holding the class columns.
    truth, pred
        obs columns of the true classes (e.g. from :func:`histoseq.tl.expression_classes`; ``None``: only
        the prediction) and of the predicted ones (:func:`histoseq.tl.classify`).
    table_key
        The table.
    section
        The section to show: a region (spots element) of the table or a value of ``obs[groups]``; needed
        when the table holds several.
    groups
        obs column of the sections.
    image_key
        The image; by default the finest one of the section.
    labels_key
        The dense class map to overlay; by default ``f"{image_key}_{pred}"`` when present.
    palette
        Colours: a mapping class → colour, or a list in class order; default ``tab10``, grey for ``"tissue"``.
    alpha
        Opacity of the dense map.
    max_px
        Largest side, in pixels, of the image level drawn.
    ax_size
        Size of a panel in inches.
    show
        Call ``plt.show()``; by default only in interactive sessions.

    Returns
    -------
    The matplotlib figure: one axes per panel, the spots of each as one collection, one figure legend.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=800, progress=False)
    >>> hs.tl.expression_classes(sdata, genes=["TUM1", "STRO1"])
    >>> clf = hs.tl.fit_classifier(sdata, patch_sizes_um=(56,), patch_px=32, progress=False)
    >>> hs.tl.classify(sdata, clf, spacing_um=100, progress=False)
    >>> fig = hs.pl.classes(sdata, section="section0")
    >>> len(fig.axes)
    2

    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection
    from matplotlib.patches import Patch

    _, table = get_table(sdata, table_key)
    columns = [c for c in (truth, pred) if c is not None]
    for col in columns:
        if col not in table.obs:
            hint = " Run `hs.tl.classify` first." if col == pred else ""
            raise KeyError(f"The table has no column obs[{col!r}].{hint}")
    region, rows = _section(table, section, groups)
    shapes = sdata.shapes[region]
    image_key = pick_image(sdata, shapes, image_key, f"shapes {region!r}")
    centres, radius = centers_in_image(sdata, region, image_key)
    _, _, instance_key = table_keys(table)
    pos = shapes.index.get_indexer(table.obs[instance_key].to_numpy()[rows])
    xy = centres[pos]
    polygons = radius is None and not (shapes.geometry.geom_type == "Point").all()
    r = radius[pos] if radius is not None else np.full(len(pos), 0.45 * median_nn_distance(centres))
    names = list(dict.fromkeys(c for col in columns for c in _categories(table.obs[col])))
    if labels_key is None and f"{image_key}_{pred}" in sdata.labels:
        labels_key = f"{image_key}_{pred}"
    if labels_key is not None:
        if labels_key not in sdata.labels:
            raise KeyError(f"No labels element {labels_key!r} (labels: {sorted(sdata.labels)}).")
        record = sdata.attrs.get("histoseq", {}).get("class_maps", {}).get(labels_key, {})
        names += [c for c in record.get("classes", []) if c not in names]
    colours = _palette(names, palette)
    img, extent = _coarse_image(sdata, image_key, max_px)
    fig, axes = plt.subplots(1, len(columns), figsize=(ax_size * len(columns), ax_size + 0.8), squeeze=False)
    for ax, col in zip(axes[0], columns):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], extent=extent, cmap="gray")
        if col == pred and labels_key is not None:
            rgba, map_extent = _labels_overlay(sdata, labels_key, image_key, colours, names, table)
            ax.imshow(rgba, extent=map_extent, alpha=alpha, interpolation="nearest")
        values = table.obs[col].astype(object).to_numpy()[rows]
        known = np.array([v is not None and v == v for v in values])  # NaN: no class, not drawn
        face = [colours[str(v)] for v in values[known]]
        if polygons:  # grid tiles: drawn as the squares they are
            spots = _shape_artists(sdata, region, image_key, shapes.index[pos[known]], None, ax)
            spots.set_facecolors(face)
        else:
            spots = EllipseCollection(
                2 * r[known], 2 * r[known], np.zeros(int(known.sum())), units="xy", offsets=xy[known],
                offset_transform=ax.transData, facecolors=face, edgecolors="k", linewidths=0.3,
            )  # fmt: skip
        ax.add_collection(spots)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_axis_off()
        title = f"{col} (expression)" if col == truth else f"{col} (image)"
        if col == pred and truth is not None:
            from ..tl._classes import dice

            mean = dice(table, truth, pred, spots=rows).loc["mean", "dice"]
            title += f", mean Dice {mean:.2f}"
        ax.set_title(title)
    handles = [Patch(facecolor=colours[c], edgecolor="k", linewidth=0.3, label=c) for c in names]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(f"{region}: {image_key}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return fig

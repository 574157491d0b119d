"""Put several sections into one SpatialData object."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from spatialdata import SpatialData


def _merge_attrs(attrs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in attrs:
        for key, value in a.items():
            if key == "histoseq":
                hs = out.setdefault("histoseq", {})
                for k, v in value.items():
                    if isinstance(v, dict):
                        hs.setdefault(k, {}).update(v)
                    elif k not in hs:
                        hs[k] = v
                    elif hs[k] != v:
                        hs[k] = "mixed"
            else:
                out.setdefault(key, value)
    return out


def concatenate(
    sdatas: Iterable[SpatialData], *, table_key: str = "table", join: Literal["inner", "outer"] = "inner"
) -> SpatialData:
    """Concatenate sections (each with its own elements and coordinate systems) into one SpatialData.

    The tables named ``table_key`` are concatenated into one table that annotates every section's spots;
    element names must differ between sections (readers name them after ``sample_id``). histoseq's
    provenance in ``attrs["histoseq"]`` (pixel sizes per image) is merged.

    Parameters
    ----------
    sdatas
        The sections.
    table_key
        Name of the table in every section.
    join
        Genes to keep: ``"inner"``, those measured in every section (what a model trained on some sections and
        applied to others can use); ``"outer"``, all of them, zero where a section lacks a gene.

    Returns
    -------
    A new :class:`spatialdata.SpatialData` with all elements and one table ``table_key``.

    Examples
    --------
    >>> import histoseq as hs
    >>> a = hs.datasets.synthetic(n_sections=1, random_state=0)
    >>> sdata = hs.io.concatenate([a, a.subset(["section0_image"])])  # doctest: +SKIP

    """
    import spatialdata as sd

    sdatas = list(sdatas)
    if not sdatas:
        raise ValueError("Nothing to concatenate: give at least one SpatialData.")
    names = [n for s in sdatas for _, n, _ in s.gen_spatial_elements()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Element names repeat across the sections: {dup}. Give each section its own `sample_id`.")
    missing = [i for i, s in enumerate(sdatas) if table_key not in s.tables]
    if missing:
        raise KeyError(f"Section(s) {missing} have no table {table_key!r}.")
    if join not in ("inner", "outer"):
        raise ValueError(f"`join` must be 'inner' or 'outer', got {join!r}.")
    return sd.concatenate(sdatas, concatenate_tables=True, attrs_merge=_merge_attrs, join=join, merge="same")

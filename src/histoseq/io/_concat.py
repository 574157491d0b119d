"""Put several sections into one SpatialData object."""

from __future__ import annotations

import collections
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
        applied to others can use; sections that share no gene are refused); ``"outer"``, all of them, zero
        where a section lacks a gene (with a warning: those zeros were not measured).

    Returns
    -------
    A new :class:`spatialdata.SpatialData` with all elements and one table ``table_key``.

    Examples
    --------
    >>> import histoseq as hs
    >>> a = hs.datasets.synthetic(n_sections=1, random_state=0)
    >>> sdata = hs.io.concatenate([a, a.subset(["section0_image"])])  # doctest: +SKIP

    """
    import warnings

    import spatialdata as sd

    if isinstance(sdatas, sd.SpatialData | str):
        raise TypeError("`sdatas` must be a list of SpatialData objects, e.g. `hs.io.concatenate([a, b])`.")
    sdatas = list(sdatas)
    if not sdatas:
        raise ValueError("Nothing to concatenate: give at least one SpatialData.")
    wrong = [(i, type(s).__name__) for i, s in enumerate(sdatas) if not isinstance(s, sd.SpatialData)]
    if wrong:
        raise TypeError(
            f"`sdatas` must hold SpatialData objects only; item(s) {[i for i, _ in wrong]} are "
            f"{sorted({t for _, t in wrong})}. Read stores first (`spatialdata.read_zarr(path)`)."
        )
    names = [n for s in sdatas for _, n, _ in s.gen_spatial_elements()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Element names repeat across the sections: {dup}. Give each section its own `sample_id`.")
    missing = [i for i, s in enumerate(sdatas) if table_key not in s.tables]
    if missing:
        raise KeyError(f"Section(s) {missing} have no table {table_key!r}.")
    if join not in ("inner", "outer"):
        raise ValueError(f"`join` must be 'inner' or 'outer', got {join!r}.")
    genes = [set(s.tables[table_key].var_names) for s in sdatas]
    shared, every = set.intersection(*genes), set.union(*genes)
    if join == "inner" and not shared and every:
        examples = [sorted(g)[:2] for g in genes[:3]]
        raise ValueError(
            f"The sections share no gene (e.g. {examples}), so an inner join keeps none. Are the genes named alike "
            "in every section (symbols in one, Ensembl ids in another)? Rename them to one scheme first (e.g. "
            "`read_legacy_st(..., gene_names=...)`), or pass `join='outer'` to keep all genes."
        )
    if join == "outer" and len(shared) < len(every):
        lacking = {i: len(every - g) for i, g in enumerate(genes) if len(g) < len(every)}
        warnings.warn(
            f"{len(every - shared)} of {len(every)} genes are not measured in every section (section: number of "
            f"genes it lacks: {lacking}, e.g. {sorted(every - shared)[:3]}); the outer join gives them zero counts "
            "there, which a model learns as no expression. Use `join='inner'` to keep the genes every section "
            "measured, or subset the table to those genes before fitting.",
            UserWarning,
            stacklevel=2,
        )
    names = [n for s in sdatas for n in s.tables[table_key].obs_names]
    if len(set(names)) < len(names):
        dup = sorted({n for n, c in collections.Counter(names).items() if c > 1})
        warnings.warn(
            f"{len(dup)} spot name(s) occur in several sections, e.g. {dup[:3]}: the joined table's `obs_names` "
            "repeat, and spots are matched and selected by name. Make them unique first (e.g. prefix each "
            "section's `obs_names` with its sample id) or after (`table.obs_names_make_unique()`).",
            UserWarning,
            stacklevel=2,
        )
    return sd.concatenate(sdatas, concatenate_tables=True, attrs_merge=_merge_attrs, join=join, merge="same")

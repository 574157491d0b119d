"""The training spots as other scans would show them: scan augmentation of the expression models.

A model trained on sharp scans reads a slide scanned slightly out of focus as different tissue: the nuclei
segment differently, the haematoxylin peaks flatten, the texture smooths, and the features it learnt from move
further than the expression they stand for (``benchmarks/shifts.py``: a 1.5 µm blur cost the kernel model a
third of its accuracy). No statistic of the test slide can undo a blur, and a prediction must not depend on
the other spots of its slide; so the model learns it instead. Each training spot is embedded again from its own
patch as a less sharp scan would show it (a :class:`ScanShift`), and the method trains on the spot and these
*views* alike, with the spot's targets (:attr:`~histoseq.tl._training_set.TrainingSet.views`; the kernel
method, :mod:`histoseq.tl.methods._kernel`). Predictions read the slide as it is: nothing changes at prediction.

- :class:`ScanShift` and :data:`DEFAULT_AUGMENT`: what a view changes;
- :func:`resolve_augment`: ``hs.tl.fit(augment=...)`` read into shifts;
- :func:`scan_views` and :class:`Views`: the views of a table's spots, computed with :func:`histoseq.tl.embed`
  on the spots' own patches (so they leak nothing: a frozen encoder learns nothing from the data).

Only the hand-crafted morphology (``encoder="morphology"``, whose :class:`~histoseq.tl._morphology.MorphologyParams`
has the blur as ``smooth_um``) is re-embedded; the other parts of an embedding (a network's features, the tissue
position) keep their values in every view.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table
from ._data import embedding_matrix, embedding_params, embedding_parts
from ._embed import MorphologyEncoder, embed

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanShift:
    """How a view of a spot differs from the spot as scanned.

    Attributes
    ----------
    blur_um
        Standard deviation in µm of a Gaussian blur of the patch's intensities (a scan less sharp than the
        training scans: focus, optics, compression); added in quadrature to any ``smooth_um`` the embedding
        already has. ``0``: none.
    stain
        Factor on every pixel's optical density (Beer–Lambert: ``I' = 256 ((I + 1) / 256) ** stain - 1``): a
        darker (``> 1``) or paler (``< 1``) stain than the training slides'. ``1``: none.

    Examples
    --------
    Views blurred by 1 µm and stained half as strongly again, for :func:`histoseq.tl.fit`'s ``augment``:

    >>> import histoseq as hs
    >>> hs.tl.ScanShift(blur_um=1.0)
    ScanShift(blur_um=1.0, stain=1.0)
    >>> shifts = [hs.tl.ScanShift(blur_um=1.0), hs.tl.ScanShift(stain=1.5)]  # hs.tl.fit(sdata, augment=shifts)

    """

    blur_um: float = 0.0
    stain: float = 1.0

    def __post_init__(self):
        for name in ("blur_um", "stain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not np.isfinite(value):
                raise ValueError(f"`{name}` of a scan shift must be a number, got {value!r}.")
        if self.blur_um < 0:
            raise ValueError(f"`blur_um` of a scan shift must be a non-negative number of µm, got {self.blur_um!r}.")
        if self.stain <= 0:
            raise ValueError(f"`stain` of a scan shift must be a positive factor, got {self.stain!r}.")
        if self.blur_um == 0 and self.stain == 1:
            raise ValueError("This scan shift changes nothing: give `blur_um` > 0 or `stain` other than 1.")

    def record(self) -> dict[str, float]:
        """The shift as plain values (for a model's provenance)."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


#: The views ``hs.tl.fit`` trains on by default (``augment="auto"``): each training spot blurred by 1 and by 2 µm,
#: and stained 0.7 and 1.4 times as strongly. Blur views alone trade the loss under blur for one under a paler
#: stain (the model leans on intensity features instead); with the stain views it holds under both. Chosen on the
#: development split (``benchmarks/shifts.py``); see the benchmark page of the docs.
DEFAULT_AUGMENT: tuple[ScanShift, ...] = (
    ScanShift(blur_um=1.0),
    ScanShift(blur_um=2.0),
    ScanShift(stain=0.7),
    ScanShift(stain=1.4),
)


def resolve_augment(augment: Any) -> tuple[ScanShift, ...] | None:
    """The shifts ``augment`` asks for: ``None`` for ``"auto"`` (decided by the data), ``()`` for none.

    ``True`` is :data:`DEFAULT_AUGMENT`, ``False`` none; a list holds :class:`ScanShift` objects, mappings of
    their fields, or numbers (blurs in µm).
    """
    if isinstance(augment, str):
        if augment == "auto":
            return None
        raise ValueError(f"Unknown `augment` {augment!r}; use 'auto', True, False or a list of ScanShift.")
    if augment is True:
        return DEFAULT_AUGMENT
    if augment is False or augment is None:
        return ()
    if isinstance(augment, ScanShift | Mapping | int | float):
        augment = [augment]
    if not isinstance(augment, Sequence):
        raise TypeError(
            f"`augment` must be 'auto', True, False or a list of ScanShift (or of blurs in µm), got "
            f"{type(augment).__name__}."
        )
    out = []
    for item in augment:
        if isinstance(item, ScanShift):
            out.append(item)
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - {f.name for f in fields(ScanShift)})
            if unknown:
                raise ValueError(
                    f"Unknown field(s) {unknown} of a scan shift; it has {[f.name for f in fields(ScanShift)]}."
                )
            out.append(ScanShift(**item))
        elif isinstance(item, int | float) and not isinstance(item, bool):
            out.append(ScanShift(blur_um=float(item)))
        else:
            raise TypeError(f"A scan shift must be a ScanShift, a mapping or a blur in µm, got {item!r}.")
    if len(set(out)) < len(out):
        raise ValueError(f"`augment` lists a shift twice: {out}.")
    return tuple(out)


@dataclass
class Views:
    """The embedding ``embedding`` of every spot of a table under each of ``shifts`` (``NaN`` where not computed).

    ``hs.tl.fit(augment=views)`` takes it in place of shifts, so that views computed once serve many fits (as
    :func:`histoseq.tl.cross_validate` does for its folds).

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._views import ScanShift, Views
    >>> views = Views("X_demo", (ScanShift(1.0),), [np.ones((4, 2))])
    >>> [v.shape for v in views.rows(np.array([0, 2]))]
    [(2, 2)]

    """

    embedding: str
    shifts: tuple[ScanShift, ...]
    arrays: list[np.ndarray]

    @property
    def n_obs(self) -> int:
        """Rows of the table the views belong to."""
        return len(self.arrays[0]) if self.arrays else 0

    def rows(self, rows: np.ndarray) -> list[np.ndarray]:
        """Each view's rows ``rows`` (positions in the table)."""
        return [np.asarray(a[rows], dtype=np.float64) for a in self.arrays]

    def check(self, embedding: str, n_obs: int, dims: int) -> None:
        """Refuse views of another embedding or table."""
        if self.embedding != embedding or self.n_obs != n_obs or any(a.shape[1] != dims for a in self.arrays):
            raise ValueError(
                f"These views are of `obsm[{self.embedding!r}]` for {self.n_obs} spots, but the fit reads "
                f"`obsm[{embedding!r}]` ({dims} dimensions) of {n_obs} spots. Compute them for this table."
            )


class _ShiftedMorphology(MorphologyEncoder):
    """The morphology encoder on patches whose optical densities are scaled by ``stain`` (blur: ``smooth_um``)."""

    def __init__(self, params: Any, stain: float):
        super().__init__(params)
        intensities = np.arange(256, dtype=np.float64)
        self.lut = np.clip(np.rint(256.0 * ((intensities + 1.0) / 256.0) ** stain - 1.0), 0, 255).astype(np.uint8)

    def __call__(self, images: np.ndarray, um_per_px: float) -> np.ndarray:
        return super().__call__(self.lut[images], um_per_px)


def _morphology_params(record: Mapping[str, Any]):
    from ._morphology import MorphologyParams

    stored = dict(record.get("morphology") or {})
    known = {f.name for f in fields(MorphologyParams)}
    stored = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in known}
    return MorphologyParams(**stored)


def _shifted_part(
    sdata: SpatialData, tkey: str, part: str, shift: ScanShift, mask: np.ndarray | None, progress: bool
) -> np.ndarray:
    """The part ``part`` of the embedding of the table's spots (rows ``mask``) as ``shift`` shows them."""
    table = sdata.tables[tkey]
    record = embedding_params(table, part)
    if record.get("encoder") != "morphology":  # a network's features or the tissue position: as they are
        return embedding_matrix(table, part, f"Table {tkey!r}")
    params = _morphology_params(record)
    params = replace(params, smooth_um=math.hypot(params.smooth_um, shift.blur_um))
    out = embed(
        sdata,
        encoder=MorphologyEncoder(params) if shift.stain == 1 else _ShiftedMorphology(params, shift.stain),
        patch_size_um=record.get("patch_size_um", 112.0),
        patch_px=int(record.get("patch_px", 224)),
        table_key=tkey,
        spots=mask,
        stain_norm=record.get("stain_norm", False),
        progress=progress,
        inplace=False,
    )
    return np.asarray(out, dtype=np.float64)


def can_augment(objects: Sequence[Any], table_key: str | None, embedding: str) -> str | None:
    """Why the spots of ``objects`` cannot be re-embedded as views (``None`` when they can)."""
    import anndata as ad

    if any(isinstance(o, ad.AnnData) for o in objects):
        return "an AnnData table holds no images to re-embed the spots from"
    for obj in objects:
        _, table = get_table(obj, table_key)
        if not any(embedding_params(table, p).get("encoder") == "morphology" for p in embedding_parts(embedding)):
            return (
                f"no part of `obsm[{embedding!r}]` was made by the morphology encoder (only its features are "
                "re-embedded)"
            )
    return None


def scan_views(
    objects: Sequence[SpatialData],
    table_key: str | None,
    embedding: str,
    shifts: Sequence[ScanShift],
    *,
    masks: Sequence[np.ndarray | None] | None = None,
    progress: bool = True,
) -> Views:
    """The embedding ``embedding`` of the spots of ``objects`` (their tables' rows, in order) under each shift.

    Each spot is re-embedded from its own patch with the parameters recorded for its embedding
    (:func:`histoseq.tl.embed`), its morphology blurred by the shift. ``masks`` (one per object) limits the work to
    those rows; the others are ``NaN``. Nothing is written into the objects.

    Examples
    --------
    >>> import histoseq as hs
    >>> from histoseq.tl._views import ScanShift, scan_views
    >>> sdata = hs.datasets.synthetic(n_sections=1, section_size_um=400, random_state=0, progress=False)
    >>> hs.tl.embed(sdata, patch_size_um=64, patch_px=32, progress=False)
    >>> views = scan_views([sdata], "table", "X_morphology", [ScanShift(blur_um=1.0)], progress=False)
    >>> views.arrays[0].shape == sdata.tables["table"].obsm["X_morphology"].shape
    True

    """
    shifts = tuple(shifts)
    masks = [None] * len(objects) if masks is None else list(masks)
    per_shift: list[list[np.ndarray]] = [[] for _ in shifts]
    for obj, mask in zip(objects, masks, strict=True):
        tkey, table = get_table(obj, table_key)
        if mask is not None and not np.asarray(mask).any():
            dims = embedding_matrix(table, embedding, f"Table {tkey!r}").shape[1]
            for got in per_shift:
                got.append(np.full((table.n_obs, dims), np.nan))
            continue
        for s, shift in enumerate(shifts):
            parts = [_shifted_part(obj, tkey, p, shift, mask, progress) for p in embedding_parts(embedding)]
            per_shift[s].append(np.hstack(parts))
    arrays = [np.vstack(got) for got in per_shift]
    logger.info(
        "Views of %d spots under %d scan shift(s) of `obsm[%r]`.",
        len(arrays[0]) if arrays else 0,
        len(shifts),
        embedding,
    )
    return Views(embedding, shifts, arrays)

"""The training set of a fit: what an expression method reads, and how it is assembled from tables.

:func:`training_set` gathers the training spots of one or several tables: the targets (the transformed
counts of the chosen genes), the inputs (an embedding, normalised per section as asked, or the spots'
patches), and what the splits need (groups, regions, positions). Every expression method's ``fit`` takes a
:class:`TrainingSet` and nothing else from the data, so what a method may look at is written in one place:
the training spots only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, warn_duplicated_names
from ._data import (
    as_table,
    concat_tables,
    embedding_dims,
    embedding_matrix,
    embedding_parts,
    group_labels,
    region_labels,
    section_labels,
    train_mask,
    transform_counts,
    warn_if_not_counts,
)
from ._genes import resolve_genes
from ._inputs import training_patches
from ._sections import SECTION_NORMS
from ._targets import neighbor_genes

if TYPE_CHECKING:
    import anndata as ad

    from ._views import Views

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerSettings:
    """How networks are trained with Lightning (``max_epochs``, ``accelerator``, ``devices``, ``strategy``)."""

    max_epochs: int | None = None
    accelerator: Any = "auto"
    devices: Any = "auto"
    strategy: Any = "auto"


@dataclass
class TrainingSet:
    """The training spots of a fit, as an expression method reads them.

    Attributes
    ----------
    Y
        ``(n, genes)`` targets: the transformed counts of :attr:`genes`.
    genes
        The genes the model learns.
    X
        ``(n, d)`` embedding (float64, normalised within each section when the fit asks), for methods that
        read an embedding; ``None`` otherwise.
    blocks
        Dimensions of the embedding's parts when it has several (in order), else ``None``.
    views
        ``(n, d)`` embeddings of the same spots as other scans would show them (rows aligned with :attr:`X`,
        normalised like it), for methods that learn from them (:mod:`histoseq.tl._views`); ``None`` otherwise.
    images
        ``(n, px, px, 3)`` uint8 patches, for methods that read patches; ``None`` otherwise.
    patch_params
        How the patches were cut (:attr:`histoseq.pp.Patches.params`).
    labels, regions, coords
        Group (``obs[groups]``), region (section) and position of each spot, for the splits
        (:mod:`histoseq.tl._splits`); ``None`` when unknown.
    counts
        Raw counts of the training spots over all genes of the table (for :meth:`expression`).
    random_state, progress
        Seed of everything random, and whether to show progress.
    trainer
        Lightning settings of the networks.

    """

    Y: np.ndarray
    genes: list[str]
    X: np.ndarray | None = None
    blocks: list[int] | None = None
    images: np.ndarray | None = None
    views: list[np.ndarray] | None = None
    patch_params: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = None
    regions: np.ndarray | None = None
    coords: np.ndarray | None = None
    counts: Any = None
    random_state: int | None = 0
    progress: bool = False
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    _expression: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        """Number of training spots."""
        return len(self.Y)

    def expression(self) -> np.ndarray:
        """Log-normalised expression of the training spots' most expressed genes (computed once).

        ``log1p`` of counts per 10,000 over all genes, for the genes of
        :func:`histoseq.tl._targets.neighbor_genes`: what target smoothing finds neighbours in and what the
        kernel's relevance weights follow.
        """
        if self._expression is None:
            if self.counts is None:
                raise ValueError("This training set holds no counts, so it has no expression.")
            self._expression = transform_counts(self.counts, "log1p_cp10k", neighbor_genes(self.counts), check=False)
        return self._expression


def training_set(
    sdata: Any,
    objects: list[Any],
    is_list: bool,
    *,
    genes: int | Sequence[str],
    embedding: str | None,
    patches: Mapping[str, Any] | None,
    section_norm: str | None,
    train: Any,
    table_key: str | None,
    target_transform: str | None,
    groups: str | None,
    min_spot_fraction: float,
    hvg_flavor: str,
    random_state: int | None,
    progress: bool,
    trainer: TrainerSettings,
    views: Views | None = None,
) -> tuple[TrainingSet, ad.AnnData, str]:
    """The training set of a fit, the table it comes from (several are concatenated) and a name for it.

    ``embedding`` (an ``obsm`` key) or ``patches`` (``patch_size_um``, ``patch_px``, ``stain_norm``) says what
    the method reads; ``views`` (of the same table's rows) become :attr:`TrainingSet.views`. The embedding is
    normalised within each section with ``section_norm`` before the training rows are taken; training spots
    without a finite embedding or a patch are left out, with a warning.
    """
    import anndata as ad

    if isinstance(sdata, ad.AnnData):
        table, source = sdata, "the AnnData"
    elif is_list:
        tables = [as_table(s, table_key) for s in objects]
        table = tables[0] if len(tables) == 1 else concat_tables(tables, embedding, groups)
        source = f"{len(tables)} SpatialData objects"
    else:
        tkey, table = get_table(sdata, table_key)
        source = f"table {tkey!r}"
    warn_duplicated_names(table, f"The {source}" if source.startswith("table") else source, stacklevel=4)
    labels = group_labels(table, groups)
    mask = train_mask(table, train, groups)
    X_all = images = None
    patch_params: dict[str, Any] = {}
    if embedding is not None:
        X_all = embedding_matrix(table, embedding, f"The {source}" if source.startswith("table") else source)
        finite = np.isfinite(X_all).all(axis=1)
        if views is not None:
            views.check(embedding, table.n_obs, X_all.shape[1])
            view_all = [np.asarray(a, dtype=np.float64) for a in views.arrays]
            finite &= np.logical_and.reduce([np.isfinite(a).all(axis=1) for a in view_all])
        if (mask & ~finite).any():
            logger.warning(
                "%d training spot(s) have non-finite values in `obsm[%r]` or its views (no image under them?); they "
                "are left out.",
                int((mask & ~finite).sum()),
                embedding,
            )
            mask &= finite
            if not mask.any():
                raise ValueError(f"No training spot has a finite embedding `obsm[{embedding!r}]`.")
        if section_norm:
            sections = section_labels(table, groups)
            X_all = SECTION_NORMS[section_norm](X_all, sections)
            if views is not None:
                view_all = [SECTION_NORMS[section_norm](a, sections) for a in view_all]
    elif patches is not None:
        images, patch_params, mask = training_patches(objects, table_key, mask, progress=progress, **patches)
    rows = np.flatnonzero(mask)
    gene_list = resolve_genes(table, genes, mask, min_spot_fraction=min_spot_fraction, flavor=hvg_flavor)
    cols = table.var_names.get_indexer(gene_list)
    warn_if_not_counts(table.X[rows], target_transform, stacklevel=4)
    regions = region_labels(table)
    data = TrainingSet(
        Y=transform_counts(table.X[rows], target_transform, cols),
        genes=gene_list,
        X=X_all[rows] if X_all is not None else None,
        blocks=embedding_dims(table, embedding) if embedding and len(embedding_parts(embedding)) > 1 else None,
        images=images,
        views=[a[rows] for a in view_all] if views is not None and X_all is not None else None,
        patch_params=patch_params,
        labels=labels[rows] if labels is not None else None,
        regions=regions[rows] if regions is not None else None,
        coords=np.asarray(table.obsm["spatial"], float)[rows, :2] if "spatial" in table.obsm else None,
        counts=table.X[rows],
        random_state=random_state,
        progress=progress,
        trainer=trainer,
    )
    return data, table, source

"""Splits of the training spots: the folds that choose hyper-parameters and the spots that stop training.

Neighbouring spots share expression, so a split that puts neighbours on both sides is optimistic. Every
split in histoseq therefore comes from one chain, :func:`partition`, which takes the most independent
parts the training spots offer:

1. the groups (``obs[groups]``: sections or donors) when the training spots span two or more;
2. else the regions (the spots elements, i.e. sections) when they span two or more;
3. else spatial blocks of the one section (k-means on the spot positions), with a warning;
4. else random spots, with a warning.

:func:`cv_folds` leaves each part out in turn (the inner cross-validation of ridge and kernel models);
:func:`validation_rows` holds one part out for the early stopping of the networks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    """Parts of the training spots, from :func:`partition`.

    Attributes
    ----------
    assign
        The part (``0 .. len(names) - 1``) of each spot.
    kind
        ``"group"``, ``"region"``, ``"block"`` (spatial blocks of one section) or ``"random"``.
    names
        The name of each part: the group or region label, or the block or fold number.

    """

    assign: np.ndarray
    kind: str
    names: list[str]


def spatial_blocks(
    coords: np.ndarray | None, regions: np.ndarray | None, k: int, random_state: int | None
) -> np.ndarray | None:
    """Block index (``0..k-1``) of each spot: k-means clusters of the spot positions, within each region.

    Positions of different regions (sections) are not comparable, so each region is split on its own and
    block ``b`` gathers cluster ``b`` of every region. ``None`` without usable positions.
    """
    if coords is None or not np.isfinite(coords).all():
        return None
    from sklearn.cluster import KMeans

    regions = np.zeros(len(coords), dtype=int) if regions is None else regions
    blocks = np.zeros(len(coords), dtype=int)
    for r in np.unique(regions):
        idx = np.flatnonzero(regions == r)
        n_clusters = min(k, len(idx))
        if n_clusters < 2:
            continue
        labels = KMeans(n_clusters=n_clusters, n_init=4, random_state=random_state).fit_predict(coords[idx])
        # order clusters by their first spot so that block numbers do not depend on k-means' labelling
        order = {c: i for i, c in enumerate(dict.fromkeys(labels.tolist()))}
        blocks[idx] = [order[c] for c in labels]
    return blocks


def partition(
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    n: int,
    *,
    k: int,
    random_state: int | None,
) -> Partition:
    """The most independent parts of ``n`` training spots: groups, regions, ``k`` spatial blocks or ``k`` random folds.

    Spatial blocks need positions and at least ``2 k`` spots; random folds are the last resort.

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl._splits import partition
    >>> p = partition(np.array(["a", "b", "a"]), None, None, 3, k=2, random_state=0)
    >>> p.kind, p.assign.tolist(), p.names
    ('group', [0, 1, 0], ['a', 'b'])

    """
    for values, kind in ((labels, "group"), (regions, "region")):
        if values is not None and len(np.unique(values)) >= 2:
            names, assign = np.unique(values, return_inverse=True)
            return Partition(assign, kind, [str(v) for v in names])
    if n < 2:
        raise ValueError(f"Splitting the training spots needs at least 2 of them, got {n}.")
    blocks = spatial_blocks(coords, regions, k, random_state) if n >= 2 * k else None
    if blocks is not None and len(np.unique(blocks)) >= 2:
        return Partition(blocks, "block", [str(b) for b in range(int(blocks.max()) + 1)])
    from sklearn.model_selection import KFold

    folds = min(k, n)
    assign = np.empty(n, dtype=int)
    for f, (_, held) in enumerate(KFold(n_splits=folds, shuffle=True, random_state=random_state).split(np.zeros(n))):
        assign[held] = f
    return Partition(assign, "random", [str(f) for f in range(folds)])


def cv_folds(
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    n: int,
    *,
    n_splits: int,
    random_state: int | None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Folds ``(train rows, held-out rows)`` of the training spots for choosing hyper-parameters, and their name.

    Leave one part of :func:`partition` out at a time: one group, one region, or (with a warning) one of
    ``n_splits`` spatial blocks or random folds of a single section.
    """
    several = any(v is not None and len(np.unique(v)) >= 2 for v in (labels, regions))
    if not several and n < 4:
        raise ValueError(f"Choosing the penalty by cross-validation needs at least 4 training spots, got {n}.")
    k = max(2, min(n_splits, n // 2))
    part = partition(labels, regions, coords, n, k=k, random_state=random_state)
    folds = [(np.flatnonzero(part.assign != p), np.flatnonzero(part.assign == p)) for p in range(len(part.names))]
    folds = [f for f in folds if len(f[0]) and len(f[1])]
    if part.kind in ("group", "region"):
        if part.kind == "region":
            logger.info("The training spots form one group: the penalty is chosen leaving one region out.")
        return folds, f"leave-one-{part.kind}-out"
    if part.kind == "block":
        logger.warning(
            "The training spots form one group: the penalty is chosen by cross-validation over %d spatial blocks "
            "of it. Neighbouring spots share expression, so the choice may be less regularised than one made "
            "across sections; train on several sections where possible.",
            len(folds),
        )
        return folds, f"{len(folds)} spatial blocks (one training group)"
    logger.warning(
        "The training spots form one group and have no spot positions (`obsm['spatial']`): the penalty is chosen "
        "by %d-fold cross-validation over random spots, which neighbouring spots make optimistic.",
        len(folds),
    )
    return folds, f"{len(folds)}-fold (random spots, one training group)"


def validation_rows(
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    n: int,
    *,
    val_groups: Sequence[str] | str | None,
    val_fraction: float,
    random_state: int | None,
) -> tuple[np.ndarray, str]:
    """The training spots that early stopping watches (a boolean mask) and their description.

    ``val_groups`` names them; otherwise one part of :func:`partition` (with about ``1 / val_fraction``
    blocks or folds for a single section) drawn with ``random_state``. Refused when it leaves no spot to
    train on or none to validate.
    """
    rng = np.random.default_rng(random_state)
    if val_groups is not None:
        if labels is None:
            raise ValueError("`val_groups` needs `groups` (the obs column that holds them).")
        val_groups = [str(g) for g in ([val_groups] if isinstance(val_groups, str) else val_groups)]
        missing = sorted(set(val_groups) - set(labels))
        if missing:
            raise KeyError(f"`val_groups` {missing} are not training groups ({sorted(set(labels))}).")
        val, desc = np.isin(labels, val_groups), f"groups {val_groups}"
    else:
        part = partition(labels, regions, coords, n, k=max(2, round(1 / val_fraction)), random_state=random_state)
        if part.kind in ("group", "region"):
            chosen = str(rng.choice(part.names))
            val, desc = part.assign == part.names.index(chosen), f"{part.kind} {chosen!r}"
        elif part.kind == "block":
            val, desc = part.assign == 0, "a spatial block of the single training group"
            logger.warning(
                "The training spots form one group: early stopping watches a spatial block of %.0f%% of them.",
                100 * np.mean(val),
            )
        else:
            val, desc = part.assign == 0, "random spots"
            logger.warning(
                "Early stopping watches %.0f%% random training spots (one group, no positions).", 100 * np.mean(val)
            )
    if val.all() or not val.any():
        raise ValueError("The validation spots for early stopping leave no spot to train on (or none to validate).")
    return val, desc

"""Inputs of fit and predict read from SpatialData: embeddings (computed when missing) and spot patches.

- :data:`EMBEDDING_PRESETS` and :data:`DEFAULT_EMBEDDING`: the embeddings that :func:`histoseq.tl.fit`
  computes by name;
- :func:`ensure_embeddings` and :func:`undo_embeddings`: compute what a fit needs, and remove it again when
  the fit fails;
- :func:`prediction_embedding`: a model's embedding of a table's spots, computed with the model's encoder
  when absent;
- :func:`spot_patches` and :func:`training_patches`: the patches that image methods read;
- :func:`spot_diameter_um`: the size of the training spots (for methods whose tiles follow it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, shape_sizes_um, store_element
from ..pp._stain import stain_norm_mode
from ._data import embedding_matrix, embedding_name, embedding_params, embedding_parts, missing_embedding_error
from ._embed import embed, list_encoders

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Embeddings that :func:`fit` computes by name when a table lacks them: ``obsm`` key -> :func:`embed` options.
#: ``"X_morphology_context"`` is the hand-crafted morphology of the spot's patch at three scales (224, 448
#: and 800 µm: the spot, its neighbours and its tissue context): the default embedding. ``"X_tissue_position"``
#: is the spot's offsets from the centroid of the tissue along its major and minor axes
#: (:mod:`histoseq.tl._position`): it describes how a dataset's sections lie, not morphology, so it is no part
#: of the default (see the benchmark page of the docs for which split chose what).
EMBEDDING_PRESETS: dict[str, dict[str, Any]] = {
    "X_morphology_context": {"encoder": "morphology", "patch_size_um": [224.0, 448.0, 800.0], "patch_px": 224},
    "X_tissue_position": {"encoder": "tissue_position"},
    # ImageNet features at the spot and its context (needs histoseq[imagenet]); added to the default embedding,
    # ``embedding=["X_morphology_context", "X_imagenet_context"]``, see the benchmark page
    "X_imagenet_context": {"encoder": "imagenet", "patch_size_um": [224.0, 448.0, 800.0], "patch_px": 224},
}
DEFAULT_EMBEDDING = "X_morphology_context"

# embedding parameters that do not change the embedding of a spot (compared with a warning only)
RUN_PARAMS = {"batch_size", "progress", "device", "accelerator", "devices", "num_workers", "n_jobs", "key_added"}


def undo_embeddings(added: list[tuple[Any, str, str, bool, Any]]) -> None:
    """Remove the embeddings that :func:`ensure_embeddings` added (in memory and on disk), restoring ``uns``."""
    for obj, tkey, name, had_uns, old_uns in reversed(added):
        table = obj.tables[tkey]
        changed = f"X_{name}" in table.obsm or (name in table.uns) != had_uns or table.uns.get(name) is not old_uns
        if not changed:
            continue
        table.obsm.pop(f"X_{name}", None)
        if had_uns:
            table.uns[name] = old_uns
        else:
            table.uns.pop(name, None)
        try:
            store_element(obj, "tables", tkey)
        except Exception as err:  # pragma: no cover - disk errors while cleaning up must not hide the first error
            logger.warning("Could not write table %r back after removing the embedding: %s", tkey, err)


def ensure_embeddings(
    objects: list[Any],
    table_key: str | None,
    embedding: str,
    embed_kwargs: Mapping[str, Any] | None,
    random_state: int | None,
    progress: bool,
) -> list[tuple[Any, str, str, bool, Any]]:
    """Compute ``obsm[embedding]`` with :func:`histoseq.tl.embed` for the SpatialData objects that lack it.

    The encoder is named by the key (``"X_morphology"`` → ``"morphology"``) or by
    :data:`EMBEDDING_PRESETS`, unless ``embed_kwargs`` gives ``encoder=``. Returns what was added, for
    :func:`undo_embeddings`; on an error, what was added so far is removed before the error propagates.
    """
    import anndata as ad

    parts = embedding_parts(embedding)
    if len(parts) > 1:
        per_part = dict(embed_kwargs or {})
        if any(k not in parts or not isinstance(v, Mapping) for k, v in per_part.items()):
            raise TypeError(
                f"`embedding` has several parts {parts}, so `embed_kwargs` maps parts to their options, e.g. "
                f"`embed_kwargs={{{parts[0]!r}: {{'patch_px': 112}}}}`; got keys {sorted(per_part)}."
            )
        done: list[tuple[Any, str, str, bool, Any]] = []
        try:
            for part in parts:
                done += ensure_embeddings(objects, table_key, part, per_part.get(part), random_state, progress)
        except BaseException:
            undo_embeddings(done)
            raise
        return done
    lacking = []
    for obj in objects:
        if isinstance(obj, ad.AnnData):
            continue
        tkey, table = get_table(obj, table_key)
        if embedding not in table.obsm:
            lacking.append((obj, tkey))
    if not lacking:
        return []
    kwargs = dict(embed_kwargs or {})
    name = embedding_name(embedding)
    for bad in ("sdata", "table_key", "inplace"):
        if bad in kwargs:
            raise TypeError(f"`embed_kwargs` cannot set {bad!r}: fit sets it.")
    if not embedding.startswith("X_") or kwargs.get("key_added", name) != name:
        raise KeyError(
            f"{missing_embedding_error(embedding, f'Table {lacking[0][1]!r}').args[0]} fit computes a missing "
            "embedding only under a key `X_<name>` (with `key_added=<name>`)."
        )
    kwargs["key_added"] = name
    kwargs = {**EMBEDDING_PRESETS.get(embedding, {}), **kwargs}
    encoder = kwargs.pop("encoder", name)
    if isinstance(encoder, str) and encoder == name and name not in list_encoders():
        raise KeyError(
            f"{missing_embedding_error(embedding, f'Table {lacking[0][1]!r}').args[0]} {name!r} is not an encoder "
            f"name ({list_encoders()}), so fit cannot compute it: pass `embed_kwargs={{'encoder': ...}}`."
        )
    kwargs.setdefault("random_state", random_state)
    kwargs.setdefault("progress", progress)
    added: list[tuple[Any, str, str, bool, Any]] = []
    try:
        for obj, tkey in lacking:
            table = obj.tables[tkey]
            added.append((obj, tkey, name, name in table.uns, table.uns.get(name)))
            logger.info(
                "Table %r has no `obsm[%r]`: computing it with hs.tl.embed(encoder=%r).", tkey, embedding, encoder
            )
            embed(obj, encoder=encoder, table_key=tkey, **kwargs)
    except BaseException:
        undo_embeddings(added)
        raise
    return added


def prediction_embedding(
    sdata: SpatialData, tkey: str, key: str, trained: Mapping[str, Any], n_features: int, *, progress: bool = False
) -> np.ndarray:
    """A model's embedding ``key`` of the table's spots, computed with :func:`histoseq.tl.embed` when absent.

    ``trained`` holds the parameters of the model's training embedding (``model.embedding_params``) and
    ``n_features`` its dimension: an embedding made by another encoder is refused.
    """
    parts = embedding_parts(key)
    params_of = {key: trained} if len(parts) == 1 else dict(trained.get("parts", {}))
    for part in parts:
        ensure_prediction_part(sdata, tkey, part, params_of.get(part, {}), progress=progress)
    table = sdata.tables[tkey]
    X = embedding_matrix(table, key, f"Table {tkey!r}")
    if X.shape[1] != n_features:
        raise ValueError(
            f"`obsm[{key!r}]` of table {tkey!r} has {X.shape[1]} dimensions, but the model was trained on "
            f"{n_features}: it was made by another encoder. Recompute it with the model's encoder "
            f"({trained.get('encoder', 'see model.embedding_params')})."
        )
    for part in parts:
        here = _with_morphology_defaults(embedding_params(table, part))
        there = _with_morphology_defaults(params_of.get(part, {}))
        if here and there and here != there:
            if "encoder" in here and "encoder" in there and here["encoder"] != there["encoder"]:
                raise ValueError(
                    f"`obsm[{part!r}]` of table {tkey!r} was made by encoder {here['encoder']!r}, but the model was "
                    f"trained on encoder {there['encoder']!r}. Recompute the embedding with the model's encoder."
                )
            diff = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k) and k not in RUN_PARAMS)
            if diff:
                logger.warning(
                    "The embedding `obsm[%r]` was made with other parameters than the model's training embedding "
                    "(differing: %s); predictions may be off.",
                    part,
                    diff,
                )
    return X


def _with_morphology_defaults(params: Mapping[str, Any]) -> dict[str, Any]:
    """Embedding parameters with the morphology settings a record lacks filled in with their defaults.

    A setting added to :class:`~histoseq.tl._morphology.MorphologyParams` (e.g. ``smooth_um``) is missing from
    the records of models saved before it; at its default it changes nothing, so it must not count as a
    difference.
    """
    out = dict(params)
    recorded = out.get("morphology")
    if isinstance(recorded, Mapping):
        from dataclasses import fields

        from ._morphology import MorphologyParams

        defaults = MorphologyParams()
        missing = {f.name: getattr(defaults, f.name) for f in fields(MorphologyParams) if f.name not in recorded}
        out["morphology"] = {**missing, **recorded}
    return out


def ensure_prediction_part(
    sdata: SpatialData, tkey: str, key: str, params: Mapping[str, Any], *, progress: bool = False
) -> None:
    """Compute ``obsm[key]`` with :func:`histoseq.tl.embed` and the training ``params`` when the table lacks it."""
    if key in sdata.tables[tkey].obsm:
        return
    if "encoder" not in params:
        raise missing_embedding_error(key, f"Table {tkey!r}")
    accepted = inspect.signature(embed).parameters
    skip = {"sdata", "table_key", "inplace", "spots", "image_key", "shapes_key", "progress"}
    kwargs = {k: v for k, v in params.items() if k in accepted and k not in skip}
    # an embedding recorded before stains were normalised read the pixels as scanned
    kwargs.setdefault("stain_norm", False)
    logger.info("Table %r has no `obsm[%r]`: computing it with hs.tl.embed(encoder=%r).", tkey, key, params["encoder"])
    embed(sdata, table_key=tkey, progress=progress, **kwargs)
    if key not in sdata.tables[tkey].obsm:
        raise missing_embedding_error(key, f"Table {tkey!r} (after hs.tl.embed)")


def spot_patches(
    sdata: SpatialData,
    table_key: str,
    rows: np.ndarray,
    *,
    patch_size_um: float,
    patch_px: int,
    stain_norm: str | bool = False,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Patches of the table rows ``rows`` (positions, any order), cut once into uint8 memory.

    Returns ``(images, found, params)``: ``images`` is ``(len(rows), patch_px, patch_px, 3)`` uint8, ``found``
    flags the rows that have a patch (spots whose centre lies outside their image have none: zeros) and
    ``params`` is :attr:`histoseq.pp.Patches.params`. With ``stain_norm`` (``"colour"`` or ``"amount"``, as
    in :func:`histoseq.tl.embed`), each image's patches are mapped onto the reference stain
    (:func:`histoseq.pp.normalize_stain`, from the image's whole-tissue estimate, recorded in
    ``params["images"][image]["stain"]``).
    """
    import warnings

    from ..pp import extract_patches

    rows = np.asarray(rows, dtype=int)
    if len(rows) == 0:
        return np.zeros((0, int(patch_px), int(patch_px), 3), dtype=np.uint8), np.zeros(0, dtype=bool), {}
    unique = np.unique(rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        patches = extract_patches(
            sdata,
            table_key=table_key,
            spots=unique,
            patch_size_um=float(patch_size_um),
            patch_px=int(patch_px),
            outside="drop",
            progress=progress,
        )
    for w in caught:
        logger.warning("%s", w.message)
    params = dict(patches.params)
    mode = stain_norm_mode(stain_norm)
    if mode and len(patches):
        _normalise_stains(sdata, table_key, unique, patches, params, amount=mode == "amount")
    pos = np.searchsorted(unique, patches.rows)
    if not (pos < len(unique)).all() or not (unique[np.minimum(pos, len(unique) - 1)] == patches.rows).all():
        raise RuntimeError("extract_patches returned spots that were not asked for.")  # pragma: no cover
    images = np.zeros((len(unique), int(patch_px), int(patch_px), 3), dtype=np.uint8)
    found = np.zeros(len(unique), dtype=bool)
    images[pos] = patches.images[..., :3]
    found[pos] = True
    back = np.searchsorted(unique, rows)
    if len(unique) == len(rows) and (unique == rows).all():
        return images, found, params
    return images[back], found[back], params


def _normalise_stains(
    sdata: SpatialData, table_key: str, rows: np.ndarray, patches: Any, params: dict, *, amount: bool
) -> None:
    """Map each image's patches (in place) onto the reference stain and record each image's estimate."""
    from .._sdata import resolve_regions
    from ..pp._stain import estimate_stains, normalize_stain

    image_of = {r.shapes_key: r.image.key for r in resolve_regions(sdata, table_key=table_key, spots=rows)}
    stains = estimate_stains(sdata, list(image_of.values()))
    images = {k: dict(v) for k, v in params.get("images", {}).items()}
    for region in np.unique(patches.region):
        key = image_of.get(region)
        if stains.get(key) is None:
            continue
        sel = patches.region == region
        patches.images[sel] = normalize_stain(patches.images[sel], stains[key], amount=amount)
        images.setdefault(key, {})["stain"] = stains[key]
    params["images"] = images


def spot_diameter_um(objects: list[Any], table_key: str | None) -> float | None:
    """The median size in µm of the spots of the tables of ``objects`` (diameter of a circle, side of a square).

    ``None`` when the shapes have no size (points).
    """
    sizes = []
    for obj in objects:
        tkey, table = get_table(obj, table_key)
        sizes.append(shape_sizes_um(obj, tkey, np.arange(table.n_obs)))
    values = np.concatenate(sizes) if sizes else np.zeros(0)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else None


def training_patches(
    objects: list[Any],
    table_key: str | None,
    mask: np.ndarray,
    *,
    patch_size_um: float,
    patch_px: int,
    stain_norm: str | bool,
    progress: bool,
) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Patches of the training spots of the (concatenated) tables; spots without a patch leave the mask."""
    mask = mask.copy()
    parts, params = [], {}
    offset = 0
    for obj in objects:
        tkey, table = get_table(obj, table_key)
        local = np.flatnonzero(mask[offset : offset + table.n_obs])
        if len(local):
            imgs, found, p = spot_patches(
                obj,
                tkey,
                local,
                patch_size_um=patch_size_um,
                patch_px=patch_px,
                stain_norm=stain_norm,
                progress=progress,
            )
            params = {**p, "images": {**params.get("images", {}), **p.get("images", {})}}
            if not found.all():
                logger.warning(
                    "%d training spot(s) of table %r have no patch (centre outside the image); they are left out.",
                    int((~found).sum()),
                    tkey,
                )
                mask[offset + local[~found]] = False
            parts.append(imgs[found])
        offset += table.n_obs
    if not mask.any():
        raise ValueError("No training spot has a patch: are the spots on their images?")
    return np.concatenate(parts), params, mask

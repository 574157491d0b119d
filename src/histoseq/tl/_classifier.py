"""Classes of tissue learnt from the H&E: :func:`fit_classifier`, :func:`classify` and :class:`ClassifierModel`.

The labels come from the expression (:func:`histoseq.tl.expression_classes`), the classifier learns what the
tissue looks like where each class is, and :func:`classify` paints the classes over sections it has never
seen: per spot, and as a dense labels element over whole images. The image features are computed in
:mod:`histoseq.tl._class_features`; the classification method comes from the registry
(:func:`histoseq.tl.methods.get_method`, ``task="classification"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, image_ref, resolve_key, resolve_regions, store_element, transformations
from .._utils import jsonable
from ..pp._stain import estimate_stains, stain_norm_mode
from ._class_features import (
    BACKGROUND,
    Featurizer,
    background_blocks,
    check_sizes,
    grid_points,
    image_channels,
    patch_features,
    points_region,
    spot_blocks,
)
from ._classes import is_ours
from ._model_file import read_model, write_model
from ._training_set import TrainingSet
from .methods import Fitted, get_method, list_methods

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

FORMAT = "histoseq.ClassifierModel"
#: Fields of a classifier file's metadata, with their JSON types.
META_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,),
    "classes": (list,),
    "labels": (str,),
    "encoder": (str,),
    "features": (str,),
    "channels": (str,),
    "patch_px": (int,),
    "stain_norm": (str, type(None)),
    "random_state": (int, type(None)),
    "members": (list,),
    "provenance": (dict,),
}
#: Grid tiles classified together (bounds the memory of a dense map).
_CHUNK = 4096


class ClassifierModel:
    """A trained map from the patches around a point of an H&E (or single-channel) image to classes of tissue.

    Made by :func:`fit_classifier`; applied by :func:`classify` (or :meth:`predict_proba`); written to one file
    by :meth:`save` and read back by :meth:`load` (or :func:`load_classifier`), as JSON text and tensors only
    (``torch.load(weights_only=True)``), so loading never runs code.

    The model is an ensemble of *members*: one per patch size (``ensemble="average"``: their class
    probabilities are averaged) or one over the features of all sizes side by side (``"concat"``). Each
    member is a fitted state of :attr:`method` (arrays only).

    Attributes
    ----------
    classes
        The class names, in the order of the probabilities.
    method
        The classification method of the registry (``"logistic"``).
    encoder, features
        The encoder asked for and the features it computed (``"morphology"``, ``"intensity"`` on
        single-channel images, or a network).
    channels
        ``"rgb"`` or ``"gray"``: the images it reads.
    patch_sizes_um, patch_px
        Sizes of the patches in µm (all members together) and their side in pixels.
    provenance
        How it was trained (labels column, training sections, class counts, background tiles).

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=800, progress=False)
    >>> hs.tl.expression_classes(sdata, genes=["TUM1", "STRO1"])
    >>> clf = hs.tl.fit_classifier(sdata, patch_sizes_um=(56,), patch_px=32, progress=False)
    >>> clf.method, clf.channels, clf.patch_sizes_um, clf.patch_px
    ('logistic', 'rgb', (56.0,), 32)
    >>> clf.classes
    ['TUM1', 'STRO1', 'tissue', 'background']

    """

    def __init__(
        self,
        *,
        method: str,
        classes: Sequence[str],
        labels: str,
        encoder: str,
        features: str,
        channels: str,
        patch_px: int,
        stain_norm: str | None,
        random_state: int | None,
        members: Sequence[dict[str, Any]],
        arrays: dict[str, np.ndarray],
        provenance: dict[str, Any],
    ):
        impl = get_method(method)
        if impl.task != "classification":
            raise ValueError(f"Method {method!r} learns {impl.task}, not classes.")
        classes = [str(c) for c in classes]
        if len(classes) < 2 or len(set(classes)) < len(classes):
            raise ValueError(f"A classifier needs at least two distinct classes, got {classes}.")
        if channels not in ("rgb", "gray") or not members:
            raise ValueError(f"Malformed classifier: channels {channels!r}, {len(members)} members.")
        self._impl = impl
        self._members: list[tuple[tuple[float, ...], Fitted]] = []
        for i, m in enumerate(members):
            own = {k.split(".", 1)[1]: np.asarray(v) for k, v in arrays.items() if k.split(".", 1)[0] == str(i)}
            missing = [a for a in impl.arrays if a not in own]
            if missing:
                raise ValueError(f"Member {i} of the {method!r} classifier lacks the arrays {missing}.")
            sizes = tuple(float(s) for s in m["patch_sizes_um"])
            self._members.append((sizes, Fitted(own, jsonable(m["config"]), jsonable(m["info"]), int(m["n_features"]))))
        self._meta = {
            "method": method,
            "classes": classes,
            "labels": str(labels),
            "encoder": str(encoder),
            "features": str(features),
            "channels": channels,
            "patch_px": int(patch_px),
            "stain_norm": stain_norm,
            "random_state": None if random_state is None else int(random_state),
            "provenance": jsonable(dict(provenance)),
        }
        self._featurizers: dict[str, Featurizer] = {}

    # -- properties ----------------------------------------------------------------------------------
    classes = property(lambda self: list(self._meta["classes"]), doc="The class names, in probability order.")
    method = property(lambda self: self._meta["method"], doc="The classification method.")
    labels = property(lambda self: self._meta["labels"], doc="The obs column the classes were learnt from.")
    encoder = property(lambda self: self._meta["encoder"], doc="The encoder asked for.")
    features = property(lambda self: self._meta["features"], doc="The features computed by the encoder.")
    channels = property(lambda self: self._meta["channels"], doc="``'rgb'`` or ``'gray'``: the images it reads.")
    patch_px = property(lambda self: self._meta["patch_px"], doc="Side of the patches in pixels.")
    stain_norm = property(lambda self: self._meta["stain_norm"], doc="Stain normalisation of RGB patches.")
    provenance = property(lambda self: jsonable(self._meta["provenance"]), doc="How the model was trained.")

    @property
    def patch_sizes_um(self) -> tuple[float, ...]:
        """Sizes (µm) of the patches that the members read, in order."""
        return tuple(dict.fromkeys(s for sizes, _ in self._members for s in sizes))

    @property
    def ensemble(self) -> str:
        """``"average"`` (one member per patch size) or ``"concat"`` (one member on all sizes)."""
        return "concat" if len(self._members) == 1 and len(self._members[0][0]) > 1 else "average"

    # -- prediction ----------------------------------------------------------------------------------
    def featurizer(self, device: Any = "cpu") -> Featurizer:
        """The encoder of the model on ``device`` (built once)."""
        key = str(device)
        if key not in self._featurizers:
            m = self._meta
            self._featurizers[key] = Featurizer(m["encoder"], m["channels"], m["random_state"], device)
        return self._featurizers[key]

    def proba_from_features(self, features: dict[float, np.ndarray]) -> np.ndarray:
        """Class probabilities ``(n, K)`` from the features of each patch size (NaN where a feature is not finite)."""
        out = None
        for sizes, fitted in self._members:
            X = np.hstack([features[s] for s in sizes])
            if X.shape[1] != fitted.n_features:
                raise ValueError(f"The model reads {fitted.n_features} features for {sizes} µm, got {X.shape[1]}.")
            p = np.full((len(X), len(self.classes)), np.nan)
            ok = np.isfinite(X).all(axis=1)
            if ok.any():
                p[ok] = self._impl.predict(fitted, self._impl.load(fitted), X[ok])
            out = p if out is None else out + p
        return out / len(self._members)

    def proba_at(self, region: Any, stain: Any, *, device: Any = "cpu", batch_size: int = 256, bar: Any = None):
        """Class probabilities of the points of a :class:`~histoseq._sdata.Region`."""
        amount = self.stain_norm == "amount"
        feats = patch_features(
            region, self.patch_sizes_um, self.patch_px, self.featurizer(device), stain, amount=amount,
            batch_size=batch_size, bar=bar,
        )  # fmt: skip
        return self.proba_from_features(feats)

    def predict_proba(
        self,
        sdata: SpatialData,
        *,
        table_key: str | None = "table",
        spots: Any = None,
        batch_size: int = 256,
        device: Any = "cpu",
        progress: bool = False,
    ) -> np.ndarray:
        """Class probabilities ``(n_spots, K)`` of a table's spots (in the order of ``spots``), from their patches.

        Examples
        --------
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=800, progress=False)
        >>> hs.tl.expression_classes(sdata, genes=["TUM1", "STRO1"])
        >>> clf = hs.tl.fit_classifier(sdata, patch_sizes_um=(56, 112), patch_px=32, progress=False)
        >>> clf.predict_proba(sdata).shape == (sdata.tables["table"].n_obs, len(clf.classes))
        True

        """
        from tqdm.auto import tqdm

        regions = resolve_regions(sdata, table_key=table_key, spots=spots)
        stains = _stains(self, sdata, [r.image.key for r in regions])
        out = np.full((sum(len(r.rows) for r in regions), len(self.classes)), np.nan)
        total = sum(len(r.rows) for r in regions) * len(self.patch_sizes_um)
        with tqdm(total=total, desc="classify spots", unit="patch", disable=not progress) as bar:
            for r in regions:
                out[r.order] = self.proba_at(r, stains.get(r.image.key), device=device, batch_size=batch_size, bar=bar)
        return out

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the model to one file (JSON text and tensors; see :func:`load_classifier`).

        Examples
        --------
        >>> import tempfile, pathlib
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=800, progress=False)
        >>> hs.tl.expression_classes(sdata, genes=["TUM1", "STRO1"])
        >>> clf = hs.tl.fit_classifier(sdata, patch_sizes_um=(56,), patch_px=32, progress=False)
        >>> hs.tl.load_classifier(clf.save(pathlib.Path(tempfile.mkdtemp()) / "clf.pt")).classes == clf.classes
        True

        """
        members = [
            {"patch_sizes_um": list(s), "n_features": f.n_features, "config": f.config, "info": f.info}
            for s, f in self._members
        ]
        arrays = {f"{i}.{k}": v for i, (_, f) in enumerate(self._members) for k, v in f.arrays.items()}
        path = write_model(path, {**self._meta, "members": members}, arrays, format=FORMAT)
        logger.info("Saved %s classifier (%d classes) to %s.", self.method, len(self.classes), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClassifierModel:
        """Read a model written by :meth:`save` without unpickling anything (see :func:`load_classifier`)."""
        meta, arrays = read_model(path, format=FORMAT, fields=META_FIELDS)
        try:
            return cls(arrays=arrays, **{k: meta[k] for k in META_FIELDS})
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{str(path)!r}: the classifier file is damaged ({err!r}).") from err

    def __repr__(self) -> str:
        p = self._meta["provenance"]
        sizes = ", ".join(f"{s:g}" for s in self.patch_sizes_um)
        lines = [
            f"ClassifierModel({self.method!r}): {len(self.classes)} classes from obs[{self.labels!r}]",
            f"    features: {self.features} ({self.channels}) of {sizes} µm patches at {self.patch_px} px, "
            f"{self.ensemble} ensemble of {len(self._members)}",
        ]
        lines += [
            f"    {', '.join(f'{s:g}' for s in sizes_)} µm: {self._impl.summary(f)}" for sizes_, f in self._members
        ]
        counts = p.get("class_counts", {})
        lines.append("    classes: " + ", ".join(f"{c} ({counts[c]})" if c in counts else c for c in self.classes))
        groups = list(p.get("train_groups") or {})
        lines.append(f"    trained on {p.get('n_train_spots', '?')} spots of {', '.join(groups[:5]) or '?'}")
        return "\n".join(lines)


def load_classifier(path: str | Path) -> ClassifierModel:
    """Read a :class:`ClassifierModel` written by :meth:`ClassifierModel.save`.

    The file is read with ``torch.load(path, weights_only=True)``: a file holding pickled Python objects, or
    one that is not a classifier file, is refused with a ``ValueError``.

    Parameters
    ----------
    path
        The classifier file.

    Returns
    -------
    The model.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import histoseq as hs
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "junk.pt"
    >>> _ = path.write_bytes(b"not a model")
    >>> try:
    ...     hs.tl.load_classifier(path)
    ... except ValueError as err:
    ...     print("refused")
    refused

    """
    return ClassifierModel.load(path)


def _stains(clf: ClassifierModel, sdata: SpatialData, keys: Sequence[str]) -> dict[str, Any]:
    """Stain estimates of the images (``{}`` without stain normalisation), after checking their channels."""
    for key in dict.fromkeys(keys):
        found = image_channels(sdata, key)
        if found != clf.channels:
            raise ValueError(
                f"The classifier was trained on {clf.channels} images, but image {key!r} is {found}: train one on "
                f"images like it."
            )
    return estimate_stains(sdata, list(keys)) if clf.stain_norm and clf.channels == "rgb" else {}


# --------------------------------------------------------------------------------------------------
# fit_classifier
# --------------------------------------------------------------------------------------------------


def fit_classifier(
    sdata: SpatialData | Sequence[SpatialData],
    labels: str = "expression_class",
    *,
    train: Any = None,
    table_key: str | None = "table",
    groups: str | None = "sample_id",
    method: str = "logistic",
    encoder: str = "morphology",
    patch_sizes_um: Sequence[float] = (56.0, 112.0, 224.0),
    patch_px: int = 64,
    ensemble: str = "average",
    stain_norm: str | bool = "colour",
    background: bool = True,
    n_background: int | None = None,
    background_tile_um: float | None = None,
    batch_size: int = 256,
    device: Any = "cpu",
    random_state: int | None = 0,
    progress: bool = True,
    **method_kwargs: Any,
) -> ClassifierModel:
    """Learn classes of tissue (e.g. from :func:`histoseq.tl.expression_classes`) from the image.

    For each patch size, the patches of ``patch_sizes_um`` around the training spots are resampled to
    ``patch_px`` pixels, stain-normalised (``stain_norm``, RGB images only) and embedded by ``encoder``; a
    classification method of the registry (``method="logistic"``: class-balanced multinomial logistic
    regression, :mod:`histoseq.tl.methods._logistic`) learns the classes from them. Every choice it makes
    (the penalty) is made by cross-validation inside the training spots, leaving one training section
    (``obs[groups]``) out at a time (:func:`histoseq.tl._splits.cv_folds`). With ``ensemble="average"`` (the
    default, as in the reference study) one model is fitted per patch size and their class probabilities are
    averaged; ``"concat"`` fits one model on the features of all sizes side by side.

    The **background** class is learnt from the glass: on each training image, grid tiles of
    ``background_tile_um`` (default: the spot diameter) with under 1% tissue (:func:`histoseq.pp.make_grid`
    with the image's tissue mask, :func:`histoseq.pp.detect_tissue`) and away from the spots are drawn at
    random (seeded) and labelled ``"background"``: ``n_background`` of them in all (default: as many as
    the training spots of the rarest class), shared evenly between the training images.

    Parameters
    ----------
    sdata
        SpatialData with images, spots and a table holding ``obs[labels]``; or a list of them.
    labels
        Categorical (or string) obs column of the classes.
    train
        Training spots: ``None`` (all), values of ``obs[groups]``, or a boolean mask (for a list, over the rows
        of all tables in order).
    table_key
        The table.
    groups
        obs column of the sections (or donors), for the inner cross-validation; without it, the sections
        (spots elements).
    method
        A classification method of the registry (``hs.tl.methods.list_methods(task="classification")``).
    encoder
        ``"morphology"`` (default; on single-channel images it becomes ``"intensity"``,
        :func:`histoseq.tl._class_features.intensity_features`), ``"intensity"``, or a network of
        :func:`histoseq.tl.list_encoders` (a random-initialised one is seeded with ``random_state``).
    patch_sizes_um
        Patch sizes in µm.
    patch_px
        Side of the patches in pixels.
    ensemble
        ``"average"`` or ``"concat"`` (see above).
    stain_norm
        ``"colour"`` (default), ``"amount"`` or ``False``, as in :func:`histoseq.tl.embed`.
    background
        Learn the background class from off-tissue tiles.
    n_background
        Number of background tiles in all (default: the count of the rarest class).
    background_tile_um
        Side of the background tiles in µm (default: the spot diameter, else 56 µm).
    batch_size
        Patches per batch.
    device
        Torch device of a network encoder.
    random_state
        Seed of the background tiles, the networks and the method.
    progress
        Show a progress bar.
    **method_kwargs
        Options of the method (logistic: ``Cs``, ``C``, ``scoring``, ``class_weight``, ``n_splits``,
        ``max_iter``).

    Returns
    -------
    The :class:`ClassifierModel`. Nothing is written to ``sdata``.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=3, section_size_um=800, progress=False)
    >>> hs.tl.expression_classes(sdata, genes=["TUM1", "STRO1"], train=["section0", "section1"])
    >>> clf = hs.tl.fit_classifier(
    ...     sdata, train=["section0", "section1"], patch_sizes_um=(56, 112), patch_px=32, progress=False
    ... )
    >>> clf.classes
    ['TUM1', 'STRO1', 'tissue', 'background']

    """
    from tqdm.auto import tqdm

    impl = get_method(method)
    if impl.task != "classification" or impl.reads != "embedding":
        raise ValueError(
            f"`method={method!r}` does not classify image features; choose one of "
            f"{list_methods(task='classification')}."
        )
    impl.check_options(method_kwargs)
    sizes = check_sizes(patch_sizes_um, patch_px)
    if ensemble not in ("average", "concat"):
        raise ValueError(f"`ensemble` must be 'average' or 'concat', got {ensemble!r}.")
    stain_mode = stain_norm_mode(stain_norm)
    objects = list(sdata) if isinstance(sdata, Sequence) and not isinstance(sdata, str) else [sdata]
    if not objects:
        raise ValueError("`sdata` is an empty list.")
    blocks, order, channels, sections = spot_blocks(objects, labels, train, table_key, groups, stain_mode)
    featurizer = Featurizer(encoder, channels, random_state, device)  # refuses unknown encoders before any work
    y_spots = np.concatenate([b.y for b in blocks])
    spot_classes = [c for c in order if c in set(y_spots.tolist())]
    if len(spot_classes) < 2:
        raise ValueError(
            f"The training spots hold a single class {spot_classes} in obs[{labels!r}]: a classifier needs two or "
            "more. Choose other genes or a lower `quantile` in `hs.tl.expression_classes`, or more training spots."
        )
    classes = list(spot_classes)
    if background:
        n_bg = min(int((y_spots == c).sum()) for c in spot_classes) if n_background is None else int(n_background)
        bg = background_blocks(blocks, sections, n_bg, background_tile_um, np.random.default_rng(random_state))
        if bg and BACKGROUND not in classes:
            where = [c for c in order if c in classes or c == BACKGROUND]
            classes.insert(where.index(BACKGROUND) if BACKGROUND in where else len(classes), BACKGROUND)
        blocks += bg
    total = sum(len(b.y) for b in blocks) * len(sizes)
    logger.info("Fitting a %d-class %s classifier on %d patches (%s µm).", len(classes), method, total, sizes)
    feats: dict[float, list[np.ndarray]] = {s: [] for s in sizes}
    with tqdm(total=total, desc=f"classifier ({featurizer.features})", unit="patch", disable=not progress) as bar:
        for b in blocks:
            amount = stain_mode == "amount"
            got = patch_features(
                b.region, sizes, patch_px, featurizer, b.stain, amount=amount, batch_size=batch_size, bar=bar
            )
            for s, f in got.items():
                feats[s].append(f)
    y = np.concatenate([b.y for b in blocks])
    Y = (y[:, None] == np.array(classes)[None, :]).astype(np.float64)
    grp = np.concatenate([b.groups for b in blocks])
    sec = np.concatenate([np.full(len(b.y), b.section) for b in blocks])
    coords = np.vstack([b.region.centers_px * b.region.image.pixel_size_um for b in blocks])
    members, arrays = [], {}
    for j, msizes in enumerate([(s,) for s in sizes] if ensemble == "average" else [tuple(sizes)]):
        X = np.hstack([np.vstack(feats[s]) for s in msizes])
        ok = np.isfinite(X).all(axis=1)
        if not ok.all():
            logger.warning("%d training patches have no finite features; they are left out.", int((~ok).sum()))
        data = TrainingSet(
            Y=Y[ok], genes=classes, X=X[ok], labels=grp[ok], regions=sec[ok], coords=coords[ok],
            random_state=random_state, progress=progress,
        )  # fmt: skip
        fitted = impl.fit(data, **method_kwargs)
        members.append(
            {
                "patch_sizes_um": list(msizes),
                "n_features": fitted.n_features,
                "config": fitted.config,
                "info": fitted.info,
            }
        )
        arrays.update({f"{j}.{k}": v for k, v in fitted.arrays.items()})
    spot_groups, spot_counts = np.unique(np.concatenate([b.groups for b in blocks if b.spots]), return_counts=True)
    record = next((t.uns.get(labels) for _, t in (get_table(o, table_key) for o in objects) if labels in t.uns), None)
    provenance = {
        "labels": labels,
        "groups": groups,
        "train_groups": {str(g): int(c) for g, c in zip(spot_groups, spot_counts)},
        "n_train_spots": len(y_spots),
        "class_counts": {c: int((y == c).sum()) for c in classes},
        "background": {"n_tiles": int((y == BACKGROUND).sum()), "tile_um": background_tile_um},
        "ensemble": ensemble,
        "expression_classes": record,
    }
    logger.info("Fitted a classifier of %s.", classes)
    return ClassifierModel(
        method=method, classes=classes, labels=labels, encoder=encoder, features=featurizer.features,
        channels=channels, patch_px=int(patch_px), stain_norm=stain_mode, random_state=random_state,
        members=members, arrays=arrays, provenance=provenance,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------------


def _dense_map(
    clf: ClassifierModel, sdata: SpatialData, key: str, spacing_um: float, stain: Any, opts: dict[str, Any], bar: Any
) -> Any:
    """The labels element of the classes on a grid at ``spacing_um`` over image ``key`` (codes: 0 = none, 1 + class)."""
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale
    from spatialdata.transformations import Sequence as Seq

    ref = image_ref(sdata, key)
    xs, ys, step = grid_points(ref, spacing_um)
    dtype = np.uint8 if len(clf.classes) < 255 else np.uint16
    codes = np.zeros((len(ys), len(xs)), dtype=dtype)
    flat = codes.reshape(-1)
    for start in range(0, codes.size, _CHUNK):
        idx = np.arange(start, min(start + _CHUNK, codes.size))
        pts = np.column_stack([xs[idx % len(xs)], ys[idx // len(xs)]])
        proba = clf.proba_at(points_region(ref, pts, f"{key}_grid"), stain, bar=bar, **opts)
        ok = np.isfinite(proba).all(axis=1)
        flat[idx[ok]] = 1 + proba[ok].argmax(axis=1)
    scale = Scale([step, step], axes=("x", "y"))
    tf = {cs: Seq([scale, t]) for cs, t in transformations(sdata.images[key]).items()}
    return Labels2DModel.parse(codes, dims=("y", "x"), transformations=tf)


def classify(
    sdata: SpatialData,
    clf: ClassifierModel,
    *,
    key_added: str = "predicted_class",
    table_key: str | None = "table",
    spots: Any = None,
    spacing_um: float | None = None,
    image_key: str | Sequence[str] | None = None,
    spots_on_tissue: bool = True,
    overwrite: bool = False,
    batch_size: int = 256,
    device: Any = "cpu",
    progress: bool = True,
    inplace: bool = True,
) -> dict[str, Any] | None:
    """Paint the classes of a :class:`ClassifierModel` over spots, and over whole images as a labels element.

    Each spot of the table gets the class of highest probability (the probabilities of the patch sizes
    averaged, :meth:`ClassifierModel.predict_proba`). With ``spacing_um``, each image of the table's sections
    (or ``image_key``, which also serves slides without a table) is tiled by a square grid at ``spacing_um``
    over its whole area; the tiles are classified in batches (the image is read chunk by chunk, never whole)
    and the classes written as a labels element whose pixel is one tile, with the image's transformations
    scaled by the grid step, so spatialdata-plot overlays it on the H&E. Nothing is written unless everything
    succeeded.

    Parameters
    ----------
    sdata
        SpatialData with the images (and a table of spots).
    clf
        The classifier, from :func:`fit_classifier` or :func:`load_classifier`.
    key_added
        Name of the results (see Returns).
    table_key
        The table of spots; ``None`` (or a SpatialData without tables) classifies no spots.
    spots
        Spots to classify (boolean mask, ``obs_names`` or positions); the others get no class.
    spacing_um
        Distance between the tiles of the dense map in µm; ``None``: no dense map.
    image_key
        Image(s) of the dense map; default the images of the classified spots' sections.
    spots_on_tissue
        The table's spots were measured, so they lie on tissue: they get one of the tissue classes, never
        ``"background"`` (its probability is set to 0 and the others rescaled to sum to 1). ``False`` lets a
        spot be background (e.g. for a table of grid tiles). The dense map always includes the background.
    overwrite
        Replace an ``obs`` column or labels element of that name that :func:`classify` did not write.
    batch_size
        Patches per batch.
    device
        Torch device of a network encoder.
    progress
        Show a progress bar.
    inplace
        Write into ``sdata``; ``False`` returns the results instead.

    Returns
    -------
    With ``inplace=True`` ``None``, and sets (on disk too for a backed SpatialData):

    - ``table.obs[key_added]``: the class of each spot (categorical over ``clf.classes``; NaN for spots not
      classified), ``table.obsm[f"{key_added}_proba"]`` the probabilities (columns in
      ``table.uns[key_added]["classes"]``), ``table.uns[key_added]`` the model's description and the maps;
    - with ``spacing_um``, ``sdata.labels[f"{image_key}_{key_added}"]`` per image: uint8 (uint16 beyond 254
      classes) codes, 0 = unassigned and ``k`` = class ``k - 1`` of ``clf.classes``; codes, image and spacing are
      recorded in ``sdata.attrs["histoseq"]["class_maps"]`` (and in ``table.uns[key_added]["labels"]``).

    With ``inplace=False``, ``{"spots": DataFrame of the class and probabilities per spot, or None,
    "labels": {name: labels element}}``.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=3, section_size_um=800, progress=False)
    >>> hs.tl.expression_classes(sdata, genes=["TUM1", "STRO1"], train=["section0", "section1"])
    >>> clf = hs.tl.fit_classifier(sdata, train=["section0", "section1"], patch_sizes_um=(56,), patch_px=32,
    ...                            progress=False)
    >>> hs.tl.classify(sdata, clf, spacing_um=100, image_key="section2_image", progress=False)
    >>> sdata.labels["section2_image_predicted_class"].shape
    (8, 8)

    """
    import pandas as pd
    from tqdm.auto import tqdm

    if not isinstance(clf, ClassifierModel):
        raise TypeError(f"`clf` must be a ClassifierModel (from `hs.tl.fit_classifier`), got {type(clf).__name__}.")
    if not isinstance(key_added, str) or not re.fullmatch(r"[\w.\-]+", key_added) or key_added == "spatialdata_attrs":
        raise ValueError(f"`key_added` must be a name of letters, digits, '_', '.' or '-', got {key_added!r}.")
    if spacing_um is not None and (
        isinstance(spacing_um, bool)
        or not isinstance(spacing_um, int | float)
        or not np.isfinite(spacing_um)
        or spacing_um <= 0
    ):
        raise ValueError(f"`spacing_um` must be a positive distance in µm, got {spacing_um!r}.")
    if image_key is not None and spacing_um is None:
        raise ValueError("`image_key` names the images of the dense map: give `spacing_um` too.")
    table = tkey = None
    regions: list[Any] = []
    if table_key is not None and len(sdata.tables):
        tkey, table = get_table(sdata, table_key)
        if key_added in table.obs and not overwrite and not is_ours(table.uns.get(key_added), "classify"):
            raise ValueError(
                f"obs[{key_added!r}] exists and was not written by `hs.tl.classify`; pass `overwrite=True` or another "
                "`key_added`."
            )
        regions = resolve_regions(sdata, table_key=tkey, spots=spots)
    if spacing_um is None:
        images = []
    elif image_key is not None:
        keys = [image_key] if isinstance(image_key, str) else list(image_key)
        images = [resolve_key(k, list(sdata.images.keys()), "image", "image_key") for k in keys]
    else:
        images = list(dict.fromkeys(r.image.key for r in regions)) or [
            resolve_key(None, list(sdata.images), "image", "image_key")
        ]
    if table is None and not images:
        raise ValueError(
            "Nothing to classify: the SpatialData has no table of spots; give `spacing_um` for a dense map."
        )
    maps_done = sdata.attrs.get("histoseq", {}).get("class_maps", {})
    names = {k: f"{k}_{key_added}" for k in images}
    clash = [
        n for n in names.values() if n in sdata.labels and not overwrite and not is_ours(maps_done.get(n), "classify")
    ]
    if clash:
        raise ValueError(f"Labels {clash} exist and were not written by `hs.tl.classify`; pass `overwrite=True`.")
    stains = _stains(clf, sdata, [r.image.key for r in regions] + images)
    opts = {"device": device, "batch_size": batch_size}
    n_sizes = len(clf.patch_sizes_um)
    n_tiles = 0
    for k in images:
        xs, ys, _ = grid_points(image_ref(sdata, k), spacing_um)
        if len(xs) * len(ys) > 5_000_000:
            raise ValueError(
                f"A {spacing_um} µm grid on image {k!r} has {len(xs) * len(ys):,} tiles; choose a larger spacing."
            )
        n_tiles += len(xs) * len(ys)
    total = (sum(len(r.rows) for r in regions) + n_tiles) * n_sizes
    logger.info(
        "Classifying %d spots and %d grid tiles with %d patch sizes.", total // n_sizes - n_tiles, n_tiles, n_sizes
    )
    with tqdm(total=total, desc="classify", unit="patch", disable=not progress) as bar:
        proba = None
        if table is not None:
            proba = np.full((table.n_obs, len(clf.classes)), np.nan, dtype=np.float32)
            for r in regions:
                proba[r.rows] = clf.proba_at(r, stains.get(r.image.key), bar=bar, **opts)
            if spots_on_tissue and BACKGROUND in clf.classes:
                proba[:, clf.classes.index(BACKGROUND)] = 0
                proba /= proba.sum(axis=1, keepdims=True)
        maps = {names[k]: _dense_map(clf, sdata, k, float(spacing_um), stains.get(k), opts, bar) for k in images}
    map_records = {
        n: {"histoseq": "classify", "image": k, "spacing_um": float(spacing_um), "key_added": key_added,
            "classes": clf.classes, "codes": {c: i + 1 for i, c in enumerate(clf.classes)}, "unassigned": 0}
        for k, n in names.items()
    }  # fmt: skip
    spots_df = None
    if proba is not None:
        ok = np.isfinite(proba).all(axis=1)
        pred = np.full(table.n_obs, None, dtype=object)
        pred[ok] = np.asarray(clf.classes, dtype=object)[proba[ok].argmax(axis=1)]
        cat = pd.Categorical(pred, categories=clf.classes)
        spots_df = pd.DataFrame(proba, index=table.obs_names, columns=clf.classes)
        spots_df.insert(0, key_added, cat)
    if not inplace:
        return {"spots": spots_df, "labels": maps}
    for name, element in maps.items():
        store_element(sdata, "labels", name, element)
    if maps:
        attrs = sdata.attrs.setdefault("histoseq", {})
        attrs["class_maps"] = {**attrs.get("class_maps", {}), **map_records}
        if sdata.is_backed():
            sdata.write_attrs()
    if table is not None:
        table.obs[key_added] = cat
        table.obsm[f"{key_added}_proba"] = proba
        table.uns[key_added] = {
            "histoseq": "classify",
            "classes": clf.classes,
            "model": {
                "method": clf.method, "labels": clf.labels, "encoder": clf.encoder, "features": clf.features,
                "patch_sizes_um": list(clf.patch_sizes_um), "patch_px": clf.patch_px, "ensemble": clf.ensemble,
            },
            "n_spots": int(np.isfinite(proba).all(axis=1).sum()),
            "spots_on_tissue": bool(spots_on_tissue),
            "labels": map_records,
        }  # fmt: skip
        store_element(sdata, "tables", tkey)
    logger.info("Added obs[%r] and labels %s.", key_added, list(maps))
    return None

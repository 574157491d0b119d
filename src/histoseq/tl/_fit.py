"""The public entry points of expression models: :func:`fit`, :func:`predict` and :func:`load_model`.

Thin on purpose: :func:`fit` checks its arguments, computes missing embeddings (:mod:`histoseq.tl._inputs`),
assembles the training set (:mod:`histoseq.tl._training_set`) and hands it to the method named by
``method=`` (:mod:`histoseq.tl.methods`); :func:`predict` hands a table's spots to the model
(:mod:`histoseq.tl._prediction`). The model and its file are :mod:`histoseq.tl._model` and
:mod:`histoseq.tl._model_file`.

A fitted :class:`ExpressionModel` is saved to one file that holds only JSON text and tensors, and is
read back with ``torch.load(..., weights_only=True)``: loading a model never runs code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._cohort import open_slides, over_slides
from ._data import (
    TARGET_TRANSFORMS,
    TargetTransform,
    as_table,
    check_table,
    embedding_key,
    embedding_params,
    train_mask,
)
from ._genes import resolve_genes
from ._inputs import DEFAULT_EMBEDDING, EMBEDDING_PRESETS, ensure_embeddings, spot_diameter_um, undo_embeddings
from ._model import ExpressionModel, load_model
from ._prediction import predict_table
from ._sections import section_norm_mode
from ._training_set import TrainerSettings, training_set
from ._views import DEFAULT_AUGMENT, Views, can_augment, resolve_augment, scan_views
from .methods import get_method

if TYPE_CHECKING:
    import anndata as ad
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EMBEDDING",
    "DEFAULT_METHOD",
    "EMBEDDING_PRESETS",
    "ExpressionModel",
    "fit",
    "load_model",
    "predict",
]

#: What :func:`fit` does without ``method=``: the most accurate method on the real-data folds of
#: ``benchmarks/accuracy.py``.
DEFAULT_METHOD = "kernel"


def fit(
    sdata: SpatialData | Sequence[SpatialData] | ad.AnnData,
    *,
    genes: int | Sequence[str] = 50,
    method: str = DEFAULT_METHOD,
    embedding: str | Sequence[str] = DEFAULT_EMBEDDING,
    section_norm: Literal["rank", "standardise"] | bool = False,
    train: Sequence[str] | np.ndarray | None = None,
    table_key: str | None = "table",
    target_transform: TargetTransform = "log1p_cp10k",
    groups: str | None = "sample_id",
    min_spot_fraction: float = 0.1,
    hvg_flavor: str = "seurat",
    random_state: int | None = 0,
    progress: bool = True,
    max_epochs: int | None = None,
    accelerator: str | Any = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any = "auto",
    embed_kwargs: Mapping[str, Any] | None = None,
    augment: Any = "auto",
    **method_kwargs: Any,
) -> ExpressionModel:
    """Learn gene expression from spot embeddings, or from the spots' H&E patches.

    The targets are the ``target_transform`` of the raw counts in ``X``; the inputs are the embeddings in
    ``obsm[embedding]`` (or, for ``method="cnn"``, the patches around the spots). Everything that is
    learnt (gene selection, scaling, principal components, penalty, early stopping) looks at the training
    spots only, so a model trained with ``train=`` can be evaluated honestly on the other sections.

    When ``obsm[embedding]`` is absent from a SpatialData's table, it is computed first with
    :func:`histoseq.tl.embed`, with the encoder named by the key (``"X_morphology"`` → ``"morphology"``,
    ``"X_resnet18"`` → ``"resnet18"``) and the options ``embed_kwargs`` (e.g. ``{"patch_px": 128}``, or
    ``{"encoder": "resnet18", "weights": "ssl.pt"}`` for another key). The default,
    ``"X_morphology_context"``, is the morphology encoder at 224, 448 and 800 µm around each spot (the spot,
    its neighbours and its tissue context; :data:`~histoseq.tl._inputs.EMBEDDING_PRESETS`), on
    stain-normalised patches. It comes from the spot's image alone, so a spot's prediction depends only on
    its image and the model. So ``hs.tl.fit(sdata)`` then ``hs.tl.predict(other, model)`` is a whole workflow.

    ``section_norm`` (default ``False``: the embedding is read as it is) can normalise each dimension of the
    embedding within each section (the spots element of a row, or ``obs[groups]`` for a table that records no
    regions), at training and again at prediction: ``"rank"`` replaces each value by the normal score of its
    rank among the section's spots (:func:`~histoseq.tl._sections.rank_sections`), ``"standardise"`` (or
    ``True``) centres and scales (:func:`~histoseq.tl._sections.standardise_sections`). Both **assume that
    every section holds the same mix of tissue**: a section with more tumour than the training sections has
    its tumour features pulled towards the training sections' average, which biases its predictions, and a
    spot's prediction then depends on which other spots of its section are predicted with it. Stain and
    scanner differences are better handled on the pixels, which :func:`histoseq.tl.embed` does by default
    (``stain_norm``). Use a per-section normalisation only for sections of one tissue, alike in make-up.

    The methods:

    - ``"kernel"`` (default): kernel ridge regression on the standardised embedding, with an exponential
      (Laplacian) kernel ``exp(-sqrt(gamma Σ w_j (x_j - y_j)²))`` (``kernel="exponential"``, the default)
      or an RBF kernel ``exp(-gamma Σ w_j (x_j - y_j)²)`` (``"rbf"``). The weights ``w_j`` sum to 1 and
      follow each dimension's relevance: its squared correlation with the main principal components of
      the training spots' expression, raised to ``relevance_power`` (default 2; ``0`` weighs every
      dimension ``1 / d``), so dimensions that follow nothing in the expression hardly move the
      distances. The width (``gammas``, default ``(0.01, 0.03, ..., 3, 10)``) and the penalty
      (``alphas``, as for ridge) are chosen together by the same cross-validation inside the training
      data as for ridge (``alpha_scoring``, ``n_splits``); ``gamma=``/``alpha=`` fix them. The same
      cross-validation weighs the parts of an embedding made of several (``part_weights``: by default all
      alike or, for each part after the first, without it, so that a part that says nothing about the
      training sections' expression is left out; :func:`~histoseq.tl.methods._kernel.default_part_weights`),
      and decides whether the model trains on each training spot's targets averaged over
      its nearest training spots in expression (``target_neighbors``, default ``(1, 10)``; ``1`` = the
      raw targets), which averages out counting noise: each inner fold smooths among its own training
      spots and is scored on raw held-out targets (:mod:`histoseq.tl._targets`). Beyond
      ``max_landmarks`` (3,000) training spots, a Nyström approximation on that many spots drawn at
      random keeps time and memory linear in the number of spots. See
      :mod:`histoseq.tl.methods._kernel`.
    - ``"ridge"``: :class:`~sklearn.preprocessing.StandardScaler`-like standardisation, PCA to
      ``n_components`` (default ``min(256, n_features, n_train - 1)``; a float in (0, 1) keeps that
      fraction of variance), then ridge regression with an unpenalised intercept. The penalty is chosen
      from ``alphas`` (default ``logspace(-2, 6, 33)``; the objective is the *sum* of squared errors plus
      ``alpha`` times the squared norm, as in scikit-learn) by cross-validation inside the training data:
      leave one group (``groups``, e.g. section) out when the training spots span two or more groups;
      with a single group, spatial blocks of it (k-means on ``obsm['spatial']``) or, without positions,
      random K-fold (both with a warning: neighbouring spots share expression, so such folds are
      optimistic). Each fold costs one SVD for all penalties (closed form). The held-out mean squared
      error, each gene divided by its variance, picks the penalty (``alpha_scoring="pearson"`` picks
      the highest mean held-out Pearson instead). PCA and scaling are fitted once on all training spots
      (they use no expression, so the inner folds only share unsupervised structure). ``alpha=`` fixes
      the penalty.
    - ``"ridge_hest"``: the same pipeline with the fixed penalty of the HEST benchmark
      (Jaume et al., 2024), ``alpha = 100 / (n_components * n_genes)`` after standardisation and PCA to
      256 components. HEST fits no intercept on the centred PCA scores, which gives the same coefficients
      as fitting one; the predictions here are shifted by the gene means (HEST's are centred on zero),
      which changes the MSE but no correlation. HEST's targets are ``log1p`` counts:
      pass ``target_transform="log1p"`` to match it.
    - ``"mlp"``: a :class:`~histoseq.models._heads.MLPHead` (``n_layers`` hidden layers of
      ``n_hidden`` units, GELU, ``dropout``) on standardised embeddings, predicting standardised targets
      with a mean squared error, trained by AdamW (``lr``, ``weight_decay``, ``batch_size``) with a
      :class:`lightning.pytorch.Trainer`. Early stopping (``patience`` epochs) watches one training group
      chosen with ``random_state`` (or ``val_groups``), or a spatial block of a single group; the weights
      of the best validation epoch are kept. ``random_state`` makes training deterministic (on a given
      device) without touching the global random state.
    - ``"cnn"``: end-to-end training of an image encoder and a head on the patches (as ST-Net and
      HistoSPACE do). The ``patch_size_um`` µm patch around each training spot is cut once at ``patch_px``
      pixels (default 112 µm at 64 px: quick on CPUs), stain-normalised as :func:`histoseq.tl.embed` does
      (``stain_norm="colour"``; the setting is stored in the model and applied at prediction), and kept as uint8
      in memory (12 kB per spot at 64 px). The encoder (``encoder="small_cnn"`` by default, or
      ``"resnet18"``, any network of :func:`histoseq.tl.list_encoders` or ``"timm:<name>"``) is
      random-initialised, or loaded from the local state dict ``weights=`` (e.g. written by
      :func:`histoseq.tl.pretrain_encoder`); an :class:`~histoseq.models._heads.MLPHead` (``n_hidden``,
      ``n_layers``, ``dropout``) follows. It is
      trained like the MLP (standardised targets, MSE, AdamW with ``lr``, ``encoder_lr`` for the encoder,
      ``weight_decay``, ``batch_size``; early stopping as above, default ``patience=10``, ``max_epochs``
      100), with each training patch turned and flipped at random (``flips=True``: tissue has no
      orientation) and, with ``stain_jitter > 0`` (default 0), its haematoxylin and eosin concentrations
      scaled by up to ``± stain_jitter`` and shifted (:func:`histoseq.models._augment.hed_jitter`, against
      stain differences between slides). Prediction averages the 8 turns and flips of each patch
      (``tta=True``, the default stored in the model). Needs SpatialData (the images), not an AnnData;
      ``embedding`` is not used. Spots whose centre is outside their image are left out (with a warning).
    - ``"contrastive"``: BLEEP (Xie et al., 2023). Two projection heads map the standardised embedding
      and the standardised expression into an ``n_proj``-dimensional joint space (L2-normalised), trained
      with BLEEP's symmetric contrastive loss with soft targets (``temperature``; AdamW, ``batch_size``
      spots per batch; early stopping as above). A spot is predicted by retrieval: the ``k`` (default 50)
      training spots whose projected expression is most similar to its projected embedding, averaged
      with weights ``softmax(similarity / temperature)`` (``weighting="softmax"``) or equally
      (``"mean"``). The training spots' projections and transformed expression are stored in the model.
      See :mod:`histoseq.tl.methods._contrastive`.
    - ``"attention"``: interpretable regression from bags of tiles (Graziani et al.; gated attention pooling of
      Ilse et al., 2018). The ``region_um`` µm (default 128) around each spot is cut into tiles of ``tile_um``
      µm (default 32: 16 tiles) at ``tile_px`` px, each tile embedded by a frozen ``encoder`` (default
      ``"morphology"``, or any network of :func:`histoseq.tl.list_encoders`), stain-normalised as in
      :func:`histoseq.tl.embed`. One gated attention branch per gene pools the tiles before a linear read-out per
      gene; trained like the MLP (standardised targets, MSE plus ``attention_penalty`` times the spread of the
      attention scores within a bag, AdamW, early stopping on a training section). Where a gene's signal comes
      from: :func:`histoseq.tl.attention_maps` and :func:`histoseq.tl.hotspots`. Needs SpatialData (the images).
      See :mod:`histoseq.tl.methods._attention`.
    - ``"superres"``: expression below the spot size (HisToSGE / iStar), learnt by weak supervision. Each training
      spot is cut into ``n × n`` tiles of ``tile_um`` µm (default about 25 µm, at least 2 × 2 a spot; the spots'
      diameter ``spot_um`` is measured from their shapes), each tile embedded by a frozen ``encoder`` together
      with its neighbourhood of ``context_tiles`` tiles around it; a tile network is trained so that the mean of
      a spot's tile predictions matches the spot (plus ``smoothness`` times the squared differences of
      neighbouring tiles). Predicted on a grid of ``tile_um`` (``hs.tl.predict(sdata, model, image_key=...,
      spacing_um=model.config["tile_um"])``) every cell is a tile: the super-resolved map
      (:func:`histoseq.tl.expression_map` writes it as an image); on spots, the mean of their tiles. Needs
      SpatialData (the images). See :mod:`histoseq.tl.methods._superres`.

    Parameters
    ----------
    sdata
        A SpatialData, a list of them (their tables' rows are concatenated; they must share genes and
        embedding), or an AnnData table (not for ``"cnn"``). Paths of SpatialData zarr stores (one or a list)
        are opened lazily, so the slides' images are read patch by patch and never all held in memory; an
        embedding that a store lacks is computed and written into that store (see :mod:`histoseq.tl._cohort`;
        ``hs.tl.embed(paths, client=...)`` computes them beforehand on a dask cluster).
    genes
        Gene names, or a number ``n`` of genes to select with :func:`histoseq.tl.select_genes` on the
        training spots (``min_spot_fraction``, ``hvg_flavor``).
    method
        ``"kernel"``, ``"ridge"``, ``"ridge_hest"``, ``"mlp"``, ``"cnn"``, ``"contrastive"``, ``"attention"`` or
        ``"superres"`` (or a registered method, :func:`histoseq.tl.methods.list_methods`; classification methods go to
        :func:`histoseq.tl.fit_classifier`).
    embedding
        Key of the embedding in ``obsm`` (not used by ``"cnn"``), or several keys (a list, or joined by
        ``"+"``) read as one concatenated embedding, e.g. ``["X_morphology_context", "X_imagenet"]``: the
        hand-crafted features and a CNN's see different things. Each part is computed when absent (as
        above, with ``embed_kwargs[part]``) and recorded with its parameters. The kernel method weighs
        the parts by their share of the distance, whatever their dimensions, the shares chosen by
        cross-validation (``part_weights``, see above; :func:`~histoseq.tl.methods._kernel.kernel_matrix`);
        the other methods read the concatenation. Prediction needs all the parts.
    section_norm
        ``False`` (default), ``"rank"`` or ``"standardise"`` (``True``): whether and how the embedding is
        normalised within each section (see above and its assumption; not used by ``"cnn"``).
    train
        Training spots: ``None`` (all), values of ``obs[groups]`` (e.g. sample ids), or a boolean mask over
        the rows (of the concatenated tables, for a list).
    table_key
        The table of the SpatialData.
    target_transform
        ``"log1p_cp10k"`` (counts scaled to 10,000 per spot over all genes, then ``log1p``), ``"log1p"`` or
        ``None`` (raw counts). Recorded in the model and applied identically by :func:`histoseq.tl.evaluate`.
    groups
        Column of ``obs`` with section (or donor) labels: what ``train`` lists and what the inner
        cross-validation leaves out. ``None``: the training spots are one group.
    min_spot_fraction
        Genes selected by number must be detected in this fraction of training spots.
    hvg_flavor
        Flavor of the gene selection (see :func:`histoseq.tl.select_genes`).
    random_state
        Seed of the PCA solver, the spatial blocks and the networks (initialisation, batches, dropout,
        augmentation).
    progress
        Show progress bars and Lightning's messages.
    max_epochs
        Maximal number of epochs of the networks (default 200; 100 for ``"cnn"``).
    accelerator
        Lightning accelerator of the networks (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
    devices
        Lightning devices of the networks.
    strategy
        Lightning strategy of the networks (e.g. ``"ddp"`` on several GPUs, or on several CPU processes with
        ``accelerator="cpu", devices=2``). Lightning's ``"ddp"`` starts its other processes by running the calling
        script again, so call ``fit`` from a script (not a notebook; there ``"ddp_notebook"``). ``batch_size`` is per
        process, as in Lightning: on ``n`` processes each step averages ``n × batch_size`` spots; the validation
        loss that picks the best epoch is summed over all processes. See the cluster page of the docs.
    embed_kwargs
        Options of :func:`histoseq.tl.embed` when the embedding is computed (see above); for an embedding of
        several parts, a mapping from part to options, e.g. ``{"X_morphology_context": {"patch_px": 112}}``.
    augment
        Scan augmentation (:mod:`histoseq.tl._views`): each training spot is embedded again from its own patch as
        a less sharp or differently stained scan would show it, and the method trains on the spot and these views
        alike, so a slide scanned less sharply, or stained more or less strongly, than the training slides is read
        as the same tissue. ``"auto"`` (default): the views of :data:`~histoseq.tl._views.DEFAULT_AUGMENT` (blurs
        of 1 and 2 µm, stains 0.7 and 1.4 times as strong) when the method learns from
        views (``"kernel"``), the data are SpatialData (the patches are needed) and the embedding has a
        morphology part; none otherwise. ``False``: none; ``True``: the default views, or an error when they
        cannot be made; a list of :class:`~histoseq.tl._views.ScanShift` (or blurs in µm) chooses the views.
        Views of a list of SpatialData are computed for all their spots, of one SpatialData for its training
        spots. It costs one more embedding of the training spots per view, a kernel fit 10–15 times as long (on
        two cores, her2st's 730 training spots: about a minute against 5 s) and nothing at prediction;
        ``augment=False`` is the fast path when every slide comes from one scanner and one staining run.
    **method_kwargs
        Options of the method: ``kernel``, ``gammas``, ``gamma``, ``max_landmarks``, ``target_neighbors``,
        ``relevance_power``, ``part_weights`` (kernel); ``alphas``, ``alpha``, ``alpha_scoring``, ``n_splits``
        (kernel and ridge); ``n_components`` (ridge, ``ridge_hest``); ``n_hidden``, ``n_layers``, ``dropout``
        (MLP, cnn); ``encoder``, ``weights``, ``patch_size_um``, ``patch_px``, ``encoder_lr``, ``flips``,
        ``stain_jitter``, ``stain_norm``, ``tta`` (cnn); ``n_proj``, ``dropout``, ``temperature``, ``k``, ``weighting``
        (contrastive); ``encoder``, ``region_um``, ``tile_um``, ``tile_px``, ``stain_norm``, ``n_hidden``,
        ``n_attention``, ``dropout``, ``attention_penalty`` (attention); ``encoder``, ``spot_um``, ``tile_um``,
        ``tile_px``, ``context_tiles``, ``stain_norm``, ``n_hidden``, ``dropout``, ``smoothness`` (superres); and
        ``lr``, ``weight_decay``, ``batch_size``, ``patience``, ``val_groups``, ``val_fraction``, ``trainer_kwargs``
        (all networks).

    Returns
    -------
    The trained :class:`~histoseq.tl.ExpressionModel`. The tables are not modified, except that a missing
    embedding is added (``obsm[embedding]`` and ``uns[name]``, as :func:`histoseq.tl.embed` writes them);
    when the fit fails, embeddings it added are removed again (also from disk for backed objects).

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 16))
    >>> model = hs.tl.fit(sdata, genes=20, embedding="X_demo", train=["section0", "section1"], progress=False)
    >>> len(model.genes), sorted(model.provenance["train_groups"])
    (20, ['section0', 'section1'])

    """
    import anndata as ad

    impl = get_method(method)
    if impl.task != "regression":
        raise ValueError(
            f"`method={method!r}` learns classes, not expression: use `hs.tl.fit_classifier(sdata, labels=..., "
            f"method={method!r})`."
        )
    if target_transform not in TARGET_TRANSFORMS:
        raise ValueError(f"Unknown `target_transform` {target_transform!r}; choose one of {list(TARGET_TRANSFORMS)}.")
    norm = section_norm_mode(section_norm)
    impl.check_options(method_kwargs)
    if not isinstance(augment, Views):
        resolve_augment(augment)  # refuses a bad value before any work
    if not impl.network and max_epochs is not None:
        logger.warning("`max_epochs` only applies to methods that train networks; %r does not. Ignored.", method)
    reads_embedding = impl.reads == "embedding"
    if reads_embedding:
        embedding = embedding_key(embedding)
    sdata = open_slides(sdata)  # zarr paths: opened lazily, images stay on disk
    is_list = isinstance(sdata, Sequence) and not isinstance(sdata, str)
    objects = list(sdata) if is_list else [sdata]
    if is_list and not objects:
        raise ValueError("`sdata` is an empty list.")
    by_number = isinstance(genes, int | np.integer) and not isinstance(genes, bool)
    for i, obj in enumerate(objects):  # before any embedding is computed
        where = "The AnnData" if isinstance(obj, ad.AnnData) else "The table"
        obj_table = as_table(obj, table_key)
        check_table(obj_table, f"{where} of SpatialData {i}" if is_list else where)
        if not by_number:
            resolve_genes(obj_table, genes, None, min_spot_fraction=min_spot_fraction, flavor=hvg_flavor)
    if reads_embedding:
        added = ensure_embeddings(objects, table_key, embedding, embed_kwargs, random_state, progress)
    else:
        if any(isinstance(o, ad.AnnData) for o in objects):
            raise TypeError(
                f"`method={method!r}` learns from the images, so it needs SpatialData objects (with the H&E images "
                "and the spots), not an AnnData table."
            )
        if embed_kwargs is not None:
            logger.warning("`embed_kwargs` is not used by `method=%r`, which reads the %s.", method, impl.reads)
        if impl.needs_spot_size:
            method_kwargs = impl.resolve_options(method_kwargs, spot_um=spot_diameter_um(objects, table_key))
        added = []
    try:
        views = views_of(
            augment, impl, objects, is_list, embedding if reads_embedding else None, train, table_key, groups, progress
        )
        data, table, source = training_set(
            sdata,
            objects,
            is_list,
            genes=genes,
            embedding=embedding if reads_embedding else None,
            patches=None if reads_embedding else impl.patch_options(method_kwargs),
            section_norm=norm if reads_embedding else None,
            train=train,
            table_key=table_key,
            target_transform=target_transform,
            groups=groups,
            min_spot_fraction=min_spot_fraction,
            hvg_flavor=hvg_flavor,
            random_state=random_state,
            progress=progress,
            trainer=TrainerSettings(max_epochs, accelerator, devices, strategy),
            views=views,
        )
        logger.info(
            "Fitting a %s model: %d spots × %s -> %d genes (%s).",
            method,
            data.n,
            f"{data.X.shape[1]} embedding dims" if data.X is not None else impl.reads,
            len(data.genes),
            target_transform,
        )
        fitted = impl.fit(data, **method_kwargs)
    except BaseException:
        undo_embeddings(added)
        raise
    config = dict(fitted.config)
    if reads_embedding:
        config["section_norm"] = norm or False
    if data.labels is not None:
        uniq, counts = np.unique(data.labels, return_counts=True)
        train_groups = {str(g): int(c) for g, c in zip(uniq, counts)}
    else:
        train_groups = {}
    provenance = {
        "groups": groups,
        "train_groups": train_groups,
        "n_train_spots": data.n,
        "source": source,
        "random_state": random_state,
        "gene_selection": (
            {"n": int(genes), "min_spot_fraction": float(min_spot_fraction), "flavor": hvg_flavor}
            if by_number
            else "given"
        ),
        "augment": [shift.record() for shift in views.shifts] if views is not None else [],
        **fitted.info,
    }
    model = ExpressionModel(
        method=method,
        genes=data.genes,
        target_transform=target_transform,
        embedding=embedding if reads_embedding else None,
        embedding_params=embedding_params(table, embedding) if reads_embedding else {},
        n_features=fitted.n_features,
        arrays=fitted.arrays,
        config=config,
        provenance=provenance,
    )
    info = fitted.info
    logger.info(
        "Fitted a %s model on %d spots%s.",
        method,
        data.n,
        f" (alpha={info['alpha']:.4g})" if "alpha" in info else f" (best epoch {info.get('best_epoch')})",
    )
    return model


def views_of(
    augment: Any,
    impl: Any,
    objects: list[Any],
    is_list: bool,
    embedding: str | None,
    train: Any,
    table_key: str | None,
    groups: str | None,
    progress: bool,
) -> Views | None:
    """The views of the training spots that ``augment`` asks for (``None``: none); see :mod:`histoseq.tl._views`."""
    if isinstance(augment, Views):
        if not impl.learns_views or embedding is None:
            raise ValueError(f"`method={impl.name!r}` does not learn from views of the training spots; drop `augment`.")
        return augment
    shifts = resolve_augment(augment)
    if shifts == ():
        return None
    why_not = (
        f"`method={impl.name!r}` does not learn from views of the training spots"
        if not impl.learns_views or embedding is None
        else None
    )
    if why_not is None:
        why_not = can_augment(objects, table_key, embedding)
    if why_not is not None:
        if shifts is None:  # "auto": augment where it can
            logger.info("No scan augmentation for this fit: %s.", why_not)
            return None
        raise ValueError(f"`augment` cannot be used here: {why_not}. Pass `augment=False`.")
    shifts = DEFAULT_AUGMENT if shifts is None else shifts
    masks = None if is_list else [train_mask(as_table(objects[0], table_key), train, groups)]
    return scan_views(objects, table_key, embedding, shifts, masks=masks, progress=progress)


@over_slides
def predict(
    sdata: SpatialData,
    model: ExpressionModel,
    *,
    key_added: str | None = None,
    table_key: str | None = "table",
    shapes_key: str | None = None,
    image_key: str | None = None,
    spacing_um: float | None = None,
    spots: Any = None,
    into_table: bool = False,
    overwrite: bool = False,
    inplace: bool = True,
    progress: bool = True,
    tta: bool | None = None,
    device: Any = "cpu",
) -> ad.AnnData | None:
    """Predict expression for a table's spots, for any shapes (a grid), or for a whole image-only slide.

    What is predicted:

    - by default, the spots of the table ``table_key`` (all, or ``spots``);
    - ``shapes_key``: the shapes of that element. When no table annotates them (a grid from
      :func:`histoseq.pp.make_grid`, the spots of a slide that has only an image), the table
      ``f"{shapes_key}_table"`` is made for them first (one row per shape; the embeddings go there);
    - ``image_key`` and ``spacing_um``: the tissue of an image, in one call: the tissue is detected, a grid of
      ``spacing_um`` tiles is laid on it (shapes ``f"{image_key}_grid"``, or ``shapes_key``), and its tiles are
      embedded (streamed in batches) and predicted.

    The model's inputs are read as it was trained: the embedding ``obsm[model.embedding]`` of those rows, computed
    with the model's encoder when absent (and kept in their table; an embedding made by another encoder is
    refused), or, for models that read images (``"cnn"``, ``"attention"``, ``"superres"``), the patches around the
    shapes, cut and stain-normalised as in training (``"superres"``: the tiles that make up each shape; ``"cnn"``:
    averaged over the 8 turns and flips unless ``tta=False``).
    Shapes whose centre lies outside their image, or whose embedding is not finite, get NaN.

    Parameters
    ----------
    sdata
        The SpatialData; or the path of a SpatialData zarr store, or a list of them: each slide is opened lazily,
        predicted, and the prediction table written into its store (atomically), one slide at a time
        (:mod:`histoseq.tl._cohort`). Returns a list of tables with ``inplace=False``.
    model
        A fitted :class:`~histoseq.tl.ExpressionModel`.
    client
        With paths: a :class:`dask.distributed.Client`; each slide is then a task on its cluster (the model
        travels in its file format, never pickled) and the workers write into the stores. ``None``: the slides
        run here, one after the other, with the same result.
    key_added
        Name of the table of predictions; default ``"predicted"`` for a table's spots and
        ``f"{shapes_key}_predicted"`` for other shapes.
    table_key
        The table whose spots are predicted.
    shapes_key
        Predict these shapes instead (see above).
    image_key
        With ``spacing_um``: the image whose tissue is tiled and predicted.
    spacing_um
        Spacing (and side) in µm of the grid laid on ``image_key``.
    spots
        Rows to predict: ``None`` (all), a boolean mask, names or positions of the table's rows.
    into_table
        Also write the predictions into the measured table, as ``obsm[key_added]``: a DataFrame with one column
        per gene of the model (rows not predicted are NaN). Off by default: the measured table stays as it was.
    overwrite
        Replace a table of predictions of the same name (a table that histoseq did not write is never replaced).
    inplace
        Write the predictions into ``sdata`` (``True``) or return them.
    progress
        Show progress bars (embedding and patch cutting).
    tta
        ``"cnn"`` models: test-time augmentation; ``None``: the model's default (``model.config['tta']``).
    device
        Models that read images: the torch device that runs the network.

    Returns
    -------
    With ``inplace=False``, the table of predictions (and ``sdata`` is left as it was). Otherwise ``None``, and
    ``sdata.tables[key_added]`` holds it: one row per predicted shape with the ``obs`` (names included) and
    ``obsm['spatial']`` of its table, annotating the same shapes (TableModel; same region and instance keys), the
    model's genes as ``var_names``, the predictions (float32, on the model's target scale) in ``X``, and
    ``uns[key_added]``: ``genes``, ``target_transform``, ``method``, ``embedding``, ``groups``, ``train_groups``
    (what :func:`histoseq.tl.evaluate` reads). It is ready for ``sc.pp.pca``, ``sc.pp.neighbors``,
    ``sq.gr.spatial_neighbors`` and ``sq.gr.spatial_autocorr``. A grid laid by the call (shapes) and a table made
    for shapes are added too. On a backed SpatialData every element written is written to disk.

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
    >>> hs.tl.predict(sdata, model)
    >>> sdata.tables["predicted"].shape == (t.n_obs, 5)
    True

    An image-only slide, predicted on a 100 µm grid over its tissue:

    >>> model = hs.tl.fit(sdata, genes=5, embed_kwargs={"patch_px": 32}, progress=False)
    >>> slide = hs.datasets.synthetic(n_sections=1, section_size_um=600, random_state=7, progress=False)
    >>> del slide.tables["table"]
    >>> hs.tl.predict(slide, model, image_key="section0_image", spacing_um=100, progress=False)
    >>> slide.tables["section0_image_grid_predicted"].n_vars
    5

    """
    if not isinstance(model, ExpressionModel):
        raise TypeError(f"`model` must be an ExpressionModel (from hs.tl.fit or hs.tl.load_model), got {type(model)}.")
    return predict_table(
        sdata,
        model,
        key_added=key_added,
        table_key=table_key,
        shapes_key=shapes_key,
        image_key=image_key,
        spacing_um=spacing_um,
        spots=spots,
        into_table=into_table,
        overwrite=overwrite,
        inplace=inplace,
        progress=progress,
        tta=tta,
        device=device,
    )

"""The fitted expression model: :class:`ExpressionModel`, what :func:`histoseq.tl.fit` returns.

The model holds what its method learnt (a :class:`~histoseq.tl.methods.Fitted`), the genes and target
transform, and the embedding it reads; it predicts through its method (found in the registry,
:func:`histoseq.tl.methods.get_method`) and is saved in the format of :mod:`histoseq.tl._model_file`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._utils import jsonable, seeded
from ._data import TARGET_TRANSFORMS, TargetTransform
from ._model_file import read_model, write_model
from ._prediction import predict_table
from ._sections import SECTION_NORMS, section_norm_mode
from .methods import Fitted, get_method

if TYPE_CHECKING:
    import anndata as ad
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


class ExpressionModel:
    """A trained map from spot embeddings (or the image around each spot: ``"cnn"``, ``"attention"``) to expression.

    Made by :func:`histoseq.tl.fit`; applied by :meth:`predict` (or :func:`histoseq.tl.predict`);
    written to one file by :meth:`save` and read back by :meth:`load` (or :func:`histoseq.tl.load_model`).
    The file holds JSON text and tensors only and is read with ``torch.load(path, weights_only=True)``,
    so loading a model never runs code, and a loaded model predicts exactly what the saved one did.

    Attributes
    ----------
    method
        A method of :func:`histoseq.tl.methods.list_methods` (``"kernel"``, ``"ridge"``, ``"cnn"``, ...).
    genes
        The genes it predicts, in order.
    target_transform
        Transform of the counts it predicts (``"log1p_cp10k"``, ``"log1p"`` or ``None``).
    embedding
        The ``obsm`` key of the embedding it reads (several joined by ``"+"``: their concatenation), and
        :attr:`embedding_params`, the parameters that made it (``uns[name]['params']``; for several, one
        entry per key under ``"parts"``); ``None`` for a ``"cnn"`` model, which reads patches (its
        encoder and patch size are in :attr:`config`).
    provenance
        How it was trained: training groups and spots, penalty and cross-validation scores (ridge), best
        epoch and validation loss (networks).

    Examples
    --------
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
    >>> model.method, model.embedding, model.n_features, len(model.genes), model.target_transform
    ('kernel', 'X_demo', 8, 5, 'log1p_cp10k')
    >>> sorted(model.provenance["train_groups"]), model.provenance["n_train_spots"] == t.n_obs
    (['section0', 'section1'], True)
    >>> hs.tl.predict(sdata, model)
    >>> sdata.tables["predicted"].var_names.tolist() == model.genes
    True

    """

    def __init__(
        self,
        *,
        method: str,
        genes: Sequence[str],
        target_transform: TargetTransform,
        embedding: str | None,
        embedding_params: Mapping[str, Any],
        n_features: int,
        arrays: Mapping[str, np.ndarray],
        config: Mapping[str, Any],
        provenance: Mapping[str, Any],
    ):
        impl = get_method(method)
        if target_transform not in TARGET_TRANSFORMS:
            raise ValueError(f"Unknown target transform {target_transform!r}.")
        missing = [a for a in impl.arrays if a not in arrays]
        if missing:
            raise ValueError(f"A {method!r} model needs the arrays {missing}.")
        if (embedding is None) != (impl.reads != "embedding"):
            raise ValueError(f"A {method!r} model reads {'an embedding' if impl.reads == 'embedding' else impl.reads}.")
        self._method = method
        self._impl = impl
        self._genes = [str(g) for g in genes]
        self._target_transform = target_transform
        self._embedding = None if embedding is None else str(embedding)
        self._embedding_params = jsonable(dict(embedding_params))
        self._fitted = Fitted(
            arrays={k: np.asarray(v) for k, v in arrays.items()},
            config=jsonable(dict(config)),
            info=jsonable(dict(provenance)),
            n_features=int(n_features),
        )
        self._predictor: Any = None

    # -- properties ----------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The method's name (``"kernel"``, ``"ridge"``, ``"mlp"``, ``"cnn"``, ``"attention"``, ...)."""
        return self._method

    @property
    def uses_images(self) -> bool:
        """Whether the model reads the images around the spots (``"cnn"``, ``"attention"``), not an embedding."""
        return self._impl.reads != "embedding"

    @property
    def patches_follow_shapes(self) -> bool:
        """Whether the patches it predicts from follow the size of the shapes (``"superres"``: their tiles)."""
        return self._impl.patches_follow_shapes

    @property
    def genes(self) -> list[str]:
        """The genes the model predicts, in the order of its outputs."""
        return list(self._genes)

    @property
    def target_transform(self) -> TargetTransform:
        """Transform of the counts that the model predicts."""
        return self._target_transform

    @property
    def embedding(self) -> str | None:
        """The ``obsm`` key of the embedding the model reads (``None`` for a ``"cnn"`` model)."""
        return self._embedding

    @property
    def embedding_params(self) -> dict[str, Any]:
        """Parameters of the embedding the model was trained on (``uns[name]['params']``)."""
        return json.loads(json.dumps(self._embedding_params))

    @property
    def n_features(self) -> int:
        """Dimension of the embedding (of the encoder's output, for a ``"cnn"`` model)."""
        return self._fitted.n_features

    @property
    def config(self) -> dict[str, Any]:
        """Options of the method (penalty grid, network size, ...)."""
        return json.loads(json.dumps(self._fitted.config))

    @property
    def provenance(self) -> dict[str, Any]:
        """How the model was trained."""
        return json.loads(json.dumps(self._fitted.info))

    @property
    def section_norm(self) -> str | None:
        """How the embedding is normalised within each section first: ``"rank"``, ``"standardise"`` or ``None``."""
        return section_norm_mode(self._fitted.config.get("section_norm", False))

    @property
    def alpha(self) -> float | None:
        """Penalty of a ridge or kernel model (``None`` for the other methods)."""
        value = self._fitted.info.get("alpha")
        return None if value is None else float(value)

    # -- prediction ----------------------------------------------------------------------------------
    def _get_predictor(self) -> Any:
        """What the method predicts with (its network, rebuilt once); the global random state is left alone."""
        if self._predictor is None:
            if self._impl.network:
                with seeded(0):  # initial weights, replaced by the trained ones
                    self._predictor = self._impl.load(self._fitted)
            else:
                self._predictor = self._impl.load(self._fitted)
        return self._predictor

    def predict_embeddings(
        self,
        X: np.ndarray,
        *,
        sections: np.ndarray | None = None,
        rows: np.ndarray | None = None,
        batch_size: int = 65536,
    ) -> np.ndarray:
        """Predictions ``(n_spots, n_genes)`` (float32) for an embedding matrix; NaN rows stay NaN.

        Each row is predicted from itself alone, unless the model was fitted with a ``section_norm``
        (``"rank"`` or ``"standardise"``; off by default in :func:`fit`): then each embedding dimension is
        first normalised within each section (:func:`~histoseq.tl._sections.rank_sections`), so ``X`` should
        hold whole sections: all spots of one section when ``sections`` is ``None``.

        Parameters
        ----------
        X
            Embeddings, ``(n_spots, n_features)``.
        sections
            Section label of each row (for ``section_norm`` models); ``None``: the rows are one section.
        rows
            Predict only these rows (indices or a boolean mask) of ``X``; each section's statistics still
            come from all of its rows. ``None``: all rows.
        batch_size
            Spots per batch of the networks.

        Returns
        -------
        Predicted (transformed) expression of :attr:`genes`.

        Examples
        --------
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
        >>> model.predict_embeddings(t.obsm["X_demo"][:3]).shape
        (3, 5)

        """
        if self.uses_images:
            raise TypeError(
                f"A {self._method!r} model reads the spots' patches, not an embedding: use "
                "`hs.tl.predict(sdata, model)` or `model.predict_patches(images)`."
            )
        X = np.asarray(X, dtype=np.float64)
        d = self._fitted.n_features
        if X.ndim != 2 or X.shape[1] != d:
            raise ValueError(f"The model reads {d}-dimensional embeddings ({self._embedding!r}); got shape {X.shape}.")
        if self.section_norm:
            X = SECTION_NORMS[self.section_norm](X, sections)
        if rows is not None:
            X = X[np.asarray(rows)]
        out = np.full((len(X), len(self._genes)), np.nan, dtype=np.float32)
        ok = np.isfinite(X).all(axis=1)
        if not ok.any():
            return out
        out[ok] = self._impl.predict(self._fitted, self._get_predictor(), X[ok], batch_size=batch_size)
        return out

    def predict_patches(
        self, images: np.ndarray, *, tta: bool | None = None, batch_size: int = 128, device: Any = "cpu"
    ) -> np.ndarray:
        """Predictions ``(n_spots, n_genes)`` (float32) of a ``"cnn"`` model for patches.

        Parameters
        ----------
        images
            ``(n, patch_px, patch_px, 3)`` uint8 patches of ``config['patch_size_um']`` µm, as cut by
            :func:`histoseq.pp.extract_patches` with the model's ``patch_size_um`` and ``patch_px``.
        tta
            Average the predictions over the 8 turns and flips of each patch (test-time augmentation);
            ``None``: the model's default (``config['tta']``).
        batch_size
            Patches per batch.
        device
            Torch device to run the network on.

        Returns
        -------
        Predicted (transformed) expression of :attr:`genes`.

        Examples
        --------
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
        >>> model = hs.tl.fit(
        ...     sdata, genes=4, method="cnn", patch_px=32, max_epochs=1, n_hidden=8, progress=False
        ... )
        >>> patches = hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=32, progress=False)
        >>> model.predict_patches(patches.images[:3]).shape
        (3, 4)

        """
        if not self.uses_images:
            raise TypeError(f"A {self._method!r} model reads embeddings: use `predict_embeddings`.")
        images = np.asarray(images)
        c = self._fitted.config
        px = int(c["patch_px"])
        if self._impl.patches_follow_shapes and images.ndim == 4:
            px = images.shape[1]  # the method checks the size (the tiles that make up a shape)
        if images.ndim != 4 or images.shape[1:3] != (px, px) or images.shape[3] < 3 or images.dtype != np.uint8:
            raise ValueError(
                f"The model reads ({px}, {px}, 3) uint8 patches of {c['patch_size_um']} µm; got "
                f"{images.dtype} of shape {images.shape}."
            )
        if len(images) == 0:
            return np.zeros((0, len(self._genes)), dtype=np.float32)
        pred = self._impl.predict(
            self._fitted, self._get_predictor(), images, tta=tta, batch_size=batch_size, device=device
        )
        return pred.astype(np.float32)

    def patch_options(self, size_um: float | None = None) -> dict[str, Any]:
        """``patch_size_um``, ``patch_px`` and ``stain_norm`` of the patches to predict shapes of ``size_um`` µm.

        The training patches for most image methods; a ``"superres"`` model cuts the tiles that make up the
        shape (one tile for a grid cell of its ``tile_um``).
        """
        if not self.uses_images:
            raise TypeError(f"A {self._method!r} model reads embeddings, not patches.")
        out = dict(self._impl.prediction_patches(self._fitted, size_um))
        # models saved before stain normalisation read the patches as scanned
        out["stain_norm"] = self._fitted.config.get("stain_norm", False)
        return out

    def prediction_info(self, **options: Any) -> dict[str, Any]:
        """What a prediction with ``options`` (e.g. ``tta``) records beside the genes (the patch size, ...)."""
        return self._impl.prediction_info(self._fitted, **options)

    def predict(self, sdata: SpatialData, **kwargs: Any) -> ad.AnnData | None:
        """Predict expression for the spots of ``sdata``: :func:`histoseq.tl.predict` with this model.

        Parameters
        ----------
        sdata
            The SpatialData whose table holds (or can be given) the embedding.
        **kwargs
            Options of :func:`histoseq.tl.predict` (``key_added``, ``table_key``, ``spots``, ``inplace``).

        Returns
        -------
        See :func:`histoseq.tl.predict`.

        Examples
        --------
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
        >>> model.predict(sdata, inplace=False).shape == (t.n_obs, 5)
        True

        """
        return predict_table(sdata, self, **kwargs)

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the model to one file.

        The file is ``torch.save({"meta": <JSON text>, "tensors": {name: tensor}})``: no Python object is
        pickled, so :meth:`load` can read it with ``torch.load(path, weights_only=True)``.

        Parameters
        ----------
        path
            Destination file (``.pt`` by convention); an existing file is replaced.

        Returns
        -------
        The path written.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
        >>> path = model.save(pathlib.Path(tempfile.mkdtemp()) / "model.pt")
        >>> hs.tl.load_model(path).genes == model.genes
        True

        """
        meta = {
            "method": self._method,
            "genes": self._genes,
            "target_transform": self._target_transform,
            "embedding": self._embedding,
            "embedding_params": self._embedding_params,
            "n_features": self._fitted.n_features,
            "config": self._fitted.config,
            "provenance": self._fitted.info,
        }
        path = write_model(path, meta, self._fitted.arrays)
        logger.info("Saved %s model (%d genes) to %s.", self._method, len(self._genes), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpressionModel:
        """Read a model written by :meth:`save`, without unpickling any object.

        Parameters
        ----------
        path
            A file written by :meth:`save`.

        Returns
        -------
        The model.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> import numpy as np
        >>> import histoseq as hs
        >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
        >>> t = sdata.tables["table"]
        >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
        >>> path = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False).save(
        ...     pathlib.Path(tempfile.mkdtemp()) / "model.pt"
        ... )
        >>> hs.tl.ExpressionModel.load(path).method
        'kernel'

        """
        from .methods import list_methods

        meta, arrays = read_model(path)
        where = repr(str(path))
        if meta["method"] not in list_methods():
            raise ValueError(
                f"{where} holds a model of method {meta['method']!r}, which is not registered here (methods: "
                f"{list_methods()}). Import or register the method first (`hs.tl.methods.register`), or upgrade "
                "histoseq."
            )
        try:
            if not all(isinstance(g, str) for g in meta["genes"]):
                raise ValueError("`genes` must be a list of gene names (strings)")
            model = cls(
                method=meta["method"],
                genes=meta["genes"],
                target_transform=meta["target_transform"],
                embedding=meta["embedding"],
                embedding_params=meta["embedding_params"],
                n_features=meta["n_features"],
                arrays=arrays,
                config=meta["config"],
                provenance=meta["provenance"],
            )
            model._check_consistency()
        except Exception as err:
            raise ValueError(
                f"{where}: the model's metadata and arrays do not fit together ({type(err).__name__}: {err}). The file "
                "is damaged or was edited; save the model again with its `save` method."
            ) from err
        return model

    def _check_consistency(self) -> None:
        """Raise when the metadata is malformed or the arrays do not match it.

        A probe prediction must give one value per gene: a file edited by hand, or damaged, fails here rather than
        in :func:`predict`.
        """
        genes = self._genes
        if not genes or len(set(genes)) < len(genes):
            raise ValueError(f"`genes` must list distinct gene names, got {len(genes)} with {len(set(genes))} distinct")
        if self._fitted.n_features < 1:
            raise ValueError(f"`n_features` must be positive, got {self._fitted.n_features}")
        section_norm_mode(self._fitted.config.get("section_norm", False))
        repr(self)
        if self.uses_images:
            px = int(self.patch_options(None)["patch_px"])
            probe = np.full((1, px, px, 3), 255, dtype=np.uint8)
            out = self._impl.predict(self._fitted, self._get_predictor(), probe, tta=False, batch_size=1, device="cpu")
        else:
            probe = np.zeros((2, self._fitted.n_features))
            out = self._impl.predict(self._fitted, self._get_predictor(), probe, batch_size=2)
        if np.shape(out) != (len(probe), len(genes)):
            raise ValueError(
                f"a probe prediction has shape {np.shape(out)}, not (spots, {len(genes)} genes) as `genes` says"
            )

    # -- display -------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        p, c = self._fitted.info, self._fitted.config
        genes = ", ".join(self._genes[:6]) + (", ..." if len(self._genes) > 6 else "")
        source = (
            f"{c['patch_size_um']:g} µm patches at {c['patch_px']} px"
            if self.uses_images
            else f"{self._embedding!r} ({self._fitted.n_features} dims)"
        )
        lines = [
            f"ExpressionModel({self._method!r}): {source} -> {len(self._genes)} genes, target "
            f"{self._target_transform!r}",
            f"    {self._impl.summary(self._fitted)}",
        ]
        if self.section_norm:
            how = "ranked (normal scores)" if self.section_norm == "rank" else "standardised"
            lines.append(f"    embedding {how} within each section")
        groups = p.get("train_groups") or {}
        shown = ", ".join(list(groups)[:5]) + (", ..." if len(groups) > 5 else "")
        lines.append(f"    trained on {p.get('n_train_spots', '?')} spots" + (f" of {shown}" if shown else ""))
        lines.append(f"    genes: {genes}")
        return "\n".join(lines)


def load_model(path: str | Path) -> ExpressionModel:
    """Read an :class:`ExpressionModel` written by :meth:`ExpressionModel.save`.

    The file is read with ``torch.load(path, weights_only=True)``; a file holding pickled Python objects
    is refused with a ``ValueError``.

    Parameters
    ----------
    path
        The model file.

    Returns
    -------
    The model.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, section_size_um=900, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 8))
    >>> model = hs.tl.fit(sdata, genes=5, embedding="X_demo", progress=False)
    >>> model.save(pathlib.Path(tempfile.mkdtemp()) / "m.pt").exists()
    True

    """
    return ExpressionModel.load(path)

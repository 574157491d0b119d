"""The protocol that every expression method implements, and what a fitted method is.

A method is a small object (one per module of :mod:`histoseq.tl.methods`) that says what it reads, which
options it takes, how it learns from a :class:`~histoseq.tl._training_set.TrainingSet` and how it predicts.
What it learns is a :class:`Fitted`: named arrays, a JSON-able configuration and a record of the training.
:class:`~histoseq.tl.ExpressionModel` holds a :class:`Fitted` and saves it as tensors and JSON text, so a
method never writes files and a model file never holds code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from .._training_set import TrainingSet

#: What a method reads: an embedding (``obsm``), the patch around each spot, or bags of tiles per spot.
Reads = Literal["embedding", "patches", "tiles"]
#: What a method learns: expression values (regression) or classes.
Task = Literal["regression", "classification"]


@dataclass
class Fitted:
    """What a method learnt: everything a prediction needs, and nothing that is code.

    Attributes
    ----------
    arrays
        Named numeric arrays (weights, scalings, references); saved as tensors.
    config
        The method's options as used (JSON-able); saved as JSON.
    info
        How it was trained (chosen penalty, best epoch, ...); becomes the model's provenance.
    n_features
        Dimension of the input the method reads (the embedding, or the encoder's output for patches).

    Examples
    --------
    >>> import numpy as np
    >>> from histoseq.tl.methods import Fitted
    >>> fitted = Fitted(arrays={"mean": np.zeros(3)}, config={"alpha": 1.0}, info={"n_train": 10}, n_features=8)
    >>> fitted.arrays["mean"].shape, fitted.config["alpha"], fitted.n_features
    ((3,), 1.0, 8)

    """

    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    n_features: int = 0


class ExpressionMethod:
    """Base of the expression methods: a name, what it reads, its options, ``fit`` and ``predict``.

    A new method subclasses this in a module of its own under :mod:`histoseq.tl.methods`, sets the class
    attributes and implements :meth:`fit`, :meth:`predict` and :meth:`summary`; the registry
    (:func:`histoseq.tl.methods.register`) makes ``hs.tl.fit(method=name)`` use it.

    Attributes
    ----------
    name
        The name that ``hs.tl.fit(method=...)`` takes.
    description
        One line for listings.
    reads
        ``"embedding"``, ``"patches"`` or ``"tiles"``.
    task
        ``"regression"`` (expression values) or ``"classification"``.
    network
        Whether it trains a network with Lightning (``max_epochs``, ``accelerator``, ``devices`` and
        ``strategy`` apply).
    options
        The keyword options its :meth:`fit` takes.
    arrays
        The arrays every fitted state of it holds (checked when a model is made or loaded).
    needs_spot_size
        Whether :meth:`resolve_options` is given the training spots' diameter.
    patches_follow_shapes
        Whether the patches it predicts from depend on the size of the shapes predicted
        (:meth:`prediction_patches`).
    learns_views
        Whether it trains on the views of the training spots that ``hs.tl.fit(augment=...)`` computes
        (:mod:`histoseq.tl._views`); a method that does not is given none.

    Examples
    --------
    >>> from histoseq.tl.methods import ExpressionMethod, get_method
    >>> kernel = get_method("kernel")
    >>> isinstance(kernel, ExpressionMethod), kernel.reads, kernel.task, kernel.network
    (True, 'embedding', 'regression', False)
    >>> sorted(kernel.options)[:3]
    ['alpha', 'alpha_scoring', 'alphas']

    A method of one's own is a subclass with ``fit`` and ``predict``; see :func:`histoseq.tl.methods.register`.

    """

    name: ClassVar[str]
    description: ClassVar[str]
    reads: ClassVar[Reads] = "embedding"
    task: ClassVar[Task] = "regression"
    network: ClassVar[bool] = False
    options: ClassVar[frozenset[str]] = frozenset()
    arrays: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`resolve_options` needs the size of the training spots, and whether the patches it predicts
    #: from may differ in size from its training patches (:meth:`prediction_patches`).
    needs_spot_size: ClassVar[bool] = False
    patches_follow_shapes: ClassVar[bool] = False
    #: Whether :meth:`fit` trains on :attr:`TrainingSet.views <histoseq.tl._training_set.TrainingSet.views>`
    #: (the training spots as other scans show them; :mod:`histoseq.tl._views`).
    learns_views: ClassVar[bool] = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse unknown options (and, in methods that can, bad values) before any work is done."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown} for method {self.name!r}; it takes {sorted(self.options)}.")

    def patch_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``patch_size_um``, ``patch_px`` and ``stain_norm`` of the patches a method that reads patches trains on."""
        raise TypeError(f"Method {self.name!r} reads {self.reads}, not patches.")

    def resolve_options(self, options: Mapping[str, Any], *, spot_um: float | None = None) -> dict[str, Any]:
        """Options with the defaults that depend on the data filled in (``spot_um``: the training spots' size).

        Called before the patches are cut; :attr:`needs_spot_size` says whether ``spot_um`` is measured for it.
        """
        return dict(options)

    def prediction_patches(self, fitted: Fitted, size_um: float | None) -> dict[str, Any]:
        """``patch_size_um`` and ``patch_px`` of the patches to cut around shapes of ``size_um`` µm to predict them.

        By default the training patches, whatever the shapes' size.
        """
        return {"patch_size_um": fitted.config["patch_size_um"], "patch_px": fitted.config["patch_px"]}

    def fit(self, data: TrainingSet, **options: Any) -> Fitted:
        """Learn from the training spots ``data`` with the method's ``options``."""
        raise NotImplementedError

    def load(self, fitted: Fitted) -> Any:
        """What :meth:`predict` runs: the fitted state itself, or for networks the rebuilt network (cached)."""
        return fitted

    def predict(self, fitted: Fitted, predictor: Any, inputs: np.ndarray, **options: Any) -> np.ndarray:
        """Predictions ``(n, genes)`` for finite ``inputs`` (embedding rows, or uint8 patches)."""
        raise NotImplementedError

    def summary(self, fitted: Fitted) -> str:
        """One line for :class:`~histoseq.tl.ExpressionModel`'s ``repr`` (``fitted.info`` is the provenance)."""
        return self.name

    def prediction_info(self, fitted: Fitted, **options: Any) -> dict[str, Any]:
        """What a prediction records beside the model's genes and method (e.g. the patch size)."""
        return {}

    def __repr__(self) -> str:
        return f"<{self.reads} {self.task} method {self.name!r}: {self.description}>"


def standardised(fitted: Fitted, X: np.ndarray) -> np.ndarray:
    """The rows of ``X`` scaled as the training embedding was (``scaler_mean``, ``scaler_scale``)."""
    return (X - fitted.arrays["scaler_mean"]) / fitted.arrays["scaler_scale"]

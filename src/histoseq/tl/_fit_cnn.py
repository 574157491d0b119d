"""``fit(method="cnn")``: an image encoder and a regression head trained end to end on the spots' patches.

This is the ST-Net / HistoSPACE recipe: the patch around each spot is cut once
(:func:`histoseq.pp.extract_patches`, kept as uint8 in memory), and a network
(:class:`~histoseq.models._heads.ImageRegressor`: an encoder from the registry of :func:`histoseq.tl.embed`,
random-initialised or loaded from a local state dict, then an :class:`~histoseq.models._heads.MLPHead`)
learns the standardised expression of the genes from the pixels, with random dihedral transforms (the 8
turns and flips of the square) as augmentation and early stopping on a validation section. Prediction
averages the network's output over the 8 transforms (test-time augmentation).

:mod:`histoseq.tl._fit` dispatches here; the model is an :class:`~histoseq.tl.ExpressionModel` whose file
holds the network's state dict and the patch parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Encoders that ``method="cnn"`` trains (any built-in network of :func:`histoseq.tl.list_encoders`, or
#: ``"timm:<name>"``); the hand-crafted ``"morphology"`` features have nothing to train.
NOT_TRAINABLE = ("morphology",)
#: Default patch: 112 µm (HEST's) at 64 px, small enough to train on CPUs.
DEFAULT_PATCH_SIZE_UM = 112.0
DEFAULT_PATCH_PX = 64


def check_options(
    *,
    encoder: Any = "small_cnn",
    patch_size_um: Any = DEFAULT_PATCH_SIZE_UM,
    patch_px: Any = DEFAULT_PATCH_PX,
    **_: Any,
) -> None:
    """Refuse bad ``encoder``, ``patch_size_um`` and ``patch_px`` before any patch is cut."""
    from ._embed import _ALIASES, _TIMM_PREFIX, ENCODERS

    if not isinstance(encoder, str):
        raise TypeError(
            "`encoder` of `method='cnn'` must be the name of a built-in network (e.g. 'small_cnn', 'resnet18') or "
            f"'timm:<name>', so that the saved model can rebuild it; got {type(encoder).__name__}."
        )
    low = _ALIASES.get(encoder.strip().lower(), encoder.strip().lower())
    if low in NOT_TRAINABLE:
        raise ValueError(
            f"Encoder {encoder!r} is hand-crafted and has nothing to train; use `method='ridge'` or `'mlp'` on its "
            "embedding, or a network encoder ('small_cnn', 'resnet18') with `method='cnn'`."
        )
    if low not in ENCODERS and not low.startswith(_TIMM_PREFIX):
        raise ValueError(
            f"Unknown encoder {encoder!r} for `method='cnn'`; choose one of "
            f"{sorted(set(ENCODERS) - set(NOT_TRAINABLE))} or 'timm:<name>'."
        )
    if isinstance(patch_size_um, bool) or not (isinstance(patch_size_um, int | float) and patch_size_um > 0):
        raise ValueError(f"`patch_size_um` must be a positive size in µm, got {patch_size_um!r}.")
    if isinstance(patch_px, bool) or not isinstance(patch_px, int | np.integer) or patch_px < 8:
        raise ValueError(f"`patch_px` must be an integer of at least 8 pixels, got {patch_px!r}.")


def spot_patches(
    sdata: SpatialData,
    table_key: str,
    rows: np.ndarray,
    *,
    patch_size_um: float,
    patch_px: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Patches of the table rows ``rows`` (positions, any order), cut once into uint8 memory.

    Returns ``(images, found, params)``: ``images`` is ``(len(rows), patch_px, patch_px, 3)`` uint8, ``found``
    flags the rows that have a patch (spots whose centre lies outside their image have none: zeros) and
    ``params`` is :attr:`histoseq.pp.Patches.params`.
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
    pos = np.searchsorted(unique, patches.rows)
    if not (pos < len(unique)).all() or not (unique[np.minimum(pos, len(unique) - 1)] == patches.rows).all():
        raise RuntimeError("extract_patches returned spots that were not asked for.")  # pragma: no cover
    images = np.zeros((len(unique), int(patch_px), int(patch_px), 3), dtype=np.uint8)
    found = np.zeros(len(unique), dtype=bool)
    images[pos] = patches.images[..., :3]
    found[pos] = True
    back = np.searchsorted(unique, rows)
    if len(unique) == len(rows) and (unique == rows).all():
        return images, found, dict(patches.params)
    return images[back], found[back], dict(patches.params)


def build_network(
    encoder: str,
    n_genes: int,
    *,
    patch_px: int,
    n_hidden: int,
    n_layers: int,
    dropout: float,
    weights: str | Path | None = None,
    random_state: int | None = 0,
) -> tuple[torch.nn.Module, dict[str, str], int]:
    """The encoder (from the registry of :func:`histoseq.tl.embed`) and a fresh head.

    Returns ``(network, weights_record, encoder_dim)``.
    """
    import torch

    from ..models._heads import ImageRegressor, MLPHead
    from ._embed import _resolve

    check_options(encoder=encoder, patch_px=patch_px)
    res = _resolve(encoder, weights, random_state)
    if res.kind != "torch":  # pragma: no cover - names resolve to networks or to morphology
        raise ValueError(f"Encoder {encoder!r} is not a torch network.")
    enc = res.model
    enc.eval()
    with torch.no_grad():
        dim = int(enc(torch.zeros(2, 3, int(patch_px), int(patch_px))).flatten(1).shape[1])
    with torch.random.fork_rng(devices=[]):
        if random_state is not None:
            torch.manual_seed(int(random_state) + 1)
        head = MLPHead(dim, n_genes, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
    return ImageRegressor(enc, head), dict(res.weights), dim


def predict_images(
    network: torch.nn.Module,
    images: np.ndarray,
    *,
    tta: bool,
    batch_size: int = 128,
    device: Any = "cpu",
) -> np.ndarray:
    """Network outputs ``(n, G)`` (float64) for ``(n, h, w, 3)`` uint8 patches.

    With ``tta``, the mean of the outputs for the 8 dihedral transforms (turns and flips) of each patch.
    """
    import torch

    from ..models._augment import dihedral

    device = torch.device(device)
    network.eval()
    network.to(device)
    transforms = range(8) if tta else range(1)
    parts = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), int(batch_size)):
                chunk = np.ascontiguousarray(images[start : start + int(batch_size), ..., :3])
                x = torch.from_numpy(chunk).to(device).permute(0, 3, 1, 2).float().div_(255.0)
                acc = None
                for k in transforms:
                    y = network(dihedral(x, torch.full((len(x),), k, dtype=torch.long))).double()
                    acc = y if acc is None else acc + y
                parts.append((acc / len(transforms)).cpu().numpy())
    finally:
        network.to("cpu")
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def fit_cnn(
    images: np.ndarray,
    Y: np.ndarray,
    labels: np.ndarray | None,
    regions: np.ndarray | None,
    coords: np.ndarray | None,
    *,
    patch_params: Mapping[str, Any],
    random_state: int | None,
    progress: bool,
    max_epochs: int | None,
    accelerator: Any,
    devices: Any,
    strategy: Any,
    encoder: str = "small_cnn",
    weights: str | Path | None = None,
    patch_size_um: float = DEFAULT_PATCH_SIZE_UM,
    patch_px: int = DEFAULT_PATCH_PX,
    n_hidden: int = 256,
    n_layers: int = 1,
    dropout: float = 0.1,
    lr: float = 1e-3,
    encoder_lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    patience: int = 10,
    val_groups: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    flips: bool = True,
    stain_jitter: float = 0.0,
    tta: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Train the network on ``images`` (``(n, px, px, 3)`` uint8) and targets ``Y``; see :func:`histoseq.tl.fit`.

    Returns ``(arrays, config, info)`` for :class:`~histoseq.tl.ExpressionModel`: the target scaling and the
    network's state dict (``net.*``), the architecture and patch parameters, and the training record.
    """
    import torch
    from torch.utils.data import TensorDataset

    from ..models._heads import ImageRegressionPlan
    from ..models._training import training_seed
    from ._fit import _standardise, _train_plan, _training_record, _validation_rows

    if not (isinstance(stain_jitter, int | float) and 0 <= stain_jitter < 1):
        raise ValueError(f"`stain_jitter` must lie in [0, 1), got {stain_jitter!r}.")
    augment = None
    if stain_jitter > 0:
        from functools import partial

        from ..models._augment import hed_jitter

        # each stain's concentration scaled by up to ±stain_jitter and shifted by up to 0.4 * stain_jitter OD
        augment = partial(hed_jitter, scale=float(stain_jitter), shift=0.4 * float(stain_jitter))
    n = len(images)
    val, val_desc = _validation_rows(
        labels, regions, coords, n, val_groups=val_groups, val_fraction=val_fraction, random_state=random_state
    )
    y_mean, y_scale = _standardise(Y)
    Ys = ((Y - y_mean) / y_scale).astype(np.float32)
    seed = training_seed(random_state)
    epochs = 100 if max_epochs is None else int(max_epochs)
    network, weights_record, dim = build_network(
        encoder,
        Y.shape[1],
        patch_px=patch_px,
        n_hidden=n_hidden,
        n_layers=n_layers,
        dropout=dropout,
        weights=weights,
        random_state=seed,
    )
    network.train()  # the registry hands out encoders in eval mode; Lightning keeps a module's mode
    # (n, c, h, w) uint8 tensors: a quarter of the memory of floats; scaled to [0, 1] by the plan
    x_all = torch.from_numpy(np.ascontiguousarray(images[..., :3])).permute(0, 3, 1, 2)
    tr, va = np.flatnonzero(~val), np.flatnonzero(val)
    logger.info(
        "Training %s + head end to end on %d patches (%d px, %g µm), validating on %d (%s).",
        encoder,
        len(tr),
        patch_px,
        patch_size_um,
        len(va),
        val_desc,
    )
    plan = _train_plan(
        lambda: ImageRegressionPlan(
            network, lr=lr, weight_decay=weight_decay, encoder_lr=encoder_lr, flips=flips, augment=augment
        ),
        TensorDataset(x_all[tr].contiguous(), torch.from_numpy(Ys[tr])),
        TensorDataset(x_all[va].contiguous(), torch.from_numpy(Ys[va])),
        seed=seed,
        batch_size=int(batch_size),
        val_batch_size=int(batch_size),
        drop_last=len(tr) > int(batch_size),  # batch norm needs more than one patch per batch
        progress=progress,
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        patience=patience,
        trainer_kwargs=trainer_kwargs,
    )
    state, info = _training_record(plan, network, val_desc, int(val.sum()), seed)
    arrays = {"target_mean": y_mean, "target_scale": y_scale}
    arrays.update({f"net.{k}": v.numpy().copy() for k, v in state.items()})
    config = {
        "encoder": str(encoder),
        "encoder_dim": dim,
        "patch_size_um": float(patch_size_um),
        "patch_px": int(patch_px),
        "n_hidden": int(n_hidden),
        "n_layers": int(n_layers),
        "dropout": float(dropout),
        "lr": float(lr),
        "encoder_lr": None if encoder_lr is None else float(encoder_lr),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "patience": int(patience),
        "max_epochs": epochs,
        "flips": bool(flips),
        "stain_jitter": float(stain_jitter),
        "tta": bool(tta),
        "images": dict(patch_params.get("images", {})),
    }
    if weights_record:
        config["weights"] = weights_record["path"]
        config["weights_sha256"] = weights_record["sha256"]
    return arrays, config, info


def rebuild_network(config: Mapping[str, Any], n_genes: int, arrays: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """The trained network of a saved ``"cnn"`` model: its architecture from ``config``, its weights from ``net.*``."""
    import torch

    network, _, dim = build_network(
        config["encoder"],
        n_genes,
        patch_px=config["patch_px"],
        n_hidden=config["n_hidden"],
        n_layers=config["n_layers"],
        dropout=config["dropout"],
        weights=None,
        random_state=0,  # any: the weights are replaced; seeded so that the global random state is left alone
    )
    if dim != config.get("encoder_dim", dim):
        raise ValueError(f"Encoder {config['encoder']!r} now gives {dim} dims; the model was trained with another.")
    state = {k[4:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("net.")}
    network.load_state_dict(state, strict=True)
    network.eval()
    return network

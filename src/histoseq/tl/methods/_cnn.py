"""``method="cnn"``: an image encoder and a regression head trained end to end on the spots' patches.

This is the ST-Net / HistoSPACE recipe: the patch around each spot is cut once
(:func:`histoseq.pp.extract_patches`, kept as uint8 in memory), and a network
(:class:`~histoseq.models._heads.ImageRegressor`: an encoder from the registry of :func:`histoseq.tl.embed`,
random-initialised or loaded from a local state dict, then an :class:`~histoseq.models._heads.MLPHead`)
learns the standardised expression of the genes from the pixels, with random dihedral transforms (the 8
turns and flips of the square) as augmentation and early stopping on a validation section. Prediction
averages the network's output over the 8 transforms (test-time augmentation).

The model is an :class:`~histoseq.tl.ExpressionModel` whose file holds the network's state dict and the
patch parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._utils import seeded, unpack_state
from ...pp._stain import stain_norm_mode
from .._embed import _ALIASES, _TIMM_PREFIX, ENCODERS, _resolve
from .._network_fit import NETWORK_OPTIONS, NetworkOptions, fit_network
from ._base import ExpressionMethod, Fitted

if TYPE_CHECKING:
    import torch

    from .._training_set import TrainingSet

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

    from ...models._heads import ImageRegressor, MLPHead

    check_options(encoder=encoder, patch_px=patch_px)
    res = _resolve(encoder, weights, random_state)
    if res.kind != "torch":  # pragma: no cover - names resolve to networks or to morphology
        raise ValueError(f"Encoder {encoder!r} is not a torch network.")
    enc = res.model
    enc.eval()
    with torch.no_grad():
        dim = int(enc(torch.zeros(2, 3, int(patch_px), int(patch_px))).flatten(1).shape[1])
    with seeded(None if random_state is None else int(random_state) + 1):
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

    from ...models._augment import dihedral

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


class CNN(ExpressionMethod):
    """An image encoder and a head trained end to end on the spots' patches (ST-Net, HistoSPACE)."""

    name = "cnn"
    description = "an image encoder and a head trained end to end on the spots' patches, test-time augmentation"
    reads = "patches"
    network = True
    options = frozenset(
        {
            "encoder",
            "weights",
            "patch_size_um",
            "patch_px",
            "n_hidden",
            "n_layers",
            "dropout",
            "encoder_lr",
            "stain_norm",
            "flips",
            "stain_jitter",
            "tta",
            *NETWORK_OPTIONS,
        }
    )
    arrays = ("target_mean", "target_scale")

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Unknown options, and bad ``encoder``, ``patch_size_um`` and ``patch_px``, before any patch is cut."""
        super().check_options(options)
        check_options(**options)

    def patch_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The patch size in µm and pixels, and the stain normalisation, that the options ask for."""
        return {
            "patch_size_um": float(options.get("patch_size_um", DEFAULT_PATCH_SIZE_UM)),
            "patch_px": int(options.get("patch_px", DEFAULT_PATCH_PX)),
            "stain_norm": stain_norm_mode(options.get("stain_norm", "colour")) or False,
        }

    def fit(
        self,
        data: TrainingSet,
        *,
        encoder: str = "small_cnn",
        weights: str | Path | None = None,
        patch_size_um: float = DEFAULT_PATCH_SIZE_UM,
        patch_px: int = DEFAULT_PATCH_PX,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        encoder_lr: float | None = None,
        stain_norm: str | bool = "colour",
        flips: bool = True,
        stain_jitter: float = 0.0,
        tta: bool = True,
        **network: Any,
    ) -> Fitted:
        """Train the network on the training patches; see :func:`histoseq.tl.fit`.

        The arrays hold the target scaling and the network's state dict (``net.*``); the configuration holds
        the architecture and the patch parameters. ``network``: :class:`~histoseq.tl._network_fit.NetworkOptions`
        (here ``batch_size=64`` and ``patience=10`` by default).
        """
        import torch

        from ...models._plans import ImageRegressionPlan

        opts = NetworkOptions(**{"batch_size": 64, "patience": 10, **network})
        if not (isinstance(stain_jitter, int | float) and 0 <= stain_jitter < 1):
            raise ValueError(f"`stain_jitter` must lie in [0, 1), got {stain_jitter!r}.")
        augment = None
        if stain_jitter > 0:
            from ...models._augment import hed_jitter

            # each stain's concentration scaled by up to ±stain_jitter and shifted by up to 0.4 * stain_jitter OD
            augment = partial(hed_jitter, scale=float(stain_jitter), shift=0.4 * float(stain_jitter))
        built: dict[str, Any] = {}

        def make_plan(seed: int) -> ImageRegressionPlan:
            network, built["weights"], built["dim"] = build_network(
                encoder,
                data.Y.shape[1],
                patch_px=patch_px,
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout=dropout,
                weights=weights,
                random_state=seed,
            )
            network.train()  # the registry hands out encoders in eval mode; Lightning keeps a module's mode
            return ImageRegressionPlan(
                network, lr=opts.lr, weight_decay=opts.weight_decay, encoder_lr=encoder_lr, flips=flips, augment=augment
            )

        logger.info(
            "Training %s + head end to end on the patches of %d spots (%d px, %g µm).",
            encoder,
            data.n,
            patch_px,
            patch_size_um,
        )
        # (n, c, h, w) uint8 tensors: a quarter of the memory of floats; scaled to [0, 1] by the plan
        x_all = torch.from_numpy(np.ascontiguousarray(data.images[..., :3])).permute(0, 3, 1, 2)
        run = fit_network(
            data,
            x_all,
            make_plan,
            opts,
            default_epochs=100,
            val_batch_size=opts.batch_size,
            drop_last=True,  # batch norm needs more than one patch per batch
        )
        config = {
            "encoder": str(encoder),
            "encoder_dim": built["dim"],
            "patch_size_um": float(patch_size_um),
            "patch_px": int(patch_px),
            "n_hidden": int(n_hidden),
            "n_layers": int(n_layers),
            "dropout": float(dropout),
            **opts.record(),
            "encoder_lr": None if encoder_lr is None else float(encoder_lr),
            "max_epochs": run.epochs,
            "stain_norm": stain_norm_mode(stain_norm) or False,
            "flips": bool(flips),
            "stain_jitter": float(stain_jitter),
            "tta": bool(tta),
            "images": dict(data.patch_params.get("images", {})),
        }
        if built["weights"]:
            config["weights"] = built["weights"]["path"]
            config["weights_sha256"] = built["weights"]["sha256"]
        return Fitted(run.arrays(), config, run.info, n_features=built["dim"])

    def load(self, fitted: Fitted) -> Any:
        """The trained network: its architecture from the configuration, its weights from ``net.*``."""
        c = fitted.config
        network, _, dim = build_network(
            c["encoder"],
            len(fitted.arrays["target_mean"]),
            patch_px=c["patch_px"],
            n_hidden=c["n_hidden"],
            n_layers=c["n_layers"],
            dropout=c["dropout"],
            weights=None,
            random_state=0,  # any: the weights are replaced; seeded so that the global random state is left alone
        )
        if dim != c.get("encoder_dim", dim):
            raise ValueError(f"Encoder {c['encoder']!r} now gives {dim} dims; the model was trained with another.")
        network.load_state_dict(unpack_state(fitted.arrays), strict=True)
        return network.eval()

    def predict(
        self,
        fitted: Fitted,
        predictor: Any,
        inputs: np.ndarray,
        *,
        tta: bool | None = None,
        batch_size: int = 128,
        device: Any = "cpu",
        **options: Any,
    ) -> np.ndarray:
        """The network's output for uint8 patches (averaged over the 8 turns and flips with ``tta``), scaled back."""
        a = fitted.arrays
        raw = predict_images(predictor, inputs, tta=self.use_tta(fitted, tta), batch_size=batch_size, device=device)
        return raw * a["target_scale"] + a["target_mean"]

    @staticmethod
    def use_tta(fitted: Fitted, tta: bool | None) -> bool:
        """Whether a prediction averages over the 8 turns and flips: ``tta``, else the model's default."""
        return bool(fitted.config.get("tta", True)) if tta is None else bool(tta)

    def prediction_info(self, fitted: Fitted, *, tta: bool | None = None, **options: Any) -> dict[str, Any]:
        """The encoder, patch size and test-time augmentation of a prediction."""
        c = fitted.config
        return {
            "encoder": c["encoder"],
            "patch_size_um": c["patch_size_um"],
            "patch_px": c["patch_px"],
            "stain_norm": c.get("stain_norm", False),
            "tta": self.use_tta(fitted, tta),
        }

    def summary(self, fitted: Fitted) -> str:
        """Encoder, head, test-time augmentation and early stopping."""
        c, p = fitted.config, fitted.info
        weights = f", weights {Path(c['weights']).name}" if c.get("weights") else ""
        return (
            f"cnn: {c['encoder']} ({c['encoder_dim']} dims{weights}) + {c['n_layers']} hidden layer(s) of "
            f"{c['n_hidden']}; test-time augmentation {'on' if c.get('tta', True) else 'off'}; "
            f"best epoch {p.get('best_epoch')} (validation: {p.get('validation')})"
        )


METHOD = CNN()

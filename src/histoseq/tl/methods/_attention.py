"""``method="attention"``: gated attention pooling over the tiles around each spot, with per-gene attention maps.

A spot is a bag of tiles (Graziani et al.'s interpretable regression with the gated attention pooling of
Ilse et al., 2018): the square region of ``region_um`` µm around the spot is cut once as a patch (the patch
machinery of ``method="cnn"``: :func:`histoseq.tl._inputs.spot_patches`, stain-normalised alike), split into
``grid × grid`` tiles of ``tile_um`` µm (``grid = round(region_um / tile_um)``) at ``tile_px`` pixels, and each
tile is embedded by a fixed encoder: the hand-crafted ``"morphology"`` features (default) or a network of
:func:`histoseq.tl.list_encoders` (random-initialised with the fit's ``random_state``; nothing of the encoder
is trained). The tile embeddings are standardised with the training statistics and a
:class:`~histoseq.models._attention.GatedAttentionRegressor` learns the standardised expression of the genes
from the bags (:func:`histoseq.tl._network_fit.fit_network`: early stopping on a training section, the best
weights kept). The training loss is the mean squared error plus ``attention_penalty`` (default 0.1) times the
variance of each gene's scores within a bag (:class:`~histoseq.models._attention.AttentionRegressionPlan`):
attention leaves uniform only as far as it lowers the error, so genes that the tiles do not explain keep flat
maps (without it, noise genes showed attention contrasts of up to 2× on synthetic data; the held-out accuracy
was the same with and without).

Options: ``encoder`` (``"morphology"``), ``region_um`` (128), ``tile_um`` (32), ``tile_px`` (32), ``stain_norm``
(``"colour"``), ``n_hidden`` (64), ``n_attention`` (32), ``dropout`` (0.1), ``attention_penalty`` (0.1) and the
options of every network (:class:`~histoseq.tl._network_fit.NetworkOptions`). Prediction reads the same patches
(:meth:`~histoseq.tl.ExpressionModel.predict_patches`); ``tta`` and ``device`` do not apply.

Each gene's gated score of a tile depends on that tile alone, so :func:`tile_scores` scores any tile of a
slide: :func:`histoseq.tl.attention_maps` turns the scores into maps of the attention each tile receives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._utils import standardise, training_seed, unpack_state
from ...pp._stain import stain_norm_mode
from .._network_fit import NETWORK_OPTIONS, NetworkOptions, fit_network
from .._tiles import TileEncoder, encoder_name, probe_tile, rebuild_encoder
from ._base import ExpressionMethod, Fitted, standardised

if TYPE_CHECKING:
    from .._training_set import TrainingSet

logger = logging.getLogger(__name__)

DEFAULT_REGION_UM = 128.0
DEFAULT_TILE_UM = 32.0
DEFAULT_TILE_PX = 32


def tile_grid(region_um: Any, tile_um: Any) -> int:
    """Tiles per side of a region, ``round(region_um / tile_um)``; errors name the fix."""
    for name, value in (("region_um", region_um), ("tile_um", tile_um)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise TypeError(f"`{name}` must be a size in µm, got {value!r}.")
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"`{name}` must be a positive size in µm, got {value!r}.")
    ratio = float(region_um) / float(tile_um)
    grid = round(ratio)
    if grid < 1 or abs(ratio - grid) > 0.01 * grid:
        raise ValueError(
            f"`region_um` ({region_um}) must be a whole number of tiles of `tile_um` ({tile_um}) µm, e.g. "
            f"`region_um={max(grid, 1) * float(tile_um):g}`."
        )
    return grid


def check_options(
    *,
    encoder: Any = "morphology",
    region_um: Any = DEFAULT_REGION_UM,
    tile_um: Any = DEFAULT_TILE_UM,
    tile_px: Any = DEFAULT_TILE_PX,
    stain_norm: Any = "colour",
    n_hidden: Any = 64,
    n_attention: Any = 32,
    dropout: Any = 0.1,
    attention_penalty: Any = 0.1,
    **_: Any,
) -> None:
    """Refuse bad options of ``method="attention"`` before any patch is cut."""
    encoder_name(encoder)
    tile_grid(region_um, tile_um)
    if isinstance(tile_px, bool) or not isinstance(tile_px, int | np.integer) or tile_px < 8:
        raise ValueError(f"`tile_px` must be an integer of at least 8 pixels, got {tile_px!r}.")
    stain_norm_mode(stain_norm)
    for name, value in (("n_hidden", n_hidden), ("n_attention", n_attention)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
    ok = isinstance(attention_penalty, int | float) and not isinstance(attention_penalty, bool)
    if not (ok and np.isfinite(attention_penalty) and attention_penalty >= 0):
        raise ValueError(f"`attention_penalty` must be a non-negative number, got {attention_penalty!r}.")


def split_tiles(images: np.ndarray, grid: int) -> np.ndarray:
    """``(n, P, P, c)`` patches → ``(n * grid², P / grid, P / grid, 3)`` tiles, row by row within each patch."""
    n, h, w = images.shape[:3]
    if h != w or h % grid:
        raise ValueError(f"Patches of {h} × {w} px cannot be split into {grid} × {grid} tiles.")
    px = h // grid
    tiles = images[..., :3].reshape(n, grid, px, grid, px, 3).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(tiles.reshape(n * grid * grid, px, px, 3))


@dataclass
class AttentionPredictor:
    """What a fitted attention model predicts with: its tile encoder and its network."""

    encoder: TileEncoder
    network: Any


def embed_tiles(fitted: Fitted, predictor: AttentionPredictor, tiles: np.ndarray) -> np.ndarray:
    """Embeddings ``(n, D)`` of ``(n, tile_px, tile_px, 3)`` uint8 tiles, stain-normalised as in training."""
    return predictor.encoder(tiles)


def tile_scores(fitted: Fitted, predictor: AttentionPredictor, features: np.ndarray) -> np.ndarray:
    """Each gene's gated attention score ``s_tg`` (before the softmax) of tiles, ``(n, G)`` float64.

    ``features`` are the tiles' embeddings by the model's encoder (:func:`embed_tiles`); they are standardised
    as in training. A tile's score does not depend on the other tiles of a bag.
    """
    import torch

    Z = standardised(fitted, np.asarray(features, dtype=np.float64)).astype(np.float32)
    out = []
    with torch.inference_mode():
        for start in range(0, len(Z), 65536):
            x = torch.from_numpy(Z[start : start + 65536])[:, None, :]
            out.append(predictor.network.scores(x)[:, 0, :].double().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(fitted.arrays["target_mean"])))


class AttentionMethod(ExpressionMethod):
    """Gated attention pooling over the tiles around each spot (interpretable, with per-gene attention maps)."""

    name = "attention"
    description = "gated attention pooling over the tiles around each spot; per-gene attention maps"
    reads = "tiles"
    network = True
    options = frozenset(
        {
            "encoder",
            "region_um",
            "tile_um",
            "tile_px",
            "stain_norm",
            "n_hidden",
            "n_attention",
            "dropout",
            "attention_penalty",
            *NETWORK_OPTIONS,
        }
    )
    arrays = ("scaler_mean", "scaler_scale", "target_mean", "target_scale", "encoder_probe")

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Unknown options and bad values, before any patch is cut."""
        super().check_options(options)
        check_options(**options)

    def patch_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The region around each spot, cut once at ``grid * tile_px`` pixels, and the stain normalisation."""
        region_um = float(options.get("region_um", DEFAULT_REGION_UM))
        grid = tile_grid(region_um, options.get("tile_um", DEFAULT_TILE_UM))
        return {
            "patch_size_um": region_um,
            "patch_px": grid * int(options.get("tile_px", DEFAULT_TILE_PX)),
            "stain_norm": stain_norm_mode(options.get("stain_norm", "colour")) or False,
        }

    def fit(
        self,
        data: TrainingSet,
        *,
        encoder: str = "morphology",
        region_um: float = DEFAULT_REGION_UM,
        tile_um: float = DEFAULT_TILE_UM,
        tile_px: int = DEFAULT_TILE_PX,
        stain_norm: str | bool = "colour",
        n_hidden: int = 64,
        n_attention: int = 32,
        dropout: float = 0.1,
        attention_penalty: float = 0.1,
        **network: Any,
    ) -> Fitted:
        """Embed the tiles of each training spot once and train the attention network; see :func:`histoseq.tl.fit`.

        ``network``: the options of :class:`~histoseq.tl._network_fit.NetworkOptions`.
        """
        import torch

        from ...models._attention import AttentionRegressionPlan, GatedAttentionRegressor

        check_options(
            encoder=encoder,
            region_um=region_um,
            tile_um=tile_um,
            tile_px=tile_px,
            stain_norm=stain_norm,
            n_hidden=n_hidden,
            n_attention=n_attention,
            dropout=dropout,
            attention_penalty=attention_penalty,
        )
        opts = NetworkOptions(**network)
        name, grid = encoder_name(encoder), tile_grid(region_um, tile_um)
        if data.images is None or data.images.shape[1] != grid * int(tile_px):
            raise ValueError(f"The training set holds no patches of {grid * int(tile_px)} px.")  # pragma: no cover
        seed = training_seed(data.random_state)
        tile_size_um = float(region_um) / grid  # the size of a tile as cut
        tiles_encoder = TileEncoder.build(name, tile_size_um, int(tile_px), seed)
        logger.info(
            "Embedding %d tiles (%d per spot, %g µm at %d px) with %r.",
            data.n * grid * grid,
            grid * grid,
            tile_size_um,
            tile_px,
            name,
        )
        feats = tiles_encoder(split_tiles(data.images, grid), progress=data.progress).astype(np.float64)
        if not np.isfinite(feats).all():
            raise ValueError(f"Encoder {name!r} gave non-finite features for some tiles.")
        mean, scale = standardise(feats)
        dim = feats.shape[1]
        bags = ((feats - mean) / scale).astype(np.float32).reshape(data.n, grid * grid, dim)

        def make_plan(seed: int) -> AttentionRegressionPlan:
            net = GatedAttentionRegressor(
                dim, data.Y.shape[1], n_hidden=n_hidden, n_attention=n_attention, dropout=dropout
            )
            return AttentionRegressionPlan(
                net, lr=opts.lr, weight_decay=opts.weight_decay, attention_penalty=attention_penalty
            )

        run = fit_network(data, torch.from_numpy(bags), make_plan, opts, default_epochs=200)
        config = {
            "encoder": name,
            "encoder_seed": seed,
            "encoder_dim": dim,
            "region_um": float(region_um),
            "tile_um": tile_size_um,
            "tile_px": int(tile_px),
            "grid": grid,
            "patch_size_um": float(region_um),
            "patch_px": grid * int(tile_px),
            "stain_norm": stain_norm_mode(stain_norm) or False,
            "n_hidden": int(n_hidden),
            "n_attention": int(n_attention),
            "dropout": float(dropout),
            "attention_penalty": float(attention_penalty),
            **opts.record(),
            "max_epochs": run.epochs,
            "images": dict(data.patch_params.get("images", {})),
        }
        probe = tiles_encoder(probe_tile(int(tile_px)))[0]
        arrays = run.arrays(scaler_mean=mean, scaler_scale=scale, encoder_probe=probe)
        return Fitted(arrays, config, run.info, n_features=dim)

    def load(self, fitted: Fitted) -> AttentionPredictor:
        """The tile encoder (rebuilt from its name and seed, checked on a probe tile) and the trained network."""
        from ...models._attention import GatedAttentionRegressor

        c, a = fitted.config, fitted.arrays
        encoder = rebuild_encoder(c, a["encoder_probe"], a["scaler_scale"])
        net = GatedAttentionRegressor(
            fitted.n_features,
            len(a["target_mean"]),
            n_hidden=c["n_hidden"],
            n_attention=c["n_attention"],
            dropout=c["dropout"],
        )
        net.load_state_dict(unpack_state(a), strict=True)
        return AttentionPredictor(encoder, net.eval())

    def predict(
        self,
        fitted: Fitted,
        predictor: Any,
        inputs: np.ndarray,
        *,
        batch_size: int = 128,
        tta: bool | None = None,
        device: Any = None,
        **options: Any,
    ) -> np.ndarray:
        """Predictions for uint8 patches of the region around each spot (``tta`` and ``device`` do not apply)."""
        import torch

        a, grid = fitted.arrays, int(fitted.config["grid"])
        out = []
        step = max(1, int(batch_size))
        for start in range(0, len(inputs), step):
            chunk = inputs[start : start + step]
            feats = embed_tiles(fitted, predictor, split_tiles(chunk, grid)).astype(np.float64)
            bags = standardised(fitted, feats).astype(np.float32).reshape(len(chunk), grid * grid, -1)
            with torch.inference_mode():
                out.append(predictor.network(torch.from_numpy(bags)).double().numpy())
        raw = np.concatenate(out) if out else np.zeros((0, len(a["target_mean"])))
        return raw * a["target_scale"] + a["target_mean"]

    def prediction_info(self, fitted: Fitted, **options: Any) -> dict[str, Any]:
        """The encoder, region and tiles of a prediction."""
        c = fitted.config
        keys = ("encoder", "region_um", "tile_um", "tile_px", "patch_size_um", "patch_px")
        return {**{k: c[k] for k in keys}, "stain_norm": c.get("stain_norm", False)}

    def summary(self, fitted: Fitted) -> str:
        """Tiles, encoder, network and early stopping."""
        c, p = fitted.config, fitted.info
        return (
            f"attention: bags of {c['grid']}×{c['grid']} tiles of {c['tile_um']:g} µm ({c['encoder']}, "
            f"{c['encoder_dim']} dims), gated attention {c['n_attention']} over {c['n_hidden']} hidden; "
            f"best epoch {p.get('best_epoch')} (validation: {p.get('validation')})"
        )


METHOD = AttentionMethod()

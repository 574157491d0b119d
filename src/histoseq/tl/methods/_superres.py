"""``method="superres"``: expression below the spot size, learnt from spots by weak supervision (HisToSGE / iStar).

A spot measures the mean expression of the tissue under it. The method splits the square around each training
spot into ``n × n`` tiles of ``tile_um`` µm (``n = round(spot_um / tile_um)``; by default tiles of about 25 µm,
at least 2 × 2 per spot), embeds each tile with a fixed encoder and trains a tile network ``f``
(:class:`~histoseq.models._superres.TileRegressor`) so that the mean of ``f`` over a spot's tiles matches the
spot's (standardised, transformed) measurement, as iStar does. A tile's embedding is its own features joined
with those of the window of ``2 · context_tiles + 1`` tiles centred on it, so a tile sees its neighbourhood
as well as itself. ``smoothness`` adds a penalty on the difference between neighbouring tiles of a spot.

Prediction follows the shapes asked for: a shape of ``s`` µm (a circle's diameter, a polygon's side) is cut
as ``k = max(1, round(s / tile_um))`` tiles per side with the context margin around them, and its prediction
is the mean of ``f`` over its ``k × k`` tiles. On a grid of ``tile_um`` spacing
(``hs.tl.predict(sdata, model, image_key=..., spacing_um=model.config["tile_um"])``, or any grid through
``shapes_key=``) every cell is one tile: the super-resolved map. On the measured spots it is the spot-level
prediction, so ``hs.tl.evaluate`` scores it like any other model.

The mean is taken in the space of the model's targets (``log1p`` of normalised counts by default), not of
counts: a simplification of the measurement model that keeps the targets of every method alike.

Options: ``encoder`` (``"morphology"``, or a network of :func:`histoseq.tl.list_encoders`, random-initialised
with the fit's ``random_state`` and never trained), ``spot_um`` (default: the training spots' diameter),
``tile_um`` (default ``spot_um / max(2, round(spot_um / 25))``), ``tile_px`` (32), ``context_tiles`` (1),
``stain_norm`` (``"colour"``), ``n_hidden`` (64), ``dropout`` (0.1), ``smoothness`` (0) and the options of every
network (:class:`~histoseq.tl._network_fit.NetworkOptions`).
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

#: The size of a tile the default aims at, in µm.
TARGET_TILE_UM = 25.0
DEFAULT_TILE_PX = 32
#: Spots (or shapes) whose tiles are embedded at once.
BAG_BATCH = 256


def _size(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a size in µm, got {value!r}.")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive size in µm, got {value!r}.")


def check_options(
    *,
    encoder: Any = "morphology",
    spot_um: Any = None,
    tile_um: Any = None,
    tile_px: Any = DEFAULT_TILE_PX,
    context_tiles: Any = 1,
    stain_norm: Any = "colour",
    n_hidden: Any = 64,
    dropout: Any = 0.1,
    smoothness: Any = 0.0,
    **_: Any,
) -> None:
    """Refuse bad options of ``method="superres"`` before any patch is cut."""
    encoder_name(encoder, method="superres")
    _size("spot_um", spot_um)
    _size("tile_um", tile_um)
    if isinstance(tile_px, bool) or not isinstance(tile_px, int | np.integer) or tile_px < 8:
        raise ValueError(f"`tile_px` must be an integer of at least 8 pixels, got {tile_px!r}.")
    if (
        isinstance(context_tiles, bool)
        or not isinstance(context_tiles, int | np.integer)
        or not 0 <= context_tiles <= 4
    ):
        raise ValueError(f"`context_tiles` must be an integer from 0 to 4, got {context_tiles!r}.")
    stain_norm_mode(stain_norm)
    if isinstance(n_hidden, bool) or not isinstance(n_hidden, int | np.integer) or n_hidden < 0:
        raise ValueError(f"`n_hidden` must be a non-negative integer, got {n_hidden!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
    ok = isinstance(smoothness, int | float) and not isinstance(smoothness, bool)
    if not (ok and np.isfinite(smoothness) and smoothness >= 0):
        raise ValueError(f"`smoothness` must be a non-negative number, got {smoothness!r}.")


def tiles_per_spot(spot_um: float, tile_um: float) -> int:
    """Tiles per side of a spot (at least 1); an error when the spot is far from a whole number of tiles."""
    ratio = float(spot_um) / float(tile_um)
    n = max(1, round(ratio))
    if abs(ratio - n) > 0.25 * n:
        raise ValueError(
            f"Spots of {spot_um:g} µm are not a whole number of tiles of `tile_um={tile_um:g}` µm; choose e.g. "
            f"`tile_um={float(spot_um) / n:g}`."
        )
    return n


def bag_features(encoder: TileEncoder, patches: np.ndarray, k: int, margin: int, tile_px: int) -> np.ndarray:
    """Embeddings ``(B, k², D)`` of the ``k × k`` inner tiles of patches of ``k + 2 · margin`` tiles per side.

    A tile's embedding is the encoder's features of the tile, joined (``margin > 0``) with those of the window of
    ``2 · margin + 1`` tiles centred on it. Tiles are ordered row by row.
    """
    b = len(patches)
    side = k + 2 * margin
    if patches.shape[1] != side * tile_px or patches.shape[2] != side * tile_px:
        raise ValueError(f"Patches of {patches.shape[1]} px are not {side} tiles of {tile_px} px.")  # pragma: no cover
    own, context = [], []
    w = (2 * margin + 1) * tile_px
    for i in range(k):
        for j in range(k):
            y0, x0 = (i + margin) * tile_px, (j + margin) * tile_px
            own.append(patches[:, y0 : y0 + tile_px, x0 : x0 + tile_px, :3])
            if margin:
                cy, cx = i * tile_px, j * tile_px
                context.append(patches[:, cy : cy + w, cx : cx + w, :3])
    # (k², B, ...) -> (B·k², ...), spot by spot
    feats = encoder(np.ascontiguousarray(np.stack(own, axis=1).reshape(b * k * k, tile_px, tile_px, 3)))
    if margin:
        ctx = encoder(np.ascontiguousarray(np.stack(context, axis=1).reshape(b * k * k, w, w, 3)))
        feats = np.concatenate([feats, ctx], axis=1)
    return feats.reshape(b, k * k, -1)


@dataclass
class SuperResPredictor:
    """What a fitted super-resolution model predicts with: its tile encoder and its tile network."""

    encoder: TileEncoder
    network: Any


class SuperResolutionMethod(ExpressionMethod):
    """Expression per tile, learnt from spots by weak supervision: the mean of a spot's tiles matches the spot."""

    name = "superres"
    description = "expression per sub-spot tile (weak supervision: a spot's tiles average to the spot)"
    reads = "tiles"
    network = True
    needs_spot_size = True
    patches_follow_shapes = True
    options = frozenset(
        {
            "encoder",
            "spot_um",
            "tile_um",
            "tile_px",
            "context_tiles",
            "stain_norm",
            "n_hidden",
            "dropout",
            "smoothness",
            *NETWORK_OPTIONS,
        }
    )
    arrays = ("scaler_mean", "scaler_scale", "target_mean", "target_scale", "encoder_probe")

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Unknown options and bad values, before any patch is cut."""
        super().check_options(options)
        check_options(**options)

    def resolve_options(self, options: Mapping[str, Any], *, spot_um: float | None = None) -> dict[str, Any]:
        """``spot_um`` (the training spots' diameter unless given) and ``tile_um`` (about 25 µm, ≥ 2 × 2 a spot)."""
        out = dict(options)
        if out.get("spot_um") is None:
            if spot_um is None or not np.isfinite(spot_um):
                raise ValueError(
                    "`method='superres'` needs the size of the spots: their shapes have no radius or area here; "
                    "pass `spot_um=` (the spot diameter in µm)."
                )
            out["spot_um"] = float(spot_um)
        if out.get("tile_um") is None:
            out["tile_um"] = out["spot_um"] / max(2, round(out["spot_um"] / TARGET_TILE_UM))
        check_options(**out)
        tiles_per_spot(out["spot_um"], out["tile_um"])
        return out

    def patch_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The square of the spot's tiles with the context margin around it, cut once per spot."""
        tile_um, tile_px = float(options["tile_um"]), int(options.get("tile_px", DEFAULT_TILE_PX))
        side = tiles_per_spot(options["spot_um"], tile_um) + 2 * int(options.get("context_tiles", 1))
        return {
            "patch_size_um": side * tile_um,
            "patch_px": side * tile_px,
            "stain_norm": stain_norm_mode(options.get("stain_norm", "colour")) or False,
        }

    def prediction_patches(self, fitted: Fitted, size_um: float | None) -> dict[str, Any]:
        """The tiles that make up a shape of ``size_um`` µm (one tile when unknown), with the context margin."""
        c = fitted.config
        k = 1 if size_um is None or not np.isfinite(size_um) else max(1, round(float(size_um) / c["tile_um"]))
        side = k + 2 * int(c["context_tiles"])
        return {"patch_size_um": side * float(c["tile_um"]), "patch_px": side * int(c["tile_px"])}

    def fit(
        self,
        data: TrainingSet,
        *,
        encoder: str = "morphology",
        spot_um: float | None = None,
        tile_um: float | None = None,
        tile_px: int = DEFAULT_TILE_PX,
        context_tiles: int = 1,
        stain_norm: str | bool = "colour",
        n_hidden: int = 64,
        dropout: float = 0.1,
        smoothness: float = 0.0,
        **network: Any,
    ) -> Fitted:
        """Embed each training spot's tiles once and train the tile network; see :func:`histoseq.tl.fit`.

        ``spot_um`` and ``tile_um`` are filled in by :meth:`resolve_options` in a fit; ``network``: the options
        of :class:`~histoseq.tl._network_fit.NetworkOptions`.
        """
        import torch

        from ...models._superres import SuperResolutionPlan, TileRegressor

        # fills spot_um and tile_um, and checks every option once
        opts = self.resolve_options(
            {
                "encoder": encoder,
                "spot_um": spot_um,
                "tile_um": tile_um,
                "tile_px": tile_px,
                "context_tiles": context_tiles,
                "stain_norm": stain_norm,
                "n_hidden": n_hidden,
                "dropout": dropout,
                "smoothness": smoothness,
            },
            spot_um=spot_um,
        )
        net_opts = NetworkOptions(**network)
        name, tile_um = encoder_name(encoder, method="superres"), float(opts["tile_um"])
        k, margin = tiles_per_spot(opts["spot_um"], tile_um), int(context_tiles)
        side = k + 2 * margin
        if data.images is None or data.images.shape[1] != side * int(tile_px):
            raise ValueError(f"The training set holds no patches of {side * int(tile_px)} px.")  # pragma: no cover
        seed = training_seed(data.random_state)
        tiles_encoder = TileEncoder.build(name, tile_um, int(tile_px), seed)
        logger.info(
            "Embedding %d tiles (%d × %d per spot, %g µm at %d px, context %d tile(s)) with %r.",
            data.n * k * k,
            k,
            k,
            tile_um,
            tile_px,
            margin,
            name,
        )
        feats = self._embed(tiles_encoder, data.images, k, margin, int(tile_px), progress=data.progress)
        if not np.isfinite(feats).all():
            raise ValueError(f"Encoder {name!r} gave non-finite features for some tiles.")
        dim = feats.shape[2]
        mean, scale = standardise(feats.reshape(-1, dim).astype(np.float64))
        bags = ((feats - mean) / scale).astype(np.float32)

        def make_plan(seed: int) -> SuperResolutionPlan:
            net = TileRegressor(dim, data.Y.shape[1], n_hidden=n_hidden, dropout=dropout)
            return SuperResolutionPlan(
                net, grid=k, lr=net_opts.lr, weight_decay=net_opts.weight_decay, smoothness=smoothness
            )

        run = fit_network(data, torch.from_numpy(bags), make_plan, net_opts, default_epochs=200)
        config = {
            "encoder": name,
            "encoder_seed": seed,
            "encoder_dim": dim,
            "spot_um": float(opts["spot_um"]),
            "tile_um": tile_um,
            "tile_px": int(tile_px),
            "tiles_per_spot": k,
            "context_tiles": margin,
            "patch_size_um": side * tile_um,
            "patch_px": side * int(tile_px),
            "stain_norm": stain_norm_mode(stain_norm) or False,
            "n_hidden": int(n_hidden),
            "dropout": float(dropout),
            "smoothness": float(smoothness),
            "pooling": "mean of the tiles' predictions in the targets' space",
            **net_opts.record(),
            "max_epochs": run.epochs,
            "images": dict(data.patch_params.get("images", {})),
        }
        probe = tiles_encoder(probe_tile(int(tile_px)))[0]
        arrays = run.arrays(scaler_mean=mean, scaler_scale=scale, encoder_probe=probe)
        return Fitted(arrays, config, run.info, n_features=dim)

    @staticmethod
    def _embed(encoder: TileEncoder, patches: np.ndarray, k: int, margin: int, tile_px: int, *, progress: bool):
        from tqdm.auto import tqdm

        parts = []
        with tqdm(total=len(patches), desc=f"tiles ({encoder.name})", unit="spot", disable=not progress) as bar:
            for start in range(0, len(patches), BAG_BATCH):
                chunk = patches[start : start + BAG_BATCH]
                parts.append(bag_features(encoder, chunk, k, margin, tile_px))
                bar.update(len(chunk))
        return np.concatenate(parts) if parts else np.zeros((0, k * k, 0), np.float32)

    def load(self, fitted: Fitted) -> SuperResPredictor:
        """The tile encoder (rebuilt from its name and seed, checked on a probe tile) and the trained network."""
        from ...models._superres import TileRegressor

        c, a = fitted.config, fitted.arrays
        encoder = rebuild_encoder(c, a["encoder_probe"], a["scaler_scale"])
        net = TileRegressor(fitted.n_features, len(a["target_mean"]), n_hidden=c["n_hidden"], dropout=c["dropout"])
        net.load_state_dict(unpack_state(a), strict=True)
        return SuperResPredictor(encoder, net.eval())

    def tile_predictions(self, fitted: Fitted, predictor: SuperResPredictor, inputs: np.ndarray) -> np.ndarray:
        """Expression ``(n, k², G)`` of the ``k × k`` tiles of each patch (``k`` from the patches' size)."""
        import torch

        c, a = fitted.config, fitted.arrays
        px, margin = int(c["tile_px"]), int(c["context_tiles"])
        side = inputs.shape[1] // px
        k = side - 2 * margin
        if inputs.shape[1] != side * px or inputs.shape[2] != inputs.shape[1] or k < 1:
            raise ValueError(
                f"A superres model reads square patches of k + {2 * margin} tiles of {px} px (k ≥ 1); got "
                f"{inputs.shape[1]} × {inputs.shape[2]} px."
            )
        feats = bag_features(predictor.encoder, inputs, k, margin, px).astype(np.float64)
        z = standardised(fitted, feats).astype(np.float32)
        with torch.inference_mode():
            raw = predictor.network.tiles(torch.from_numpy(z)).double().numpy()
        return raw * a["target_scale"] + a["target_mean"]

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
        """The mean over each patch's inner tiles of their predicted expression (``tta``, ``device`` do not apply)."""
        out = []
        step = max(1, int(batch_size))
        for start in range(0, len(inputs), step):
            out.append(self.tile_predictions(fitted, predictor, inputs[start : start + step]).mean(axis=1))
        return np.concatenate(out) if out else np.zeros((0, len(fitted.arrays["target_mean"])))

    def prediction_info(self, fitted: Fitted, **options: Any) -> dict[str, Any]:
        """The encoder and the tiles of a prediction."""
        c = fitted.config
        keys = ("encoder", "spot_um", "tile_um", "tile_px", "context_tiles")
        return {**{k: c[k] for k in keys}, "stain_norm": c.get("stain_norm", False)}

    def summary(self, fitted: Fitted) -> str:
        """Tiles, encoder, network and early stopping."""
        c, p = fitted.config, fitted.info
        return (
            f"superres: tiles of {c['tile_um']:g} µm ({c['tiles_per_spot']}×{c['tiles_per_spot']} per spot, "
            f"context ±{c['context_tiles']}; {c['encoder']}, {c['encoder_dim']} dims), tile network "
            f"{c['n_hidden']} hidden, smoothness {c['smoothness']:g}; best epoch {p.get('best_epoch')} "
            f"(validation: {p.get('validation')})"
        )


METHOD = SuperResolutionMethod()

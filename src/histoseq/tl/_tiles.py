"""Fixed encoders of image tiles, shared by the methods that read tiles (``attention``, ``superres``).

:class:`TileEncoder` rebuilds a built-in encoder from its name (and seed) and embeds uint8 tiles in batches;
:func:`probe_tile` is the fixed tile on which a saved model checks that the rebuilt encoder embeds as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._embed import _ALIASES, ENCODERS, MorphologyEncoder, TorchRunner, get_encoder

#: Encoders that do not embed image tiles.
NO_TILES = ("tissue_position",)
#: Tiles per batch of the encoder.
TILE_BATCH = 1024


def encoder_name(encoder: Any, method: str = "attention") -> str:
    """The registry name of ``encoder`` (aliases resolved); a clear error for anything that cannot embed tiles."""
    if not isinstance(encoder, str):
        raise TypeError(
            f"`encoder` of `method={method!r}` must be the name of a built-in encoder (e.g. 'morphology', "
            f"'small_cnn'), so that the saved model can rebuild it; got {type(encoder).__name__}."
        )
    low = _ALIASES.get(encoder.strip().lower(), encoder.strip().lower())
    if low not in ENCODERS or low in NO_TILES:
        raise ValueError(
            f"Unknown encoder {encoder!r} for `method={method!r}`; choose one of "
            f"{sorted(set(ENCODERS) - set(NO_TILES) - set(_ALIASES))}."
        )
    return low


def probe_tile(tile_px: int) -> np.ndarray:
    """A fixed H&E-like test tile ``(1, tile_px, tile_px, 3)``: what a rebuilt encoder must embed as before."""
    y, x = np.mgrid[0:tile_px, 0:tile_px] / max(tile_px - 1, 1)
    dots = (np.sin(9 * x) * np.sin(7 * y) > 0.5).astype(float)
    r = 230 - 60 * x - 90 * dots
    g = 200 - 120 * y * x - 130 * dots
    b = 220 - 40 * y - 50 * dots
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)[None]


@dataclass
class TileEncoder:
    """A fixed encoder of uint8 tiles: ``encoder(tiles) -> (n, D)`` float32, in batches of :data:`TILE_BATCH`."""

    name: str
    model: Any
    kind: str
    um_per_px: float

    @classmethod
    def build(cls, name: str, tile_um: float, tile_px: int, seed: int) -> TileEncoder:
        """The encoder ``name`` (a network random-initialised with ``seed``) for tiles of ``tile_um`` µm."""
        if name == "morphology":
            return cls(name, MorphologyEncoder(), "numpy", float(tile_um) / int(tile_px))
        _, model, kind = get_encoder(name, random_state=seed)
        return cls(name, model, kind, float(tile_um) / int(tile_px))

    def __call__(self, tiles: np.ndarray, *, progress: bool = False) -> np.ndarray:
        """Embeddings ``(n, D)`` (float32) of ``(n, px, px, 3)`` uint8 tiles."""
        from tqdm.auto import tqdm

        parts = []
        with tqdm(total=len(tiles), desc=f"tiles ({self.name})", unit="tile", disable=not progress) as bar:
            if self.kind == "numpy":
                for start in range(0, len(tiles), TILE_BATCH):
                    parts.append(np.asarray(self.model(tiles[start : start + TILE_BATCH], self.um_per_px)))
                    bar.update(len(parts[-1]))
            else:
                # float32 on every device, so that a model predicts with the features it was trained on
                with TorchRunner(self.model, "cpu", autocast=False, builtin=True) as runner:
                    for start in range(0, len(tiles), TILE_BATCH):
                        parts.append(runner(tiles[start : start + TILE_BATCH]))
                        bar.update(len(parts[-1]))
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32)


def rebuild_encoder(config: Mapping[str, Any], probe: np.ndarray, scale: np.ndarray) -> TileEncoder:
    """A saved model's tile encoder, rebuilt from its name and seed and checked on :func:`probe_tile`.

    ``probe`` is what the training encoder gave for the probe tile, ``scale`` the training features' scale (its
    first columns are the probe's); a warning says when the rebuilt encoder drifts by more than 1e-3 of it.
    """
    encoder = TileEncoder.build(config["encoder"], config["tile_um"], config["tile_px"], config["encoder_seed"])
    again = encoder(probe_tile(config["tile_px"]))[0]
    drift = np.abs(again - probe) / np.asarray(scale)[: len(again)] if again.shape == probe.shape else np.ones(1)
    if np.max(drift) > 1e-3:
        warnings.warn(
            f"The encoder {config['encoder']!r} rebuilt here embeds a test tile differently from the one the model "
            "was trained with (another torch or histoseq version?); its predictions may be off.",
            UserWarning,
            stacklevel=3,
        )
    return encoder

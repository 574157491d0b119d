"""Self-supervised pretraining of a patch encoder on the tissue of whole H&E images: ``hs.tl.pretrain_encoder``.

Tiles are drawn uniformly at random from the tissue of the images (a grid on the detected tissue, each tile
jittered inside its grid cell), not only around the spots, read once into memory with the patch reader of
:mod:`histoseq.pp`, and used to train the encoder that :func:`histoseq.tl.embed` builds (``"small_cnn"`` or
``"resnet18"``) with one of two objectives:

- ``"simclr"`` (Chen et al., 2020): two random views of each tile (:class:`histoseq.models._augment.Augment`:
  crops, the 8 symmetries of the square, stain jitter in HED space, brightness/contrast and blur) go through the
  encoder and a projection MLP; the NT-Xent loss pulls the two views of a tile together and pushes the other
  tiles of the batch away;
- ``"autoencoder"`` (as in HistoSPACE): the encoder's vector is decoded back into the tile (upsampling
  convolutions) under a mean squared error; the input is the tile under a random symmetry of the square.

Only the encoder is saved, as a plain state dict that :func:`histoseq.tl.embed` loads with ``weights=``.

The networks and the Lightning training plan live in :mod:`histoseq.models._pretrain`; they follow the
scvi-tools split: plain :class:`torch.nn.Module` networks and a :class:`lightning.pytorch.LightningModule` plan.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._sdata import (
    affine_xy,
    get_table,
    image_levels,
    image_ref,
    pixel_size_from_affine,
    resolve_regions,
    transformations,
)
from .._utils import training_seed
from ..models._augment import Augment
from ..models._pretrain import PretrainPlan, SimCLRProjection, TileDecoder
from ..models._training import quiet_loggers, train_plan
from ..pp._stain import estimate_stains, normalize_stain, stain_norm_mode

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Pretraining objectives.
METHODS = ("simclr", "autoencoder")
#: Encoders that can be pretrained, with the smallest tile (pixels) their strided stages can take.
MIN_PATCH_PX = {"small_cnn": 16, "resnet18": 32}
#: Fewest tissue grid cells (half a tile apart) the selected images must hold together.
MIN_TISSUE_CELLS = 4
_TILES_KEY = "pretrain_tiles"


# --------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    """What :func:`pretrain_encoder` wrote and how.

    It is path-like (:func:`os.fspath` gives :attr:`path`), so it can be passed as ``weights=`` directly.

    Attributes
    ----------
    path
        The encoder's state dict (a torch or safetensors file).
    history
        Mean training loss of each epoch.
    tiles
        One row per training tile: ``dataset`` (position of its SpatialData in the list given), ``image_key``,
        the centre ``x_px``, ``y_px`` in level-0 pixels of the image and ``x_um``, ``y_um`` in µm.
    params
        The arguments and what was found (the metadata written beside the weights).

    """

    path: Path
    history: list[float]
    tiles: pd.DataFrame = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict, repr=False)

    def __fspath__(self) -> str:
        return str(self.path)


# --------------------------------------------------------------------------------------------------
# choosing images and sampling tiles
# --------------------------------------------------------------------------------------------------


def _extent(image: Any, cs: str) -> np.ndarray:
    """``(xmin, ymin, xmax, ymax)`` of an image's level 0 in coordinate system ``cs``."""
    lvl = image_levels(image)[0]
    h, w = int(lvl.sizes["y"]), int(lvl.sizes["x"])
    m = affine_xy(transformations(image)[cs])
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=float) @ m.T
    return np.concatenate([corners[:, :2].min(0), corners[:, :2].max(0)])


def _same_scan(sdata: SpatialData, a: str, b: str) -> bool:
    """Whether images ``a`` and ``b`` are one section at two resolutions: same place in a shared system."""
    ta, tb = transformations(sdata.images[a]), transformations(sdata.images[b])
    for cs in sorted(set(ta) & set(tb)):
        ea, eb = _extent(sdata.images[a], cs), _extent(sdata.images[b], cs)
        size = max(ea[2] - ea[0], ea[3] - ea[1], eb[2] - eb[0], eb[3] - eb[1])
        if np.abs(ea - eb).max() <= 0.05 * size:
            return True
    return False


def section_images(sdata: SpatialData) -> list[str]:
    """One image per section of ``sdata``.

    Images that cover the same place of a shared coordinate system are one scan at several resolutions (Visium's
    full-resolution, hires and lowres images); of those, the finest is kept.
    """
    keys = list(sdata.images.keys())
    groups: list[list[str]] = []
    for k in keys:
        for g in groups:
            if any(_same_scan(sdata, k, other) for other in g):
                g.append(k)
                break
        else:
            groups.append([k])

    def pixel_size(k: str, group: list[str]) -> float:
        common = set.intersection(*(set(transformations(sdata.images[o])) for o in group))
        cs = sorted(common)[0] if common else sorted(transformations(sdata.images[k]))[0]
        return pixel_size_from_affine(affine_xy(transformations(sdata.images[k])[cs]))[0]

    return [min(g, key=lambda k, g=g: pixel_size(k, g)) for g in groups]


def _select_images(
    datasets: list[SpatialData],
    image_key: str | Sequence[str] | None,
    train: str | Sequence[str] | None,
    groups: str | None,
    table_key: str | None,
) -> list[tuple[int, str]]:
    """``(dataset position, image key)`` of the images to draw tiles from."""
    if image_key is not None and train is not None:
        raise ValueError("Pass either `image_key` (images to use) or `train` (sections to use), not both.")
    if image_key is not None:
        wanted = [image_key] if isinstance(image_key, str) else list(image_key)
        out = [(i, k) for k in wanted for i, sd in enumerate(datasets) if k in sd.images]
        found = {k for _, k in out}
        missing = [k for k in wanted if k not in found]
        if missing:
            available = sorted({k for sd in datasets for k in sd.images})
            raise KeyError(f"Image(s) {missing} not found. Available: {available}. Pass some of them as `image_key`.")
        return out
    if train is None:
        out = [(i, k) for i, sd in enumerate(datasets) for k in section_images(sd)]
        if not out:
            raise ValueError("The SpatialData object has no image; pretraining needs the H&E images.")
        return out
    if groups is None:
        raise ValueError("`train` lists sections by a column of the table's obs: name it with `groups`.")
    wanted = [train] if isinstance(train, str) else [str(t) for t in train]
    out, seen, values = [], set(), set()
    for i, sd in enumerate(datasets):
        if not sd.tables:
            continue
        tkey, table = get_table(sd, table_key)
        if groups not in table.obs:
            raise KeyError(
                f"`groups={groups!r}` is not a column of table {tkey!r} (columns: {list(table.obs.columns)}). Name the "
                "column of section labels, or select the images with `image_key`."
            )
        labels = table.obs[groups].astype(str).to_numpy()
        values.update(labels)
        mask = np.isin(labels, wanted)
        seen.update(labels[mask])
        if not mask.any():
            continue
        for reg in resolve_regions(sd, table_key=tkey, spots=mask):
            if (i, reg.image.key) not in out:
                out.append((i, reg.image.key))
    missing = [t for t in wanted if t not in seen]
    if missing:
        raise KeyError(f"`train` names {missing}, which are not values of obs[{groups!r}] (values: {sorted(values)}).")
    return out


def _tissue_cells(
    sdata: SpatialData,
    image_key: str,
    cell_um: float,
    patch_size_um: float,
    tissue: bool,
    min_tissue_fraction: float,
) -> tuple[np.ndarray, float, str | None]:
    """Centres (level-0 px) of the tissue grid cells of an image, the pixel size, and why there are none."""
    from ..pp import make_grid

    ref = image_ref(sdata, image_key)
    try:
        grid = make_grid(
            sdata,
            image_key=image_key,
            spacing_um=cell_um,
            tile_size_um=patch_size_um,
            tissue=tissue,
            min_tissue_fraction=min_tissue_fraction,
            pixel_size_um=ref.pixel_size_um,
            inplace=False,
        )
    except ValueError as err:
        if "tissue" not in str(err).lower():
            raise
        return np.empty((0, 2)), ref.pixel_size_um, str(err)
    xy = np.column_stack([grid["x_um"].to_numpy(), grid["y_um"].to_numpy()]) / ref.pixel_size_um
    return xy, ref.pixel_size_um, None


def _read_tiles(
    sdata: SpatialData,
    image_key: str,
    centers_px: np.ndarray,
    pixel_size_um: float,
    patch_size_um: float,
    patch_px: int,
    progress: bool,
) -> np.ndarray:
    """``(n, patch_px, patch_px, 3)`` uint8 tiles centred on ``centers_px`` (level-0 px), with the patch reader."""
    from spatialdata import SpatialData as SD
    from spatialdata.models import ShapesModel

    from ..pp import extract_patches

    image = sdata.images[image_key]
    shapes = ShapesModel.parse(
        np.asarray(centers_px, dtype=float),
        geometry=0,
        radius=np.full(len(centers_px), patch_size_um / pixel_size_um / 2),
        transformations=transformations(image),
    )
    tmp = SD(images={image_key: image}, shapes={_TILES_KEY: shapes})
    patches = extract_patches(
        tmp,
        table_key=None,
        shapes_key=_TILES_KEY,
        image_key=image_key,
        patch_size_um=patch_size_um,
        patch_px=patch_px,
        pixel_size_um=pixel_size_um,
        rgb=True,
        progress=progress,
    )
    return patches.images


def sample_tiles(
    datasets: list[SpatialData],
    images: list[tuple[int, str]],
    *,
    n_tiles: int,
    patch_size_um: float,
    patch_px: int,
    tissue: bool = True,
    min_tissue_fraction: float = 0.5,
    stain_norm: str | bool = False,
    rng: np.random.Generator,
    progress: bool = False,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Draw ``n_tiles`` tiles uniformly from the tissue of ``images`` and read them.

    The tissue of each image is tiled by a grid of cells half a tile apart (:func:`histoseq.pp.make_grid`, keeping
    cells whose tile is at least ``min_tissue_fraction`` tissue); cells are drawn uniformly from all images
    together (so each image contributes in proportion to its tissue area; without replacement while there are
    enough) and each tile centre is placed uniformly inside its cell.

    Returns
    -------
    ``(tiles, table)``: ``(n_tiles, patch_px, patch_px, 3)`` uint8 and one row per tile (see
    :class:`PretrainResult`).

    """
    cell_um = patch_size_um / 2
    cells, sizes, reasons = [], [], []
    for i, key in images:
        xy, px_um, why = _tissue_cells(datasets[i], key, cell_um, patch_size_um, tissue, min_tissue_fraction)
        cells.append(xy)
        sizes.append(px_um)
        if why:
            reasons.append(f"{key!r}: {why}")
    counts = np.array([len(c) for c in cells])
    total = int(counts.sum())
    if total < MIN_TISSUE_CELLS:
        detail = (" " + " ".join(reasons)) if reasons else ""
        raise ValueError(
            f"Too few tissue tiles: the selected images {[k for _, k in images]} hold {total} tissue grid cell(s) of "
            f"{cell_um:g} µm, and pretraining needs at least {MIN_TISSUE_CELLS}. Use a smaller `patch_size_um`, more "
            f"sections, a lower `min_tissue_fraction`, or `tissue=False` to use the whole images.{detail}"
        )
    pick = rng.choice(total, size=n_tiles, replace=n_tiles > total)
    pick.sort()
    owner = np.repeat(np.arange(len(images)), counts)[pick]
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    tiles = np.empty((n_tiles, patch_px, patch_px, 3), dtype=np.uint8)
    rows = []
    for j, (i, key) in enumerate(images):
        sel = np.flatnonzero(owner == j)
        if sel.size == 0:
            continue
        half = cell_um / sizes[j] / 2
        xy = cells[j][pick[sel] - start[j]] + rng.uniform(-half, half, size=(sel.size, 2))
        lvl = image_levels(datasets[i].images[key])[0]
        w, h = int(lvl.sizes["x"]), int(lvl.sizes["y"])
        xy[:, 0] = np.clip(xy[:, 0], 0, np.nextafter(w, 0))
        xy[:, 1] = np.clip(xy[:, 1], 0, np.nextafter(h, 0))
        tiles[sel] = _read_tiles(datasets[i], key, xy, sizes[j], patch_size_um, patch_px, progress)
        mode = stain_norm_mode(stain_norm)
        if mode:  # as hs.tl.embed will show the encoder its patches
            stain = estimate_stains(datasets[i], [key])[key]
            if stain is not None:
                tiles[sel] = normalize_stain(tiles[sel], stain, amount=mode == "amount")
        rows.append(
            pd.DataFrame(
                {
                    "dataset": i,
                    "image_key": key,
                    "x_px": xy[:, 0],
                    "y_px": xy[:, 1],
                    "x_um": xy[:, 0] * sizes[j],
                    "y_um": xy[:, 1] * sizes[j],
                },
                index=sel,
            )
        )
    table = pd.concat(rows).sort_index().reset_index(drop=True)
    return tiles, table


# --------------------------------------------------------------------------------------------------
# pretrain_encoder
# --------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


def _check_path(path: str | os.PathLike) -> tuple[Path, str]:
    p = Path(path).expanduser()
    if p.is_dir():
        raise IsADirectoryError(f"`path` {str(p)!r} is a directory; give a file name, e.g. {str(p / 'encoder.pt')!r}.")
    if not p.parent.is_dir():
        raise FileNotFoundError(
            f"The folder of `path` ({str(p.parent)!r}) does not exist; create it first "
            "(`Path(path).parent.mkdir(parents=True)`)."
        )
    fmt = "safetensors" if p.suffix == ".safetensors" else "torch"
    if fmt == "safetensors":
        try:
            import safetensors.torch  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"Writing {p.name!r} needs the `safetensors` package: `pip install safetensors`, or use a '.pt' file."
            ) from err
    return p.resolve(), fmt


def _write(state: dict[str, torch.Tensor], path: Path, fmt: str, meta: dict[str, Any]) -> None:
    """Write ``state`` atomically (a temporary file renamed), and the metadata as JSON beside it."""
    text = json.dumps(meta, indent=1, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"histoseq": text})
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    path.with_name(path.name + ".json").write_text(text)


def pretrain_encoder(
    sdata: SpatialData | Sequence[SpatialData],
    path: str | os.PathLike,
    *,
    method: Literal["simclr", "autoencoder"] = "simclr",
    encoder: Literal["small_cnn", "resnet18"] = "small_cnn",
    patch_size_um: float = 112.0,
    patch_px: int = 64,
    image_key: str | Sequence[str] | None = None,
    train: str | Sequence[str] | None = None,
    groups: str | None = "sample_id",
    table_key: str | None = "table",
    n_tiles: int = 2000,
    tissue: bool = True,
    min_tissue_fraction: float = 0.5,
    stain_norm: str | bool = "colour",
    max_epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    temperature: float = 0.2,
    augment: Augment | None = None,
    accelerator: str | Any = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any = "auto",
    trainer_kwargs: Mapping[str, Any] | None = None,
    random_state: int | None = 0,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a patch encoder without labels on tissue tiles of the whole H&E images.

    ``n_tiles`` tiles of ``patch_size_um`` µm at ``patch_px`` pixels are drawn uniformly at random from the
    tissue of the images (detected with :func:`histoseq.pp.detect_tissue`; a grid of cells half a tile apart is
    laid on it with :func:`histoseq.pp.make_grid` and each tile is placed at random inside a cell), so the whole
    tissue counts, not only the spots. They are read once into memory (``n_tiles × patch_px² × 3`` bytes) with
    the patch reader of :func:`histoseq.pp.extract_patches`, then the encoder that
    ``hs.tl.embed(encoder=encoder)`` builds is trained with a :class:`lightning.pytorch.Trainer`:

    - ``"simclr"``: contrastive learning (SimCLR). Each tile gives two views by
      :class:`~histoseq.models._augment.Augment` (random resized crop of 50–100% of the area, one of the 8
      symmetries of the square, stain jitter in haematoxylin–eosin–DAB optical density with the Ruifrok–Johnston
      matrix, brightness/contrast jitter, Gaussian blur); a projection MLP maps the embeddings to 128-d and the
      NT-Xent loss at ``temperature`` makes the two views of a tile the most similar pair of the batch. Negatives
      are the other tiles of the batch on the same device.
    - ``"autoencoder"`` (HistoSPACE style): a decoder of upsampling convolutions rebuilds the tile (under a
      random symmetry of the square) from the encoder's vector; mean squared error.

    Both use AdamW (``lr``, ``weight_decay``). Only the encoder is saved (not the projection head or the
    decoder), so that ``hs.tl.embed(sdata, encoder=encoder, weights=path, patch_size_um=patch_size_um,
    patch_px=patch_px)`` uses it. Pretrain on the training sections only (``train=`` or ``image_key=``) when the
    embeddings will be evaluated on the others.

    ``random_state`` fixes the tiles, the initial weights, the batches and the augmentations, so a run is
    reproducible on a given device; the global random state of numpy and torch is left as it was (torch's is
    forked for the run).

    Parameters
    ----------
    sdata
        A SpatialData with H&E images (each may hold several sections), or a list of them.
    path
        File to write the encoder's weights to: a state dict saved with :func:`torch.save` (read back with
        ``torch.load(path, weights_only=True)``), or a safetensors file when the suffix is ``.safetensors``. Its
        folder must exist; the file is replaced atomically.
    method
        ``"simclr"`` or ``"autoencoder"``.
    encoder
        ``"small_cnn"`` (128-d) or ``"resnet18"`` (512-d): the architecture that :func:`histoseq.tl.embed` builds
        under that name, initialised as it does with ``random_state``.
    patch_size_um
        Side of a tile in µm (use the same in :func:`~histoseq.tl.embed`).
    patch_px
        Side of a tile in pixels: at least 16 for ``"small_cnn"`` and 32 for ``"resnet18"``.
    image_key
        Image(s) to draw tiles from. Default: every section image of each SpatialData (one per section: of
        images covering the same place of a coordinate system, such as Visium's hires and lowres, the finest).
    train
        Sections to draw tiles from, as values of ``table.obs[groups]`` (e.g. sample ids): the images of the
        spots of those sections. Exclusive with ``image_key``.
    groups
        Column of the table's obs that ``train`` refers to.
    table_key
        Table that ``train`` looks up.
    n_tiles
        Number of tiles (drawn with replacement of grid cells only when the tissue has fewer cells).
    tissue
        Draw from detected tissue only; ``False`` uses the whole images.
    min_tissue_fraction
        Fraction of tissue a grid cell's tile must hold.
    stain_norm
        Map the tiles of each image onto the reference stain, as :func:`histoseq.tl.embed` does with the
        patches it gives the encoder (``"colour"``, ``"amount"`` or ``False``, as there).
    max_epochs
        Passes over the tiles.
    batch_size
        Tiles per batch (at most ``n_tiles``); larger batches give SimCLR more negatives. The last incomplete
        batch of an epoch is dropped.
    lr
        Learning rate of AdamW.
    weight_decay
        Decoupled weight decay of AdamW.
    temperature
        Temperature of the NT-Xent loss (SimCLR).
    augment
        The views of SimCLR; default ``Augment()``.
    accelerator, devices, strategy
        Passed to :class:`lightning.pytorch.Trainer` (e.g. ``devices=4, strategy="ddp"`` trains on four GPUs).
    trainer_kwargs
        Further arguments of the trainer (e.g. ``precision="bf16-mixed"``).
    random_state
        Seed of everything random; ``None``: a fresh seed.
    progress
        Show progress bars (reading tiles, training); ``False`` also silences Lightning's log lines.

    Returns
    -------
    A :class:`PretrainResult` (path-like: it can be given as ``weights=``) with the ``path`` written, the mean loss
    of every epoch (``history``), the tile positions (``tiles``) and the ``params``. Writes ``path`` (the encoder's
    state dict, with exactly the keys that ``get_encoder(encoder)`` loads; a safetensors file also carries the
    metadata under the ``"histoseq"`` key of its header) and ``path + ".json"`` (the metadata: parameters,
    history, tiles per image). Nothing is written to ``sdata``.

    Examples
    --------
    >>> import tempfile
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1, section_size_um=600, random_state=0, progress=False)
    >>> path = tempfile.mkdtemp() + "/encoder.pt"
    >>> res = hs.tl.pretrain_encoder(
    ...     sdata, path, method="autoencoder", patch_size_um=56, patch_px=32, n_tiles=64, max_epochs=1,
    ...     batch_size=32, accelerator="cpu", progress=False,
    ... )
    >>> len(res.history)
    1
    >>> hs.tl.embed(sdata, encoder="small_cnn", weights=res, patch_size_um=56, patch_px=32, progress=False)
    >>> sdata.tables["table"].obsm["X_small_cnn"].shape[1]
    128

    """
    from ._embed import get_encoder

    # ---- validate everything before any work
    if method not in METHODS:
        raise ValueError(f"Unknown `method` {method!r}; choose one of {list(METHODS)}.")
    if encoder not in MIN_PATCH_PX:
        raise ValueError(
            f"`encoder={encoder!r}` cannot be pretrained; choose one of {list(MIN_PATCH_PX)} (the networks that "
            "`hs.tl.embed(encoder=...)` builds and loads with `weights=`)."
        )
    if not (isinstance(patch_size_um, int | float) and np.isfinite(patch_size_um) and patch_size_um > 0):
        raise ValueError(f"`patch_size_um` must be a positive size in µm, got {patch_size_um!r}.")
    patch_px = _positive_int("patch_px", patch_px, 1)
    if patch_px < MIN_PATCH_PX[encoder]:
        raise ValueError(
            f"`patch_px={patch_px}` is too small for {encoder!r}, whose strided stages need at least "
            f"{MIN_PATCH_PX[encoder]} px: pass `patch_px={MIN_PATCH_PX[encoder]}` or more."
        )
    n_tiles = _positive_int("n_tiles", n_tiles, 4)
    max_epochs = _positive_int("max_epochs", max_epochs, 1)
    batch_size = _positive_int("batch_size", batch_size, 2)
    for name, value, low_ok in (
        ("lr", lr, False),
        ("weight_decay", weight_decay, True),
        ("temperature", temperature, False),
    ):
        if not (isinstance(value, int | float) and np.isfinite(value) and (value >= 0 if low_ok else value > 0)):
            raise ValueError(f"`{name}` must be a {'non-negative' if low_ok else 'positive'} number, got {value!r}.")
    stain_norm_mode(stain_norm)  # checked before any work
    if not 0 <= min_tissue_fraction <= 1:
        raise ValueError(f"`min_tissue_fraction` must lie in [0, 1], got {min_tissue_fraction!r}.")
    if augment is not None and not isinstance(augment, Augment):
        raise TypeError(f"`augment` must be a histoseq.models._augment.Augment, got {type(augment).__name__}.")
    out_path, fmt = _check_path(path)
    datasets = list(sdata) if isinstance(sdata, list | tuple) else [sdata]
    if not datasets:
        raise ValueError("`sdata` is an empty list; give at least one SpatialData.")
    images = _select_images(datasets, image_key, train, groups, table_key)

    seed = training_seed(random_state)
    rng = np.random.default_rng(seed)
    logger.info(
        "Pretraining %r (%s) on %d tiles of %g µm at %d px from %d image(s).",
        encoder,
        method,
        n_tiles,
        patch_size_um,
        patch_px,
        len(images),
    )
    # squidpy's tissue detection logs through spatialdata's logger; lightning logs devices and the like
    quiet = (
        []
        if progress
        else ["spatialdata", "spatialdata._logging", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"]
    )
    with quiet_loggers(quiet):
        tiles, tile_table = sample_tiles(
            datasets,
            images,
            n_tiles=n_tiles,
            patch_size_um=float(patch_size_um),
            patch_px=patch_px,
            tissue=tissue,
            min_tissue_fraction=min_tissue_fraction,
            stain_norm=stain_norm,
            rng=rng,
            progress=progress,
        )

    # ---- train
    from torch.utils.data import TensorDataset

    batch = min(batch_size, n_tiles)
    built: dict[str, nn.Module] = {}

    def build() -> PretrainPlan:
        _, net, _ = get_encoder(encoder, random_state=seed)
        net.train()
        built["encoder"] = net
        head = SimCLRProjection(int(net.out_dim)) if method == "simclr" else TileDecoder(int(net.out_dim), patch_px)
        return PretrainPlan(
            net,
            head,
            method=method,
            augment=augment or Augment(),
            lr=lr,
            weight_decay=weight_decay,
            temperature=temperature,
            seed=seed,
        )

    plan = train_plan(
        build,
        TensorDataset(torch.from_numpy(tiles)),
        None,
        seed=seed,
        batch_size=batch,
        drop_last=True,
        progress=progress,
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        trainer_kwargs=trainer_kwargs,
    )
    net = built["encoder"]
    if not plan.history or not np.isfinite(plan.history).all():
        raise RuntimeError(f"Pretraining diverged (epoch losses {plan.history}); lower `lr` or raise `temperature`.")

    # ---- save the encoder only
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    per_image = tile_table.groupby(["dataset", "image_key"]).size()
    params: dict[str, Any] = {
        "method": method,
        "encoder": encoder,
        "patch_size_um": float(patch_size_um),
        "patch_px": patch_px,
        "um_per_px": float(patch_size_um) / patch_px,
        "n_tiles": n_tiles,
        "tiles_per_image": {f"{d}:{k}" if len(datasets) > 1 else k: int(n) for (d, k), n in per_image.items()},
        "tissue": bool(tissue),
        "min_tissue_fraction": float(min_tissue_fraction),
        "stain_norm": stain_norm_mode(stain_norm) or False,
        "max_epochs": max_epochs,
        "epochs_run": len(plan.history),
        "batch_size": batch,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "random_state": seed,
        "history": [float(v) for v in plan.history],
        "format": fmt,
    }
    if method == "simclr":
        params["temperature"] = float(temperature)
        params["augment"] = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(plan.augment).items()}
    if plan.trainer.is_global_zero:  # with several processes (DDP), one writes
        _write(state, out_path, fmt, params)
    logger.info(
        "Pretrained %r (%s, final loss %.4g); wrote %s and its metadata %s.",
        encoder,
        method,
        plan.history[-1],
        out_path,
        out_path.name + ".json",
    )
    return PretrainResult(out_path, list(params["history"]), tile_table, params)

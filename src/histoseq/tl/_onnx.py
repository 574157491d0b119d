"""ONNX Runtime backend for histoseq's built-in networks: :class:`OnnxRunner` and the choice of backend.

Eager torch runs a small convolutional network on two CPU cores far below what the cores can do: every layer is
dispatched from Python and the depthwise convolutions of EfficientNet-Lite are slow in eager mode. The same
network exported to ONNX and run by ONNX Runtime (fused convolutions and activations, one graph) embeds several
times faster (issue 18; see ``benchmarks/embed.py``). :func:`histoseq.tl.embed` therefore runs histoseq's *own*
networks (``small_cnn``, ``resnet18``, ``efficientnet_lite*``, ``timm:*``) through ONNX Runtime on a CPU when it
is installed (``pip install "histoseq[onnx]"``), and through torch otherwise: on a GPU, for a module or callable
the user passes (their code, their device and mode are theirs), or when asked with ``HISTOSEQ_BACKEND=torch``.

Each network is exported once, on first use, into a cache folder (``$HISTOSEQ_CACHE_DIR/onnx``, by default
``~/.cache/histoseq/onnx``), under a name keyed by a SHA-256 of the network's name and class, every parameter and
buffer (names, shapes, dtypes and bytes), the input size, the exporter and the torch version: other weights never
share a file. The graph takes the ``(n, h, w, 3)`` uint8 patches themselves, with a dynamic batch size, and
converts them as :class:`~histoseq.tl._embed.TorchRunner` does. Before a file is used, cached or fresh, its output
on a fixed batch is compared with the torch network in float32; a file that cannot be read or does not agree is
exported again, and when export or verification fails the runner falls back to torch (logged at INFO): the
backend only ever changes speed, never whether embedding works.

This module does not import :mod:`histoseq.tl._embed` (that module imports this one): the torch runner is
passed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Environment variable choosing the backend of built-in networks: ``"auto"`` (default), ``"onnx"`` or ``"torch"``.
BACKEND_ENV = "HISTOSEQ_BACKEND"
#: Environment variable naming histoseq's cache folder (exported networks go to its ``onnx/`` folder).
CACHE_ENV = "HISTOSEQ_CACHE_DIR"
BACKENDS = ("auto", "onnx", "torch")

_GRAPH_FORMAT = "uint8-nhwc-v1"  # the exported graph's input contract; part of the cache key
_EXPORT_BATCH = 2  # example batch of the export (the batch axis is dynamic)
_VERIFY_BATCH = 3  # another size, so that verification also checks the dynamic batch axis
_TOLERANCE = 1e-4  # max |onnx - torch| relative to max |torch| on the verification batch
_INPUT, _OUTPUT = "images", "features"
_CACHE_BYTES = 2 << 30  # the cache keeps the most recently used exports up to 2 GiB

#: Verified sessions of this process, by (file, threads): a file is checked once per process, not at every call
#: (the check runs the torch network, ~1 s for EfficientNet-Lite0 at 224 px on two cores). The file name holds
#: the digest of the weights, so a session is only reused for the same weights.
_VERIFIED: OrderedDict[tuple[str, int], Any] = OrderedDict()
_MAX_VERIFIED = 4


def forget_sessions() -> None:
    """Drop the verified ONNX Runtime sessions kept by this process (the next use loads and checks the file)."""
    _VERIFIED.clear()


def cache_dir() -> Path:
    """Folder of the exported networks: ``$HISTOSEQ_CACHE_DIR/onnx``, by default ``~/.cache/histoseq/onnx``."""
    root = os.environ.get(CACHE_ENV) or "~/.cache/histoseq"
    return Path(root).expanduser() / "onnx"


#: Networks that ``"auto"`` runs through ONNX Runtime: those it measured faster end to end on 2 CPU cores
#: (``benchmarks/embed.py``: EfficientNet 1.6–2.9×, 2.1× with the overlapped cutting; ResNet-18 0.7–1.1× and the
#: small CNN 1.0–1.2× stay in torch, where they also skip the one-off export). ``HISTOSEQ_BACKEND=onnx`` runs every
#: built-in network through it.
AUTO_ONNX = ("efficientnet",)


def backend_setting(backend: str | None = None) -> str:
    """The requested backend: ``backend``, else ``$HISTOSEQ_BACKEND``, else ``"auto"``; validated."""
    value = backend if backend is not None else os.environ.get(BACKEND_ENV, "")
    value = (value or "auto").strip().lower()
    if value not in BACKENDS:
        source = "`backend`" if backend is not None else f"${BACKEND_ENV}"
        raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {value!r}.")
    return value


def onnx_available() -> bool:
    """Whether ONNX Runtime and onnx can be imported (the extra ``histoseq[onnx]``)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _device_type(device: Any) -> str:
    return str(getattr(device, "type", None) or str(device).split(":")[0])


def choose_backend(*, builtin: bool, device: Any = "cpu", backend: str | None = None) -> str:
    """``"onnx"`` or ``"torch"``: the backend that runs a network.

    ONNX Runtime runs built-in networks on the CPU when it is installed, unless ``backend`` (or
    ``$HISTOSEQ_BACKEND``) says ``"torch"``. It is never used on another device (a GPU) nor for a module or
    callable the user supplies (``builtin=False``), even when asked for (that request is logged and ignored).

    Parameters
    ----------
    builtin
        Whether histoseq built the network (a name given to :func:`~histoseq.tl.embed`).
    device
        The torch device the network would run on.
    backend
        ``"auto"``, ``"onnx"`` or ``"torch"``; ``None``: ``$HISTOSEQ_BACKEND`` (default ``"auto"``).

    Examples
    --------
    >>> from histoseq.tl._onnx import choose_backend
    >>> choose_backend(builtin=True, device="cuda")
    'torch'

    """
    setting = backend_setting(backend)
    if setting == "torch":
        return "torch"
    if not builtin:
        reason = "the encoder is a user-supplied module or callable"
    elif _device_type(device) != "cpu":
        reason = f"device {str(device)!r} is not the CPU"
    elif not onnx_available():
        reason = 'onnxruntime is not installed (`pip install "histoseq[onnx]"`)'
    else:
        return "onnx"
    if setting == "onnx":
        logger.info("Backend 'onnx' was requested but %s: running through torch.", reason)
    return "torch"


def onnx_or_torch(runner: Any, name: str, *, backend: str | None = None) -> Any:
    """The runner :func:`~histoseq.tl.embed` uses: an :class:`OnnxRunner` around ``runner`` or ``runner`` itself.

    Parameters
    ----------
    runner
        A :class:`~histoseq.tl._embed.TorchRunner` (or ``None``, returned as is: not a network).
    name
        The network's name (part of the cache key), e.g. ``"efficientnet_lite0"``.
    backend
        See :func:`choose_backend`.

    """
    if runner is None:
        return None
    builtin = bool(getattr(runner, "builtin", False) and getattr(runner, "is_module", False))
    if backend_setting(backend) == "auto" and not any(str(name).startswith(n) for n in AUTO_ONNX):
        return runner  # measured no faster through ONNX Runtime (benchmarks/embed.py): torch
    if choose_backend(builtin=builtin, device=runner.device, backend=backend) == "onnx":
        return OnnxRunner(runner, name)
    return runner


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


def _exporter() -> str:
    """``"dynamo"`` (torch.export; needs onnxscript) when available, else the TorchScript exporter.

    The torch.export graph is clean (static padding folded into the convolutions) and runs about twice as fast in
    ONNX Runtime as the TorchScript exporter's, which keeps shape arithmetic for TensorFlow-style padding.
    """
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


def model_digest(model: Any, name: str, size: tuple[int, int], exporter: str | None = None) -> str:
    """SHA-256 hex digest identifying an export of ``model`` at input ``size``: the cache key.

    It covers the name and class of the network, every parameter and buffer (names, dtypes, shapes and bytes,
    non-persistent buffers such as normalisation constants included), the input size, the graph format, the
    exporter and the torch version.
    """
    import torch

    h = hashlib.sha256()
    cls = type(model)
    exporter = exporter or _exporter()
    head = (
        f"{name}|{cls.__module__}.{cls.__qualname__}|{size[0]}x{size[1]}|{_GRAPH_FORMAT}|{exporter}|{torch.__version__}"
    )
    h.update(head.encode())
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for key, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _uint8_wrapper(model: Any) -> Any:
    """``model`` taking ``(n, h, w, 3)`` uint8 patches, converted as :class:`~histoseq.tl._embed.TorchRunner` does."""
    from torch import nn

    class Uint8Input(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            y = self.net(x.permute(0, 3, 1, 2).float() / 255.0)
            return y.reshape(y.shape[0], -1)

    return Uint8Input(model)


def export_onnx(model: Any, path: str | Path, size: tuple[int, int], *, exporter: str | None = None) -> Path:
    """Export ``model`` to ``path`` as an ONNX graph on ``(batch, h, w, 3)`` uint8 patches (dynamic batch).

    The file is written to a temporary name and renamed, so a reader never sees half a file. The network runs in
    eval mode during the export and gets its mode back after.

    Parameters
    ----------
    model
        A :class:`torch.nn.Module` mapping ``(B, 3, H, W)`` floats in [0, 1] to ``(B, D)``.
    path
        Where to write.
    size
        ``(h, w)`` of the patches.
    exporter
        ``"dynamo"`` (torch.export, needs onnxscript) or ``"torchscript"``; by default the dynamo exporter when
        onnxscript is installed, and the TorchScript exporter when not, or when the dynamo exporter fails.

    """
    if exporter is None and _exporter() == "dynamo":
        try:
            return export_onnx(model, path, size, exporter="dynamo")
        except Exception as err:
            logger.info("The torch.export-based ONNX exporter failed (%s); trying the TorchScript exporter.", err)
        exporter = "torchscript"
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    exporter = exporter or _exporter()
    wrapped = _uint8_wrapper(model).eval()
    example = torch.zeros((_EXPORT_BATCH, size[0], size[1], 3), dtype=torch.uint8)
    training = model.training
    # the exporters log every pass at INFO and "torchvision is not installed" as a warning, at every export
    quiet = [logging.getLogger(key) for key in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    try:
        model.eval()
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings of the exporters
            if exporter == "dynamo":
                program = torch.onnx.export(
                    wrapped,
                    (example,),
                    dynamo=True,
                    input_names=[_INPUT],
                    output_names=[_OUTPUT],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    optimize=True,
                    verbose=False,
                )
                program.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(
                    wrapped,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=[_INPUT],
                    output_names=[_OUTPUT],
                    dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
                    opset_version=17,
                )
        os.replace(tmp, path)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        model.train(training)
        tmp.unlink(missing_ok=True)
    return path


def prune_cache(folder: str | Path, max_bytes: int = _CACHE_BYTES, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used exports of ``folder`` beyond ``max_bytes``, and temporary files a day old.

    Every distinct set of weights (each pretraining run) gets its own file, so the folder would grow without
    bound. Files are ranked by last use (access time, set on every use; the modification time is the export's).
    ``keep`` is never deleted. Returns the deleted files.
    """
    import time

    folder = Path(folder)
    deleted: list[Path] = []
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        if now - tmp.stat().st_mtime > 86_400:
            tmp.unlink(missing_ok=True)
            deleted.append(tmp)
    files = sorted(folder.glob("*.onnx"), key=lambda f: f.stat().st_atime, reverse=True)
    total = 0
    for f in files:
        total += f.stat().st_size
        if total > max_bytes and f != keep:
            f.unlink(missing_ok=True)
            deleted.append(f)
    return deleted


def _touch(path: Path) -> None:
    """Mark ``path`` as used now (its access time), keeping its modification time (the export's)."""
    import time

    with contextlib.suppress(OSError):  # a read-only cache: nothing to record
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def _session(path: Path, n_threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(n_threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no busy-waiting between batches: patches are cut and stain-normalised on the same cores meanwhile
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _verification_batch(size: tuple[int, int]) -> np.ndarray:
    """A fixed batch of patches: smooth colour gradients with noise, like tissue more than white noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]), indexing="ij")
    base = np.stack([yy, xx, 1 - yy * xx], axis=-1)
    out = [base * rng.uniform(60, 230, 3) + rng.normal(0, 25, base.shape) for _ in range(_VERIFY_BATCH)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------------


class OnnxRunner:
    """Runs a built-in network through ONNX Runtime; same interface as :class:`~histoseq.tl._embed.TorchRunner`.

    ``with runner:`` then ``runner(images)``: ``(n, h, w, 3)`` uint8 patches → ``(n, D)`` float32. On the first
    batch of each patch size the network is exported (or its cached export found, see the module docstring),
    loaded into an ONNX Runtime session with ``n_threads`` threads and checked against the torch network in
    float32 on a fixed batch; when any of this fails, that patch size runs through the torch runner instead and
    :attr:`backend` says ``"torch"``.

    Parameters
    ----------
    runner
        The :class:`~histoseq.tl._embed.TorchRunner` of the network, on the CPU: the source of the export, the
        reference of the check and the fallback.
    name
        The network's name (part of the cache key and of the file name).
    cache
        Folder of the exported files; default :func:`cache_dir`.
    n_threads
        ONNX Runtime's intra-op threads; default :func:`torch.get_num_threads`.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from histoseq.tl._embed import TorchRunner, get_encoder
    >>> from histoseq.tl._onnx import OnnxRunner
    >>> _, net, _ = get_encoder("small_cnn")
    >>> with OnnxRunner(TorchRunner(net, builtin=True), "small_cnn", cache=tempfile.mkdtemp()) as run:
    ...     feats = run(np.zeros((4, 32, 32, 3), np.uint8))
    >>> feats.shape, run.backend, run.precision
    ((4, 128), 'onnxruntime', 'float32')

    """

    def __init__(self, runner: Any, name: str, *, cache: str | Path | None = None, n_threads: int | None = None):
        import torch

        if _device_type(runner.device) != "cpu":
            raise ValueError(f"OnnxRunner runs on the CPU; this network is on {str(runner.device)!r}.")
        if not isinstance(runner.model, torch.nn.Module):
            raise TypeError(f"OnnxRunner needs a torch.nn.Module, got {type(runner.model).__name__}.")
        self.torch_runner = runner
        self.model = runner.model
        self.name = name
        self.cache = Path(cache).expanduser() if cache is not None else cache_dir()
        self.n_threads = int(n_threads) if n_threads is not None else torch.get_num_threads()
        self.paths: dict[tuple[int, int], Path] = {}
        self._sessions: dict[tuple[int, int], Any] = {}  # None: that size runs through torch
        self._fell_back = False

    @property
    def backend(self) -> str:
        """``"onnxruntime"``, or ``"torch"`` once a patch size fell back to the torch runner."""
        return "torch" if self._fell_back else "onnxruntime"

    @property
    def precision(self) -> str:
        """``"float32"`` (ONNX Runtime), or the torch runner's precision after a fallback."""
        return self.torch_runner.precision if self._fell_back else "float32"

    def __enter__(self) -> OnnxRunner:
        self.torch_runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.torch_runner.__exit__(*exc)

    def file_for(self, size: tuple[int, int]) -> Path:
        """The cache file of this network at input ``size`` (``(h, w)``)."""
        if size not in self.paths:
            digest = model_digest(self.model, self.name, size)
            safe = re.sub(r"[^0-9a-zA-Z_]+", "_", self.name).strip("_").lower() or "network"
            self.paths[size] = self.cache / f"{safe}-{size[0]}x{size[1]}-{digest[:24]}.onnx"
        return self.paths[size]

    def _reference(self, images: np.ndarray) -> np.ndarray:
        """The torch network's float32 output (no autocast) on ``images``."""
        import torch

        with torch.inference_mode():
            y = _uint8_wrapper(self.model)(torch.from_numpy(images))
        return y.float().numpy()

    def _check(self, session: Any, images: np.ndarray, ref: np.ndarray) -> None:
        out = session.run(None, {_INPUT: images})[0]
        if out.shape != ref.shape:
            raise ValueError(f"the ONNX graph returns shape {out.shape}, torch {ref.shape}")
        scale = max(float(np.abs(ref).max()), 1e-12)
        diff = float(np.abs(out.astype(np.float64) - ref).max()) if out.size else 0.0
        if not np.isfinite(diff) or diff > _TOLERANCE * scale:
            raise ValueError(f"the ONNX output differs from torch by {diff:.3g} (output scale {scale:.3g})")

    def session_for(self, size: tuple[int, int]) -> Any:
        """The verified ONNX Runtime session for patches of ``size``, exporting it if needed; ``None``: use torch."""
        if size in self._sessions:
            return self._sessions[size]
        session = None
        try:
            path = self.file_for(size)
            key = (str(path), self.n_threads)
            if key in _VERIFIED:
                _VERIFIED.move_to_end(key)
                self._sessions[size] = _VERIFIED[key]
                return _VERIFIED[key]
            images = _verification_batch(size)
            ref = self._reference(images)
            for attempt in range(2):
                fresh = attempt > 0 or not path.is_file()
                try:
                    if fresh:
                        logger.info("Exporting %r at %d × %d px to ONNX (once): %s", self.name, *size, path)
                        export_onnx(self.model, path, size)
                    session = _session(path, self.n_threads)
                    self._check(session, images, ref)
                    _touch(path)
                    if fresh:
                        with contextlib.suppress(OSError):  # another process pruning at the same time
                            prune_cache(path.parent, keep=path)
                    break
                except Exception as err:
                    session = None
                    if fresh:
                        raise
                    logger.info("The cached ONNX file %s is unusable (%s); exporting it again.", path, err)
                    path.unlink(missing_ok=True)
        except Exception as err:  # export or verification failed: torch still embeds
            logger.info(
                "ONNX Runtime is not used for %r (%s: %s); running through torch.", self.name, type(err).__name__, err
            )
            session = None
        if session is None:
            self._fell_back = True
        else:
            _VERIFIED[key] = session
            while len(_VERIFIED) > _MAX_VERIFIED:
                _VERIFIED.popitem(last=False)
        self._sessions[size] = session
        return session

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``(n, h, w, 3)`` uint8 → ``(n, D)`` float32."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] < 3 or len(images) == 0:
            return self.torch_runner(images)  # not what the graph takes; torch explains errors
        session = self.session_for((int(images.shape[1]), int(images.shape[2])))
        if session is None:
            return self.torch_runner(images)
        y = session.run(None, {_INPUT: np.ascontiguousarray(images[..., :3])})[0]
        return np.asarray(y, dtype=np.float32)

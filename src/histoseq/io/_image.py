"""Lazy reading of H&E image files into multiscale SpatialData images."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".svs"}


class _LazyPILImage:
    """A PIL-readable file (JPEG, PNG) as a ``(c, y, x)`` array that decodes on first access.

    JPEG and PNG have no random access: the first chunk read decodes the file once and keeps the pixels;
    later chunks are views. Nothing is decoded while the SpatialData is only built or inspected.
    For slides that do not fit in memory, convert to a tiled TIFF or write the SpatialData to zarr.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int]):
        self.path = path
        self.shape = shape
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _decode(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                from PIL import Image

                with _unlimited_pil(), Image.open(self.path) as im:
                    arr = np.asarray(im.convert("RGB") if self.shape[0] == 3 else im)
                self._pixels = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
            return self._pixels

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._decode()[key]


class _unlimited_pil:
    """Lift PIL's decompression-bomb guard for the files the user named (whole-slide images are large)."""

    def __enter__(self):
        from PIL import Image

        self._old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self._old


def _probe_pil(path: Path) -> tuple[tuple[int, int, int], str, str]:
    from PIL import Image

    with _unlimited_pil(), Image.open(path) as im:
        mode = im.mode
        w, h = im.size
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "P", "LAB", "HSV"):
        return (3, h, w), "uint8", mode
    if mode in ("L", "1", "LA"):
        return (1, h, w), "uint8", mode
    return (1, h, w), {"I;16": "uint16", "I;16B": "uint16", "I": "int32", "F": "float32"}.get(mode, mode), mode


def read_image_lazy(path: str | Path, *, chunks: int = 1024):
    """An image file as a lazily read ``(c, y, x)`` dask array.

    TIFF files (tiled or not, including pyramidal whole-slide TIFFs) are read chunk by chunk through
    :mod:`tifffile`'s zarr interface; JPEG and PNG are decoded on first access (see :class:`_LazyPILImage`).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> import histoseq as hs
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "he.png"
    >>> Image.fromarray(np.full((300, 400, 3), 230, dtype=np.uint8)).save(path)
    >>> image = hs.io.read_image_lazy(path, chunks=256)  # nothing is decoded yet
    >>> image.shape, image.dtype.name, image.chunksize
    ((3, 300, 400), 'uint8', (3, 256, 256))

    """
    import dask.array as da

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {str(path)!r}. Check the path to the H&E image.")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile
        import zarr

        store = tifffile.imread(path, aszarr=True, level=0)
        z = zarr.open(store, mode="r")
        arr = da.from_zarr(z)
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
            arr = arr.transpose(2, 0, 1)
        elif arr.ndim != 3:
            raise ValueError(f"Image {str(path)!r} has shape {arr.shape}; expected (y, x), (y, x, c) or (c, y, x).")
        return arr.rechunk((arr.shape[0], chunks, chunks))
    shape, dtype, mode = _probe_pil(path)
    if dtype != "uint8":
        raise TypeError(
            f"Image {str(path)!r} is {dtype} (PIL mode {mode!r}); histoseq reads 8-bit images. Convert it to 8-bit "
            "RGB (e.g. `skimage.exposure.rescale_intensity(img, out_range=np.uint8)`) and save it again."
        )
    lazy = _LazyPILImage(path, shape)
    return da.from_array(lazy, chunks=(shape[0], chunks, chunks), meta=np.empty((0, 0, 0), dtype=np.uint8))


def parse_image(
    data: Any,
    *,
    transformations: Mapping[str, Any],
    chunks: int = 1024,
    scale_factors: Sequence[int] | None = None,
    rgb: bool = True,
    name: str = "image",
):
    """Validate an image array (``(c, y, x)``, uint8, RGB) and parse it into a multiscale image element.

    ``scale_factors=None`` chooses halvings until the coarsest level is below 2,048 px.
    """
    from spatialdata.models import Image2DModel

    c, h, w = data.shape
    if np.dtype(data.dtype) != np.uint8:
        raise TypeError(
            f"Image {name!r} has dtype {data.dtype}; histoseq reads 8-bit images. Rescale it to uint8 first, e.g. "
            "`skimage.exposure.rescale_intensity(img, out_range=np.uint8)`."
        )
    if rgb and c not in (3, 4):
        raise ValueError(
            f"Image {name!r} has {c} channel(s): it is grayscale (a nuclei stain?) but an RGB H&E image was "
            "expected. Pass `rgb=False` to keep it single-channel, or give the RGB scan."
        )
    if rgb and c == 4:
        data = data[:3]
        c = 3
    if scale_factors is None:
        scale_factors = []
        size = max(h, w)
        while size > 2048:
            scale_factors.append(2)
            size //= 2
    c_coords = ["r", "g", "b"] if rgb else [f"c{i}" for i in range(c)]
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=c_coords,
        scale_factors=list(scale_factors) or None,
        chunks=(c, chunks, chunks),
        transformations=dict(transformations),
    )

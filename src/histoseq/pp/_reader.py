"""The array layer of patch cutting: windows from a chunked image, each chunk decoded once.

Nothing here knows SpatialData. :func:`cut_windows` takes one pyramid level (a ``(c, y, x)`` dask or
numpy array), window centres and a window size in that level's pixels, and yields resampled patches
in the order that reads the image chunk row by chunk row. Only the chunks some window touches are
decoded, each exactly once, and only about ``1 + window / chunk`` chunk rows are held at a time, so the
memory stays bounded by the image width, never by its area.

This is where histoseq departs from :class:`spatialdata.dataloader.ImageTilesDataset`, which runs a
bounding-box query (a new dask graph, re-reading the chunks) for every single tile.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Windows:
    """Square windows on one image level, in that level's intrinsic pixel coordinates.

    ``centers`` are ``(x, y)``; a window spans ``[cx - size_x / 2, cx + size_x / 2)`` along x (likewise
    along y). Pixel ``i`` covers ``[i, i + 1)``, as in spatialdata.
    """

    centers: np.ndarray
    size_x: float
    size_y: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Float bounds ``x0, x1, y0, y1`` of every window."""
        cx, cy = self.centers[:, 0], self.centers[:, 1]
        return cx - self.size_x / 2, cx + self.size_x / 2, cy - self.size_y / 2, cy + self.size_y / 2


class ChunkedLevel:
    """A ``(c, y, x)`` level read chunk by chunk, with the decoded chunks kept in a small cache."""

    def __init__(self, data, channels: slice | None = None):
        import dask.array as da

        if channels is not None:
            data = data[channels]
        self.n_channels, self.height, self.width = (int(s) for s in data.shape)
        if isinstance(data, da.Array):
            if len(data.chunks[0]) > 1:  # channel-chunked (e.g. some OME-Zarr): one block per (y, x) chunk
                data = data.rechunk({0: -1})
            self.ybounds = np.cumsum((0, *data.chunks[1]))
            self.xbounds = np.cumsum((0, *data.chunks[2]))
        else:
            data = np.asarray(data)
            self.ybounds = np.array([0, self.height])
            self.xbounds = np.array([0, self.width])
        self.data = data
        self._ybounds, self._xbounds = [int(v) for v in self.ybounds], [int(v) for v in self.xbounds]
        self.cache: dict[tuple[int, int], np.ndarray] = {}
        self.decoded = 0  # number of chunk reads, for tests and benchmarks

    def chunk_of(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk row and column that contain the pixel ``(y, x)`` (clipped into the image)."""
        r = np.searchsorted(self.ybounds, np.clip(y, 0, self.height - 1), side="right") - 1
        c = np.searchsorted(self.xbounds, np.clip(x, 0, self.width - 1), side="right") - 1
        return r, c

    def load(self, keys: set[tuple[int, int]]) -> None:
        """Decode the listed chunks that are not cached yet, in parallel when the data is dask."""
        import dask

        missing = sorted(k for k in keys if k not in self.cache)
        if not missing:
            return
        if isinstance(self.data, np.ndarray):
            blocks = [self.data]
        else:
            blocks = dask.compute(*(self.data.blocks[0, r, c] for r, c in missing))
        for key, block in zip(missing, blocks):
            self.cache[key] = _channels_last(np.asarray(block))
        self.decoded += len(missing)

    def evict_rows_before(self, row: int) -> None:
        """Forget chunks above chunk row ``row``."""
        for key in [k for k in self.cache if k[0] < row]:
            del self.cache[key]

    def window(self, y0: int, y1: int, x0: int, x1: int, pad_value: int) -> np.ndarray:
        """Pixels ``[y0, y1) × [x0, x1)`` as ``(h, w, c)``; outside the image filled with ``pad_value``."""
        cy0, cy1 = max(y0, 0), min(y1, self.height)
        cx0, cx1 = max(x0, 0), min(x1, self.width)
        inside = (cy0, cy1, cx0, cx1) == (y0, y1, x0, x1)  # the chunks cover every pixel: nothing to pad
        shape = (y1 - y0, x1 - x0, self.n_channels)
        out = np.empty(shape, dtype=np.uint8) if inside else np.full(shape, pad_value, dtype=np.uint8)
        if cy0 >= cy1 or cx0 >= cx1:
            return out
        ybounds, xbounds = self._ybounds, self._xbounds  # Python ints: bisect, not numpy on scalars
        r0, r1 = bisect_right(ybounds, cy0) - 1, bisect_right(ybounds, cy1 - 1) - 1
        c0, c1 = bisect_right(xbounds, cx0) - 1, bisect_right(xbounds, cx1 - 1) - 1
        for r in range(r0, r1 + 1):
            by0, by1 = ybounds[r], ybounds[r + 1]
            sy0, sy1 = max(cy0, by0), min(cy1, by1)
            for c in range(c0, c1 + 1):
                bx0, bx1 = xbounds[c], xbounds[c + 1]
                sx0, sx1 = max(cx0, bx0), min(cx1, bx1)
                block = self.cache[(r, c)]
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = block[sy0 - by0 : sy1 - by0, sx0 - bx0 : sx1 - bx0]
        return out


def _channels_last(block: np.ndarray) -> np.ndarray:
    """A ``(c, h, w)`` block as a C-contiguous ``(h, w, c)`` array.

    One strided copy per channel: 3× faster than ``np.ascontiguousarray(np.moveaxis(block, 0, -1))``, whose loop
    runs over the 3 channels innermost.
    """
    out = np.empty((*block.shape[1:], block.shape[0]), dtype=block.dtype)
    for i in range(block.shape[0]):
        out[:, :, i] = block[i]
    return out


def resample(window: np.ndarray, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
    """Resample the sub-pixel ``box`` (x0, y0, x1, y1) of a ``(h, w, c)`` window to ``out_px`` pixels.

    Bilinear with a support that widens with the reduction factor (PIL's antialiased resize), so that
    downsampling does not alias, and with exact sub-pixel placement of the box.
    """
    if window.shape[2] in (1, 3):
        arr = window[:, :, 0] if window.shape[2] == 1 else window
        res = Image.fromarray(arr).resize((out_px, out_px), Image.Resampling.BILINEAR, box=box)
        res = np.asarray(res)
        return res[:, :, None] if res.ndim == 2 else res
    return np.stack([resample(window[:, :, [i]], box, out_px)[:, :, 0] for i in range(window.shape[2])], axis=-1)


def cut_windows(
    level: ChunkedLevel,
    windows: Windows,
    out_px: int,
    *,
    pad_value: int = 255,
    batch_size: int = 256,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(positions, patches)`` batches, patches ``(n, out_px, out_px, c)`` uint8, in reading order.

    ``positions`` index into ``windows.centers``. Windows are visited chunk row by chunk row; the chunks
    a row of windows needs are decoded together (in parallel) and dropped once no later window needs them.
    """
    n = len(windows.centers)
    if n == 0:
        return
    x0, x1, y0, y1 = windows.bounds()
    # margin for the resampling filter: its support is about one output pixel on each side
    margin = int(np.ceil(max(windows.size_x, windows.size_y) / out_px)) + 1
    ix0, iy0 = np.floor(x0).astype(int) - margin, np.floor(y0).astype(int) - margin
    ix1, iy1 = np.ceil(x1).astype(int) + margin, np.ceil(y1).astype(int) + margin
    r0, c0 = level.chunk_of(iy0, ix0)
    r1, c1 = level.chunk_of(iy1 - 1, ix1 - 1)
    order = np.lexsort((c0, r0))
    batch_pos: list[int] = []
    batch_img: list[np.ndarray] = []
    start = 0
    while start < n:
        row = r0[order[start]]
        stop = start + int(np.searchsorted(r0[order[start:]], row, side="right"))
        group = order[start:stop]
        level.evict_rows_before(int(row))
        needed = {
            (r, c) for i in group for r in range(int(r0[i]), int(r1[i]) + 1) for c in range(int(c0[i]), int(c1[i]) + 1)
        }
        level.load(needed)
        for i in group:
            win = level.window(int(iy0[i]), int(iy1[i]), int(ix0[i]), int(ix1[i]), pad_value)
            box = (x0[i] - ix0[i], y0[i] - iy0[i], x1[i] - ix0[i], y1[i] - iy0[i])
            batch_pos.append(int(i))
            batch_img.append(resample(win, box, out_px))
            if len(batch_pos) == batch_size:
                yield np.asarray(batch_pos), np.stack(batch_img)
                batch_pos, batch_img = [], []
        start = stop
    level.cache.clear()
    if batch_pos:
        yield np.asarray(batch_pos), np.stack(batch_img)

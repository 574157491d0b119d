"""Patches ready for an encoder: cut, stain-normalised, and prepared one batch ahead in a background thread.

:func:`~histoseq.tl.embed` runs a network on batch ``k`` while batch ``k + 1`` is cut from the image and
stain-normalised (:class:`Prefetch`): cutting (PIL's resampling, numpy, dask's decoding) and ONNX Runtime or
torch release the GIL, so the two overlap on the cores, instead of the network waiting for every batch to be cut.
Batches come in the order of the source, exactly as they would without the thread; an exception raised while
preparing a batch is raised again where that batch is asked for, and the thread never outlives the iteration.

What it gains depends on the idle cores. On two cores shared with ONNX Runtime's two threads, EfficientNet-Lite0
end to end gained about 2 % from the thread (the network keeps both cores busy; cutting and stain normalisation
cost about 1.3 ms of CPU per 224 px patch, against 6 ms for the network), the ``"morphology"`` encoder 12-14 %
(its threads wait for each other at the end of every batch); it gains most when the network runs on a GPU. Dask
reads the chunks from this thread with a thread pool of its own, which dask drops at its next read from another
thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
_END = object()  # the source is exhausted


class Prefetch(Generic[T]):
    """Iterate over ``fn(item)`` for the items of ``source``, computed one item ahead in a background thread.

    One worker thread advances ``source`` and applies ``fn`` while the caller works on the previous item, so the
    order is the source's and the source is never advanced by two threads at once. An exception raised by the
    source or by ``fn`` is raised by the ``next()`` that would have returned that item, and ends the iteration.
    Use it as a context manager (or call :meth:`close`): leaving the block early (a ``break``, an exception of
    the caller) waits for the item in progress, discards it, closes the source generator and ends the thread.
    With ``background=False`` it does the same in the caller's thread, one item at a time (nothing ahead).

    Examples
    --------
    >>> from histoseq.tl._batches import Prefetch
    >>> with Prefetch(range(5), lambda v: v * v) as squares:
    ...     list(squares)
    [0, 1, 4, 9, 16]

    """

    def __init__(
        self,
        source: Iterable[Any],
        fn: Callable[[Any], T] | None = None,
        *,
        background: bool = True,
        name: str = "histoseq-prefetch",
    ):
        self._source = iter(source)
        self._fn = fn
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._done = False
        if background:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
            self._pending = self._pool.submit(self._produce)

    def _produce(self) -> Any:
        try:
            item = next(self._source)
        except StopIteration:
            return _END
        return item if self._fn is None else self._fn(item)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            if self._pool is None:
                item = self._produce()
            else:
                assert self._pending is not None
                item = self._pending.result()
                self._pending = None
        except BaseException:  # the source's or fn's error (or an interrupt while waiting): the iteration ends
            self.close()
            raise
        if item is _END:
            self.close()
            raise StopIteration
        if self._pool is not None:
            self._pending = self._pool.submit(self._produce)  # the next item, while the caller uses this one
        return item

    def close(self) -> None:
        """Stop: wait for the item in progress (its result is dropped), close the source, end the thread."""
        if self._done:
            return
        self._done = True
        pending, self._pending = self._pending, None
        try:
            if pending is not None and not pending.cancel():
                wait_for([pending])  # running: a batch cannot be interrupted, it ends soon
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            close = getattr(self._source, "close", None)
            if close is not None:  # a generator: run its cleanup (progress bars, caches) now
                close()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def stain_normalised(
    batches: Iterable[Any],
    stains: Mapping[str, Any],
    image_of: Mapping[str, str],
    *,
    amount: bool = False,
    background: bool = True,
) -> Prefetch[tuple[Any, np.ndarray]]:
    """``(batch, images)`` for each :class:`~histoseq.pp.Patches` batch: its images stain-normalised.

    ``stains`` maps an image key to its stain estimate (``None``: that image's patches stay as they are) and
    ``image_of`` a batch's region (its shapes element) to its image key. With ``background=True`` the next batch
    is cut and normalised in a background thread while the caller uses the current one (see :class:`Prefetch`).
    """
    from ..pp._stain import StainNormalizer

    normalizers: dict[str, StainNormalizer | None] = {}

    def prepare(batch: Any) -> tuple[Any, np.ndarray]:
        key = image_of.get(batch.region[0]) if len(batch) else None
        if key not in normalizers:
            stain = stains.get(key) if key is not None else None
            normalizers[key] = StainNormalizer(stain, amount=amount) if stain is not None else None
        norm = normalizers[key]
        return batch, batch.images if norm is None else norm(batch.images)

    return Prefetch(batches, prepare, background=background)

"""The fast path of ``hs.tl.embed``: batches prepared in a background thread, the stain lookup, the chunk reader."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest

import histoseq as hs
from histoseq.pp import _stain
from histoseq.pp._reader import ChunkedLevel, _channels_last
from histoseq.pp._stain import REFERENCE, StainNormalizer, _lookup_tables, normalize_stain
from histoseq.tl import _batches
from histoseq.tl._batches import Prefetch

EST = {
    "stain_matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]],
    "max_concentrations": [1.2, 0.6],
    "white_point": [240, 238, 242],
}


def prefetch_threads() -> list[threading.Thread]:
    """Prefetch threads still alive after a grace of 5 s (a pool's idle thread ends soon after its shutdown)."""
    threads = [t for t in threading.enumerate() if t.name.startswith("histoseq-prefetch")]
    for t in threads:
        t.join(timeout=5)
    return [t for t in threads if t.is_alive()]


# ---------------------------------------------------------------------------------------------- Prefetch


@pytest.mark.parametrize("background", [True, False])
def test_prefetch_keeps_the_order_and_applies_fn(background):
    with Prefetch(iter(range(50)), lambda v: (v, v * v), background=background) as items:
        assert list(items) == [(v, v * v) for v in range(50)]
    assert not prefetch_threads()
    with Prefetch([], background=background) as items:
        assert list(items) == []
    with Prefetch("ab", background=background) as items:  # left after one item: closed by the block
        assert next(items) == "a"
    assert not prefetch_threads()


def test_prefetch_works_one_item_ahead_in_another_thread():
    log: list[tuple[str, int]] = []
    threads: set[str] = set()
    second_ready = threading.Event()

    def source():
        for i in range(6):
            threads.add(threading.current_thread().name)
            log.append(("made", i))
            if i == 1:
                second_ready.set()
            yield i

    with Prefetch(source()) as items:
        for v in items:
            if v == 0:  # item 1 is made while the caller still works on item 0
                assert second_ready.wait(timeout=60)
            log.append(("used", v))
    assert [v for what, v in log if what == "used"] == list(range(6))
    for i in range(4):  # never more than one item ahead
        assert log.index(("used", i)) < log.index(("made", i + 2))
    assert all(name.startswith("histoseq-prefetch") for name in threads)
    assert not prefetch_threads()


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("where", ["source", "fn"])
def test_prefetch_raises_the_error_of_its_item_and_ends(background, where):
    closed = []

    def source():
        try:
            for i in range(10):
                if where == "source" and i == 3:
                    raise KeyError("bad item")
                yield i
        finally:
            closed.append(True)

    def fn(v):
        if where == "fn" and v == 3:
            raise KeyError("bad item")
        return v

    got = []

    def consume():
        with Prefetch(source(), fn, background=background) as items:
            for v in items:
                got.append(v)
        return items

    with pytest.raises(KeyError, match="bad item"):
        consume()
    assert got == [0, 1, 2]
    assert closed == [True]  # the source generator was closed, its cleanup ran
    assert not prefetch_threads()
    done = Prefetch(source(), fn, background=background)
    done.close()
    with pytest.raises(StopIteration):
        next(done)


def test_prefetch_closes_the_source_when_the_caller_stops_early():
    closed = []

    def source():
        try:
            yield from range(100)
        finally:
            closed.append(threading.current_thread() is threading.main_thread())

    with Prefetch(source()) as items:
        for v in items:
            if v == 5:
                break
    assert closed == [True]  # closed by the caller, once the item in progress was done
    assert not prefetch_threads()

    def fail_while_iterating():
        with Prefetch(source()) as items:
            next(items)
            raise RuntimeError("the caller fails")

    with pytest.raises(RuntimeError, match="caller"):
        fail_while_iterating()
    assert not prefetch_threads()


# ---------------------------------------------------------------------------------------------- stain lookup


def three_tables(images, estimate, reference=REFERENCE, amount=True):
    """The three-table implementation that :class:`StainNormalizer` replaces (bit for bit)."""
    tables = _lookup_tables(estimate, reference, amount)
    flat = images.reshape(-1, images.shape[-1])
    out = np.empty_like(flat)
    out[:, 3:] = flat[:, 3:]
    value = np.take(tables[0], flat[:, 0], axis=0)
    value *= np.take(tables[1], flat[:, 1], axis=0)
    value *= np.take(tables[2], flat[:, 2], axis=0)
    value -= 0.5
    np.clip(value, 0.0, 255.0, out=value)
    out[:, :3] = value
    return out.reshape(images.shape)


@pytest.mark.parametrize("seed", range(4))
def test_stain_lookup_is_bit_identical_to_three_tables(seed):
    rng = np.random.default_rng(seed)
    est = {
        "stain_matrix": rng.uniform(0.05, 1.0, (2, 3)).tolist(),
        "max_concentrations": rng.uniform(0.3, 2.0, 2).tolist(),
        "white_point": rng.uniform(200, 255, 3).tolist(),
    }
    images = rng.integers(0, 256, (3, 70, 41, 4), dtype=np.uint8)  # 8,610 px: several blocks when small
    images[0] = (np.arange(70 * 41 * 4) % 256).reshape(70, 41, 4)  # every value in every channel
    for amount in (True, False):
        norm = StainNormalizer(est, amount=amount)
        for x in (images, images[..., :3], images[1, ..., :3], np.asfortranarray(images[..., :3])):
            expected = three_tables(np.ascontiguousarray(x), est, amount=amount)
            np.testing.assert_array_equal(norm(x), expected)
            np.testing.assert_array_equal(normalize_stain(x, est, amount=amount), expected)
    assert normalize_stain(images[:0], est).shape == (0, 70, 41, 4)


def test_stain_lookup_over_several_blocks(monkeypatch):
    monkeypatch.setattr(_stain, "_BLOCK_PX", 1000)
    images = np.random.default_rng(0).integers(0, 256, (2, 45, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(StainNormalizer(EST)(images), three_tables(images, EST))


# ---------------------------------------------------------------------------------------------- chunk reader


def test_channels_last_and_windows_match_a_padded_image():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 90, 70), dtype=np.uint8)
    np.testing.assert_array_equal(_channels_last(image), np.moveaxis(image, 0, -1))
    level = ChunkedLevel(da.from_array(image, chunks=(3, 25, 20)))
    level.load({(r, c) for r in range(4) for c in range(4)})
    padded = np.pad(np.moveaxis(image, 0, -1), ((40, 40), (40, 40), (0, 0)), constant_values=7)
    for y0, x0, h, w in [(0, 0, 90, 70), (5, 3, 30, 40), (-10, -5, 30, 30), (80, 60, 25, 25), (-40, 20, 10, 10)]:
        window = level.window(y0, y0 + h, x0, x0 + w, pad_value=7)
        np.testing.assert_array_equal(window, padded[y0 + 40 : y0 + 40 + h, x0 + 40 : x0 + 40 + w])


# ---------------------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def sdata():
    return hs.datasets.synthetic(n_sections=2, random_state=0, progress=False)


@pytest.mark.parametrize("encoder", ["small_cnn", "morphology"])
def test_embed_is_the_same_with_and_without_the_background_thread(sdata, monkeypatch, encoder):
    kw = {"encoder": encoder, "patch_size_um": [56, 112], "patch_px": 32, "batch_size": 7, "progress": False}
    threaded = hs.tl.embed(sdata, inplace=False, **kw)
    assert not prefetch_threads()
    plain = _batches.stain_normalised
    monkeypatch.setattr(_batches, "stain_normalised", lambda *a, **k: plain(*a, **{**k, "background": False}))
    np.testing.assert_array_equal(hs.tl.embed(sdata, inplace=False, **kw), threaded)


def test_an_encoder_error_ends_the_background_thread(sdata):
    calls = []

    def failing(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError("encoder failed")
        return x.mean(dim=(2, 3))

    with pytest.raises(RuntimeError, match="encoder failed"):
        hs.tl.embed(sdata, encoder=failing, patch_px=16, batch_size=5, progress=False, inplace=False)
    assert len(calls) == 3
    assert not prefetch_threads()


def test_the_stain_estimate_is_made_once_per_image(sdata, monkeypatch):
    from histoseq.pp._stain import estimate_stains

    made = []
    real = _stain.estimate_stain
    monkeypatch.setattr(_stain, "estimate_stain", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(_stain, "_REMEMBERED", type(_stain._REMEMBERED)())
    first = estimate_stains(sdata, ["section0_image"])["section0_image"]
    again = estimate_stains(sdata, ["section0_image", "section1_image"])
    assert made == ["section0_image", "section1_image"]
    assert again["section0_image"] == first
    again["section0_image"]["stain_matrix"][0][0] = -1.0  # a copy: the remembered estimate is not changed
    assert estimate_stains(sdata, ["section0_image"])["section0_image"] == first

    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from histoseq._sdata import image_levels

    copy = SpatialData(images={"renamed": sdata.images["section0_image"]})
    assert estimate_stains(copy, ["renamed"])["renamed"] == dict(first, image_key="renamed")
    assert made == ["section0_image", "section1_image"]
    pixels = np.asarray(image_levels(sdata.images["section0_image"])[0].data)
    other = SpatialData(images={"section0_image": Image2DModel.parse(pixels, dims=("c", "y", "x"))})
    estimate_stains(other, ["section0_image"])  # other arrays: estimated anew
    assert made == ["section0_image", "section1_image", "section0_image"]

"""Stain estimation (Macenko, from the whole image's tissue) and stain normalisation of patches."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, TableModel

import histoseq as hs
from histoseq._sdata import image_levels, transformations
from histoseq.pp._stain import REFERENCE, estimate_stain, normalize_stain

TILE = 64
TINT = np.array([0.96, 0.93, 0.98])


def _od(rgb: np.ndarray, white: float | np.ndarray = 255.0) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1) / (white + 1))


def _hue_rotation(degrees: float) -> np.ndarray:
    """Rotation of optical-density space about the grey axis (a change of stain colour)."""
    k = np.ones(3) / np.sqrt(3)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def _glass(rgb: np.ndarray) -> np.ndarray:
    """Intensity of the glass of a ``(3, y, x)`` image: the median of its palest tenth of tiles."""
    tile_od = _tile_od(rgb)
    rows, cols = np.nonzero(tile_od <= np.percentile(tile_od, 10))
    return np.median(_tiles(rgb, rows, cols), axis=(0, 1, 2))


def _shift(rgb: np.ndarray) -> np.ndarray:
    """Another lab and scanner: 1.5× the stain, its colour rotated by 8°, a tinted glass. ``(c, y, x)`` uint8."""
    glass = _glass(rgb)
    od = _od(np.moveaxis(rgb, 0, -1), glass) * 1.5 @ _hue_rotation(8.0).T
    out = ((glass + 1) * np.exp(-od) - 1) * TINT
    return np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), -1, 0)


def _level0(sdata: SpatialData, key: str) -> np.ndarray:
    return np.asarray(image_levels(sdata.images[key])[0].data)


def _image(rgb: np.ndarray, like) -> object:
    return Image2DModel.parse(rgb, dims=("c", "y", "x"), transformations=transformations(like), scale_factors=(2, 2))


def _tiles(rgb: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(n, TILE, TILE, 3)`` tiles of a ``(3, y, x)`` image at tile grid positions."""
    hwc = np.moveaxis(rgb, 0, -1)
    return np.stack([hwc[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] for r, c in zip(rows, cols)])


def _tile_od(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density (summed over channels) of each TILE × TILE tile of a ``(3, y, x)`` image."""
    h, w = (s // TILE * TILE for s in rgb.shape[1:])
    od = _od(rgb[:, :h, :w]).sum(axis=0)
    return od.reshape(h // TILE, TILE, w // TILE, TILE).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def slides():
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, progress=False)
    im0, im1 = sdata.images["section0_image"], sdata.images["section1_image"]
    rgb1 = _level0(sdata, "section1_image")
    # a test-local SpatialData: the shifted copy is never added to the dataset's object
    local = SpatialData(
        images={"section0_image": im0, "section1_image": im1, "section1_shifted": _image(_shift(rgb1), im1)}
    )
    est = {k: estimate_stain(local, k) for k in local.images}
    return sdata, local, est


def _angle(u, v) -> float:
    u, v = np.asarray(u), np.asarray(v)
    return float(np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))


def test_estimate_has_unit_vectors_haematoxylin_first_and_sensible_concentrations(slides):
    _, _, est = slides
    for e in est.values():
        m = np.asarray(e["stain_matrix"])
        assert m.shape == (2, 3)
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
        assert (m > 0).all()
        assert m[0, 0] > m[1, 0]  # haematoxylin absorbs more red than eosin
        assert _angle(m[0], REFERENCE["stain_matrix"][0]) < 20
        assert _angle(m[1], REFERENCE["stain_matrix"][1]) < 20
        h, e_ = e["max_concentrations"]
        assert 0.5 < h < 5 and 0.3 < e_ < 3
        assert e["method"] == "macenko" and e["level"] == 0 and e["stride"] == 1
        assert e["um_per_px"] == pytest.approx(0.5)
        assert e["n_pixels"] >= 100_000 and e["n_tissue_pixels"] >= e["n_pixels"]
        assert 200 <= min(e["white_point"]) <= max(e["white_point"]) <= 255
        assert e["params"] | {"beta": 0.15, "alpha": 1.0, "percentile": 99.0} == e["params"]


def test_estimate_measures_the_stronger_stain_and_the_tinted_glass(slides):
    _, _, est = slides
    plain, shifted = est["section1_image"], est["section1_shifted"]
    ratio = np.asarray(shifted["max_concentrations"]) / np.asarray(plain["max_concentrations"])
    assert np.all((ratio > 1.3) & (ratio < 1.7)), ratio
    # the rotated stain colour is seen: the stain vectors turn as the colours were turned
    for v, w in zip(plain["stain_matrix"], shifted["stain_matrix"]):
        assert _angle(_hue_rotation(8.0) @ v, w) < 0.5 * _angle(v, w), (_angle(_hue_rotation(8.0) @ v, w), _angle(v, w))
    # the scanner's glass tint is the white point
    tint = np.asarray(shifted["white_point"]) / np.asarray(plain["white_point"])
    np.testing.assert_allclose(tint, TINT, atol=0.01)


def test_estimate_never_reads_the_spots_or_the_table(slides):
    sdata, _, est = slides
    full = estimate_stain(sdata, "section1_image")
    assert full == est["section1_image"]  # the dataset with its spots and table, and the image alone
    table = sdata.tables["table"]
    few = table[table.obs["region"] == "section1_spots"][:5].copy()
    del few.uns["spatialdata_attrs"]
    few.obs["region"] = few.obs["region"].astype(str).astype("category")
    fewer = SpatialData(
        images={"section1_image": sdata.images["section1_image"]},
        shapes={"section1_spots": sdata.shapes["section1_spots"].iloc[:5]},
        tables={"table": TableModel.parse(few, region="section1_spots", region_key="region", instance_key="spot_id")},
    )
    assert estimate_stain(fewer, "section1_image") == full
    assert "section1_shifted" not in sdata.images and set(sdata.labels) == set()


def test_estimate_from_a_coarser_level_agrees(slides):
    _, local, est = slides
    coarse = estimate_stain(local, "section0_image", max_pixels=200_000)
    assert coarse["level"] == 2 and coarse["um_per_px"] == pytest.approx(2.0)
    fine = est["section0_image"]
    for a, b in zip(coarse["stain_matrix"], fine["stain_matrix"]):
        assert _angle(a, b) < 3
    np.testing.assert_allclose(coarse["max_concentrations"], fine["max_concentrations"], rtol=0.15)
    # and a level bigger than max_pixels is read every n-th pixel
    strided = estimate_stain(local, "section0_image", max_pixels=50_000)
    assert strided["level"] == 2 and strided["stride"] == 2 and strided["um_per_px"] == pytest.approx(4.0)
    np.testing.assert_allclose(strided["max_concentrations"], fine["max_concentrations"], rtol=0.2)


def test_normalisation_brings_the_shifted_section_to_the_others(slides):
    _, local, est = slides
    rgb = {k: _level0(local, k) for k in local.images}
    stats = {}
    for plain, other in (("section0_image", "section0_image"), ("section1_image", "section1_shifted")):
        tile_od = _tile_od(rgb[plain])
        rows, cols = np.nonzero(tile_od > 0.6)  # tiles on tissue, chosen on the unshifted image
        assert len(rows) > 100
        for key in {plain, other}:
            tiles = _tiles(rgb[key], rows, cols)
            stats[key] = {"before": tiles, "after": normalize_stain(tiles, est[key])}

    def mean_od(key: str, when: str) -> np.ndarray:
        return _od(stats[key][when]).reshape(-1, 3).mean(axis=0)

    def gap(a: str, b: str, when: str) -> float:
        return float(np.linalg.norm(mean_od(a, when) - mean_od(b, when)))

    # stain amount and colour: the mean optical density of the tissue tiles of the two sections
    before = gap("section0_image", "section1_shifted", "before")
    after = gap("section0_image", "section1_shifted", "after")
    assert after < 0.4 * before, (before, after)
    plain_before = gap("section1_image", "section1_shifted", "before")
    assert gap("section1_image", "section1_shifted", "after") < 0.3 * plain_before
    # the colour alone (the direction of the mean optical density) is brought back too
    turn_before = _angle(mean_od("section1_image", "before"), mean_od("section1_shifted", "before"))
    turn_after = _angle(mean_od("section1_image", "after"), mean_od("section1_shifted", "after"))
    assert turn_before > 1.5 and turn_after < 0.5 * turn_before, (turn_before, turn_after)
    # and the amount is the reference's: the tissue of every slide is as dark after, the shifted one included
    total = {k: mean_od(k, "after").sum() for k in stats}
    assert max(total.values()) < 1.15 * min(total.values()), total
    for k in stats:
        assert stats[k]["after"].dtype == np.uint8 and stats[k]["after"].shape == stats[k]["before"].shape


def test_white_glass_stays_white(slides):
    _, local, est = slides
    white = np.full((3, TILE, TILE, 3), 255, np.uint8)
    for e in est.values():
        assert normalize_stain(white, e).min() >= 253
    # the tinted glass of the shifted scan comes out white
    tile_od = _tile_od(_level0(local, "section1_image"))
    rows, cols = np.nonzero(tile_od <= np.percentile(tile_od, 10))
    assert len(rows) > 20
    glass = _tiles(_level0(local, "section1_shifted"), rows, cols)
    assert np.median(glass, axis=(0, 1, 2)).min() < 235  # tinted before
    out = normalize_stain(glass, est["section1_shifted"])
    assert np.median(out, axis=(0, 1, 2)).min() >= 248
    assert np.percentile(out, 5) >= 225


def test_grayscale_or_blank_image_raises_naming_stain_norm_false(slides):
    sdata, _, _ = slides
    im = sdata.images["section0_image"]
    rgb = _level0(sdata, "section0_image")
    gray = np.rint(rgb.astype(float).mean(axis=0, keepdims=True)).astype(np.uint8)
    local = SpatialData(
        images={
            "gray": _image(gray, im),
            "gray_rgb": _image(np.repeat(gray, 3, axis=0), im),
            "blank": _image(np.full_like(rgb, 240), im),
        }
    )
    with pytest.raises(ValueError, match=r"grayscale.*`stain_norm=False`"):
        estimate_stain(local, "gray")
    with pytest.raises(ValueError, match=r"grayscale.*`stain_norm=False`"):
        estimate_stain(local, "gray_rgb")
    with pytest.raises(ValueError, match=r"No tissue.*`stain_norm=False`"):
        estimate_stain(local, "blank")
    with pytest.raises(ValueError, match="beta"):
        estimate_stain(SpatialData(images={"im": im}), "im", beta=5.0)  # nothing that dark: too few stained pixels


def test_estimate_is_json_and_works_after_a_round_trip(slides):
    _, local, est = slides
    e = est["section1_shifted"]
    again = json.loads(json.dumps(e))
    assert again == e
    tiles = _tiles(_level0(local, "section1_shifted"), np.array([5, 6]), np.array([5, 6]))
    np.testing.assert_array_equal(normalize_stain(tiles, again), normalize_stain(tiles, e))
    json.dumps(REFERENCE)


def _beer_lambert(conc: np.ndarray, stains) -> np.ndarray:
    od = conc @ np.asarray(stains)
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def test_normalisation_equalises_stain_amount_and_keeps_reference_pixels():
    rng = np.random.default_rng(0)
    conc = rng.uniform(0, 1, (4, 32, 32, 2)) * np.asarray(REFERENCE["max_concentrations"])
    plain = _beer_lambert(conc, REFERENCE["stain_matrix"])
    # a slide at the reference stain is left as it is (up to rounding)
    assert np.abs(normalize_stain(plain, REFERENCE).astype(int) - plain).max() <= 2
    # a slide stained 1.6× (haematoxylin) and 0.7× (eosin) as strongly is brought back
    strong = _beer_lambert(conc * [1.6, 0.7], REFERENCE["stain_matrix"])
    est = dict(REFERENCE, max_concentrations=np.multiply(REFERENCE["max_concentrations"], [1.6, 0.7]).tolist())
    assert np.abs(strong.astype(int) - plain).mean() > 10
    assert np.abs(normalize_stain(strong, est).astype(int) - plain).mean() < 1.5


def test_normalize_stain_shapes_channels_and_errors():
    est = {"stain_matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], "max_concentrations": [1.2, 0.6]}
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (5, 16, 16, 4), dtype=np.uint8)
    out = normalize_stain(rgba, est)
    assert out.shape == rgba.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])  # alpha passes through
    np.testing.assert_array_equal(out[..., :3], normalize_stain(rgba[..., :3], est))
    np.testing.assert_array_equal(normalize_stain(rgba[0, ..., :3], est), out[0, ..., :3])  # one (h, w, c) patch
    assert not np.array_equal(out[..., :3], rgba[..., :3])
    with pytest.raises(TypeError, match="uint8"):
        normalize_stain(rgba.astype(np.float32), est)
    with pytest.raises(ValueError, match="channels"):
        normalize_stain(rgba[..., :1], est)
    with pytest.raises(ValueError, match="stain_matrix"):
        normalize_stain(rgba, {"max_concentrations": [1, 1]})
    with pytest.raises(ValueError, match="parallel"):
        normalize_stain(rgba, dict(est, stain_matrix=[[0.6, 0.7, 0.3], [0.6, 0.7, 0.3]]))
    with pytest.raises(ValueError, match="positive"):
        normalize_stain(rgba, dict(est, max_concentrations=[1.0, 0.0]))


def test_normalize_stain_is_fast():
    est = {"stain_matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], "max_concentrations": [1.2, 0.6]}
    batch = np.random.default_rng(2).integers(0, 256, (1000, 64, 64, 3), dtype=np.uint8)
    normalize_stain(batch[:10], est)
    start = time.perf_counter()
    normalize_stain(batch, est)
    # about 0.05 s on one core; 2,000 patches of 64×64 per second is the floor the encoders need
    assert time.perf_counter() - start < 0.5

from __future__ import annotations

import numpy as np
import pytest
from _geometry import make_geometry_sdata

import histoseq as hs
from histoseq.pp._reader import ChunkedLevel, Windows, cut_windows


def _disk_diameter_px(patch: np.ndarray) -> float:
    """Equivalent diameter of the dark disk in a patch, from its area."""
    dark = (patch < 128).all(-1)
    return float(2 * np.sqrt(dark.sum() / np.pi))


def _dark_centroid(patch: np.ndarray) -> np.ndarray:
    yy, xx = np.nonzero((patch < 128).all(-1))
    return np.array([xx.mean() + 0.5, yy.mean() + 0.5])


@pytest.mark.parametrize(("patch_size_um", "patch_px"), [(112.0, 224), (56.0, 64), (80.0, 32), (150.0, 48)])
def test_patches_have_exact_physical_size(geometry_sdata, patch_size_um, patch_px):
    p = hs.pp.extract_patches(geometry_sdata, patch_size_um=patch_size_um, patch_px=patch_px, progress=False)
    um_per_px = patch_size_um / patch_px
    expected = 20.0 / um_per_px
    measured = np.array([_disk_diameter_px(im) for im in p.images])
    assert np.abs(measured - expected).max() < max(1.0, 0.05 * expected)
    centres = np.array([_dark_centroid(im) for im in p.images])
    assert np.abs(centres - patch_px / 2).max() < 0.75  # centred to a fraction of a patch pixel
    # the red mark sits 30 µm right of the centre: orientation and scale along x
    red = (p.images[..., 0] > 150) & (p.images[..., 1] < 100)
    if patch_size_um / 2 > 30 + 4:
        xs = np.array([np.nonzero(r[:, patch_px // 2 :])[1].mean() + 0.5 + patch_px // 2 for r in red])
        np.testing.assert_allclose(xs - patch_px / 2, 30 / um_per_px, atol=0.75)


def test_pixel_size_and_level_recorded(geometry_sdata):
    p = hs.pp.extract_patches(geometry_sdata, patch_size_um=112, patch_px=56, progress=False)
    info = p.params["images"]["img"]
    assert info["pixel_size_um"] == pytest.approx(0.37)
    assert info["pixel_size_method"] == "um_coordinate_system"
    # 2 µm/px target: level 2 (4 × 0.37 = 1.48 µm/px) is the coarsest not coarser than the target
    assert info["level"] == 2
    assert p.params["um_per_px"] == pytest.approx(2.0)


def test_coarse_level_matches_full_resolution(geometry_sdata):
    auto = hs.pp.extract_patches(geometry_sdata, patch_size_um=112, patch_px=56, progress=False)
    full = hs.pp.extract_patches(geometry_sdata, patch_size_um=112, patch_px=56, level=0, progress=False)
    assert auto.params["images"]["img"]["level"] > 0
    diff = np.abs(auto.images.astype(float) - full.images.astype(float)).mean()
    assert diff < 6  # same content, only resampling differences


def test_numpy_and_dask_backed_images_give_identical_patches():
    a = make_geometry_sdata(dask=False, scale_factors=None)
    b = make_geometry_sdata(dask=True, chunks=97, scale_factors=None)
    pa = hs.pp.extract_patches(a, patch_size_um=60, patch_px=40, progress=False)
    pb = hs.pp.extract_patches(b, patch_size_um=60, patch_px=40, progress=False)
    np.testing.assert_array_equal(pa.images, pb.images)
    np.testing.assert_array_equal(pa.obs_names, pb.obs_names)


def test_each_chunk_is_decoded_once():
    import dask.array as da

    rng = np.random.default_rng(0)
    data = da.from_array(rng.integers(0, 255, (3, 1000, 1200), dtype=np.uint8), chunks=(3, 128, 128))
    centres = rng.uniform(0, [1200, 1000], (500, 2))
    level = ChunkedLevel(data)
    out = list(cut_windows(level, Windows(centres, 60.0, 60.0), 32, batch_size=64))
    n_chunks = data.numblocks[1] * data.numblocks[2]
    assert level.decoded <= n_chunks
    assert sum(len(pos) for pos, _ in out) == 500
    assert sorted(np.concatenate([pos for pos, _ in out]).tolist()) == list(range(500))
    assert not level.cache  # nothing is held after the pass


def test_window_matches_direct_slicing():
    import dask.array as da

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (3, 300, 260), dtype=np.uint8)
    level = ChunkedLevel(da.from_array(arr, chunks=(3, 64, 50)))
    level.load({(r, c) for r in range(5) for c in range(6)})
    win = level.window(-5, 70, 40, 130, pad_value=7)
    expected = np.full((75, 90, 3), 7, np.uint8)
    expected[5:, :] = np.moveaxis(arr[:, 0:70, 40:130], 0, -1)
    np.testing.assert_array_equal(win, expected)


def test_integer_aligned_patch_without_scaling_is_a_plain_crop():
    import dask.array as da

    rng = np.random.default_rng(2)
    arr = rng.integers(0, 255, (3, 200, 200), dtype=np.uint8)
    level = ChunkedLevel(da.from_array(arr, chunks=(3, 64, 64)))
    (_pos, imgs), *_ = list(cut_windows(level, Windows(np.array([[100.0, 80.0]]), 32.0, 32.0), 32))
    np.testing.assert_array_equal(imgs[0], np.moveaxis(arr[:, 64:96, 84:116], 0, -1))


def test_spot_subsets_keep_the_requested_order(geometry_sdata):
    names = geometry_sdata.tables["table"].obs_names
    chosen = [names[5], names[0], names[17]]
    p = hs.pp.extract_patches(geometry_sdata, spots=chosen, patch_size_um=40, patch_px=16, progress=False)
    assert p.obs_names.tolist() == chosen
    assert p.rows.tolist() == [5, 0, 17]
    by_pos = hs.pp.extract_patches(geometry_sdata, spots=[5, 0, 17], patch_size_um=40, patch_px=16, progress=False)
    np.testing.assert_array_equal(by_pos.images, p.images)
    mask = np.zeros(len(names), bool)
    mask[[17, 5]] = True
    by_mask = hs.pp.extract_patches(geometry_sdata, spots=mask, patch_size_um=40, patch_px=16, progress=False)
    assert by_mask.obs_names.tolist() == [names[5], names[17]]


def test_iter_patches_streams_the_same_patches(geometry_sdata):
    whole = hs.pp.extract_patches(geometry_sdata, patch_size_um=50, patch_px=24, progress=False)
    batches = list(hs.pp.iter_patches(geometry_sdata, patch_size_um=50, patch_px=24, batch_size=7, progress=False))
    assert max(len(b) for b in batches) == 7
    rows = np.concatenate([b.rows for b in batches])
    images = np.concatenate([b.images for b in batches])
    order = np.argsort(rows)
    np.testing.assert_array_equal(images[order], whole.images)


def test_border_spots_are_padded_and_flagged():
    sdata = make_geometry_sdata(height=600, width=600, spot_pitch_um=60)
    p = hs.pp.extract_patches(sdata, patch_size_um=160, patch_px=32, pad_value=123, progress=False)
    xy = sdata.shapes["spots"].geometry
    near = (np.minimum(xy.x, 600 - xy.x) < 80 / 0.37) | (np.minimum(xy.y, 600 - xy.y) < 80 / 0.37)
    np.testing.assert_array_equal(p.at_border, near.to_numpy())
    assert p.at_border.any()
    assert (p.images[p.at_border] == 123).all(axis=-1).any(axis=(1, 2)).all()
    assert not (p.images[~p.at_border] == 123).all(axis=-1).any()


def test_spots_outside_the_image_raise_or_are_dropped(geometry_sdata):
    from shapely.geometry import Point

    shapes = geometry_sdata.shapes["spots"]
    shapes.loc[3, "geometry"] = Point(-500.0, 10.0)
    with pytest.raises(ValueError, match="outside image 'img'.*outside='drop'"):
        hs.pp.extract_patches(geometry_sdata, patch_size_um=40, patch_px=16, progress=False)
    with pytest.warns(UserWarning, match="Dropping 1 spot"):
        p = hs.pp.extract_patches(geometry_sdata, patch_size_um=40, patch_px=16, outside="drop", progress=False)
    assert len(p) == geometry_sdata.tables["table"].n_obs - 1
    assert "spot3" not in p.obs_names


def test_patch_dataset_feeds_a_dataloader(geometry_sdata):
    import torch
    from torch.utils.data import DataLoader

    n = geometry_sdata.tables["table"].n_obs
    targets = np.arange(n, dtype=np.float32)[:, None]
    ds = hs.pp.PatchDataset.from_sdata(geometry_sdata, targets=targets, patch_size_um=40, patch_px=16, progress=False)
    x, y = next(iter(DataLoader(ds, batch_size=5, shuffle=False)))
    assert x.shape == (5, 3, 16, 16)
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(y.numpy()[:, 0], np.arange(5))
    flipped = hs.pp.PatchDataset(ds.patches, transform=lambda t: t.flip(-1))
    torch.testing.assert_close(flipped[0], ds[0][0].flip(-1))
    with pytest.raises(ValueError, match="rows for"):
        hs.pp.PatchDataset(ds.patches, targets=targets[:3])


def test_patches_to_tensor(geometry_sdata):
    p = hs.pp.extract_patches(geometry_sdata, patch_size_um=40, patch_px=16, progress=False)
    t = p.to_tensor()
    assert tuple(t.shape) == (len(p), 3, 16, 16)
    assert float(t.max()) <= 1.0


def test_zarr_round_trip_gives_the_same_patches(geometry_sdata, tmp_path):
    import spatialdata as sd

    before = hs.pp.extract_patches(geometry_sdata, patch_size_um=50, patch_px=32, progress=False)
    geometry_sdata.write(tmp_path / "g.zarr")
    back = sd.read_zarr(tmp_path / "g.zarr")
    after = hs.pp.extract_patches(back, patch_size_um=50, patch_px=32, progress=False)
    np.testing.assert_array_equal(before.images, after.images)


def _elements(sdata):
    return {(kind, name) for kind, name, _ in sdata.gen_elements()}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patch_size_um": -1}, ValueError, "positive size in µm"),
        ({"patch_px": 0}, ValueError, "positive integer"),
        ({"image_key": "nope"}, KeyError, "image 'nope' not found"),
        ({"table_key": "nope"}, KeyError, "table 'nope' not found"),
        ({"spots": ["nope"]}, KeyError, "not in the table"),
        ({"outside": "ignore"}, ValueError, "'raise' or 'drop'"),
        ({"level": 9}, ValueError, "levels 0..2"),
    ],
)
def test_bad_arguments_raise_and_leave_sdata_untouched(geometry_sdata, kwargs, error, match):
    before = _elements(geometry_sdata)
    attrs = dict(geometry_sdata.attrs)
    with pytest.raises(error, match=match):
        hs.pp.extract_patches(geometry_sdata, progress=False, **kwargs)
    assert _elements(geometry_sdata) == before
    assert dict(geometry_sdata.attrs) == attrs


def test_unknown_pixel_size_names_the_fix():
    from spatialdata.transformations import Identity, set_transformation

    sdata = make_geometry_sdata()
    for el in (sdata.images["img"], sdata.shapes["spots"]):
        set_transformation(el, {"s": Identity()}, set_all=True)
    with pytest.raises(ValueError, match=r"pixel size of image 'img' is unknown.*hs.io.set_pixel_size"):
        hs.pp.extract_patches(sdata, progress=False)
    p = hs.pp.extract_patches(sdata, pixel_size_um=0.37, patch_size_um=40, patch_px=16, progress=False)
    assert p.params["images"]["img"]["pixel_size_method"] == "argument"
    hs.io.set_pixel_size(sdata, spot_pitch_um=100.0)
    info = sdata.attrs["histoseq"]["pixel_size_um"]["img"]
    assert info["method"] == "spot_pitch"
    assert info["value"] == pytest.approx(0.37, rel=0.01)
    q = hs.pp.extract_patches(sdata, patch_size_um=40, patch_px=16, progress=False)
    assert q.params["images"]["img"]["pixel_size_method"] == "um_coordinate_system"


def test_set_pixel_size_validates_before_writing():
    sdata = make_geometry_sdata()
    with pytest.raises(ValueError, match="exactly one"):
        hs.io.set_pixel_size(sdata)
    with pytest.raises(ValueError, match="positive"):
        hs.io.set_pixel_size(sdata, -2.0, coordinate_system="s")
    assert "histoseq" not in sdata.attrs


def test_non_uint8_and_grayscale_images_are_refused():
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    sdata = make_geometry_sdata(scale_factors=None)
    t = get_transformation(sdata.images["img"], get_all=True)
    data = sdata.images["img"].data
    sdata.images["img"] = Image2DModel.parse(data.astype(np.uint16) * 256, dims=("c", "y", "x"), transformations=t)
    with pytest.raises(TypeError, match="uint16.*uint8"):
        hs.pp.extract_patches(sdata, patch_size_um=40, patch_px=16, progress=False)
    gray = da.mean(data, axis=0, keepdims=True).astype(np.uint8)
    sdata.images["img"] = Image2DModel.parse(gray, dims=("c", "y", "x"), transformations=t)
    with pytest.raises(ValueError, match="1 channel.*rgb=False"):
        hs.pp.extract_patches(sdata, patch_size_um=40, patch_px=16, progress=False)
    p = hs.pp.extract_patches(sdata, patch_size_um=40, patch_px=16, rgb=False, progress=False)
    assert p.images.shape[-1] == 1
    assert abs(_disk_diameter_px(np.repeat(p.images[0], 3, -1)) - 20 / 2.5) < 1


def test_plot_patches(geometry_sdata):
    import matplotlib

    matplotlib.use("Agg")
    p = hs.pp.extract_patches(geometry_sdata, patch_size_um=40, patch_px=16, progress=False)
    fig = hs.pl.patches(p, n=6, ncols=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6

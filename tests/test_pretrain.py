from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import histoseq as hs
from histoseq.models import SmallCNN
from histoseq.models._augment import (
    Augment,
    brightness_contrast,
    dihedral,
    gaussian_blur,
    hed_jitter,
    hed_to_rgb,
    random_resized_crop,
    rgb_to_hed,
)
from histoseq.models._pretrain import nt_xent
from histoseq.tl._pretrain import _select_images, _write, sample_tiles, section_images

HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None

# small everything: 600 µm sections (1200 px), 56 µm tiles at 32 px
KW = {"patch_size_um": 56.0, "patch_px": 32, "batch_size": 32, "accelerator": "cpu", "progress": False}


@pytest.fixture(scope="module")
def base():
    return hs.datasets.synthetic(n_sections=2, section_size_um=600, random_state=0, progress=False)


def light_copy(sdata):
    from spatialdata import SpatialData

    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": sdata["table"].copy()})


@pytest.fixture(scope="module")
def ae_run(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "encoder.pt"
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()  # noqa: NPY002
    res = hs.tl.pretrain_encoder(base, path, method="autoencoder", n_tiles=64, max_epochs=3, random_state=0, **KW)
    rng_kept = torch.equal(torch_state, torch.random.get_rng_state()) and np.array_equal(
        np_state,
        np.random.get_state()[1],  # noqa: NPY002
    )
    return res, rng_kept


@pytest.fixture(scope="module")
def simclr_run(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("simclr") / "encoder.pt"
    return hs.tl.pretrain_encoder(base, path, method="simclr", n_tiles=96, max_epochs=3, random_state=0, **KW)


# ---------------------------------------------------------------------------------------------- training


def test_autoencoder_trains_and_saves_encoder_only(ae_run):
    res, rng_kept = ae_run
    assert len(res.history) == 3
    assert np.isfinite(res.history).all()
    assert res.history[-1] < res.history[0]
    assert res.path.is_file()
    state = torch.load(res.path, weights_only=True)
    assert set(state) == set(SmallCNN().state_dict())  # no decoder, no prefix
    meta = json.loads(res.path.with_name(res.path.name + ".json").read_text())
    assert meta["method"] == "autoencoder"
    assert meta["encoder"] == "small_cnn"
    assert meta["history"] == res.history
    assert sum(meta["tiles_per_image"].values()) == 64
    assert rng_kept, "the global numpy / torch random state changed"


def test_simclr_trains_and_saves_encoder_only(simclr_run):
    res = simclr_run
    assert len(res.history) == 3
    assert np.isfinite(res.history).all()
    assert res.history[-1] < res.history[0]
    assert res.history[-1] < np.log(2 * 32 - 1)  # below chance: picking the partner among 63 views at random
    state = torch.load(res.path, weights_only=True)
    assert set(state) == set(SmallCNN().state_dict())
    assert res.params["temperature"] == 0.2


def test_embed_loads_pretrained_weights(base, simclr_run):
    sdata = light_copy(base)
    kw = {"encoder": "small_cnn", "patch_size_um": 56, "patch_px": 32, "progress": False, "inplace": False}
    random_init = hs.tl.embed(sdata, **kw)
    first = hs.tl.embed(sdata, weights=simclr_run.path, **kw)
    second = hs.tl.embed(sdata, weights=simclr_run, **kw)  # the result is path-like
    assert np.isfinite(first).all()
    assert not np.allclose(first, random_init)
    np.testing.assert_array_equal(first, second)
    hs.tl.embed(sdata, weights=simclr_run.path, encoder="small_cnn", patch_size_um=56, patch_px=32, progress=False)
    assert sdata["table"].uns["small_cnn"]["params"]["weights"] == str(simclr_run.path)


@pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors is not installed")
def test_safetensors_output_loads_in_embed(base, ae_run, tmp_path):
    from safetensors import safe_open

    state = torch.load(ae_run[0].path, weights_only=True)
    path = tmp_path / "encoder.safetensors"
    _write(state, path, "safetensors", {"method": "autoencoder"})
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["histoseq"])["method"] == "autoencoder"
    kw = {"encoder": "small_cnn", "patch_size_um": 56, "patch_px": 32, "progress": False, "inplace": False}
    np.testing.assert_array_equal(hs.tl.embed(base, weights=path, **kw), hs.tl.embed(base, weights=ae_run[0], **kw))


def test_tiles_come_from_tissue_beyond_the_spots(base, ae_run):
    res = ae_run[0]
    tiles = res.tiles
    assert len(tiles) == 64
    assert set(tiles["image_key"]) == {"section0_image", "section1_image"}
    far = []
    for key, sub in tiles.groupby("image_key"):
        spots = base.shapes[key.replace("_image", "_spots")]  # same pixel frame as the image (identity)
        centres = np.column_stack([spots.geometry.x, spots.geometry.y])
        radius = float(spots["radius"].iloc[0])
        d = np.linalg.norm(sub[["x_px", "y_px"]].to_numpy()[:, None] - centres[None], axis=2).min(axis=1)
        far.append(d > radius)
    assert np.concatenate(far).sum() >= 10  # many tile centres lie between or beyond the spots
    # and they lie on tissue: the tiles read back are not white glass
    tiles_img, _ = sample_tiles(
        [base],
        [(0, "section0_image")],
        n_tiles=16,
        patch_size_um=56,
        patch_px=32,
        rng=np.random.default_rng(0),
    )
    assert tiles_img.shape == (16, 32, 32, 3)
    assert tiles_img.dtype == np.uint8
    assert (tiles_img.reshape(16, -1).mean(axis=1) < 235).mean() > 0.8


def test_sample_tiles_is_reproducible(base):
    args = ([base], [(0, "section1_image")])
    kw = {"n_tiles": 8, "patch_size_um": 56.0, "patch_px": 16}
    a, ta = sample_tiles(*args, rng=np.random.default_rng(3), **kw)
    b, tb = sample_tiles(*args, rng=np.random.default_rng(3), **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta[["x_px", "y_px"]].to_numpy(), tb[["x_px", "y_px"]].to_numpy())


def test_select_images(base):
    assert section_images(base) == ["section0_image", "section1_image"]
    assert _select_images([base], None, None, "sample_id", "table") == [(0, "section0_image"), (0, "section1_image")]
    assert _select_images([base], None, ["section1"], "sample_id", "table") == [(0, "section1_image")]
    assert _select_images([base, base], "section0_image", None, "sample_id", "table") == [
        (0, "section0_image"),
        (1, "section0_image"),
    ]
    with pytest.raises(KeyError, match="not values of obs"):
        _select_images([base], None, ["nope"], "sample_id", "table")
    with pytest.raises(KeyError, match="Pass some of them as `image_key`"):
        _select_images([base], ["nope_image"], None, "sample_id", "table")


def test_section_images_keeps_the_finest_scan_of_a_section(base):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    full = base.images["section0_image"]
    low = Image2DModel.parse(
        np.full((3, 300, 300), 200, dtype=np.uint8),
        dims=("c", "y", "x"),
        transformations={
            "section0": Scale([4.0, 4.0], axes=("x", "y")),
            "section0_um": Scale([2.0, 2.0], axes=("x", "y")),
        },
    )
    sdata = SpatialData(images={"lowres": low, "section0_image": full, "section1_image": base.images["section1_image"]})
    assert section_images(sdata) == ["section0_image", "section1_image"]


# ---------------------------------------------------------------------------------------------- augmentations


def test_dihedral_permutes_pixels():
    x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    k = torch.arange(8)
    y = dihedral(x, k)
    assert y.shape == x.shape
    torch.testing.assert_close(y[0], x[0])
    for i in range(8):  # same multiset of values in each tile and channel
        torch.testing.assert_close(y[i].flatten(1).sort(dim=1).values, x[i].flatten(1).sort(dim=1).values)
    same = dihedral(x[:1].expand(8, -1, -1, -1).contiguous(), k)
    assert len({tuple(t.flatten().tolist()) for t in same}) == 8  # the 8 symmetries differ
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.rand(2, 3, 8, 6))


def test_hed_jitter_zero_strength_is_identity_and_range_kept():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 0.95 + 0.05
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(hed_jitter(x, 0.0, 0.0, generator=g), x, atol=1e-4, rtol=0)
    y = hed_jitter(x, 0.3, 0.2, generator=g)
    assert y.shape == x.shape
    assert y.min() >= 0
    assert y.max() <= 1
    assert not torch.allclose(y, x)
    # the Ruifrok–Johnston unmixing agrees with scikit-image's (up to its scale and clipping at zero)
    from skimage.color import rgb2hed

    img = x[0].permute(1, 2, 0).double().numpy()
    ours = rgb_to_hed(x[:1].double())[0].permute(1, 2, 0).numpy()
    ref = rgb2hed(img) * np.log(1e-6) / -np.log(10)  # skimage divides log(rgb) by log(1e-6)
    np.testing.assert_allclose(np.maximum(ours, 0), ref, atol=1e-6)


def test_other_augmentations_keep_shape_and_range():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 32, 32, generator=g)
    for f in (
        lambda t: gaussian_blur(t, (0.5, 2.0), p=1.0, generator=g),
        lambda t: random_resized_crop(t, generator=g),
        lambda t: brightness_contrast(t, 0.3, 0.3, generator=g),
        lambda t: Augment()(t, generator=g),
    ):
        y = f(x)
        assert y.shape == x.shape
        assert y.min() >= 0
        assert y.max() <= 1
    assert random_resized_crop(x, size=16, generator=g).shape == (5, 3, 16, 16)
    torch.testing.assert_close(gaussian_blur(x, p=0.0, generator=g), x)
    torch.testing.assert_close(random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), generator=g), x, atol=1e-5, rtol=0)
    a = Augment()(x, generator=torch.Generator().manual_seed(7))
    b = Augment()(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="blur_p"):
        Augment(blur_p=2.0)


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    matched = nt_xent(torch.cat([z, z]), 0.2)
    shuffled = nt_xent(torch.cat([z, z.roll(1, dims=0)]), 0.2)
    assert matched < shuffled


# ---------------------------------------------------------------------------------------------- errors


def test_errors_name_the_fix(base, tmp_path):
    path = tmp_path / "w.pt"
    with pytest.raises(ValueError, match="choose one of"):
        hs.tl.pretrain_encoder(base, path, method="byol")
    with pytest.raises(ValueError, match="cannot be pretrained"):
        hs.tl.pretrain_encoder(base, path, encoder="morphology")
    with pytest.raises(ValueError, match="pass `patch_px=32` or more"):
        hs.tl.pretrain_encoder(base, path, encoder="resnet18", patch_px=16)
    with pytest.raises(FileNotFoundError, match="create it first"):
        hs.tl.pretrain_encoder(base, tmp_path / "missing" / "w.pt")
    with pytest.raises(IsADirectoryError, match="give a file name"):
        hs.tl.pretrain_encoder(base, tmp_path)
    with pytest.raises(ValueError, match="not both"):
        hs.tl.pretrain_encoder(base, path, image_key="section0_image", train=["section0"])
    with pytest.raises(ValueError, match="`n_tiles` must be an integer of at least 4"):
        hs.tl.pretrain_encoder(base, path, n_tiles=2)
    with pytest.raises(ValueError, match="`temperature` must be a positive number"):
        hs.tl.pretrain_encoder(base, path, temperature=0)
    assert not path.exists()


def test_too_few_tissue_tiles(tmp_path):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    blank = Image2DModel.parse(
        np.full((3, 256, 256), 245, dtype=np.uint8),
        dims=("c", "y", "x"),
        transformations={"s": Identity(), "s_um": Scale([0.5, 0.5], axes=("x", "y"))},
    )
    sdata = SpatialData(images={"blank": blank})
    with pytest.raises(ValueError, match="Too few tissue tiles.*`tissue=False`"):
        hs.tl.pretrain_encoder(sdata, tmp_path / "w.pt", **KW)
    assert not (tmp_path / "w.pt").exists()

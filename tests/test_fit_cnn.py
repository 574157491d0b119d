"""``fit(method="cnn")``: an encoder and a head trained end to end on the spots' patches (CPU-light)."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
import torch

import histoseq as hs
from histoseq.tl._data import transform_counts
from histoseq.tl._metrics import column_pearson as _column_pearson

TRAIN = ["section0", "section1"]
TEST = "section2"
# 10 epochs of 6 small steps (32 px, batches of 16) take a few seconds; with 5 epochs the network has barely
# left its initialisation on 49 training spots, so the recovery test could not tell a working pipeline apart.
CNN = {
    "method": "cnn",
    "patch_px": 32,
    "n_hidden": 32,
    "batch_size": 16,
    "lr": 3e-3,
    "max_epochs": 10,
    "progress": False,
}


@pytest.fixture(scope="module")
def base():
    return hs.datasets.synthetic(n_sections=3, section_size_um=900, random_state=0, progress=False)


@pytest.fixture(scope="module")
def genes(base):
    var = base.tables["table"].var
    return list(var.index[var["learnable"]]) + list(var.index[var["truth"] == "noise"])


@pytest.fixture(scope="module")
def model(base, genes):
    return hs.tl.fit(base, genes=genes, train=TRAIN, **CNN)


def held_out(table):
    return (table.obs["sample_id"] == TEST).to_numpy()


def test_cnn_recovers_learnable_genes_on_a_held_out_section(base, model):
    table = base.tables["table"]
    test = held_out(table)
    out = hs.tl.predict(base, model, spots=test, inplace=False)
    assert out.shape == (test.sum(), len(model.genes)) and np.isfinite(out.X).all()
    truth = transform_counts(table.X[test], model.target_transform, table.var_names.get_indexer(model.genes))
    r = _column_pearson(out.X.astype(float), truth)
    learnable = table.var.loc[model.genes, "learnable"].to_numpy()
    assert np.nanmean(r[learnable]) > 0.2
    assert np.nanmean(r[learnable]) > np.nanmean(r[~learnable]) + 0.2
    p = model.provenance
    assert p["validation"] in ("group 'section0'", "group 'section1'")  # a training section, never the test one
    assert 0 <= p["best_epoch"] < p["epochs_run"] <= CNN["max_epochs"]
    assert model.embedding is None and model.uses_images and model.n_features == 128
    c = model.config
    assert (c["encoder"], c["patch_px"], c["patch_size_um"], c["tta"]) == ("small_cnn", 32, 112.0, True)
    assert c["stain_norm"] == "colour"  # trained on stain-normalised patches, and predicts on them
    assert "cnn: small_cnn" in repr(model) and "112 µm patches at 32 px" in repr(model)


def test_tta_changes_predictions_and_save_load_is_exact(base, model, tmp_path):
    patches = hs.pp.extract_patches(base, patch_size_um=112, patch_px=32, spots=np.arange(20), progress=False)
    with_tta = model.predict_patches(patches.images)
    without = model.predict_patches(patches.images, tta=False)
    assert with_tta.shape == without.shape == (20, len(model.genes))
    assert not np.allclose(with_tta, without)
    # TTA is the mean over the 8 turns and flips: a flipped patch predicts the same
    flipped = np.ascontiguousarray(patches.images[:, :, ::-1])
    np.testing.assert_allclose(model.predict_patches(flipped), with_tta, rtol=1e-4, atol=1e-5)

    path = model.save(tmp_path / "cnn.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"meta", "tensors"} and any(k.startswith("net.encoder.") for k in raw["tensors"])
    loaded = hs.tl.load_model(path)
    assert loaded.method == "cnn" and loaded.config == model.config and loaded.provenance == model.provenance
    np.testing.assert_array_equal(loaded.predict_patches(patches.images), with_tta)
    a = hs.tl.predict(base, model, spots=np.arange(10), inplace=False)
    b = hs.tl.predict(base, loaded, spots=np.arange(10), inplace=False)
    np.testing.assert_array_equal(a.X, b.X)
    # hs.tl.predict cuts the patches and maps them onto the reference stain first, as training did
    assert set(patches.region) == {"section0_spots"}
    normalised = hs.pp.normalize_stain(patches.images, hs.pp.estimate_stain(base, "section0_image"), amount=False)
    np.testing.assert_allclose(a.X, model.predict_patches(normalised[:10]), rtol=1e-6)  # other batches: rounding


def test_predict_on_an_image_only_table_adds_a_table(base, model):
    from spatialdata.models import get_table_keys

    table = base.tables["table"]
    slide = sd.SpatialData(images=dict(base.images), shapes=dict(base.shapes), tables={"table": table[:, []].copy()})
    spots = np.flatnonzero(held_out(table))[:12]
    hs.tl.predict(slide, model, key_added="expr", spots=spots, tta=False)
    assert sorted(slide.tables) == ["expr", "table"] and "expr" not in slide.tables["table"].layers
    new = slide.tables["expr"]
    assert list(new.var_names) == model.genes and list(new.obs_names) == list(table.obs_names[spots])
    assert new.uns["expr"]["method"] == "cnn" and not new.uns["expr"]["tta"]
    assert get_table_keys(new)[0] == "section2_spots"
    patches = hs.pp.extract_patches(base, patch_size_um=112, patch_px=32, spots=spots, progress=False)
    images = hs.pp.normalize_stain(patches.images, hs.pp.estimate_stain(base, "section2_image"), amount=False)
    np.testing.assert_array_equal(new.X, model.predict_patches(images, tta=False))
    assert new.uns["expr"]["stain_norm"] == "colour"


def test_training_is_deterministic_and_leaves_the_global_random_state(base, genes):
    # one section: early stopping watches a spatial block of it
    kw = {**CNN, "max_epochs": 1, "genes": genes[:4], "train": ["section0"], "stain_jitter": 0.05}
    state = torch.random.get_rng_state()
    a = hs.tl.fit(base, **kw)
    assert torch.equal(state, torch.random.get_rng_state())
    b = hs.tl.fit(base, **kw)
    patches = hs.pp.extract_patches(base, patch_size_um=112, patch_px=32, spots=np.arange(8), progress=False)
    np.testing.assert_array_equal(a.predict_patches(patches.images), b.predict_patches(patches.images))
    assert a.config["stain_jitter"] == 0.05 and a.config["flips"]
    assert a.provenance["validation"] == "a spatial block of the single training group"
    with pytest.raises(ValueError, match="stain_jitter"):
        hs.tl.fit(base, **{**kw, "stain_jitter": 2.0})


def test_encoder_weights_from_a_file(base, genes, tmp_path):
    from histoseq.tl._embed import get_encoder

    _, encoder, _ = get_encoder("small_cnn", random_state=7)
    path = tmp_path / "pretrained.pt"
    torch.save({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, path)  # a prefix, as pretraining writes
    # learning rates of zero: the trained model keeps the file's convolution weights exactly
    model = hs.tl.fit(base, genes=genes[:3], train=["section0"], **{**CNN, "max_epochs": 1, "lr": 0.0}, weights=path)
    assert model.config["weights"] == str(path.resolve()) and len(model.config["weights_sha256"]) == 64
    for name, value in encoder.state_dict().items():
        if name.endswith("weight") and value.ndim == 4:
            np.testing.assert_array_equal(model._fitted.arrays[f"net.encoder.{name}"], value.numpy())
    assert "pretrained.pt" in repr(model)


def test_cnn_errors(base):
    table = base.tables["table"]
    with pytest.raises(TypeError, match="SpatialData"):
        hs.tl.fit(table, genes=3, method="cnn", progress=False)
    with pytest.raises(ValueError, match="hand-crafted"):
        hs.tl.fit(base, genes=3, method="cnn", encoder="morphology", progress=False)
    with pytest.raises(ValueError, match="Unknown encoder"):
        hs.tl.fit(base, genes=3, method="cnn", encoder="vgg99", progress=False)
    with pytest.raises(ValueError, match="patch_px"):
        hs.tl.fit(base, genes=3, method="cnn", patch_px=4, progress=False)
    with pytest.raises(TypeError, match="Unknown option"):
        hs.tl.fit(base, genes=3, method="cnn", alphas=[1.0], progress=False)


def test_cnn_model_refuses_embeddings(model):
    with pytest.raises(TypeError, match="patches"):
        model.predict_embeddings(np.zeros((2, model.n_features)))
    with pytest.raises(ValueError, match="uint8 patches"):
        model.predict_patches(np.zeros((2, 64, 64, 3), dtype=np.uint8))


def test_cross_validate_runs_the_cnn_on_patches(base):
    sdata = sd.SpatialData(images=dict(base.images), shapes=dict(base.shapes), tables={"table": base["table"].copy()})
    quick = {**CNN, "max_epochs": 1}
    quick.pop("method")
    quick.pop("progress")
    cv = hs.tl.cross_validate(sdata, groups="sample_id", genes=5, method="cnn", key_added="cv", progress=False, **quick)
    assert list(cv.summary["test_group"]) == ["section0", "section1", "section2"]
    assert np.isfinite(cv.summary["pearson_mean"]).all()
    table = sdata.tables["table"]
    assert not any(k.startswith("X_") and k != "X_spatial" for k in table.obsm)  # the cnn needs no embedding
    cv_table = sdata.tables["cv"]  # the genes of all folds; each spot has those of its own fold
    assert cv_table.n_obs == table.n_obs and np.isfinite(cv_table.X).sum(1).min() == 5

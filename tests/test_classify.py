"""Classes of tissue from expression, learnt from the image: expression_classes, fit_classifier, classify, dice."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import histoseq as hs
from histoseq._sdata import affine_xy, transformations
from histoseq.tl import _classifier
from histoseq.tl.methods import get_method

TRAIN = ["section0", "section1"]
GENES = ["TUM1", "STRO1"]
OPTS = {"patch_sizes_um": (56.0, 112.0), "patch_px": 32, "Cs": (0.01, 0.1, 1.0), "progress": False}


@pytest.fixture(scope="module")
def sdata():
    """Three synthetic sections; classes from a tumour and a stroma gene, thresholds on sections 0 and 1."""
    sd = hs.datasets.synthetic(n_sections=3, section_size_um=800, progress=False)
    hs.tl.expression_classes(sd, genes=GENES, train=TRAIN)
    return sd


@pytest.fixture(scope="module")
def clf(sdata):
    return hs.tl.fit_classifier(sdata, train=TRAIN, **OPTS)


@pytest.fixture(scope="module")
def classified(sdata, clf):
    """``sdata`` with every spot classified and a dense map of the held-out section."""
    hs.tl.classify(sdata, clf, spacing_um=50, image_key="section2_image", progress=False)
    return sdata


def _snapshot(sd):
    t = sd.tables["table"]
    return (list(t.obs.columns), sorted(t.obsm), sorted(t.uns), sorted(sd.labels), dict(sd.attrs.get("histoseq", {})))


# --------------------------------------------------------------------------------------------------
# expression_classes
# --------------------------------------------------------------------------------------------------


def _counts_table(counts: np.ndarray, sections: list[str], genes: list[str]) -> ad.AnnData:
    obs = pd.DataFrame({"sample_id": sections}, index=[f"s{i}" for i in range(len(sections))])
    return ad.AnnData(np.asarray(counts, dtype=float), obs=obs, var=pd.DataFrame(index=genes))


def test_thresholds_come_from_the_training_spots_only(sdata):
    table = sdata.tables["table"].copy()
    hs.tl.expression_classes(table, genes=GENES, train=TRAIN)
    rec = dict(table.uns["expression_class"])
    train = table.obs["sample_id"].isin(TRAIN).to_numpy()
    expr = hs.tl._data.transform_counts(table.X, "log1p_cp10k", table.var_names.get_indexer(GENES))
    np.testing.assert_allclose([rec["thresholds"][g] for g in GENES], np.quantile(expr[train], 0.75, axis=0))
    np.testing.assert_allclose([rec["sd"][g] for g in GENES], expr[train].std(axis=0))
    assert rec["n_train_spots"] == int(train.sum()) and rec["train_groups"] == {"section0": 41, "section1": 39}
    # the held-out section's counts change: thresholds stay, its classes move
    before = table.obs["expression_class"].copy()
    X = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X, dtype=float).copy()
    X[~train] = np.random.default_rng(1).permutation(X[~train])
    table.X = X
    hs.tl.expression_classes(table, genes=GENES, train=TRAIN)
    assert table.uns["expression_class"]["thresholds"] == rec["thresholds"]
    assert (table.obs["expression_class"][train] == before[train]).all()
    assert (table.obs["expression_class"][~train] != before[~train]).any()
    # with all spots as training spots the thresholds do change
    hs.tl.expression_classes(table, genes=GENES)
    assert table.uns["expression_class"]["thresholds"] != rec["thresholds"]


def test_a_spot_high_in_several_genes_takes_the_one_furthest_above_in_training_sd():
    genes = ["A", "B", "C"]
    # every spot has 100 counts, so expression is log1p(100 * count) of each gene
    a = [0, 0, 0, 0, 10, 20, 40, 80]  # wide spread: high sd
    b = [0, 0, 0, 0, 1, 2, 3, 4]  # narrow spread: low sd
    counts = np.column_stack([a, b, 100 - np.add(a, b)])
    test = np.array([[90, 6, 4], [20, 2, 78], [0, 0, 100]])  # A far above in counts, B further in sd units
    table = _counts_table(np.vstack([counts, test]), ["t"] * 8 + ["h"] * 3, genes)
    classes = hs.tl.expression_classes(table, genes=["A", "B"], train=["t"], inplace=False)
    e = np.log1p(100 * np.vstack([counts, test])[:, :2].astype(float))
    thr, sd = np.quantile(e[:8], 0.75, axis=0), e[:8].std(axis=0)
    z = (e[8] - thr) / sd
    assert (e[8] > thr).all() and z[1] > z[0] and e[8, 0] - thr[0] > e[8, 1] - thr[1]
    assert classes.iloc[8:].tolist() == ["B", "tissue", "tissue"]
    assert list(classes.cat.categories) == ["A", "B", "tissue", "background"]
    # an exact tie goes to the gene listed first
    tie = _counts_table(np.column_stack([a, a, 200 - 2 * np.array(a)]), ["t"] * 8, genes)
    assert hs.tl.expression_classes(tie, genes=["A", "B"], inplace=False).iloc[-1] == "A"
    assert hs.tl.expression_classes(tie, genes=["B", "A"], inplace=False).iloc[-1] == "B"


def test_expression_classes_refuses_bad_input():
    table = _counts_table(np.arange(24).reshape(8, 3), ["t"] * 8, ["A", "B", "C"])
    with pytest.raises(KeyError, match=r"Gene\(s\) \['Nope', 'Zip'\] are not in the table"):
        hs.tl.expression_classes(table, genes=["A", "Nope", "Zip"])
    for q in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="`quantile` must lie strictly between 0 and 1"):
            hs.tl.expression_classes(table, genes=["A"], quantile=q)
    bad = table.copy()
    bad.X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hs.tl.expression_classes(bad, genes=["A"])
    table.obs["expression_class"] = "mine"
    with pytest.raises(ValueError, match="not written by `hs.tl.expression_classes`; pass `overwrite=True`"):
        hs.tl.expression_classes(table, genes=["A"])
    assert (table.obs["expression_class"] == "mine").all()
    hs.tl.expression_classes(table, genes=["A"], overwrite=True)
    hs.tl.expression_classes(table, genes=["A", "B"])  # its own column is replaced without asking
    assert table.uns["expression_class"]["genes"] == ["A", "B"]
    with pytest.raises(ValueError, match="distinct gene names"):
        hs.tl.expression_classes(table, genes=["A", "A"])


# --------------------------------------------------------------------------------------------------
# dice
# --------------------------------------------------------------------------------------------------


def test_dice_matches_hand_computed_values():
    truth = pd.Categorical(["a", "a", "b", "b", "c", "a", "b"], categories=["a", "b", "c", "d"])
    pred = pd.Categorical(["a", "b", "b", "b", "a", None, "b"], categories=["a", "b", "c", "d"])
    obs = pd.DataFrame({"t": truth, "p": pred, "sample_id": ["x"] * 6 + ["y"]}, index=[*"uvwxyz", "q"])
    table = ad.AnnData(np.zeros((7, 1)), obs=obs)
    scores = hs.tl.dice(table, "t", "p")
    # a: |T|=2 |P|=2 |T∩P|=1; b: 3, 4, 3; c: 1, 0, 0; d: absent (NaN, left out of the mean); row 5 has no prediction
    assert scores.loc["a", "dice"] == pytest.approx(0.5)
    assert scores.loc["b", "dice"] == pytest.approx(6 / 7)
    assert scores.loc["c", "dice"] == 0 and np.isnan(scores.loc["d", "dice"])
    assert scores.loc["mean", "dice"] == pytest.approx((0.5 + 6 / 7 + 0) / 3)
    assert scores[["n_truth", "n_pred"]].loc["b"].tolist() == [3, 4]
    conf = scores.attrs["confusion"]
    assert conf.to_numpy().sum() == 6 == scores.attrs["n_spots"] and scores.attrs["n_missing"] == 1
    assert conf.loc["a", "b"] == 1 and conf.loc["c", "a"] == 1 and conf.loc["b", "b"] == 3
    assert (conf.sum(axis=1).to_numpy() == scores["n_truth"].drop("mean").to_numpy()).all()
    one = hs.tl.dice(table, "t", "p", section="y")
    assert one.loc["b", "dice"] == 1 and one.attrs["n_spots"] == 1
    assert hs.tl.dice(table, "t", "p", spots=[0, 1]).loc["a", "dice"] == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match=r"no column obs\['nope'\]"):
        hs.tl.dice(table, "t", "nope")


# --------------------------------------------------------------------------------------------------
# the logistic method
# --------------------------------------------------------------------------------------------------


def test_logistic_method_reads_a_one_hot_matrix_and_returns_probabilities():
    from histoseq.tl._training_set import TrainingSet

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    X = rng.normal(size=(240, 5)) + np.eye(3, 5)[y] * 2.5
    data = TrainingSet(Y=np.eye(3)[y], genes=["a", "b", "c"], X=X, labels=np.repeat(["s0", "s1", "s2"], 80))
    method = get_method("logistic")
    assert method.task == "classification" and method.reads == "embedding"
    fitted = method.fit(data, Cs=(0.001, 0.1, 10.0))
    assert set(fitted.arrays) == {"scaler_mean", "scaler_scale", "coef", "intercept"}
    assert fitted.arrays["coef"].shape == (3, 5) and fitted.info["C"] in (0.001, 0.1, 10.0)
    assert fitted.info["C_rule"].startswith("cross-validation (leave-one-group-out, 3 folds")
    p = method.predict(fitted, None, X)
    np.testing.assert_allclose(p.sum(axis=1), 1)
    assert (p.argmax(axis=1) == y).mean() > 0.8
    binary = TrainingSet(Y=np.eye(2)[y % 2], genes=["a", "b"], X=X, labels=data.labels)
    assert method.predict(method.fit(binary, C=1.0), None, X).shape == (240, 2)
    with pytest.raises(ValueError, match="one-hot"):
        method.fit(TrainingSet(Y=np.full((240, 3), 0.5), genes=["a", "b", "c"], X=X))
    with pytest.raises(ValueError, match="learns classes, not expression"):
        hs.tl.fit(hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False), method="logistic")


# --------------------------------------------------------------------------------------------------
# fit_classifier and classify
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_classifier_beats_the_majority_class_and_shuffled_labels_on_a_held_out_section(sdata, clf, classified):
    assert clf.classes == ["TUM1", "STRO1", "tissue", "background"] and clf.features == "morphology"
    assert clf.provenance["train_groups"] == {"section0": 41, "section1": 39}
    assert clf.provenance["class_counts"]["background"] > 0
    table = classified.tables["table"]
    assert list(table.obs["predicted_class"].cat.categories) == clf.classes
    assert table.obsm["predicted_class_proba"].shape == (table.n_obs, 4)
    assert (table.obs["predicted_class"] != "background").all()  # measured spots lie on tissue
    mean = hs.tl.dice(classified, section="section2").loc["mean", "dice"]
    truth = table.obs["expression_class"]
    held = table.obs["sample_id"].to_numpy() == "section2"
    majority = truth[~held].value_counts().idxmax()
    table.obs["_majority"] = pd.Categorical(np.full(table.n_obs, majority), categories=truth.cat.categories)
    base = hs.tl.dice(classified, pred="_majority", section="section2").loc["mean", "dice"]
    shuffled = truth.astype(str).to_numpy().copy()
    rng = np.random.default_rng(0)
    for s in TRAIN:
        rows = np.flatnonzero(table.obs["sample_id"].to_numpy() == s)
        shuffled[rows] = shuffled[rng.permutation(rows)]
    table.obs["_shuffled"] = pd.Categorical(shuffled)
    control = hs.tl.fit_classifier(classified, "_shuffled", train=TRAIN, **OPTS)
    hs.tl.classify(classified, control, key_added="_control", spots=held, progress=False)
    ctrl = hs.tl.dice(classified, pred="_control", section="section2").loc["mean", "dice"]
    for key in ("_majority", "_shuffled", "_control"):
        table.obs.pop(key)
    assert mean > base + 0.2, (mean, base)
    assert mean > ctrl + 0.15, (mean, ctrl)


def test_dense_map_paints_background_off_tissue_and_overlays_the_image(classified, clf):
    labels = classified.labels["section2_image_predicted_class"]
    codes = np.asarray(labels)
    assert codes.dtype == np.uint8 and codes.shape == (16, 16)  # 800 µm / 50 µm
    record = classified.attrs["histoseq"]["class_maps"]["section2_image_predicted_class"]
    assert record["codes"] == {c: i + 1 for i, c in enumerate(clf.classes)} and record["spacing_um"] == 50
    assert classified.tables["table"].uns["predicted_class"]["labels"]["section2_image_predicted_class"] == record
    # the centre of label pixel (i, j) lands on the centre of grid tile (i, j) in every coordinate system
    image = classified.images["section2_image"]
    step = 50 / 0.5
    for cs in ("section2", "section2_um"):
        to_cs = affine_xy(transformations(labels)[cs])
        img_to_cs = affine_xy(transformations(image)[cs])
        for i, j in [(0, 0), (3, 11), (15, 15)]:
            got = to_cs @ [j + 0.5, i + 0.5, 1]
            want = img_to_cs @ [(j + 0.5) * step, (i + 0.5) * step, 1]
            np.testing.assert_allclose(got, want)
    # background off the tissue, tissue classes on it (tissue fraction of each tile from the tissue mask)
    mask = np.asarray(hs.pp.detect_tissue(classified, image_key="section2_image", inplace=False)) > 0
    k = mask.shape[0] // 16
    frac = mask[: 16 * k, : 16 * k].reshape(16, k, 16, k).mean(axis=(1, 3))
    bg = clf.classes.index("background") + 1
    assert (codes[frac == 0] == bg).mean() > 0.9
    assert (codes[frac == 1] != bg).mean() > 0.95
    assert set(np.unique(codes[frac == 1])) >= {1, 2}  # both marker classes appear on the tissue


def test_save_load_round_trip_and_refusals(sdata, clf, tmp_path):
    path = clf.save(tmp_path / "clf.pt")
    loaded = hs.tl.load_classifier(path)
    assert loaded.classes == clf.classes and loaded.patch_sizes_um == (56.0, 112.0)
    assert repr(loaded) == repr(clf) and "ClassifierModel('logistic'): 4 classes" in repr(clf)
    held = sdata.tables["table"].obs["sample_id"].to_numpy() == "section2"
    np.testing.assert_array_equal(loaded.predict_proba(sdata, spots=held), clf.predict_proba(sdata, spots=held))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(ValueError, match="not a histoseq model file"):
        hs.tl.load_classifier(junk)
    raw = torch.load(path, weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({**raw, "tensors": {**raw["tensors"], "x": _Payload()}}, evil)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        hs.tl.load_classifier(evil)
    table = sdata.tables["table"]
    table.obsm["X_demo"] = np.random.default_rng(0).normal(size=(table.n_obs, 4))
    model_path = hs.tl.fit(sdata, genes=3, embedding="X_demo", method="ridge", progress=False).save(tmp_path / "m.pt")
    del table.obsm["X_demo"]
    with pytest.raises(ValueError, match="of format 'histoseq.ClassifierModel'"):
        hs.tl.load_classifier(model_path)
    with pytest.raises(ValueError, match="of format 'histoseq.ExpressionModel'"):
        hs.tl.load_model(path)


class _Payload:
    """Any Python object: pickled by torch.save, refused by weights_only loading."""


def test_failed_calls_leave_sdata_unchanged(classified, clf, monkeypatch):
    before = _snapshot(classified)
    previous = classified.tables["table"].obs["predicted_class"].copy()
    for bad in (-5, 0, float("nan"), True, "50"):
        with pytest.raises(ValueError, match="`spacing_um` must be a positive distance"):
            hs.tl.classify(classified, clf, spacing_um=bad, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="give `spacing_um` too"):
        hs.tl.classify(classified, clf, image_key="section0_image", progress=False)
    # an encoder that cannot run: refused when the patches are embedded, before anything is written
    meta = {k: v for k, v in clf._meta.items()}
    broken = _classifier.ClassifierModel(
        **{**meta, "encoder": "no_such_encoder"},
        members=[{"patch_sizes_um": list(s), "n_features": f.n_features, "config": f.config, "info": f.info}
                 for s, f in clf._members],
        arrays={f"{i}.{k}": v for i, (_, f) in enumerate(clf._members) for k, v in f.arrays.items()},
    )  # fmt: skip
    with pytest.raises(ValueError, match="Unknown `encoder` 'no_such_encoder'"):
        hs.tl.classify(classified, broken, key_added="other", spacing_um=100, progress=False)

    # a failure in the dense map, after every spot was classified
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(_classifier, "_dense_map", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        hs.tl.classify(classified, clf, key_added="other", spacing_um=100, progress=False)
    assert _snapshot(classified) == before
    pd.testing.assert_series_equal(classified.tables["table"].obs["predicted_class"], previous)
    # columns histoseq did not write are kept unless `overwrite=True`
    classified.tables["table"].obs["mine"] = "x"
    with pytest.raises(ValueError, match=r"obs\['mine'\] exists and was not written by `hs.tl.classify`"):
        hs.tl.classify(classified, clf, key_added="mine", progress=False)
    classified.tables["table"].obs.pop("mine")


def test_fit_classifier_refuses_bad_labels(sdata):
    table = sdata.tables["table"]
    with pytest.raises(KeyError, match=r"no column obs\['nope'\].*hs.tl.expression_classes"):
        hs.tl.fit_classifier(sdata, "nope", **OPTS)
    table.obs["_num"] = np.arange(table.n_obs, dtype=float)
    with pytest.raises(TypeError, match="not classes: it must be categorical or strings"):
        hs.tl.fit_classifier(sdata, "_num", **OPTS)
    table.obs["_one"] = pd.Categorical(["a"] * table.n_obs)
    with pytest.raises(ValueError, match=r"single class \['a'\]"):
        hs.tl.fit_classifier(sdata, "_one", **OPTS)
    nan_labels = table.obs["expression_class"].astype(object).to_numpy().copy()
    nan_labels[:3] = None
    table.obs["_nan"] = pd.Categorical(nan_labels)
    with pytest.raises(ValueError, match=r"3 training spot\(s\) .* have no label \(NaN\)"):
        hs.tl.fit_classifier(sdata, "_nan", train=TRAIN, **OPTS)
    for key in ("_num", "_one", "_nan"):
        table.obs.pop(key)
    with pytest.raises(ValueError, match="Unknown `encoder` 'nope'"):
        hs.tl.fit_classifier(sdata, encoder="nope", **OPTS)
    with pytest.raises(ValueError, match="does not classify image features"):
        hs.tl.fit_classifier(sdata, method="ridge", **OPTS)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['alpha'\]"):
        hs.tl.fit_classifier(sdata, alpha=1.0, **OPTS)
    with pytest.raises(ValueError, match="`patch_sizes_um` must be distinct positive sizes"):
        hs.tl.fit_classifier(sdata, **{**OPTS, "patch_sizes_um": (56, 56)})


@pytest.mark.slow
def test_fit_classifier_takes_a_list_and_a_concatenated_ensemble(sdata):
    n = sdata.tables["table"].n_obs
    train = np.zeros(2 * n, dtype=bool)
    train[:n] = sdata.tables["table"].obs["sample_id"].isin(["section0"]).to_numpy()
    train[n:] = sdata.tables["table"].obs["sample_id"].isin(["section1"]).to_numpy()
    clf = hs.tl.fit_classifier(
        [sdata, sdata], train=train, ensemble="concat", stain_norm=False, n_background=10, **OPTS
    )
    assert clf.ensemble == "concat" and len(clf._members) == 1 and clf.provenance["n_train_spots"] == 80
    assert clf.provenance["class_counts"]["background"] == 10
    assert clf.predict_proba(sdata, spots=[0, 1, 2]).shape == (3, 4)


@pytest.mark.slow
def test_a_single_channel_image_is_classified_with_intensity_features(sdata):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from histoseq._sdata import image_levels

    images = {}
    for key, image in sdata.images.items():
        rgb = np.asarray(image_levels(image)[0].data).astype(float)
        gray = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).astype(np.uint8)[None]
        images[key] = Image2DModel.parse(
            gray, dims=("c", "y", "x"), transformations=transformations(image), scale_factors=[2, 2]
        )
    sd = SpatialData(images=images, shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"].copy()})
    clf = hs.tl.fit_classifier(sd, train=TRAIN, **OPTS)
    assert clf.channels == "gray" and clf.features == "intensity" and "background" in clf.classes
    hs.tl.classify(sd, clf, spacing_um=100, image_key="section2_image", progress=False)
    assert (sd.tables["table"].obs["predicted_class"] != "background").all()
    scores = hs.tl.dice(sd, section="section2")
    table = sd.tables["table"]
    majority = table.obs["expression_class"][table.obs["sample_id"].isin(TRAIN)].value_counts().idxmax()
    n_major = int((table.obs["expression_class"][table.obs["sample_id"] == "section2"] == majority).sum())
    n_held = int((table.obs["sample_id"] == "section2").sum())
    base = (2 * n_major / (n_major + n_held)) / 3  # the majority class for every held-out spot, three classes
    assert scores.loc["mean", "dice"] > base + 0.15
    assert "section2_image_predicted_class" in sd.labels
    # a classifier of RGB images refuses a gray one, and writes nothing
    rgb_clf = hs.tl.fit_classifier(sdata, train=TRAIN, stain_norm=False, **{**OPTS, "patch_sizes_um": (56.0,)})
    before = _snapshot(sd)
    with pytest.raises(ValueError, match="trained on rgb images, but image 'section0_image' is gray"):
        hs.tl.classify(sd, rgb_clf, key_added="rgb", progress=False)
    assert _snapshot(sd) == before


# --------------------------------------------------------------------------------------------------
# the plot
# --------------------------------------------------------------------------------------------------


def test_plot_draws_truth_beside_prediction_with_one_legend(classified, clf):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = hs.pl.classes(classified, section="section2", show=False)
    truth_ax, pred_ax = fig.axes
    assert [len(ax.collections) for ax in fig.axes] == [1, 1]
    n_spots = int((classified.tables["table"].obs["sample_id"] == "section2").sum())
    assert len(truth_ax.collections[0].get_offsets()) == n_spots
    assert len(truth_ax.images) == 1 and len(pred_ax.images) == 2  # the H&E, and the dense map over it
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == clf.classes
    assert "mean Dice" in pred_ax.get_title()
    # the same colour for a class in both panels
    table = classified.tables["table"]
    rows = np.flatnonzero(table.obs["sample_id"].to_numpy() == "section2")
    t_cls = table.obs["expression_class"].astype(str).to_numpy()[rows]
    p_cls = table.obs["predicted_class"].astype(str).to_numpy()[rows]
    t_col, p_col = truth_ax.collections[0].get_facecolors(), pred_ax.collections[0].get_facecolors()
    both = np.flatnonzero(t_cls == p_cls)
    np.testing.assert_allclose(t_col[both], p_col[both])
    plt.close(fig)
    with pytest.raises(ValueError, match="choose one with `section=`"):
        hs.pl.classes(classified, show=False)

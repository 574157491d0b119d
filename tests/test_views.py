"""Scan augmentation (``hs.tl.fit(augment=...)``, :mod:`histoseq.tl._views`): views of the training spots."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import histoseq as hs
from histoseq.tl._views import DEFAULT_AUGMENT, ScanShift, Views, resolve_augment, scan_views
from histoseq.tl.methods._kernel import fit_kernel, predict_kernel


def test_augment_values_are_read_and_bad_ones_refused():
    assert resolve_augment("auto") is None
    assert resolve_augment(False) == () and resolve_augment(None) == ()
    assert resolve_augment(True) == DEFAULT_AUGMENT
    assert resolve_augment([1.0, {"stain": 0.5}]) == (ScanShift(blur_um=1.0), ScanShift(stain=0.5))
    assert resolve_augment(2) == (ScanShift(blur_um=2.0),)
    with pytest.raises(ValueError, match="Unknown `augment`"):
        resolve_augment("blur")
    with pytest.raises(ValueError, match="twice"):
        resolve_augment([1.0, ScanShift(blur_um=1.0)])
    with pytest.raises(ValueError, match="Unknown field"):
        resolve_augment([{"sharpen": 1}])
    with pytest.raises(TypeError, match="scan shift"):
        resolve_augment(["blur"])
    with pytest.raises(ValueError, match="changes nothing"):
        ScanShift()
    with pytest.raises(ValueError, match="non-negative"):
        ScanShift(blur_um=-1.0)
    with pytest.raises(ValueError, match="positive factor"):
        ScanShift(stain=0.0)
    with pytest.raises(ValueError, match="must be a number"):
        ScanShift(blur_um=float("nan"))


def _scan_problem(rng, n):
    """Expression follows ``z``; dimension 0 reads ``z`` sharply but a blurred scan flattens it, dimension 1 reads
    ``z`` less sharply and the same in every scan."""
    z = rng.normal(size=n)
    sharp = np.c_[z + 0.05 * rng.normal(size=n), z + 0.4 * rng.normal(size=n)]
    blurred = sharp.copy()
    blurred[:, 0] = 0.2 * sharp[:, 0] + 1.0  # the sharp feature flattened and moved by the blur
    Y = np.c_[z, -z, np.tanh(z)] + 0.1 * rng.normal(size=(n, 3))
    return sharp, blurred, Y


def test_views_teach_the_kernel_to_read_a_blurred_scan():
    rng = np.random.default_rng(0)
    X, X_blur, Y = _scan_problem(rng, 240)
    labels = np.repeat(["a", "b", "c"], 80)
    options = {"random_state": 0, "expression": Y, "target_neighbors": 1, "gammas": (0.3, 3.0)}
    plain = fit_kernel(X, Y, labels, None, None, **options)
    augmented = fit_kernel(X, Y, labels, None, None, views=[X_blur], **options)
    assert augmented[2]["n_views"] == 1 and "n_views" not in plain[2]
    # the dimension that moves with the scan weighs less once the model sees both scans
    assert augmented[0]["column_weights"][0] < plain[0]["column_weights"][0]

    T, T_blur, Y_test = _scan_problem(np.random.default_rng(1), 200)

    def error(fitted, inputs):
        arrays, config, _ = fitted
        Z = (inputs - arrays["scaler_mean"]) / arrays["scaler_scale"]
        return float(np.mean((predict_kernel(Z, arrays, config) - Y_test) ** 2))

    # a blurred test slide: the plain model is lost, the augmented one reads it almost as the sharp one
    assert error(augmented, T_blur) < 0.5 * error(plain, T_blur)
    assert error(augmented, T_blur) < 2.0 * error(augmented, T) + 0.05
    # and the sharp slide costs little
    assert error(augmented, T) < error(plain, T) + 0.1


def test_views_must_match_the_embedding():
    rng = np.random.default_rng(0)
    X, _, Y = _scan_problem(rng, 60)
    with pytest.raises(ValueError, match="shape of the embedding"):
        fit_kernel(X, Y, None, None, None, random_state=0, views=[X[:10]])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_kernel(X, Y, None, None, None, random_state=0, views=[bad])


@pytest.fixture(scope="module")
def small():
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=400, random_state=0, progress=False)
    hs.tl.embed(sdata, patch_size_um=64, patch_px=32, progress=False)
    return sdata


def test_fit_trains_on_views_of_its_training_spots_and_records_them(small, monkeypatch, tmp_path):
    from histoseq.tl import _fit

    calls = []
    real = _fit.scan_views

    def spy(objects, table_key, embedding, shifts, *, masks=None, progress=True):
        calls.append(None if masks is None else [int(m.sum()) for m in masks])
        return real(objects, table_key, embedding, shifts, masks=masks, progress=progress)

    monkeypatch.setattr(_fit, "scan_views", spy)
    before = dict(small.tables["table"].obsm)
    model = hs.tl.fit(small, genes=5, embedding="X_morphology", train=["section0"], progress=False)
    table = small.tables["table"]
    n_train = int((table.obs["sample_id"] == "section0").sum())
    assert calls == [[n_train]]  # the training spots only, once
    assert model.provenance["augment"] == [s.record() for s in DEFAULT_AUGMENT]
    assert model.provenance["n_views"] == len(DEFAULT_AUGMENT)
    assert set(table.obsm) == set(before)  # nothing written into the user's table
    # the views change the model, not how it predicts: predictions still read each spot alone
    plain = hs.tl.fit(small, genes=5, embedding="X_morphology", train=["section0"], augment=False, progress=False)
    assert plain.provenance["augment"] == [] and "n_views" not in plain.provenance
    one = hs.tl.predict(small, model, spots=[0], inplace=False).X
    everything = hs.tl.predict(small, model, inplace=False).X
    np.testing.assert_allclose(one[0], everything[0], rtol=1e-6)
    # the record travels with the model's file
    again = hs.tl.load_model(model.save(tmp_path / "model.pt"))
    assert again.provenance["augment"] == model.provenance["augment"]
    np.testing.assert_allclose(hs.tl.predict(small, again, spots=[0], inplace=False).X, one, rtol=1e-6)


def test_views_of_a_stronger_stain_and_a_blur_change_the_morphology(small):
    views = scan_views([small], "table", "X_morphology", [ScanShift(blur_um=2.0), ScanShift(stain=1.5)], progress=False)
    X = small.tables["table"].obsm["X_morphology"]
    names = small.tables["table"].uns["morphology"]["params"]["feature_names"]
    h_mean = names.index("patch_h_mean")
    assert [a.shape for a in views.arrays] == [X.shape, X.shape]
    # a 2 µm blur leaves the mean haematoxylin but smooths its texture; a stronger stain raises it
    np.testing.assert_allclose(views.arrays[0][:, h_mean], X[:, h_mean], rtol=0.1, atol=0.01)
    assert not np.allclose(views.arrays[0], X)
    assert np.median(views.arrays[1][:, h_mean] / X[:, h_mean]) > 1.3


def test_augment_is_refused_where_it_cannot_apply_and_skipped_by_default(small, caplog):
    table = small.tables["table"].copy()
    with pytest.raises(ValueError, match="AnnData table holds no images"):
        hs.tl.fit(table, genes=5, embedding="X_morphology", augment=True, progress=False)
    with caplog.at_level(logging.INFO, logger="histoseq"):
        model = hs.tl.fit(table, genes=5, embedding="X_morphology", progress=False)  # "auto": none, said so
    assert model.provenance["augment"] == []
    assert "No scan augmentation" in caplog.text
    with pytest.raises(ValueError, match="does not learn from views"):
        hs.tl.fit(small, genes=5, embedding="X_morphology", method="ridge", augment=[1.0], progress=False)
    wrong = Views("X_morphology", (ScanShift(blur_um=1.0),), [np.zeros((3, 56))])
    with pytest.raises(ValueError, match="Compute them for this table"):
        hs.tl.fit(small, genes=5, embedding="X_morphology", augment=wrong, progress=False)


def test_cross_validation_computes_the_views_once(small, monkeypatch):
    from histoseq.tl import _fit

    calls = []
    real = _fit.scan_views

    def spy(*args, **kwargs):
        calls.append(kwargs.get("masks"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_fit, "scan_views", spy)
    cv = hs.tl.cross_validate(
        small, groups="sample_id", genes=5, embedding="X_morphology", augment=[1.0], progress=False
    )
    assert calls == [None]  # every spot, once, for both folds
    assert len(cv.summary) == 2

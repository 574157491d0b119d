"""Slides that differ from the training slides: the defaults do not assume a slide's make-up."""

from __future__ import annotations

import numpy as np
import pytest

import histoseq as hs
from histoseq.tl._data import transform_counts

TRAIN = ["section0", "section1"]


@pytest.fixture(scope="module")
def composition_shift():
    """Training sections half tumour, the test section 90 % tumour; the tumour-driven genes and their truth."""
    sdata = hs.datasets.synthetic(
        n_sections=3, section_size_um=1200, tumour_fraction=[0.5, 0.5, 0.9], random_state=0, progress=False
    )
    table = sdata.tables["table"]
    genes = [g for g in table.var_names if g.startswith("TUM")]
    test = (table.obs["sample_id"] == "section2").to_numpy()
    truth = transform_counts(table.X[test], "log1p_cp10k", table.var_names.get_indexer(genes))
    return sdata, genes, test, truth


def _bias_and_r(sdata, genes, test, truth, **options):
    model = hs.tl.fit(sdata, genes=genes, train=TRAIN, progress=False, **options)
    pred = hs.tl.predict(sdata, model, spots=test, inplace=False).X.astype(float)
    bias = np.abs(pred.mean(axis=0) - truth.mean(axis=0)).mean()
    r = np.mean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(len(genes))])
    return bias, r


@pytest.mark.slow
def test_a_composition_shift_does_not_bias_the_default(composition_shift):
    sdata, genes, test, truth = composition_shift
    shares = sdata.tables["table"].uns["synthetic"]["params"]["tumour_area_fraction"]
    assert shares[2] > shares[0] + 0.3  # the test section really holds more tumour
    bias, r = _bias_and_r(sdata, genes, test, truth)
    assert bias < 0.3  # mean prediction of the tumour genes within 0.3 log units of the truth
    assert r > 0.5
    # ranking within sections assumes every section holds the same tissue: it pulls the tumour-rich section's
    # features back to the training sections' mix, and its predictions with them
    rank_bias, _ = _bias_and_r(sdata, genes, test, truth, section_norm="rank")
    assert rank_bias > 0.5 and rank_bias > 2 * bias
    # and the default's r stays within 0.05 of a model that normalises nothing (pixels as scanned)
    raw = {"encoder": "morphology", "patch_size_um": [224.0, 448.0, 800.0], "patch_px": 224, "stain_norm": False}
    _, raw_r = _bias_and_r(sdata, genes, test, truth, embedding="X_raw_context", embed_kwargs=raw)
    assert r > raw_r - 0.05


def _section1_gap(plain, shifted, stain_norm) -> float:
    """Mean |difference| (in sd units) of section1's embedding between the plain and the shifted slides."""
    key = f"m_{stain_norm}"
    for s in (plain, shifted):
        hs.tl.embed(s, stain_norm=stain_norm, key_added=key, patch_size_um=112.0, patch_px=64, progress=False)
    a, b = plain.tables["table"].obsm[f"X_{key}"], shifted.tables["table"].obsm[f"X_{key}"]
    second = (plain.tables["table"].obs["sample_id"] == "section1").to_numpy()
    # the unshifted section is untouched by the other's stain: each image has its own estimate
    np.testing.assert_allclose(a[~second], b[~second], rtol=1e-5, atol=1e-5)
    return float(np.mean(np.abs(a[second] - b[second]) / (a.std(axis=0) + 1e-9)))


def test_embed_sees_stain_normalised_patches_estimated_per_image():
    """The same tissue in another stain colour, or stained more strongly, embeds (nearly) as the original."""
    kw = {"n_sections": 2, "section_size_um": 600, "random_state": 2, "progress": False}
    plain = hs.datasets.synthetic(**kw)
    hue = hs.datasets.synthetic(stain_hue=[0.0, 20.0], **kw)
    gaps = {mode: _section1_gap(plain, hue, mode) for mode in (False, "colour")}
    assert gaps["colour"] < 0.65 * gaps[False]  # the default maps the colours back
    uns = hue.tables["table"].uns["m_colour"]
    assert uns["params"]["stain_norm"] == "colour"
    assert "stain" not in hue.tables["table"].uns["m_False"]["images"]["section1_image"]
    strong = hs.datasets.synthetic(stain_strength=[1.0, 1.6], **kw)
    gaps = {mode: _section1_gap(plain, strong, mode) for mode in (False, "colour", "amount")}
    assert gaps["amount"] < 0.65 * gaps[False]  # rescaling the amount undoes a stronger stain
    # the default keeps it: from the tissue alone, a stronger stain and more tumour look alike
    assert gaps["colour"] > 0.5 * gaps[False] and gaps["colour"] > 1.5 * gaps["amount"]
    est = [strong.tables["table"].uns["m_amount"]["images"][f"section{i}_image"]["stain"] for i in (0, 1)]
    assert est[1]["max_concentrations"][0] > 1.3 * est[0]["max_concentrations"][0]
    with pytest.raises(ValueError, match="stain_norm"):
        hs.tl.embed(plain, stain_norm="quantile", progress=False)


@pytest.fixture(scope="module")
def sharp_and_blurred_patches():
    """The same spots' 112 µm patches (1 µm/px) of one section scanned sharp and out of focus (1.5 µm)."""
    kw = {"n_sections": 1, "section_size_um": 600, "random_state": 0, "progress": False}
    out = []
    for blur in (0.0, 1.5):
        sdata = hs.datasets.synthetic(blur_um=blur, **kw)
        out.append(hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=112, progress=False).images)
    return out


def test_smoothing_brings_the_features_of_a_blurred_scan_closer_to_the_sharp_one(sharp_and_blurred_patches):
    from histoseq.tl._morphology import MorphologyParams, morphology_features

    sharp, blurred = sharp_and_blurred_patches
    assert len(sharp) >= 10 and sharp.shape == blurred.shape
    assert not np.array_equal(sharp, blurred)

    def gap(smooth_um: float) -> float:
        """Mean |sharp - blurred| over patches and features, in units of the features' spread over the patches."""
        params = MorphologyParams(smooth_um=smooth_um)
        a, _ = morphology_features(sharp, um_per_px=1.0, params=params)
        b, _ = morphology_features(blurred, um_per_px=1.0, params=params)
        spread = a.std(axis=0)
        ok = spread > 1e-6  # features constant over the patches (none here, but no division by zero)
        return float(np.mean(np.abs(a - b)[:, ok] / spread[ok]))

    plain, smoothed = gap(0.0), gap(2.0)
    assert smoothed < 0.7 * plain, (plain, smoothed)


def test_no_smoothing_is_the_default_output_exactly(sharp_and_blurred_patches):
    from histoseq.tl._morphology import MorphologyParams, morphology_features, optical_density_stains

    sharp = sharp_and_blurred_patches[0][:8]
    default, names = morphology_features(sharp, um_per_px=1.0)
    zero, names0 = morphology_features(sharp, um_per_px=1.0, params=MorphologyParams(smooth_um=0.0))
    assert names0 == names and MorphologyParams().smooth_um == 0.0
    assert zero.dtype == default.dtype and zero.tobytes() == default.tobytes()
    assert not np.allclose(morphology_features(sharp, 1.0, MorphologyParams(smooth_um=1.0))[0], default)
    # the smoothing path turns intensities into densities by the same formula as the lookup table
    for factor in (1, 2):
        od, hed = optical_density_stains(sharp, factor)
        od_s, hed_s = optical_density_stains(sharp, factor, smooth_px=1e-3)  # a kernel of one tap: no blur
        np.testing.assert_allclose(od_s, od, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hed_s, hed, rtol=1e-5, atol=1e-6)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="smooth_um"):
            MorphologyParams(smooth_um=bad)

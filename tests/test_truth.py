"""Tests of the ground-truth maps of the synthetic dataset: cell-type labels and the expected-expression raster."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

import histoseq as hs
from histoseq.datasets import _synthetic
from histoseq.datasets._spots import _donor_index, _drive, _expected_means, _SpotFeatures
from histoseq.datasets._tissue import _GLASS

KW = {
    "n_sections": 2,
    "n_donors": 2,
    "section_size_um": 900,
    "spot_pitch_um": 70,
    "n_genes": 30,
    "random_state": 7,
    "library_size": [1.0, 0.5],
}
MEAN_SIZE_FACTOR = math.exp(0.3**2 / 2)  # log-normal size factors, sd 0.3
TRUE_COLUMNS = [
    "true_nuclei_count",
    "true_nuclear_area_um2",
    "true_eosin_fraction",
    "true_lumen_fraction",
    "true_frac_tumour",
    "true_frac_stroma",
    "true_frac_immune",
]


def _quiet(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hs.datasets.synthetic(progress=False, **kwargs)


@pytest.fixture(scope="module")
def drawn():
    """The SpatialData with ground truth, and the sections, genes and drivers its counts were drawn from."""
    captured = {}
    real = _synthetic._counts

    def spy(sections, genes, drivers=None, **kwargs):
        captured.update(sections=sections, genes=genes, drivers=drivers)
        return real(sections, genes, drivers, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_synthetic, "_counts", spy)
        sdata = _quiet(ground_truth=True, **KW)
    return sdata, captured


@pytest.fixture(scope="module")
def sdata(drawn):
    return drawn[0]


def _level0(element) -> np.ndarray:
    return (element["scale0"]["image"] if hasattr(element, "children") else element).values


def _section_rows(sdata, sid: str) -> np.ndarray:
    return (sdata.tables["table"].obs["sample_id"] == sid).to_numpy()


# --------------------------------------------------------------------------------------------------
# the default output does not change
# --------------------------------------------------------------------------------------------------


def test_ground_truth_adds_elements_and_changes_nothing_else(sdata):
    plain = _quiet(**KW)
    assert not plain.labels
    assert sorted(plain.images) == ["section0_image", "section1_image"]
    assert "ground_truth" not in plain.tables["table"].uns["synthetic"]
    assert sorted(sdata.labels) == ["section0_cell_types", "section1_cell_types"]
    assert sorted(sdata.images) == sorted([*plain.images, "section0_expected", "section1_expected"])
    for key in plain.images:
        for level in plain.images[key].children:
            np.testing.assert_array_equal(
                plain.images[key][level]["image"].values, sdata.images[key][level]["image"].values
            )
    a, b = plain.tables["table"], sdata.tables["table"]
    assert a.X.shape == b.X.shape and (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert a.uns["synthetic"]["params"] == b.uns["synthetic"]["params"]
    assert plain.attrs["histoseq"] == sdata.attrs["histoseq"]  # pixel sizes of the H&E images only


# --------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------


def test_elements_dtypes_and_transformations(sdata):
    from spatialdata.transformations import Identity, Scale, get_transformation

    var_names = list(sdata.tables["table"].var_names)
    for sid in ("section0", "section1"):
        image, labels = sdata.images[f"{sid}_image"], sdata.labels[f"{sid}_cell_types"]
        assert list(labels.children) == list(image.children)
        lab0 = labels["scale0"]["image"]
        assert lab0.dims == ("y", "x") and lab0.dtype == np.uint8
        assert lab0.shape == image["scale0"]["image"].shape[1:] == (1800, 1800)
        assert set(np.unique(lab0.values)) == {0, 1, 2, 3}
        tr = get_transformation(labels, get_all=True)
        assert isinstance(tr[sid], Identity)
        np.testing.assert_allclose(tr[f"{sid}_um"].to_affine_matrix(("y", "x"), ("y", "x")), np.diag([0.5, 0.5, 1]))

        expected = sdata.images[f"{sid}_expected"]
        assert expected.dims == ("c", "y", "x") and expected.dtype == np.float32
        assert expected.shape == (30, 90, 90)
        assert list(expected.coords["c"].values) == var_names
        tr = get_transformation(expected, get_all=True)
        assert set(tr) == {sid, f"{sid}_um"}
        assert all(isinstance(t, Scale) for t in tr.values())
        np.testing.assert_allclose(tr[sid].to_affine_matrix(("y", "x"), ("y", "x")), np.diag([20, 20, 1]))
        np.testing.assert_allclose(tr[f"{sid}_um"].to_affine_matrix(("y", "x"), ("y", "x")), np.diag([10, 10, 1]))
        assert np.isfinite(expected.values).all() and (expected.values > 0).all()
    record = sdata.tables["table"].uns["synthetic"]["ground_truth"]
    json.dumps(record)
    assert record["cell_types"] == {"section0": "section0_cell_types", "section1": "section1_cell_types"}
    assert record["expected"] == {"section0": "section0_expected", "section1": "section1_expected"}
    assert record["cell_type_codes"] == {"glass": 0, "tumour": 1, "stroma": 2, "immune": 3}
    assert record["expected_um"] == 10.0
    assert isinstance(record["expected_definition"], str) and "expected" in record["expected_definition"].lower()


def test_maps_are_not_taken_for_the_section_image(sdata):
    from histoseq._sdata import pick_image, resolve_image_key

    for sid in ("section0", "section1"):
        assert pick_image(sdata, sdata.shapes[f"{sid}_spots"], None, "the spots") == f"{sid}_image"
        one = sdata.subset([f"{sid}_image", f"{sid}_expected", f"{sid}_cell_types"])
        assert resolve_image_key(one, None) == f"{sid}_image"
    patches = hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=32)
    assert sorted(patches.params["images"]) == ["section0_image", "section1_image"]
    assert len(patches) == sdata.tables["table"].n_obs


# --------------------------------------------------------------------------------------------------
# cell-type labels
# --------------------------------------------------------------------------------------------------


def test_cell_types_are_glass_exactly_off_tissue(drawn):
    sdata, captured = drawn
    for s in captured["sections"]:
        cell_types = _level0(sdata.labels[f"{s.sample_id}_cell_types"])
        np.testing.assert_array_equal(cell_types == 0, s.truth.spots.labels == _GLASS)
        rgb = _level0(sdata.images[f"{s.sample_id}_image"]).astype(float).mean(0)
        assert abs(rgb[cell_types == 0].mean() - 240) < 2  # glass in the scan
        assert rgb[cell_types > 0].mean() < 215


def test_cell_types_agree_with_the_nuclei(sdata):
    obs = sdata.tables["table"].obs
    centre_type = np.empty(len(obs), dtype=int)
    for sid in ("section0", "section1"):
        rows = _section_rows(sdata, sid)
        cell_types = _level0(sdata.labels[f"{sid}_cell_types"])
        xy = np.floor(sdata.tables["table"].obsm["spatial"][rows]).astype(int)
        centre_type[rows] = cell_types[xy[:, 1], xy[:, 0]]
    assert (centre_type > 0).mean() > 0.9  # spots are kept with at least half of their disk on tissue
    for code, name in ((1, "tumour"), (2, "stroma"), (3, "immune")):
        frac = obs[f"true_frac_{name}"].to_numpy()
        inside, outside = frac[centre_type == code], frac[(centre_type != code) & (centre_type > 0)]
        assert len(inside) >= 10, name
        assert inside.mean() > 0.5 and inside.mean() > 2.5 * outside.mean(), (name, inside.mean(), outside.mean())


# --------------------------------------------------------------------------------------------------
# expected raster
# --------------------------------------------------------------------------------------------------


def test_hypothetical_spots_at_the_spot_centres_are_the_spots(drawn):
    _, captured = drawn
    genes, drivers = captured["genes"], captured["drivers"]
    for s in captured["sections"]:
        features = s.truth.spots.features(s.xy_px)
        np.testing.assert_array_equal(features["true_nuclei_count"], s.features["true_nuclei_count"])
        for col in TRUE_COLUMNS[1:]:
            np.testing.assert_allclose(features[col], s.features[col], rtol=0, atol=1e-9, err_msg=col)
        assert (features["tissue_fraction"] >= 0.5).all()
        # the means the counts were drawn from (before the size factor)
        drawn_means = _expected_means(
            genes, _drive(genes, drivers.z(s.features), s.spatial), _donor_index(s), s.library_size
        )
        np.testing.assert_allclose(s.truth.expected(s.xy_px, genes, drivers, s), drawn_means, rtol=1e-12)


def _brute_force_expected(truth, section, genes, drivers, xy: np.ndarray) -> np.ndarray:
    """Expected counts of spots at ``xy`` (non-overlapping) counted by the real spots' own code."""
    acc = _SpotFeatures(xy, truth.spots.radius_px)
    acc.add_labels(0, 0, truth.spots.labels)
    acc.add_nuclei(truth.spots.nuclei)
    drive = _drive(genes, drivers.z(acc.table()), truth.spatial(xy))
    return _expected_means(genes, drive, _donor_index(section), section.library_size)


@pytest.mark.parametrize("step_um", [None, 7.3])
def test_raster_is_the_expected_count_of_a_spot_at_each_pixel_centre(drawn, step_um):
    sdata, captured = drawn
    genes, drivers = captured["genes"], captured["drivers"]
    for s in captured["sections"]:
        truth = s.truth
        if step_um is None:
            raster = sdata.images[f"{s.sample_id}_expected"].values
        else:  # a raster whose pixel centres fall anywhere within the level-0 pixels
            truth = dataclasses.replace(truth, step_px=step_um / truth.pixel_size_um)
            raster = truth.expected_raster(genes, drivers, s)
        ny, nx = raster.shape[1:]
        stride = math.ceil(2 * truth.spots.radius_px / truth.step_px) + 1  # sampled spots do not overlap
        ii, jj = np.meshgrid(np.arange(1, ny - 1, stride), np.arange(1, nx - 1, stride), indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        xy = np.column_stack([(jj + 0.5) * truth.step_px, (ii + 0.5) * truth.step_px])
        expected = _brute_force_expected(truth, s, genes, drivers, xy)
        np.testing.assert_allclose(raster[:, ii, jj].T, expected, rtol=1e-6)
        assert len(xy) > 20


def test_counts_scatter_around_the_expected_values(drawn):
    sdata, captured = drawn
    genes, drivers = captured["genes"], captured["drivers"]
    table = sdata.tables["table"]
    counts = table.X.toarray()
    mu = np.concatenate([s.truth.expected(s.xy_px, genes, drivers, s) for s in captured["sections"]])
    ratio = counts.sum(0) / mu.sum(0) / MEAN_SIZE_FACTOR  # every gene, over all spots
    assert np.abs(ratio - 1).max() < 0.2, ratio
    # spots with near-equal expected values of a driven gene: their mean count follows
    g = int(np.flatnonzero(table.var_names == "IMM1")[0])
    which = np.empty(len(mu), dtype=int)
    which[np.argsort(mu[:, g], kind="stable")] = np.arange(len(mu)) * 4 // len(mu)  # quartiles of the spots
    means = np.array([counts[which == b, g].mean() / mu[which == b, g].mean() for b in range(4)])
    assert np.abs(means / MEAN_SIZE_FACTOR - 1).max() < 0.35, means
    assert mu[which == 3, g].mean() > 2 * mu[which == 0, g].mean()


def test_immune_genes_follow_the_immune_regions_and_noise_genes_are_constant(drawn):
    sdata, captured = drawn
    genes = captured["genes"]
    var = sdata.tables["table"].var
    imm = var.index[var["truth"] == "celltype_immune"]
    rising, falling = (g for g in imm if var.loc[g, "effect"] > 0), (g for g in imm if var.loc[g, "effect"] < 0)
    rising, falling = next(rising), next(falling)
    noise = np.flatnonzero((var["truth"] == "noise").to_numpy())
    for s in captured["sections"]:
        expected = sdata.images[f"{s.sample_id}_expected"]
        cell_types = _level0(sdata.labels[f"{s.sample_id}_cell_types"])
        centres = ((np.arange(expected.shape[1]) + 0.5) * s.truth.step_px).astype(int)
        region = cell_types[np.ix_(centres, centres)]
        immune, other = region == 3, (region == 1) | (region == 2)
        up, down = expected.sel(c=rising).values, expected.sel(c=falling).values
        assert up[immune].mean() > 1.5 * up[other].mean()
        assert down[immune].mean() < down[other].mean() / 1.5
        values = expected.values[noise]
        np.testing.assert_array_equal(values.min((1, 2)), values.max((1, 2)))
        constant = genes.base_rate[noise] * np.exp(genes.donor_shift[_donor_index(s), noise]) * s.library_size
        np.testing.assert_allclose(values[:, 0, 0], constant, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# zarr and errors
# --------------------------------------------------------------------------------------------------


def test_zarr_round_trip(sdata, tmp_path):
    import spatialdata as sd

    keys = [*sdata.labels, "section0_expected", "section1_expected", "section0_spots", "section1_spots"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.subset(keys).write(tmp_path / "s.zarr")  # without the H&E pyramids, which test_synthetic covers
        back = sd.read_zarr(tmp_path / "s.zarr")
    assert sorted(back.labels) == sorted(sdata.labels)
    for key in sdata.labels:
        np.testing.assert_array_equal(_level0(back.labels[key]), _level0(sdata.labels[key]))
    for sid in ("section0", "section1"):
        a, b = sdata.images[f"{sid}_expected"], back.images[f"{sid}_expected"]
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a.values, b.values)
        assert list(b.coords["c"].values) == list(a.coords["c"].values)
    record = back.tables["table"].uns["synthetic"]["ground_truth"]
    assert record["expected_um"] == 10.0
    assert {k: int(v) for k, v in record["cell_type_codes"].items()} == {
        "glass": 0,
        "tumour": 1,
        "stroma": 2,
        "immune": 3,
    }


def test_large_mode_refuses_ground_truth(tmp_path):
    with pytest.raises(ValueError, match="only without `path`"):
        hs.datasets.synthetic(n_sections=1, section_size_um=600, path=tmp_path / "a.zarr", ground_truth=True)
    assert not (tmp_path / "a.zarr").exists()


@pytest.mark.parametrize("value", [0.0, -5.0, float("nan"), float("inf")])
def test_invalid_ground_truth_um(value):
    with pytest.raises(ValueError, match="ground_truth_um"):
        hs.datasets.synthetic(n_sections=1, section_size_um=600, ground_truth=True, ground_truth_um=value)

"""Tests of the synthetic dataset: layout contract, determinism, ground truth, zarr round trips, large mode."""

from __future__ import annotations

import json
import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import histoseq as hs

MORPHOLOGY = {
    "nuclei_count": "true_nuclei_count",
    "nuclear_area": "true_nuclear_area_um2",
    "eosin": "true_eosin_fraction",
    "lumen": "true_lumen_fraction",
    "celltype_tumour": "true_frac_tumour",
    "celltype_stroma": "true_frac_stroma",
    "celltype_immune": "true_frac_immune",
}
TRUE_COLUMNS = list(MORPHOLOGY.values())


def _quiet(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hs.datasets.synthetic(progress=False, **kwargs)


@pytest.fixture(scope="module")
def sdata():
    return _quiet(random_state=0)


@pytest.fixture(scope="module")
def small():
    return _quiet(n_sections=2, section_size_um=600, random_state=3)


def _level0(sdata, key: str) -> np.ndarray:
    return sdata.images[key]["scale0"]["image"].values


def _log_normalised(table) -> np.ndarray:
    counts = table.X.toarray()
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


# --------------------------------------------------------------------------------------------------
# layout contract
# --------------------------------------------------------------------------------------------------


def test_elements_and_transformations(sdata):
    from spatialdata.transformations import Identity, Scale, get_transformation

    assert sorted(sdata.images) == [f"section{i}_image" for i in range(3)]
    assert sorted(sdata.shapes) == [f"section{i}_spots" for i in range(3)]
    assert list(sdata.tables) == ["table"]
    for i in range(3):
        sid = f"section{i}"
        image = sdata.images[f"{sid}_image"]
        assert list(image.children) == ["scale0", "scale1", "scale2"]
        level0 = image["scale0"]["image"]
        assert level0.dims == ("c", "y", "x")
        assert level0.shape == (3, 2400, 2400)
        assert level0.dtype == np.uint8
        assert list(level0.coords["c"].values) == ["r", "g", "b"]
        assert level0.data.chunksize == (3, 1024, 1024)
        assert image["scale2"]["image"].shape == (3, 600, 600)
        spots = sdata.shapes[f"{sid}_spots"]
        for element, axes in ((image, ("y", "x")), (spots, ("x", "y"))):
            tr = get_transformation(element, get_all=True)
            assert set(tr) == {sid, f"{sid}_um"}
            assert isinstance(tr[sid], Identity)
            assert isinstance(tr[f"{sid}_um"], Scale)
            assert tuple(tr[f"{sid}_um"].axes) == axes
            np.testing.assert_allclose(tr[f"{sid}_um"].scale, [0.5, 0.5])
        assert (spots.geometry.geom_type == "Point").all()
        np.testing.assert_allclose(spots["radius"], 55.0 / 2 / 0.5)
        assert list(spots.index) == list(range(len(spots)))
    assert sdata.attrs["histoseq"] == {
        "technology": "synthetic",
        "pixel_size_um": {f"section{i}_image": {"value": 0.5, "method": "synthetic"} for i in range(3)},
    }


def test_table_contract(sdata):
    from spatialdata.models import get_table_keys

    table = sdata.tables["table"]
    regions, region_key, instance_key = get_table_keys(table)
    assert sorted(regions) == sorted(sdata.shapes)
    assert (region_key, instance_key) == ("region", "spot_id")
    obs = table.obs
    assert {"region", "spot_id", "sample_id", "donor_id", *TRUE_COLUMNS} <= set(obs.columns)
    for col in ("region", "sample_id", "donor_id"):
        assert isinstance(obs[col].dtype, pd.CategoricalDtype)
    assert obs["spot_id"].dtype.kind == "i"
    assert obs["true_nuclei_count"].dtype.kind == "i"
    assert obs_names_ok(table)
    assert isinstance(table.X, sparse.csr_matrix)
    assert table.X.dtype == np.float32
    assert np.array_equal(table.X.data, np.round(table.X.data))
    assert table.obsm["spatial"].shape == (table.n_obs, 2)
    for region in regions:
        rows = (obs["region"] == region).to_numpy()
        spots = sdata.shapes[region]
        ids = obs.loc[rows, "spot_id"].to_numpy()
        assert sorted(ids) == list(spots.index)
        xy = np.column_stack([spots.geometry.x, spots.geometry.y])[ids]
        np.testing.assert_allclose(table.obsm["spatial"][rows], xy)
    # ground-truth features are in range
    assert (obs["true_nuclei_count"] >= 0).all()
    for col in ("true_eosin_fraction", "true_lumen_fraction", "true_frac_tumour", "true_frac_stroma"):
        assert obs[col].between(0, 1).all()
    fracs = obs[["true_frac_tumour", "true_frac_stroma", "true_frac_immune"]].sum(1)
    np.testing.assert_allclose(fracs[obs["true_nuclei_count"] > 0], 1.0)
    assert 150 < table.n_obs < 600


def obs_names_ok(table) -> bool:
    names = table.obs_names
    expected = table.obs["sample_id"].astype(str) + "_" + table.obs["spot_id"].astype(str)
    return names.is_unique and list(names) == list(expected)


def test_genes(sdata):
    table = sdata.tables["table"]
    var = table.var
    assert table.n_vars == 60
    assert var_names_look_like_genes(var.index)
    assert isinstance(var["truth"].dtype, pd.CategoricalDtype)
    assert var["learnable"].dtype == bool
    counts = var["truth"].value_counts()
    assert counts["noise"] == 20
    assert counts["spatial"] == 10
    assert var["learnable"].sum() == 30
    assert set(var.loc[var["learnable"], "truth"]) == set(MORPHOLOGY)  # every factor drives some genes
    np.testing.assert_array_equal(var["learnable"], var["truth"].isin(list(MORPHOLOGY)))
    params = table.uns["synthetic"]["params"]
    json.dumps(params)  # JSON-serialisable
    assert params["n_sections"] == 3
    assert params["random_state"] == 0
    # most genes are detected in most spots, with means of a few to a few tens of counts
    x = table.X.toarray()
    assert np.median((x > 0).mean(0)) > 0.95
    assert 3 < np.median(x.mean(0)) < 60


def var_names_look_like_genes(index) -> bool:
    return index.is_unique and all(name.rstrip("0123456789").isupper() for name in index)


def test_donors_round_robin():
    sdata = _quiet(n_sections=3, n_donors=2, section_size_um=400, n_genes=6)
    obs = sdata.tables["table"].obs
    donors = obs.groupby("sample_id", observed=True)["donor_id"].agg(lambda s: set(s.astype(str)))
    assert donors.to_dict() == {"section0": {"donor0"}, "section1": {"donor1"}, "section2": {"donor0"}}
    assert list(obs["donor_id"].cat.categories) == ["donor0", "donor1"]


def test_tissue_has_glass_around_it(sdata):
    for key in sdata.images:
        img = _level0(sdata, key)
        border = np.concatenate([img[:, :20].reshape(3, -1), img[:, -20:].reshape(3, -1)], axis=1)
        assert np.abs(border.astype(float).mean(1) - 240).max() < 3  # glass
        # 40 µm blocks: tissue (with its white lumina and clefts) is darker than glass on average
        gray = img.astype(float).mean(0).reshape(30, 80, 30, 80).mean((1, 3))
        tissue = gray < 230
        assert 0.3 < tissue.mean() < 0.85
        assert tissue[12:18, 12:18].all()  # tissue in the middle
        assert not tissue[0].any() and not tissue[-1].any() and not tissue[:, 0].any() and not tissue[:, -1].any()


def test_spot_grid_is_hexagonal_and_inside(sdata):
    from scipy.spatial import cKDTree

    for key in sdata.shapes:
        spots = sdata.shapes[key]
        xy = np.column_stack([spots.geometry.x, spots.geometry.y])
        d, _ = cKDTree(xy).query(xy, k=2)
        np.testing.assert_allclose(d[:, 1], 100 / 0.5, rtol=1e-6)  # the pitch, in pixels
        r = spots["radius"].iloc[0]
        assert (xy >= r).all() and (xy <= 2400 - r).all()


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_data_and_other_seed_differs(small):
    again = _quiet(n_sections=2, section_size_um=600, random_state=3)
    other = _quiet(n_sections=2, section_size_um=600, random_state=4)
    for key in small.images:
        np.testing.assert_array_equal(_level0(small, key), _level0(again, key))
        assert not np.array_equal(_level0(small, key), _level0(other, key))
    a, b = small.tables["table"], again.tables["table"]
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.X.shape != other.tables["table"].X.shape or (a.X != other.tables["table"].X).nnz > 0


def test_section_image_does_not_depend_on_n_sections(small):
    one = _quiet(n_sections=1, section_size_um=600, random_state=3)
    np.testing.assert_array_equal(_level0(one, "section0_image"), _level0(small, "section0_image"))


# --------------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------------


def test_morphology_genes_follow_their_feature_and_noise_genes_do_not(sdata):
    table = sdata.tables["table"]
    x = _log_normalised(table)
    var = table.var
    for g, (truth, effect) in enumerate(zip(var["truth"], var["effect"])):
        if truth in MORPHOLOGY:
            r = _corr(x[:, g], table.obs[MORPHOLOGY[truth]].to_numpy(float))
            assert np.sign(effect) * r > 0.5, (var.index[g], r)
        elif truth == "noise":
            for col in TRUE_COLUMNS:
                assert abs(_corr(x[:, g], table.obs[col].to_numpy(float))) < 0.2, (var.index[g], col)


def test_ridge_on_true_features_recovers_learnable_genes_only(sdata):
    table = sdata.tables["table"]
    x = _log_normalised(table)
    f = table.obs[TRUE_COLUMNS].to_numpy(float)
    f = np.column_stack([(f - f.mean(0)) / f.std(0), np.ones(len(f))])
    coef = np.linalg.solve(f.T @ f + np.eye(f.shape[1]), f.T @ x)
    r = np.array([_corr(f @ coef[:, g], x[:, g]) for g in range(x.shape[1])])
    truth = table.var["truth"].astype(str).to_numpy()
    learnable = table.var["learnable"].to_numpy()
    assert r[learnable].mean() > 0.75
    assert r[learnable].min() > 0.6
    assert r[truth == "noise"].mean() < 0.2  # in-sample fit of 8 features on pure noise
    assert r[truth == "spatial"].mean() < 0.35


def _pixel_stats(sdata) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Per spot: the fraction of pink pixels, of dark pixels, and the matching rows of ``obs``."""
    pink, dark, rows = [], [], []
    for key in sdata.shapes:
        sid = key.removesuffix("_spots")
        img = _level0(sdata, f"{sid}_image").astype(np.int16)
        spots = sdata.shapes[key]
        r = spots["radius"].iloc[0]
        for j, (x, y) in enumerate(zip(spots.geometry.x, spots.geometry.y)):
            y0, x0 = int(y - r), int(x - r)
            yy, xx = np.mgrid[y0 : int(y + r) + 1, x0 : int(x + r) + 1] + 0.5
            disk = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
            red, green = (img[c, y0 : int(y + r) + 1, x0 : int(x + r) + 1][disk] for c in range(2))
            pink.append((red - green > 40).mean())
            dark.append((red < 130).mean())
            rows.append(f"{sid}_{j}")
    return np.array(pink), np.array(dark), sdata.tables["table"].obs.loc[rows]


def _assert_features_match_pixels(sdata) -> None:
    """Pink pixels in a spot track its eosin fraction, dark pixels its total nuclear area."""
    pink, dark, obs = _pixel_stats(sdata)
    assert _corr(pink, obs["true_eosin_fraction"].to_numpy()) > 0.9
    assert _corr(dark, (obs["true_nuclei_count"] * obs["true_nuclear_area_um2"]).to_numpy()) > 0.9


def test_true_features_match_the_pixels(sdata):
    _assert_features_match_pixels(sdata)


# --------------------------------------------------------------------------------------------------
# zarr
# --------------------------------------------------------------------------------------------------


def test_zarr_round_trip(small, tmp_path):
    import spatialdata as sd

    path = tmp_path / "synthetic.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small.write(path)
        back = sd.read_zarr(path)
    assert sorted(back.images) == sorted(small.images)
    assert sorted(back.shapes) == sorted(small.shapes)
    for key in small.images:
        np.testing.assert_array_equal(_level0(back, key), _level0(small, key))
    a, b = small.tables["table"], back.tables["table"]
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert b.uns["synthetic"]["params"]["path"] is None
    assert back.attrs["histoseq"]["technology"] == "synthetic"


def test_large_mode_is_lazy_zarr_backed_and_deterministic(tmp_path):
    kwargs = {"n_sections": 1, "section_size_um": 1000, "image_chunks": 512}
    first = _quiet(path=tmp_path / "a.zarr", **kwargs)
    second = _quiet(path=tmp_path / "b.zarr", **kwargs)
    assert first.is_backed()
    image = first.images["section0_image"]["scale0"]["image"]
    assert isinstance(image.data, da.Array)
    assert image.data.name.startswith("from-zarr")
    assert image.shape == (3, 2000, 2000)
    assert image.data.chunksize == (3, 512, 512)
    block = image.data[:, 512:1024, 768:1536].compute()
    np.testing.assert_array_equal(block, second.images["section0_image"]["scale0"]["image"].data[:, 512:1024, 768:1536])
    corner = image.data[:, :40, :40].compute().astype(float)
    assert np.abs(corner.mean((1, 2)) - 240).max() < 3  # glass around the tissue
    table = first.tables["table"]
    pd.testing.assert_frame_equal(table.obs, second.tables["table"].obs)
    assert table.n_obs > 40
    assert (table.obs["true_nuclei_count"] > 0).mean() > 0.9
    _assert_features_match_pixels(first)  # features counted from the tiles as placed in the image
    assert table.uns["synthetic"]["params"]["large_mode"] is True
    with pytest.raises(FileExistsError, match="exists"):
        _quiet(path=tmp_path / "a.zarr", **kwargs)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spot_pitch_um": 40.0}, "would overlap"),
        ({"pixel_size_um": 0.0}, "pixel_size_um"),
        ({"n_sections": 0}, "at least 1"),
        ({"section_size_um": 100.0}, "too small"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hs.datasets.synthetic(progress=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# slide-level shifts
# --------------------------------------------------------------------------------------------------

SHIFT_KW = {"n_sections": 2, "section_size_um": 700, "random_state": 5}


@pytest.fixture(scope="module")
def unshifted():
    return _quiet(**SHIFT_KW)


def _tissue_od(sdata, reference, i: int) -> np.ndarray:
    """``(3, n)`` optical densities of section ``i``'s pixels that are tissue in ``reference``."""
    key = f"section{i}_image"
    tissue = _level0(reference, key).mean(0) < 225
    return -np.log(np.clip(_level0(sdata, key)[:, tissue].astype(float), 1, None) / 240.0)


def _assert_same_table(a, b) -> None:
    assert a.X.shape == b.X.shape
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)


def _section_totals(table, sid: str) -> np.ndarray:
    return np.asarray(table.X[(table.obs["sample_id"] == sid).to_numpy()].sum(1)).ravel()


def test_no_shift_records_nothing_and_neutral_shifts_change_nothing(unshifted):
    params = unshifted.tables["table"].uns["synthetic"]["params"]
    assert not {"stain_strength", "stain_hue", "tumour_fraction", "library_size", "blur_um"} & set(params)
    neutral = _quiet(**SHIFT_KW, stain_strength=1.0, stain_hue=[0, None], library_size=1, blur_um=0)
    for key in unshifted.images:
        np.testing.assert_array_equal(_level0(neutral, key), _level0(unshifted, key))
    _assert_same_table(neutral.tables["table"], unshifted.tables["table"])
    params = neutral.tables["table"].uns["synthetic"]["params"]
    assert params["stain_hue"] == [0.0, 0.0]
    assert np.isnan(params["tumour_fraction"]).all()


def test_stain_strength_scales_optical_density_not_counts(unshifted):
    shifted = _quiet(**SHIFT_KW, stain_strength=[0.6, 1.4])
    ratios = [_tissue_od(shifted, unshifted, i).mean() / _tissue_od(unshifted, unshifted, i).mean() for i in range(2)]
    assert 0.5 < ratios[0] < 0.7, ratios
    assert 1.3 < ratios[1] < 1.55, ratios
    _assert_same_table(shifted.tables["table"], unshifted.tables["table"])
    assert shifted.tables["table"].uns["synthetic"]["params"]["stain_strength"] == [0.6, 1.4]


def test_stain_hue_turns_the_colour_not_the_counts(unshifted):
    shifted = _quiet(**SHIFT_KW, stain_hue=[20, -20])
    for i, sign in enumerate((1, -1)):
        before, after = _tissue_od(unshifted, unshifted, i), _tissue_od(shifted, unshifted, i)
        red_blue = (after[0].mean() / after[2].mean()) / (before[0].mean() / before[2].mean())
        # +20°: eosin takes up blue (redder pink), -20°: it takes up red (magenta)
        assert (red_blue < 0.8) if sign > 0 else (red_blue > 1.25), (i, red_blue)
        assert abs(after.mean() / before.mean() - 1) < 0.1  # the stain amounts stay
    _assert_same_table(shifted.tables["table"], unshifted.tables["table"])


def test_tumour_fraction_sets_the_tumour_share_and_expression_follows(unshifted):
    shifted = _quiet(**SHIFT_KW, tumour_fraction=[0.5, 0.9])
    table = shifted.tables["table"]
    params = table.uns["synthetic"]["params"]
    np.testing.assert_allclose(params["tumour_area_fraction"], [0.5, 0.9], atol=0.01)
    np.testing.assert_allclose(params["tumour_fraction"], [0.5, 0.9])
    by_section = table.obs.groupby("sample_id", observed=True)["true_frac_tumour"].mean()
    np.testing.assert_allclose(by_section.to_numpy(), [0.5, 0.9], atol=0.07)
    # the expression model is absolute: the tumour-rich section expresses more of the tumour-rising gene
    x = _log_normalised(table)
    rising = np.flatnonzero((table.var["truth"] == "celltype_tumour").to_numpy() & (table.var["effect"] > 0).to_numpy())
    sec1 = (table.obs["sample_id"] == "section1").to_numpy()
    assert (x[sec1][:, rising].mean(0) > x[~sec1][:, rising].mean(0) + 0.3).all()
    _assert_features_match_pixels(shifted)  # the true_ features describe the tissue as drawn


def test_library_size_scales_the_counts_of_one_section(unshifted):
    shifted = _quiet(**SHIFT_KW, library_size=[1, 0.1])
    a, b = unshifted.tables["table"], shifted.tables["table"]
    ratio = _section_totals(b, "section0").mean() / _section_totals(b, "section1").mean()
    expected = _section_totals(a, "section0").mean() / _section_totals(a, "section1").mean() * 10
    assert 6 < ratio < 14
    assert abs(ratio / expected - 1) < 0.15
    np.testing.assert_array_equal(_section_totals(a, "section0"), _section_totals(b, "section0"))
    pd.testing.assert_frame_equal(a.obs, b.obs)


def _mean_gradient(image: np.ndarray, tissue: np.ndarray) -> float:
    img = image.astype(float)
    gy, gx = np.abs(np.diff(img, axis=1))[:, :, :-1], np.abs(np.diff(img, axis=2))[:, :-1, :]
    return float((gy + gx)[:, tissue[:-1, :-1]].mean())


def test_blur_softens_the_image_not_the_truth(unshifted):
    shifted = _quiet(**SHIFT_KW, blur_um=[0, 2.0])
    np.testing.assert_array_equal(_level0(shifted, "section0_image"), _level0(unshifted, "section0_image"))
    sharp, blurred = _level0(unshifted, "section1_image"), _level0(shifted, "section1_image")
    tissue = sharp.mean(0) < 225
    assert _mean_gradient(blurred, tissue) < 0.4 * _mean_gradient(sharp, tissue)
    assert abs(blurred[:, tissue].astype(float).mean() - sharp[:, tissue].astype(float).mean()) < 3
    _assert_same_table(shifted.tables["table"], unshifted.tables["table"])
    assert shifted.tables["table"].uns["synthetic"]["params"]["blur_um"] == [0.0, 2.0]


def test_large_mode_shifts(tmp_path):
    kwargs = {"n_sections": 1, "section_size_um": 1000, "image_chunks": 512, "random_state": 2}
    sdata = _quiet(path=tmp_path / "a.zarr", blur_um=1.5, tumour_fraction=0.8, **kwargs)
    table = sdata.tables["table"]
    assert table.uns["synthetic"]["params"]["tumour_area_fraction"][0] == pytest.approx(0.8, abs=0.01)
    assert table.obs["true_frac_tumour"].mean() == pytest.approx(0.8, abs=0.1)
    image = _level0(sdata, "section0_image")
    tissue = image.mean(0) < 225
    assert _mean_gradient(image, tissue) < 9  # about 17 unblurred
    # blurred across the chunk borders: no seam at x = 512
    steps = np.abs(np.diff(image[:, :, 500:524].astype(float), axis=2)).mean((0, 1))
    assert steps[11] < 2 * np.median(steps)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"library_size": -1.0}, "library_size"),
        ({"library_size": [1.0, 0.0]}, "library_size"),
        ({"stain_strength": [1.0, 1.0, 1.0]}, "stain_strength"),
        ({"tumour_fraction": 1.5}, "tumour_fraction"),
        ({"tumour_fraction": [0.5, -0.1]}, "tumour_fraction"),
        ({"stain_hue": float("nan")}, "stain_hue"),
        ({"stain_hue": 120}, "stain_hue"),
        ({"blur_um": -1}, "blur_um"),
        ({"blur_um": "2"}, "blur_um"),
        ({"stain_strength": True}, "stain_strength"),
    ],
)
def test_invalid_shifts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hs.datasets.synthetic(n_sections=2, section_size_um=600, progress=False, **kwargs)

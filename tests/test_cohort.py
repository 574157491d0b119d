"""Cohorts of slides in zarr stores: embed, predict, fit and cross_validate on paths, in process and on dask."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import histoseq as hs
from histoseq.tl._cohort import ModelFile, is_slides, open_slides

EMBED = {"patch_size_um": 112, "patch_px": 32}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Three synthetic slides (sections of different seeds, renamed section0..2) written as zarr stores."""
    import warnings

    full = hs.datasets.synthetic(n_sections=3, section_size_um=700, random_state=3, progress=False)
    root = tmp_path_factory.mktemp("cohort")
    paths = []
    for i in range(3):
        name = f"section{i}"
        table = full.tables["table"]
        table = table[(table.obs["sample_id"] == name).to_numpy()].copy()
        region_key = table.uns["spatialdata_attrs"]["region_key"]
        table.obs[region_key] = pd.Categorical([f"{name}_spots"] * table.n_obs)
        table.uns["spatialdata_attrs"]["region"] = f"{name}_spots"
        part = sd.SpatialData(
            images={f"{name}_image": full.images[f"{name}_image"]},
            shapes={f"{name}_spots": full.shapes[f"{name}_spots"]},
            tables={"table": table},
        )
        part.attrs.update(full.attrs)  # histoseq's record of pixel sizes
        path = root / f"{name}.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            part.write(path)
        paths.append(path)
    return paths


@pytest.fixture
def cohort(stores, tmp_path):
    """Fresh copies of the stores for a test that writes into them."""
    import shutil

    out = []
    for p in stores:
        shutil.copytree(p, tmp_path / p.name)
        out.append(tmp_path / p.name)
    return out


def _table(path):
    return sd.read_zarr(path).tables["table"]


def test_paths_are_opened_lazily(stores):
    import dask.array as da

    assert is_slides(stores) and is_slides(str(stores[0])) and not is_slides([sd.SpatialData()])
    opened = open_slides([str(p) for p in stores])
    assert len(opened) == 3
    for s in opened:
        (key,) = list(s.images)
        level0 = s.images[key]["scale0"].image if hasattr(s.images[key], "keys") else s.images[key]
        assert isinstance(level0.data, da.Array)  # on disk, read chunk by chunk


@pytest.mark.slow
def test_embed_fit_and_predict_paths(cohort, stores):
    assert hs.tl.embed(cohort, progress=False, **EMBED) is None
    for path, original in zip(cohort, stores, strict=True):  # each store as its slide embedded in memory
        expected = hs.tl.embed(sd.read_zarr(original), progress=False, inplace=False, **EMBED)
        got = _table(path)
        np.testing.assert_array_equal(got.obsm["X_morphology"], expected)
        assert got.uns["morphology"]["n_spots"] == got.n_obs
    model = hs.tl.fit(cohort[:2], genes=8, method="ridge", embedding="X_morphology", progress=False)
    # the same fit from objects in memory
    same = hs.tl.fit([sd.read_zarr(p) for p in cohort[:2]], genes=8, method="ridge", embedding="X_morphology")
    assert model.genes == same.genes
    assert hs.tl.predict(cohort, model, progress=False) is None
    for path in cohort:
        s = sd.read_zarr(path)
        assert "predicted" in s.tables and s.tables["predicted"].n_obs == s.tables["table"].n_obs
        direct = hs.tl.predict(sd.read_zarr(path), same, inplace=False, progress=False)
        np.testing.assert_allclose(s.tables["predicted"].X, direct.X, rtol=1e-6, atol=1e-6)
    tables = hs.tl.predict([str(p) for p in cohort], model, inplace=False, key_added="other", progress=False)
    assert [t.n_obs for t in tables] == [_table(p).n_obs for p in cohort]
    assert all("other" not in sd.read_zarr(p).tables for p in cohort)


@pytest.mark.slow
def test_cross_validate_paths(cohort):
    hs.tl.embed(cohort, progress=False, **EMBED)
    cv = hs.tl.cross_validate(
        cohort, groups="sample_id", genes=5, method="ridge", embedding="X_morphology", progress=False
    )
    assert cv.summary["test_group"].tolist() == ["section0", "section1", "section2"]
    with pytest.raises(ValueError, match="concatenate the stores first"):
        hs.tl.cross_validate(cohort, groups="sample_id", genes=5, embedding="X_morphology", key_added="cv")


def test_model_travels_as_its_file():
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=600, progress=False)
    t = sdata.tables["table"]
    t.obsm["X_demo"] = np.random.default_rng(0).normal(size=(t.n_obs, 6))
    model = hs.tl.fit(sdata, genes=4, method="ridge", embedding="X_demo", progress=False)
    carried = ModelFile.of(model)
    assert isinstance(carried.data, bytes) and carried.data[:2] == b"PK"  # histoseq's zip of JSON and tensors
    back = carried.load()
    assert back.genes == model.genes
    X = np.random.default_rng(0).normal(size=(5, model.n_features))
    np.testing.assert_allclose(back.predict_embeddings(X), model.predict_embeddings(X))


def test_bad_cohorts(cohort, tmp_path):
    before = sorted(p.name for p in cohort[0].rglob("*"))
    with pytest.raises(FileNotFoundError, match="No SpatialData zarr store"):
        hs.tl.embed([cohort[0], tmp_path / "missing.zarr"], **EMBED)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a zarr store"):
        hs.tl.embed([tmp_path / "plain"], **EMBED)
    with pytest.raises(ValueError, match="more than once"):
        hs.tl.embed([cohort[0], str(cohort[0])], **EMBED)
    with pytest.raises(TypeError, match="without it"):
        hs.tl.embed(sd.read_zarr(cohort[0]), client=object(), **EMBED)
    with pytest.raises(TypeError, match="as paths of zarr stores"):
        hs.tl.embed([cohort[0], sd.read_zarr(cohort[1])], client=object(), **EMBED)
    assert sorted(p.name for p in cohort[0].rglob("*")) == before  # nothing written by a refused call


def test_a_failing_slide_names_itself(cohort):
    import shutil

    shutil.rmtree(cohort[1] / "tables")  # a store without its table
    with pytest.raises(Exception) as info:
        hs.tl.embed(cohort, progress=False, **EMBED)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert str(cohort[1]) in notes and "2 of 3" in notes
    assert "X_morphology" in _table(cohort[0]).obsm  # the slide before it was written
    assert "X_morphology" not in _table(cohort[2]).obsm


@pytest.mark.slow
def test_local_cluster_matches_in_process(stores, tmp_path):
    """Two worker processes, one slide per task: the same stores as the in-process run."""
    import shutil

    from distributed import Client, LocalCluster

    here, there = [], []
    for p in stores:
        shutil.copytree(p, tmp_path / "here" / p.name)
        shutil.copytree(p, tmp_path / "there" / p.name)
        here.append(tmp_path / "here" / p.name)
        there.append(tmp_path / "there" / p.name)
    hs.tl.embed(here, progress=False, **EMBED)
    model = hs.tl.fit(here[:2], genes=6, method="kernel", embedding="X_morphology", progress=False)
    hs.tl.predict(here, model, progress=False)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        assert hs.tl.embed(there, client=client, progress=False, **EMBED) is None
        assert hs.tl.predict(there, model, client=client, progress=False) is None
        # a slide that fails names itself, the others are written
        shutil.rmtree(there[1] / "tables")
        with pytest.raises(RuntimeError, match=r"1 of 3 slides failed on the cluster: \[.*section1"):
            hs.tl.predict(there, model, client=client, key_added="again", progress=False)
    for a, b in zip(here, there, strict=True):
        if b == there[1]:
            continue
        sa, sb = sd.read_zarr(a), sd.read_zarr(b)
        np.testing.assert_array_equal(sa.tables["table"].obsm["X_morphology"], sb.tables["table"].obsm["X_morphology"])
        np.testing.assert_allclose(sa.tables["predicted"].X, sb.tables["predicted"].X, rtol=1e-6, atol=1e-7)
        assert "again" in sb.tables

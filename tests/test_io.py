from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import histoseq as hs
from histoseq.datasets._real import HER2ST_SECTIONS, MOB_MOUSE, MOB_SECTIONS, her2st, mouse_olfactory_bulb

# --- real data -----------------------------------------------------------------------------------------------------


def _raw_section(counts_path, spots_path):
    cnt = pd.read_csv(counts_path, sep="\t", index_col=0)
    spots = pd.read_csv(spots_path, sep="\t")
    spots = spots[spots.selected == 1]
    spots.index = spots.x.astype(str) + "x" + spots.y.astype(str)
    ids = cnt.index.intersection(spots.index)
    return cnt.loc[ids], spots.loc[ids]


@pytest.mark.realdata
def test_her2st_loads_every_section_with_raw_counts_and_coordinates(her2st_dir):
    sdata = her2st(her2st_dir, progress=False)
    table = sdata.tables["table"]
    assert sorted(table.obs["sample_id"].unique()) == list(HER2ST_SECTIONS)
    assert set(table.obs["donor_id"]) == {"C"}
    assert 13_000 < table.n_vars < 16_000
    assert "ERBB2" in table.var_names
    for s in HER2ST_SECTIONS:
        cnt, spots = _raw_section(
            her2st_dir / "ST-cnts" / f"{s}.tsv.gz", her2st_dir / "ST-spotfiles" / f"{s}_selection.tsv"
        )
        sub = table[table.obs["sample_id"] == s]
        assert sub.n_obs == len(cnt)
        assert sub.obs_names.tolist() == [f"{s}_{i}" for i in cnt.index]
        genes = ["ERBB2", "GAPDH", "ACTB"]
        np.testing.assert_array_equal(sub[:, genes].X.toarray(), cnt[genes].to_numpy())
        np.testing.assert_allclose(sub.obsm["spatial"], spots[["pixel_x", "pixel_y"]].to_numpy())
        # spots carry the same coordinates as obsm, in the section's pixel coordinate system
        shapes = sdata.shapes[f"{s}_spots"]
        np.testing.assert_allclose(shapes.geometry.x.to_numpy()[sub.obs["spot_id"]], spots["pixel_x"].to_numpy())
        info = sdata.attrs["histoseq"]["pixel_size_um"][f"{s}_image"]
        assert info["method"] == "spot_pitch"
        assert info["value"] == pytest.approx(0.735, abs=0.01)
        # spots are 100 µm circles
        assert shapes["radius"].iloc[0] * info["value"] == pytest.approx(50.0)
    assert table.X.dtype == np.float32
    assert float(table.X.sum()) == pytest.approx(float(np.rint(table.X.data).sum()))


@pytest.mark.realdata
def test_her2st_image_is_a_lazy_pyramid(her2st_dir):
    import dask.array as da

    sdata = her2st(her2st_dir, sections=["C3"], progress=False)
    image = sdata.images["C3_image"]
    levels = [image[k]["image"] for k in sorted(image.children)]
    assert len(levels) >= 3
    assert levels[0].shape == (3, 9936, 9270)
    assert all(isinstance(lvl.data, da.Array) for lvl in levels)
    assert levels[0].data.chunksize == (3, 1024, 1024)
    lazy = next(iter(levels[0].data.dask.values()))  # the file reader behind the graph, not decoded yet
    assert getattr(lazy, "_pixels", "decoded") is None


@pytest.mark.realdata
def test_her2st_patches_match_the_raw_jpeg(her2st_dir):
    sdata = her2st(her2st_dir, sections=["C2"], progress=False)
    p = hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=64, progress=False)
    full = hs.pp.extract_patches(sdata, patch_size_um=112, patch_px=64, level=0, progress=False)
    assert len(p) == sdata.tables["table"].n_obs
    assert p.params["images"]["C2_image"]["level"] == 1  # 1.47 µm/px serves 1.75 µm/px patches
    ps = sdata.attrs["histoseq"]["pixel_size_um"]["C2_image"]["value"]
    half = 56 / ps
    spots = pd.read_csv(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    spots.index = "C2_" + spots.x.astype(str) + "x" + spots.y.astype(str)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(next((her2st_dir / "ST-imgs" / "C" / "C2").glob("*.jpg"))) as im:
        for i in [0, 50, 100]:
            x, y = spots.loc[p.obs_names[i], ["pixel_x", "pixel_y"]]
            ref = np.asarray(
                im.resize((64, 64), Image.Resampling.BILINEAR, box=(x - half, y - half, x + half, y + half))
            )
            assert np.abs(ref.astype(float) - full.images[i]).mean() < 0.5  # same pixels, same resampling
            assert np.abs(ref.astype(float) - p.images[i]).mean() < 4.0  # via the pyramid
    # tissue, not glass: spot patches are darker than the image's empty corner
    corner = np.asarray(sdata.images["C2_image"]["scale3"]["image"][:, :40, :40]).mean()
    assert p.images.mean(axis=(1, 2, 3)).max() < corner


@pytest.mark.realdata
def test_mouse_olfactory_bulb_loads_with_symbols_and_donors(mob_dir):
    sdata = mouse_olfactory_bulb(mob_dir, progress=False)
    table = sdata.tables["table"]
    assert table.n_vars == 1000
    assert table.var["gene_ids"].str.startswith("ENSMUSG").all()
    assert "Gm42418" in table.var_names or "mt-Co1" in table.var_names
    counts = table.obs["sample_id"].value_counts()
    raw_n = {}
    for s in MOB_SECTIONS:
        cnt, spots = _raw_section(mob_dir / f"{s}.tsv", mob_dir / f"alignment_table_{s}.tsv")
        raw_n[s] = len(cnt)
        sub = table[table.obs["sample_id"] == s]
        gene_id = table.var["gene_ids"].iloc[7]
        np.testing.assert_array_equal(sub.X[:, 7].toarray().ravel(), cnt[gene_id].to_numpy())
        np.testing.assert_allclose(sub.obsm["spatial"], spots[["pixel_x", "pixel_y"]].to_numpy())
        assert set(sub.obs["donor_id"]) == {MOB_MOUSE[s]}
    assert counts.to_dict() == raw_n
    assert sum(raw_n.values()) == 379 + 407 + 438 + 403


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_st(tmp_path):
    """A 3×3 legacy ST section on a 200×200 px image (1 µm/px, 50 µm pitch)."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid([1, 2, 3], [1, 2, 3])
    ids = [f"{x}x{y}" for x, y in zip(xs.ravel(), ys.ravel())]
    spots = pd.DataFrame(
        {
            "x": xs.ravel(),
            "y": ys.ravel(),
            "new_x": xs.ravel(),
            "new_y": ys.ravel(),
            "pixel_x": xs.ravel() * 50.0,
            "pixel_y": ys.ravel() * 50.0,
            "selected": 1,
        }
    )
    counts = pd.DataFrame(rng.poisson(3, (9, 4)), index=ids, columns=["G1", "G2", "G3", "G4"])
    spots.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    with gzip.open(tmp_path / "counts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    Image.fromarray(rng.integers(100, 255, (200, 200, 3), dtype=np.uint8)).save(tmp_path / "he.png")
    return tmp_path, counts, spots


def test_tiny_section_reads(tiny_st):
    d, counts, _ = tiny_st
    sdata = hs.io.read_legacy_st(
        d / "counts.tsv.gz", d / "spots.tsv", d / "he.png", sample_id="S", spot_pitch_um=50, spot_diameter_um=25
    )
    table = sdata.tables["table"]
    assert table.n_obs == 9
    np.testing.assert_array_equal(table.X.toarray(), counts.to_numpy())
    assert sdata.attrs["histoseq"]["pixel_size_um"]["S_image"]["value"] == pytest.approx(1.0)
    assert "donor_id" not in table.obs
    p = hs.pp.extract_patches(sdata, patch_size_um=20, patch_px=20, progress=False)
    # 1 µm/px image, 1 µm/px patch: the patch is the image around the spot
    img = np.asarray(Image.open(d / "he.png"))
    np.testing.assert_array_equal(p.images[0], img[40:60, 40:60])


def test_reader_errors_name_the_problem(tiny_st, tmp_path):
    d, counts, spots = tiny_st
    kw = {"sample_id": "S"}
    with pytest.raises(FileNotFoundError, match="Counts file not found"):
        hs.io.read_legacy_st(d / "nope.tsv", d / "spots.tsv", d / "he.png", **kw)
    with pytest.raises(FileNotFoundError, match="Spot file not found"):
        hs.io.read_legacy_st(d / "counts.tsv.gz", d / "nope.tsv", d / "he.png", **kw)
    with pytest.raises(FileNotFoundError, match="Image file not found"):
        hs.io.read_legacy_st(d / "counts.tsv.gz", d / "spots.tsv", d / "nope.jpg", **kw)
    # ids that do not match
    other = counts.copy()
    other.index = ["99x99"] * 1 + [f"{i}x0" for i in range(8)]
    with pytest.raises(ValueError, match="No spot id of the counts"):
        hs.io.read_legacy_st(other, d / "spots.tsv", d / "he.png", **kw)
    # NaN counts
    nan = counts.astype(float)
    nan.iloc[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN counts"):
        hs.io.read_legacy_st(nan, d / "spots.tsv", d / "he.png", **kw)
    with pytest.raises(ValueError, match="negative"):
        hs.io.read_legacy_st(-counts, d / "spots.tsv", d / "he.png", **kw)
    # a spot file without pixel coordinates
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['pixel_x'"):
        hs.io.read_legacy_st(counts, spots.drop(columns="pixel_x"), d / "he.png", **kw)
    # spots beyond the image
    far = spots.copy()
    far.loc[0, "pixel_x"] = 5000
    with pytest.raises(ValueError, match="outside the 200×200 px image"):
        hs.io.read_legacy_st(counts, far, d / "he.png", **kw)
    with pytest.raises(ValueError, match="sample_id"):
        hs.io.read_legacy_st(counts, spots, d / "he.png", sample_id="")


def test_grayscale_and_16_bit_images(tiny_st):
    d, counts, spots = tiny_st
    gray = np.asarray(Image.open(d / "he.png").convert("L"))
    Image.fromarray(gray).save(d / "gray.png")
    with pytest.raises(ValueError, match="grayscale.*rgb=False"):
        hs.io.read_legacy_st(counts, spots, d / "gray.png", sample_id="S")
    sdata = hs.io.read_legacy_st(counts, spots, d / "gray.png", sample_id="S", rgb=False, pixel_size_um=1.0)
    p = hs.pp.extract_patches(sdata, patch_size_um=20, patch_px=20, rgb=False, progress=False)
    np.testing.assert_array_equal(p.images[0, ..., 0], gray[40:60, 40:60])
    Image.fromarray(gray.astype(np.uint16) * 257).save(d / "deep.png")
    with pytest.raises(TypeError, match="8-bit"):
        hs.io.read_legacy_st(counts, spots, d / "deep.png", sample_id="S")


def test_tiff_images_are_read_by_chunks(tiny_st):
    import dask.array as da
    import tifffile

    d, counts, spots = tiny_st
    img = np.asarray(Image.open(d / "he.png"))
    tifffile.imwrite(d / "he.tif", img, tile=(64, 64))
    arr = hs.io.read_image_lazy(d / "he.tif", chunks=64)
    assert isinstance(arr, da.Array)
    assert arr.shape == (3, 200, 200)
    np.testing.assert_array_equal(np.asarray(arr[:, 10:20, 30:40]), np.moveaxis(img[10:20, 30:40], -1, 0))
    sdata = hs.io.read_legacy_st(counts, spots, d / "he.tif", sample_id="T", chunks=64, pixel_size_um=1.0)
    p = hs.pp.extract_patches(sdata, patch_size_um=20, patch_px=20, progress=False)
    np.testing.assert_array_equal(p.images[0], img[40:60, 40:60])


def test_concatenate_refuses_repeated_names(tiny_st):
    d, counts, spots = tiny_st
    a = hs.io.read_legacy_st(counts, spots, d / "he.png", sample_id="A", donor_id="d1", spot_pitch_um=50)
    b = hs.io.read_legacy_st(counts, spots, d / "he.png", sample_id="B", donor_id="d2", spot_pitch_um=50)
    both = hs.io.concatenate([a, b])
    assert both.tables["table"].n_obs == 18
    assert set(both.attrs["histoseq"]["pixel_size_um"]) == {"A_image", "B_image"}
    p = hs.pp.extract_patches(both, patch_size_um=20, patch_px=20, progress=False)
    assert p.region.tolist() == ["A_spots"] * 9 + ["B_spots"] * 9
    with pytest.raises(ValueError, match="repeat across the sections"):
        hs.io.concatenate([a, a])


def test_dataset_readers_need_a_local_path(monkeypatch, tmp_path):
    monkeypatch.delenv("HISTOSEQ_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        her2st()
    with pytest.raises(FileNotFoundError, match="folder not found"):
        mouse_olfactory_bulb(tmp_path / "nope")
    with pytest.raises(ValueError, match="Unknown section"):
        her2st(tmp_path, sections=["Z9"])

"""Beyond the measured spots: any shapes element, and an image-only slide in one call."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import TableModel, get_table_keys

import histoseq as hs


@pytest.fixture(scope="module")
def model():
    train = hs.datasets.synthetic(n_sections=2, section_size_um=700, random_state=0, progress=False)
    hs.tl.embed(train, patch_size_um=112, patch_px=32, progress=False)
    return hs.tl.fit(train, genes=6, method="ridge", embedding="X_morphology", progress=False)


def image_only(seed: int = 5):
    slide = hs.datasets.synthetic(n_sections=1, section_size_um=600, random_state=seed, progress=False)
    del slide.tables["table"]
    return slide


def test_embed_on_shapes_without_a_table_makes_their_table():
    slide = image_only()
    hs.pp.make_grid(slide, image_key="section0_image", spacing_um=100, key_added="grid")
    hs.tl.embed(slide, shapes_key="grid", patch_size_um=112, patch_px=32, progress=False)
    table = slide.tables["grid_table"]
    TableModel().validate(table)
    assert get_table_keys(table) == ("grid", "region", "instance_id")
    assert table.n_obs == len(slide.shapes["grid"]) and table.n_vars == 0
    assert list(table.obs_names) == [str(i) for i in slide.shapes["grid"].index]
    assert {"grid_row", "grid_col", "x_um", "y_um"} <= set(table.obs.columns)
    assert np.isfinite(table.obsm["X_morphology"]).all()
    # inplace=False returns the embedding and leaves no table behind
    slide2 = image_only()
    hs.pp.make_grid(slide2, image_key="section0_image", spacing_um=100, key_added="grid")
    out = hs.tl.embed(slide2, shapes_key="grid", patch_size_um=112, patch_px=32, progress=False, inplace=False)
    assert out.shape == table.obsm["X_morphology"].shape and "grid_table" not in slide2.tables
    np.testing.assert_allclose(out, table.obsm["X_morphology"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_predict_an_image_only_slide_in_one_call(model, tmp_path):
    slide = image_only()
    path = tmp_path / "slide.zarr"
    slide.write(path)
    slide = sd.read_zarr(path)
    hs.tl.predict(slide, model, image_key="section0_image", spacing_um=100, progress=False)
    grid = slide.shapes["section0_image_grid"]
    pred = slide.tables["section0_image_grid_predicted"]
    TableModel().validate(pred)
    assert get_table_keys(pred)[0] == "section0_image_grid"
    assert pred.shape == (len(grid), 6) and list(pred.var_names) == model.genes
    assert np.isfinite(pred.X).all()
    assert pred.uns["section0_image_grid_predicted"]["method"] == "ridge"
    # the same values as predicting the grid's embedding directly
    X = slide.tables["section0_image_grid_table"].obsm["X_morphology"]
    np.testing.assert_allclose(pred.X, model.predict_embeddings(X), rtol=1e-5, atol=1e-5)
    # everything went to disk
    again = sd.read_zarr(path)
    assert {"section0_image_grid_table", "section0_image_grid_predicted"} <= set(again.tables)
    assert "section0_image_grid" in again.shapes
    # a second call on the same image names the grid that exists
    with pytest.raises(ValueError, match="shapes_key='section0_image_grid'"):
        hs.tl.predict(slide, model, image_key="section0_image", spacing_um=100, progress=False)
    hs.tl.predict(slide, model, shapes_key="section0_image_grid", key_added="again", progress=False)
    np.testing.assert_allclose(slide.tables["again"].X, pred.X)


@pytest.mark.slow
def test_a_failed_or_returned_prediction_leaves_the_slide_as_it_was(model):
    slide = image_only()
    before = (sorted(slide.shapes), sorted(slide.tables))
    out = hs.tl.predict(slide, model, image_key="section0_image", spacing_um=100, inplace=False, progress=False)
    assert out.n_vars == 6 and (sorted(slide.shapes), sorted(slide.tables)) == before
    with pytest.raises(ValueError, match="spacing_um"):
        hs.tl.predict(slide, model, image_key="section0_image", progress=False)
    with pytest.raises(ValueError, match="positive"):
        hs.tl.predict(slide, model, image_key="section0_image", spacing_um=-5, progress=False)
    # an embedding of another encoder: refused after the grid and its table were made, which are removed again
    other = hs.tl.fit(
        hs.datasets.synthetic(n_sections=2, section_size_um=700, random_state=1, progress=False),
        genes=3,
        method="ridge",
        embedding="X_cnn",
        embed_kwargs={"encoder": "small_cnn", "patch_px": 32},
        progress=False,
    )
    other._fitted.n_features += 1  # a model that cannot read what its encoder gives
    with pytest.raises(ValueError, match="dimensions"):
        hs.tl.predict(slide, other, image_key="section0_image", spacing_um=100, progress=False)
    assert (sorted(slide.shapes), sorted(slide.tables)) == before


@pytest.mark.slow
def test_predict_the_shapes_of_a_measured_table_by_region(model):
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=700, random_state=3, progress=False)
    hs.tl.predict(sdata, model, shapes_key="section1_spots", progress=False)
    pred = sdata.tables["predicted"]
    assert set(pred.obs["sample_id"]) == {"section1"} and get_table_keys(pred)[0] == "section1_spots"

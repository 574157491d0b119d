"""Dense maps (float images: attention, expected expression) are never taken for the scan of a section."""

from __future__ import annotations

import numpy as np
import pytest
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale

import histoseq as hs
from histoseq._sdata import candidate_images, is_map, resolve_image_key


@pytest.fixture
def sdata_with_map():
    sdata = hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False)
    pixel = sdata.attrs["histoseq"]["pixel_size_um"]["section0_image"]["value"]
    coarse = np.random.default_rng(0).random((2, 20, 20)).astype(np.float32)
    # a raster of 10 µm pixels on the same coordinate systems as the scan: finer than nothing, but a map
    sdata.images["section0_map"] = Image2DModel.parse(
        coarse,
        dims=("c", "y", "x"),
        c_coords=["g1", "g2"],
        transformations={
            "section0": Scale([10 / pixel] * 2, axes=("y", "x")),
            "section0_um": Scale([10.0] * 2, axes=("y", "x")),
        },
    )
    return sdata


def test_a_float_image_is_a_map_and_a_scan_is_not(sdata_with_map):
    assert is_map(sdata_with_map.images["section0_map"])
    assert not is_map(sdata_with_map.images["section0_image"])


def test_the_scan_is_found_beside_a_map(sdata_with_map):
    sdata = sdata_with_map
    assert resolve_image_key(sdata, None) == "section0_image"
    assert candidate_images(sdata, sdata.shapes["section0_spots"]) == ["section0_image"]
    patches = hs.pp.extract_patches(sdata, patch_size_um=56, patch_px=16, progress=False)
    assert patches.images.shape[1:] == (16, 16, 3)


def test_a_map_alone_is_still_named_in_the_dtype_error():
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel

    img = Image2DModel.parse(np.zeros((3, 32, 32), np.float32), dims=("c", "y", "x"), transformations={"s": Identity()})
    spots = ShapesModel.parse(
        np.array([[16.0, 16.0]]), geometry=0, radius=np.ones(1), transformations={"s": Identity()}
    )
    sdata = SpatialData(images={"only": img}, shapes={"spots": spots})
    assert resolve_image_key(sdata, None) == "only"
    with pytest.raises(TypeError, match="uint8"):
        hs.pp.extract_patches(sdata, shapes_key="spots", patch_size_um=8, patch_px=8, pixel_size_um=1.0)

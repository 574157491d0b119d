"""Test data with exactly known geometry."""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_geometry_sdata(
    *,
    height: int = 1500,
    width: int = 1300,
    pixel_size_um: float = 0.37,
    disk_diameter_um: float = 20.0,
    spot_pitch_um: float = 100.0,
    chunks: int = 256,
    scale_factors=(2, 2),
    dask: bool = True,
    seed: int = 0,
):
    """A SpatialData whose geometry is known exactly.

    A white image with a black disk of ``disk_diameter_um`` at every spot centre, and a red square
    (``8 µm``) 30 µm to the right of each centre, so both size and orientation of a patch can be measured.
    Spots sit on a square grid with ``spot_pitch_um`` spacing, jittered by sub-pixel amounts.
    """
    import anndata as ad
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(seed)
    step = spot_pitch_um / pixel_size_um
    xs = np.arange(step, width - step / 2, step)
    ys = np.arange(step, height - step / 2, step)
    gx, gy = np.meshgrid(xs, ys)
    xy = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.5, 0.5, (gx.size, 2))
    yy, xx = np.mgrid[0:height, 0:width] + 0.5  # pixel centres in intrinsic coordinates
    img = np.full((height, width, 3), 255, np.uint8)
    r = disk_diameter_um / 2 / pixel_size_um
    half_sq = 4.0 / pixel_size_um
    for cx, cy in xy:
        win = (slice(int(cy - 3 * r), int(cy + 3 * r) + 1), slice(int(cx - 3 * r), int(cx + 60 / pixel_size_um)))
        d2 = (xx[win] - cx) ** 2 + (yy[win] - cy) ** 2
        img[win][d2 <= r * r] = 0
        sq = (np.abs(xx[win] - (cx + 30 / pixel_size_um)) <= half_sq) & (np.abs(yy[win] - cy) <= half_sq)
        img[win][sq] = (255, 0, 0)
    data = np.moveaxis(img, -1, 0)
    if dask:
        data = da.from_array(data, chunks=(3, chunks, chunks))
    t = {"s": Identity(), "s_um": Scale([pixel_size_um, pixel_size_um], axes=("y", "x"))}
    image = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=list(scale_factors) if scale_factors else None,
        chunks=(3, chunks, chunks),
        transformations=t,
    )
    n = len(xy)
    shapes = ShapesModel.parse(
        xy, geometry=0, radius=np.full(n, 27.5 / pixel_size_um), index=pd.Index(np.arange(n)), transformations=t
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * n), "spot_id": np.arange(n)},
        index=pd.Index([f"spot{i}" for i in range(n)]),
    )
    table = TableModel.parse(
        ad.AnnData(np.ones((n, 2), np.float32), obs=obs), region="spots", region_key="region", instance_key="spot_id"
    )
    return SpatialData(images={"img": image}, shapes={"spots": shapes}, tables={"table": table})

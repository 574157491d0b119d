"""Patch throughput and peak memory: histoseq vs spatialdata's ImageTilesDataset and squidpy's spot crops.

Run:  python benchmarks/patches.py            (full: a 40,000 × 40,000 px slide for the memory figure)
      python benchmarks/patches.py --quick    (a minute: smaller slides, same measurements)

Part 1 cuts the same spots (112 µm at 224 px, the HEST setting) from the same zarr-backed synthetic slide with
each tool, cold (a fresh process each, nothing cached), and prints patches per second.
Part 2 cuts patches for every spot of a large zarr-backed slide in a fresh process and prints its peak RSS:
streamed in batches (``hs.pp.iter_patches``, how embeddings consume them) and all kept in memory
(``hs.pp.extract_patches``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PATCH_UM, PATCH_PX = 112.0, 224


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line; add its peak RSS."""
    wrapped = textwrap.dedent(code) + textwrap.dedent(
        """
        import json as _j, resource as _r
        _out["peak_rss_mb"] = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + _j.dumps(_out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def make_slide(path: Path, size_um: float, pitch_um: float) -> None:
    """Write a zarr-backed synthetic slide (skipped when it exists)."""
    if path.exists():
        return
    t = time.perf_counter()
    out = _child(
        f"""
        import histoseq as hs
        sdata = hs.datasets.synthetic(n_sections=1, section_size_um={size_um}, spot_pitch_um={pitch_um},
                                      path={str(path)!r}, progress=False)
        img = sdata.images["section0_image"]["scale0"]["image"]
        _out = {{"shape": list(img.shape), "spots": int(sdata.tables["table"].n_obs)}}
        """
    )
    if "error" in out:
        raise RuntimeError(f"could not write the slide: {out['error']}")
    print(
        f"  wrote {path.name}: {out['shape'][2]:,} × {out['shape'][1]:,} px, {out['spots']:,} spots "
        f"in {time.perf_counter() - t:.0f} s (peak RSS {out['peak_rss_mb']:.0f} MB)"
    )


HISTOSEQ = """
import time, numpy as np, spatialdata as sd, histoseq as hs
sdata = sd.read_zarr({path!r})
spots = np.arange({n})
t = time.perf_counter()
p = hs.pp.extract_patches(sdata, spots=spots, patch_size_um={um}, patch_px={px}, progress=False)
dt = time.perf_counter() - t
_out = {{"n": len(p), "seconds": dt, "shape": list(p.images.shape[1:])}}
"""

IMAGE_TILES = """
import time, numpy as np, spatialdata as sd
from spatialdata.dataloader import ImageTilesDataset
sdata = sd.read_zarr({path!r})
t = time.perf_counter()
ds = ImageTilesDataset(
    sdata, regions_to_images={{"section0_spots": "section0_image"}},
    regions_to_coordinate_systems={{"section0_spots": "section0_um"}}, tile_dim_in_units={um},
    rasterize=True, rasterize_kwargs={{"target_width": {px}}}, table_name="table",
)
# each item is a SpatialData holding the rasterized tile; the first n spots are timed
tiles = [np.asarray(ds[i].images["section0_image"].data) for i in range({n})]
dt = time.perf_counter() - t
_out = {{"n": len(tiles), "seconds": dt, "shape": list(tiles[0].shape)}}
"""

SQUIDPY = """
import time, numpy as np, spatialdata as sd, squidpy as sq
sdata = sd.read_zarr({path!r})
adata = sdata.tables["table"][:{n}].copy()
img = sdata.images["section0_image"]["scale0"]["image"]
um_per_px = {pixel_size_um}
adata.uns["spatial"] = {{"s": {{"scalefactors": {{"spot_diameter_fullres": {um} / um_per_px,
                                                  "tissue_hires_scalef": 1.0}}}}}}
t = time.perf_counter()
ic = sq.im.ImageContainer(img.transpose("y", "x", "c").data, layer="image", lazy=True)
crops = [np.asarray(c["image"].data)[..., 0, :] for c in ic.generate_spot_crops(
    adata, spatial_key="spatial", library_id="s", scale={px} / ({um} / um_per_px), as_array=False)]
dt = time.perf_counter() - t
_out = {{"n": len(crops), "seconds": dt, "shape": list(crops[0].shape)}}
"""

MEMORY = """
import time, spatialdata as sd, histoseq as hs
sdata = sd.read_zarr({path!r})
n = sdata.tables["table"].n_obs
t = time.perf_counter()
if {streamed}:
    seen = 0
    for batch in hs.pp.iter_patches(sdata, patch_size_um={um}, patch_px={px}, batch_size=256, progress=False):
        seen += len(batch)
else:
    seen = len(hs.pp.extract_patches(sdata, patch_size_um={um}, patch_px={px}, progress=False))
_out = {{"n": seen, "seconds": time.perf_counter() - t}}
"""

BASELINE = """
import spatialdata as sd, histoseq as hs, torch
sdata = sd.read_zarr({path!r})
_out = {{}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small slides (about a minute)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep the slides (default: a temp dir)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="histoseq-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    speed_um, n_speed, n_other = (4000.0, 300, 40) if args.quick else (10000.0, 1000, 100)
    big_um, big_pitch = (6000.0, 100.0) if args.quick else (20000.0, 210.0)

    print(
        f"histoseq patch benchmark ({'quick' if args.quick else 'full'}), patches of {PATCH_UM:g} µm at {PATCH_PX} px"
    )
    print("Slides (synthetic, zarr-backed, 0.5 µm/px, 1024 px chunks):")
    speed_slide = work / f"speed_{int(speed_um)}.zarr"
    big_slide = work / f"big_{int(big_um)}.zarr"
    make_slide(speed_slide, speed_um, 100.0)
    make_slide(big_slide, big_um, big_pitch)

    print(f"\n1. Throughput on the same slide and spots (cold start, one process each; {speed_slide.name})")
    kw = {"path": str(speed_slide), "um": PATCH_UM, "px": PATCH_PX, "pixel_size_um": 0.5}
    rows = [
        ("histoseq extract_patches", _child(HISTOSEQ.format(n=n_speed, **kw))),
        ("spatialdata ImageTilesDataset", _child(IMAGE_TILES.format(n=n_other, **kw))),
        ("squidpy generate_spot_crops", _child(SQUIDPY.format(n=n_other, **kw))),
    ]
    rates = {}
    print(f"  {'method':<32}{'patches':>8}{'seconds':>9}{'patches/s':>11}  patch shape")
    for name, r in rows:
        if "error" in r:
            print(f"  {name:<32} failed: {r['error']}")
            continue
        rates[name] = r["n"] / r["seconds"]
        print(f"  {name:<32}{r['n']:>8}{r['seconds']:>9.2f}{rates[name]:>11.1f}  {tuple(r['shape'])}")
    ours = rates.get("histoseq extract_patches")
    for name, rate in rates.items():
        if name != "histoseq extract_patches" and ours:
            target = " (target ≥ 10×)" if "ImageTilesDataset" in name else ""
            print(f"  histoseq / {name.split()[0]} {name.split()[1]}: {ours / rate:.1f}×{target}")

    print(f"\n2. Peak memory, every spot of {big_slide.name} (fresh process each)")
    base = _child(BASELINE.format(path=str(big_slide)))
    print(f"  baseline (imports + read_zarr): peak RSS {base.get('peak_rss_mb', float('nan')):.0f} MB")
    for label, streamed in (
        ("iter_patches (streamed, batches of 256)", True),
        ("extract_patches (all in memory)", False),
    ):
        r = _child(MEMORY.format(path=str(big_slide), um=PATCH_UM, px=PATCH_PX, streamed=streamed))
        if "error" in r:
            print(f"  {label}: failed: {r['error']}")
            continue
        kept = r["n"] * PATCH_PX * PATCH_PX * 3 / 2**20 if not streamed else 0
        verdict = "meets" if r["peak_rss_mb"] < 1536 else "MISSES"
        print(
            f"  {label:<42} {r['n']:,} patches in {r['seconds']:.1f} s ({r['n'] / r['seconds']:.0f}/s), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB ({verdict} the 1.5 GB target; patches kept: {kept:.0f} MB)"
        )


if __name__ == "__main__":
    main()

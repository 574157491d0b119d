"""Predicting an image-only whole slide in one call: wall time and peak memory, at 1× and 4× tissue area.

Run:  python benchmarks/slide.py            (full: 20,000² and 40,000² px slides; about 7 minutes on 2 cores)
      python benchmarks/slide.py --quick    (smoke test: 4,000² and 8,000² px slides, about a minute)
      python benchmarks/slide.py --sizes 20000 40000 --tmp /scratch/slides   (keep the slides for a rerun)
      python benchmarks/slide.py --embedding context   (the default embedding of hs.tl.fit: about 3× the time)

What it measures: ``hs.tl.predict(slide, model, image_key="section0_image", spacing_um=100)`` on a zarr-backed
slide that holds only an image (no table, no spots). That one call detects the tissue, lays a grid of 100 µm
tiles on it, makes the grid's table, embeds the tiles (patches streamed in batches from the zarr pyramid),
predicts, and writes the grid, its table and the table of predictions to the store.

- The model is trained once, in its own process, on a small in-memory synthetic dataset (two 1.2 mm
  sections, 50 genes) with the default method (``"kernel"``) and, by default, a one-scale morphology
  embedding: ``"X_morphology"`` of 112 µm patches at 224 px (the HEST patch) with stain normalisation. Each
  tile then costs one patch; ``--embedding context`` uses ``hs.tl.fit``'s default ``"X_morphology_context"``
  (the same encoder on three patches of 224, 448 and 800 µm at 224 px), about three times the time per tile,
  which would take a full run past 15 minutes on 2 cores. The memory figure does not depend on the choice:
  both stream patches in batches.
- The slides are ``hs.datasets.synthetic(n_sections=1, section_size_um=px / 2, spot_pitch_um=250, path=...)``
  (0.5 µm/px, 1024 px chunks, pyramid ×2 ×2), written lazily, then their table and spots are deleted from the
  store. The sides are ``--sizes`` in pixels; the default pair differs twice in side, so four times in tissue.
- Each prediction runs in a fresh interpreter, so its peak RSS (``ru_maxrss``) is that of the prediction
  alone, plus the imports and ``read_zarr`` (shown as "RSS before"). The phases are timed from histoseq's log:
  grid (tissue detection and grid), embed (stain estimate, patches, features, table write), predict + write.

Targets (from the issue): peak RSS below 2 GB on a 40,000 × 40,000 px slide, and time linear in tissue
area: the time per tile of the largest slide at most 1.25× that of the smallest (fixed costs make it less).
The exit status is 2 when a target is missed (1 when training or writing a slide fails).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PIXEL_UM = 0.5
SPACING_UM = 100.0
IMAGE_KEY = "section0_image"
PEAK_RSS_TARGET_MB = 2048.0
#: time per tile of the largest slide over that of the smallest, at most (linear in tissue area)
LINEAR_TOLERANCE = 1.25
FULL_SIZES = (20000, 40000)
QUICK_SIZES = (4000, 8000)
#: --embedding -> (obsm key, embed_kwargs of hs.tl.fit, description)
EMBEDDINGS = {
    "morphology": (
        "X_morphology",
        {"patch_size_um": 112.0, "patch_px": 224},
        "X_morphology: 112 µm patches at 224 px, stain-normalised",
    ),
    "context": (
        "X_morphology_context",
        None,
        "X_morphology_context (the default): 224, 448 and 800 µm patches at 224 px, stain-normalised",
    ),
}


def _child(code: str, timeout: float | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it fills ``_out``; return it with the process's peak RSS."""
    wrapped = (
        "import warnings as _w\n_w.filterwarnings('ignore')\n"
        + textwrap.dedent(code)
        + textwrap.dedent(
            """
            import json as _j, resource as _r
            _out.setdefault("peak_rss_mb", _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024)
            print("RESULT " + _j.dumps(_out))
            """
        )
    )
    try:
        proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr.strip().splitlines() or [f"no output (exit code {proc.returncode})"])[-1]}


TRAIN = """
import time, histoseq as hs
t = time.perf_counter()
train = hs.datasets.synthetic(n_sections=2, section_size_um=1200, random_state=0, progress=False)
model = hs.tl.fit(train, genes=50, embedding={embedding!r}, embed_kwargs={embed_kwargs!r}, progress=False)
model.save({path!r})
_out = {{"seconds": time.perf_counter() - t, "spots": int(train.tables["table"].n_obs), "method": model.method,
         "genes": len(model.genes), "dims": int(model.n_features)}}
"""

MAKE_SLIDE = """
import time, histoseq as hs
t = time.perf_counter()
sdata = hs.datasets.synthetic(n_sections=1, section_size_um={size_um}, spot_pitch_um=250, random_state=1,
                              path={path!r}, progress=False)
for key in list(sdata.tables) + list(sdata.shapes):  # only the image stays
    sdata.delete_element_from_disk(key)
img = sdata.images[{image_key!r}]["scale0"]["image"]
_out = {{"shape": list(img.shape), "seconds": time.perf_counter() - t}}
"""

PREDICT = """
import logging, resource, time
from pathlib import Path
import numpy as np, spatialdata as sd, histoseq as hs

marks = []
class _Marks(logging.Handler):
    def emit(self, record):
        marks.append((time.perf_counter(), record.getMessage()))
log = logging.getLogger("histoseq")
log.setLevel(logging.INFO)
log.addHandler(_Marks())
log.propagate = False

sdata = sd.read_zarr({path!r})
assert not sdata.tables and not sdata.shapes, "the slide must hold only an image"
model = hs.tl.load_model({model!r})
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
hs.tl.predict(sdata, model, image_key={image_key!r}, spacing_um={spacing}, progress=False)
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def at(prefix):
    return next((t for t, m in marks if m.startswith(prefix)), None)

grid_done, embed_done = at("Made table"), at("Added table.obsm")
grid_key = {image_key!r} + "_grid"
pred_key = grid_key + "_predicted"
X = np.asarray(sdata.tables[pred_key].X)
_out = {{
    "tiles": int(X.shape[0]), "finite": int(np.isfinite(X).all(axis=1).sum()), "seconds": t1 - t0,
    "grid_s": None if grid_done is None else grid_done - t0,
    "embed_s": None if None in (grid_done, embed_done) else embed_done - grid_done,
    "predict_s": None if embed_done is None else t1 - embed_done,
    "rss_before_mb": rss_before, "peak_rss_mb": peak,
    "on_disk": all((Path({path!r}) / kind / key).exists()
                   for kind, key in (("shapes", grid_key), ("tables", grid_key + "_table"), ("tables", pred_key))),
}}
for key in (pred_key, grid_key + "_table", grid_key):  # leave the slide image-only for a rerun
    if key in sdata.tables or key in sdata.shapes:
        sdata.delete_element_from_disk(key)
"""


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small slides {QUICK_SIZES} px (about a minute)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="slide sides in px (default: 20000 40000)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the zarr stores go (kept; default: a temp dir)")
    parser.add_argument("--embedding", choices=sorted(EMBEDDINGS), default="morphology", help="the model's embedding")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)))
    if sizes[0] < 1000:
        parser.error("--sizes are slide sides in pixels (at least 1000)")
    work = args.tmp or Path(tempfile.mkdtemp(prefix="histoseq-slide-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(sizes, work, args.embedding, "quick" if args.quick and not args.sizes else "full")
    finally:
        if args.tmp is None:
            shutil.rmtree(work, ignore_errors=True)


def run(sizes: list[int], work: Path, embedding: str, mode: str) -> int:
    start = time.perf_counter()
    key, embed_kwargs, description = EMBEDDINGS[embedding]
    print(f"histoseq whole-slide prediction benchmark ({mode}): hs.tl.predict(spacing_um={SPACING_UM:g}) on image-only")
    print("slides, one fresh process per slide\n")

    model_path = work / f"model_{embedding}.pt"
    m = _child(TRAIN.format(embedding=key, embed_kwargs=embed_kwargs, path=str(model_path)))
    if "error" in m:
        print(f"Training failed: {m['error']}")
        return 1
    print(
        f"Model: {m['method']}, {m['genes']} genes, on {description} ({m['dims']} dims); trained on the "
        f"{m['spots']} spots of two synthetic 1.2 mm sections in {m['seconds']:.0f} s"
    )

    print(f"Slides (synthetic, zarr-backed, {PIXEL_UM} µm/px, 1024 px chunks, image only, in {work}):")
    slides = {}
    for px in sizes:
        path = work / f"slide_{px}px.zarr"
        slides[px] = path
        if path.exists():
            print(f"  {path.name}: exists, reused")
            continue
        out = _child(MAKE_SLIDE.format(size_um=px * PIXEL_UM, path=str(path), image_key=IMAGE_KEY))
        if "error" in out:
            print(f"  {path.name}: could not be written: {out['error']}")
            return 1
        print(
            f"  wrote {path.name}: {out['shape'][2]:,} × {out['shape'][1]:,} px in {out['seconds']:.0f} s "
            f"(peak RSS {out['peak_rss_mb']:.0f} MB)"
        )

    results = {}
    for px, path in slides.items():
        r = _child(PREDICT.format(path=str(path), model=str(model_path), image_key=IMAGE_KEY, spacing=SPACING_UM))
        results[px] = r
        if "error" in r:
            print(f"  {px:,} px: prediction failed: {r['error']}")
        elif not r["on_disk"] or r["finite"] < r["tiles"]:
            print(
                f"  {px:,} px: {r['tiles'] - r['finite']} of {r['tiles']} tiles have NaN predictions; "
                f"written to the store: {r['on_disk']}"
            )

    print()
    print(
        "| slide (px) | tissue tiles | wall time (s) | tiles/s | grid (s) | embed (s) | predict + write (s) "
        "| RSS before (MB) | peak RSS (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for px, r in results.items():
        if "error" in r:
            print(f"| {px:,} × {px:,} | failed | | | | | | | |")
            continue
        print(
            f"| {px:,} × {px:,} | {r['tiles']:,} | {r['seconds']:.1f} | {r['tiles'] / r['seconds']:.0f} "
            f"| {_fmt(r['grid_s'])} | {_fmt(r['embed_s'])} | {_fmt(r['predict_s'])} "
            f"| {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )

    ok = [px for px in sizes if "error" not in results[px]]
    met = len(ok) == len(sizes)
    print()
    if len(ok) >= 2:
        a, b = results[ok[0]], results[ok[-1]]
        area = (ok[-1] / ok[0]) ** 2
        t_ratio, n_ratio = b["seconds"] / a["seconds"], b["tiles"] / a["tiles"]
        per_tile = t_ratio / n_ratio
        linear = per_tile <= LINEAR_TOLERANCE
        met &= linear
        print(
            f"{area:g}× area ({ok[-1]:,} vs {ok[0]:,} px): time ×{t_ratio:.2f} for tiles ×{n_ratio:.2f} "
            f"(time per tile ×{per_tile:.2f})"
        )
    else:
        linear = None
    peak = max((results[px]["peak_rss_mb"] for px in ok), default=math.nan)
    under = peak < PEAK_RSS_TARGET_MB
    met &= under
    print(
        f"Target peak RSS below {PEAK_RSS_TARGET_MB / 1024:g} GB: {'met' if under else 'MISSED'} "
        f"(largest {peak:,.0f} MB, on {ok[-1] if ok else 0:,} × {ok[-1] if ok else 0:,} px)"
    )
    if linear is not None:
        print(
            f"Target time linear in tissue area (time per tile ×{LINEAR_TOLERANCE:g} at most): "
            f"{'met' if linear else 'MISSED'}"
        )
    print(f"Benchmark run time: {time.perf_counter() - start:.0f} s")
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())

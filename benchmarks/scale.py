"""Cohorts of slides: time and peak memory of embedding and predicting 1, 4 and 16 slides, at 1× and 4× area.

Run:  python benchmarks/scale.py             (full: 1, 4, 16 slides of 1.6 mm and 3.2 mm sections; ~15 min on 2 cores)
      python benchmarks/scale.py --quick     (smoke test: 1 and 2 slides of 0.8 and 1.6 mm; about 2 minutes)
      python benchmarks/scale.py --workers 2 (also on a dask LocalCluster of 2 worker processes)

What it measures: ``hs.tl.embed(paths)`` then ``hs.tl.predict(paths, model)`` on a list of zarr stores, each a
measured slide (an H&E image, its spots and their table): each slide is opened lazily, its spots embedded
(``X_morphology``: 112 µm patches at 224 px, stain-normalised, streamed in batches from the zarr pyramid), its
table written back, then predicted and its table of predictions written into its store (:mod:`histoseq.tl._cohort`).

- The model is trained once, in its own process, on two synthetic 1.2 mm sections (``"kernel"``, 50 genes).
- The slides are ``hs.datasets.synthetic(n_sections=1, section_size_um=..., path=...)`` (0.5 µm/px, 100 µm spot
  pitch, 1024 px chunks). Four slides of each size are generated (seeds 1–4); a cohort of 16 holds each of them
  four times (copies of the stores). Each run gets fresh copies of the stores, made before it is timed.
- Each run is a fresh interpreter, so its peak RSS (``ru_maxrss``) is that of the run alone, with its imports
  ("RSS before" is after the imports). With ``--workers``, the run on the cluster reports the largest peak RSS of
  a worker (and of the client process beside it); its time includes starting the cluster.

Targets (from issue 19): linear or better. Time per spot with 16 slides at most 1.25× that with 1 slide, and with
4× the area at most 1.25× that at 1×; peak RSS growing no faster than the number of spots (it should hardly grow:
memory holds one slide at a time). The exit status is 2 when a target is missed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide import _child  # (the fresh-interpreter runner of the whole-slide benchmark)

PIXEL_UM = 0.5
FULL = {"counts": (1, 4, 16), "sizes_um": (1600.0, 3200.0)}
QUICK = {"counts": (1, 2), "sizes_um": (800.0, 1600.0)}
TOLERANCE = 1.25
EMBED = {"patch_size_um": 112.0, "patch_px": 224}

TRAIN = """
import time, histoseq as hs
t = time.perf_counter()
train = hs.datasets.synthetic(n_sections=2, section_size_um=1200, random_state=0, progress=False)
model = hs.tl.fit(train, genes=50, embedding="X_morphology", embed_kwargs={embed!r}, progress=False)
model.save({path!r})
_out = {{"seconds": time.perf_counter() - t, "genes": len(model.genes), "method": model.method}}
"""

MAKE = """
import time, histoseq as hs
t = time.perf_counter()
sdata = hs.datasets.synthetic(n_sections=1, section_size_um={size_um}, random_state={seed}, path={path!r},
                              progress=False)
_out = {{"spots": int(sdata.tables["table"].n_obs), "seconds": time.perf_counter() - t}}
"""

RUN = """
import resource, time
import numpy as np, spatialdata as sd, histoseq as hs
paths = {paths!r}
model = hs.tl.load_model({model!r})
client = cluster = None
t0 = time.perf_counter()
if {workers}:
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers={workers}, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t1 = time.perf_counter()
hs.tl.embed(paths, client=client, progress=False, **{embed!r})
t2 = time.perf_counter()
hs.tl.predict(paths, model, client=client, progress=False)
t3 = time.perf_counter()
workers_rss = None
if client is not None:
    rss = client.run(lambda: __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024)
    workers_rss = max(rss.values())
    client.close(); cluster.close()
spots = finite = 0
for p in paths:
    s = sd.read_zarr(p)
    X = np.asarray(s.tables["predicted"].X)
    spots += X.shape[0]
    finite += int(np.isfinite(X).all(axis=1).sum())
_out = {{"spots": spots, "finite": finite, "start_s": t1 - t0, "embed_s": t2 - t1, "predict_s": t3 - t2,
         "seconds": t3 - t0, "rss_before_mb": rss_before, "workers_rss_mb": workers_rss}}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 2 slides of 0.8 and 1.6 mm (about 2 minutes)")
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="numbers of slides (default: 1 4 16)")
    parser.add_argument("--sizes-um", type=float, nargs="+", default=None, help="section sides in µm")
    parser.add_argument("--workers", type=int, default=0, help="also run on a LocalCluster of this many workers")
    parser.add_argument("--tmp", type=Path, default=None, help="where the stores go (kept; default: a temp dir)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    counts = sorted(set(args.counts or preset["counts"]))
    sizes = sorted(set(args.sizes_um or preset["sizes_um"]))
    if counts[0] < 1 or sizes[0] < 400:
        parser.error("--counts must be ≥ 1 and --sizes-um ≥ 400")
    work = args.tmp or Path(tempfile.mkdtemp(prefix="histoseq-scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(counts, sizes, work, args.workers, "quick" if args.quick else "full")
    finally:
        if args.tmp is None:
            shutil.rmtree(work, ignore_errors=True)


def _ratio_line(what: str, a: dict, b: dict, key: str, per_spot: bool) -> tuple[str, float, float]:
    """The check of time (per spot: at most ×TOLERANCE) or peak memory (at most the growth of the data: linear)."""
    if per_spot:
        r = (b[key] / b["spots"]) / (a[key] / a["spots"])
        return f"{what}: time per spot ×{r:.2f}", r, TOLERANCE
    r = b[key] / a[key]
    return (
        f"{what}: peak RSS ×{r:.2f} ({a[key]:,.0f} → {b[key]:,.0f} MB; spots ×{b['spots'] / a['spots']:.1f})",
        r,
        (b["spots"] / a["spots"]),
    )


def run(counts: list[int], sizes: list[float], work: Path, workers: int, mode: str) -> int:
    start = time.perf_counter()
    print(f"histoseq cohort benchmark ({mode}): hs.tl.embed(paths) then hs.tl.predict(paths, model), one fresh")
    print("process per run, slides in zarr stores\n")
    model_path = work / "model.pt"
    m = _child(TRAIN.format(embed=EMBED, path=str(model_path)))
    if "error" in m:
        print(f"Training failed: {m['error']}")
        return 1
    print(f"Model: {m['method']}, {m['genes']} genes, X_morphology (112 µm at 224 px); trained in {m['seconds']:.0f} s")

    base: dict[float, list[Path]] = {}
    for size in sizes:
        base[size] = []
        for seed in range(1, min(4, max(counts)) + 1):
            path = work / "base" / f"slide_{size:g}um_{seed}.zarr"
            base[size].append(path)
            if path.exists():
                continue
            out = _child(MAKE.format(size_um=size, seed=seed, path=str(path)))
            if "error" in out:
                print(f"  could not write {path.name}: {out['error']}")
                return 1
            print(f"  wrote {path.name}: {out['spots']} spots in {out['seconds']:.0f} s")

    results: dict[tuple[int, float, str], dict] = {}
    modes = ["in process"] + ([f"{workers} workers"] if workers else [])
    for size in sizes:
        for n in counts:
            for how in modes:
                folder = work / "run"
                shutil.rmtree(folder, ignore_errors=True)
                paths = []
                for i in range(n):
                    src = base[size][i % len(base[size])]
                    dst = folder / f"{i:02d}_{src.name}"
                    shutil.copytree(src, dst)
                    paths.append(str(dst))
                code = RUN.format(
                    paths=paths, model=str(model_path), embed=EMBED, workers=workers if how != "in process" else 0
                )
                r = _child(code)
                results[(n, size, how)] = r
                if "error" in r:
                    print(f"  {n} slides of {size:g} µm ({how}): failed: {r['error']}")
                elif r["finite"] < r["spots"]:
                    print(f"  {n} slides of {size:g} µm ({how}): {r['spots'] - r['finite']} spots with NaN")
    shutil.rmtree(work / "run", ignore_errors=True)

    print()
    print(
        "| slides | section (µm) | run | spots | embed (s) | predict (s) | total (s) | spots/s | RSS before (MB) "
        "| peak RSS (MB) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for (n, size, how), r in results.items():
        if "error" in r:
            print(f"| {n} | {size:g} | {how} | failed | | | | | | |")
            continue
        peak = r["peak_rss_mb"] if r["workers_rss_mb"] is None else r["workers_rss_mb"]
        label = how if r["workers_rss_mb"] is None else f"{how} (+{r['start_s']:.0f} s start)"
        print(
            f"| {n} | {size:g} | {label} | {r['spots']:,} | {r['embed_s']:.1f} | {r['predict_s']:.1f} "
            f"| {r['seconds']:.1f} | {r['spots'] / r['seconds']:.1f} | {r['rss_before_mb']:.0f} | {peak:.0f}"
            + ("" if r["workers_rss_mb"] is None else f" (worker; client {r['peak_rss_mb']:.0f})")
            + " |"
        )

    print()
    met = True
    ok = {k: r for k, r in results.items() if "error" not in r and k[2] == "in process"}
    checks = []
    small, large = sizes[0], sizes[-1]
    if len(counts) >= 2 and (counts[0], small, "in process") in ok and (counts[-1], small, "in process") in ok:
        a, b = ok[(counts[0], small, "in process")], ok[(counts[-1], small, "in process")]
        checks.append(_ratio_line(f"{counts[-1]} vs {counts[0]} slide(s) of {small:g} µm", a, b, "seconds", True))
        checks.append(_ratio_line(f"{counts[-1]} vs {counts[0]} slide(s) of {small:g} µm", a, b, "peak_rss_mb", False))
    if len(sizes) >= 2 and (counts[0], small, "in process") in ok and (counts[0], large, "in process") in ok:
        a, b = ok[(counts[0], small, "in process")], ok[(counts[0], large, "in process")]
        area = (large / small) ** 2
        checks.append(_ratio_line(f"{area:g}× area ({large:g} vs {small:g} µm)", a, b, "seconds", True))
        checks.append(_ratio_line(f"{area:g}× area ({large:g} vs {small:g} µm)", a, b, "peak_rss_mb", False))
    for line, ratio, limit in checks:
        fine = ratio <= limit
        met &= fine
        print(f"{line}: {'met' if fine else 'MISSED'} (target ×{limit:.3g} at most)")
    met &= len(ok) == sum(1 for k in results if k[2] == "in process")
    print(f"Benchmark run time: {time.perf_counter() - start:.0f} s")
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())

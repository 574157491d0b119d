"""Embedding throughput of the built-in networks: torch (eager) vs ONNX Runtime, end to end and bare forward.

Run:  python benchmarks/embed.py                      (about 500 spots at 224 px; a few minutes on two cores)
      python benchmarks/embed.py --quick              (a few seconds: 24 spots at 64 px, small_cnn only)
      python benchmarks/embed.py --spots 200 --patch-px 128 --encoders imagenet

For each network encoder (``small_cnn``, ``resnet18``, ``imagenet`` = EfficientNet-Lite0), on a synthetic section
with ``--spots`` spots (patches of 112 µm at ``--patch-px`` px):

- *bare forward*: the runner alone on the in-memory uint8 patches, in batches of ``--batch-size`` (torch: the
  :class:`~histoseq.tl._embed.TorchRunner` ``hs.tl.embed`` uses, bf16 autocast where the CPU has it; ONNX: the
  :class:`~histoseq.tl._onnx.OnnxRunner`);
- *end to end*: ``hs.tl.embed(..., inplace=False)`` with ``HISTOSEQ_BACKEND=torch`` and ``=onnx``: cutting the
  patches, stain normalisation, the network, writing nothing;
- *patches only*: ``hs.tl.embed`` with a trivial encoder (the mean colour), the rate no network can exceed end to
  end; with the bare ONNX rate it bounds the end-to-end rate of a pipeline that cuts, then embeds.

Each measurement follows a warm-up (a first small call: imports, the ONNX export into a temporary cache, loading
and checking the session, the stain estimate of the image), so the rates are steady-state; the one-off export time
is printed separately, and so is the stain estimate's (made once per image and remembered while the image lives:
on this in-memory section spatialdata recomputes the coarse pyramid level it reads from full resolution, about a
second, where a slide read from zarr takes a fifth of that). The four
measurements of an encoder run in ``--repeats`` interleaved rounds (the order reversed every other round) and their
times are summed, so that a machine shared with other jobs slows them alike; the load average is printed before
and after.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
import warnings

import numpy as np

PATCH_UM = 112.0
ENCODERS = ("small_cnn", "resnet18", "imagenet")


def make_sdata(n_spots: int):
    """A synthetic section with at least ``n_spots`` spots (the tissue covers about half of the square)."""
    import histoseq as hs

    size = max(400.0, 100.0 * math.sqrt(n_spots / 0.5))
    while True:
        sdata = hs.datasets.synthetic(n_sections=1, section_size_um=size, progress=False)
        if sdata.tables["table"].n_obs >= n_spots:
            return sdata
        size *= 1.25


def bench_encoder(name: str, sdata, spots: np.ndarray, patches: np.ndarray, args) -> dict:
    """The four rates of one encoder, measured in interleaved rounds so that they share the machine's load."""
    import histoseq as hs
    from histoseq.tl import _onnx
    from histoseq.tl._embed import TorchRunner, get_encoder

    _, model, _ = get_encoder(name)
    batches = [patches[i : i + args.batch_size] for i in range(0, len(patches), args.batch_size)]
    row: dict = {"encoder": name}
    torch_run = TorchRunner(model, "cpu", builtin=True)
    torch32_run = TorchRunner(model, "cpu", builtin=True, autocast=False)  # torch on a CPU without bf16
    onnx_run = _onnx.OnnxRunner(TorchRunner(model, "cpu", builtin=True), _resolved_name(name))
    kw = {"encoder": name, "patch_size_um": PATCH_UM, "patch_px": args.patch_px, "batch_size": args.batch_size}

    def embed(backend: str, subset: np.ndarray) -> None:
        os.environ[_onnx.BACKEND_ENV] = backend
        try:
            hs.tl.embed(sdata, spots=subset, progress=False, inplace=False, **kw)
        finally:
            os.environ.pop(_onnx.BACKEND_ENV, None)

    with torch_run, torch32_run, onnx_run:
        row["precision"] = torch_run.precision
        t = time.perf_counter()
        onnx_run(batches[0][:2])  # the export, into the benchmark's empty cache, and the check
        row["export_s"] = time.perf_counter() - t
        if onnx_run.backend != "onnxruntime":
            row["note"] = "ONNX export or check failed: the ONNX columns are torch"
        # warm-up: oneDNN primitives for the batch size, first calls of embed (imports, session loading)
        torch_run(batches[0])
        torch32_run(batches[0])
        onnx_run(batches[0])
        embed("torch", spots[:4])
        embed("onnx", spots[:4])

        measures = {
            "bare_torch": lambda: [torch_run(b) for b in batches],
            "bare_onnx": lambda: [onnx_run(b) for b in batches],
            "bare_torch32": lambda: [torch32_run(b) for b in batches],
            "embed_torch": lambda: embed("torch", spots),
            "embed_onnx": lambda: embed("onnx", spots),
        }
        if torch_run.precision == "float32":  # the same thing twice
            del measures["bare_torch32"]
        seconds = dict.fromkeys(measures, 0.0)
        for r in range(args.repeats):  # alternate the order: a change of load hits every measure alike
            for key in list(measures) if r % 2 == 0 else list(measures)[::-1]:
                t = time.perf_counter()
                measures[key]()
                seconds[key] += time.perf_counter() - t
    for key, s in seconds.items():
        row[key] = args.repeats * len(spots) / s
    row.setdefault("bare_torch32", row["bare_torch"])
    return row


def bench_patches_only(sdata, spots: np.ndarray, args) -> float:
    """Patches per second of ``hs.tl.embed`` with a trivial encoder: cutting and stain normalisation only."""
    import histoseq as hs

    def mean_colour(x):
        return x.mean(dim=(2, 3))

    kw = {"encoder": mean_colour, "patch_size_um": PATCH_UM, "patch_px": args.patch_px, "batch_size": args.batch_size}
    hs.tl.embed(sdata, spots=spots[:4], progress=False, inplace=False, **kw)
    t = time.perf_counter()
    for _ in range(args.repeats):
        hs.tl.embed(sdata, spots=spots, progress=False, inplace=False, **kw)
    return args.repeats * len(spots) / (time.perf_counter() - t)


def _resolved_name(name: str) -> str:
    from histoseq.tl._embed import _ALIASES

    return _ALIASES.get(name, name)


def load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Unix
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spots", type=int, default=500)
    parser.add_argument("--patch-px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the measurements (times summed)")
    parser.add_argument("--quick", action="store_true", help="24 spots at 64 px, small_cnn only")
    args = parser.parse_args()
    if args.quick:
        args.spots, args.patch_px, args.encoders, args.repeats = 24, 64, ["small_cnn"], 1

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    cache = tempfile.mkdtemp(prefix="histoseq_onnx_bench_")  # a cold cache, so that the export is timed
    os.environ[_cache_env()] = cache
    try:
        run(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args) -> None:

    import torch

    import histoseq as hs
    from histoseq._utils import squidpy_image_tools
    from histoseq.pp._stain import estimate_stains

    print(
        f"{args.spots} spots, {PATCH_UM:g} µm patches at {args.patch_px} px, batches of {args.batch_size}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"load average before: {load()}",
        flush=True,
    )
    t0 = time.perf_counter()
    sdata = make_sdata(args.spots)
    spots = np.arange(args.spots)
    patches = hs.pp.extract_patches(
        sdata, patch_size_um=PATCH_UM, patch_px=args.patch_px, spots=spots, progress=False
    ).images
    print(f"synthetic section and {len(patches)} patches in {time.perf_counter() - t0:.1f} s", flush=True)
    squidpy_image_tools()  # its import is not the estimate's
    t0 = time.perf_counter()
    estimate_stains(sdata, list(sdata.images))
    print(f"stain estimate of the image (once per image): {time.perf_counter() - t0:.1f} s", flush=True)

    only = bench_patches_only(sdata, spots, args)
    print(f"patches only (hs.tl.embed with a trivial encoder): {only:.1f} patches/s", flush=True)
    rows = []
    for name in args.encoders:
        t = time.perf_counter()
        try:
            row = bench_encoder(name, sdata, spots, patches, args)
        except (ImportError, ValueError, RuntimeError) as err:
            print(f"skipped {name}: {type(err).__name__}: {err}", flush=True)
            continue
        rows.append(row)
        print(f"{name} done in {time.perf_counter() - t:.0f} s: {row}", flush=True)

    print(f"\nload average after: {load()}\n")
    print(
        "| encoder | bare torch (precision) | bare torch float32 | bare ONNX | embed torch | embed ONNX "
        "| embed speed-up | embed ONNX / bare ONNX | bound | ONNX export (once) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = 1 / (1 / only + 1 / r["bare_onnx"])  # patches, then the network, one after the other
        print(
            f"| {r['encoder']} | {r['bare_torch']:.1f} ({r['precision']}) | {r['bare_torch32']:.1f} | "
            f"{r['bare_onnx']:.1f} | {r['embed_torch']:.1f} | {r['embed_onnx']:.1f} | "
            f"{r['embed_onnx'] / r['embed_torch']:.1f}× | {100 * r['embed_onnx'] / r['bare_onnx']:.0f} % | "
            f"{bound:.1f} | {r['export_s']:.1f} s |" + (f" {r['note']}" if "note" in r else "")
        )
    print(
        "\n(patches per second; bare: the runner on in-memory uint8 patches, the torch runner of hs.tl.embed with its "
        "precision, and in float32; embed: hs.tl.embed end to end; bound: the patches-only rate and the bare ONNX "
        f"rate one after the other, 1 / (1/{only:.0f} + 1/bare ONNX))"
    )


def _cache_env() -> str:
    from histoseq.tl._onnx import CACHE_ENV

    return CACHE_ENV


if __name__ == "__main__":
    main()

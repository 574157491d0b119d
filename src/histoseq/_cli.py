"""The ``histoseq`` command line: ``histoseq demo`` runs the end-to-end demo on the embedded synthetic data."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_HELP = """\
Run histoseq end to end on its embedded synthetic tissue (no download, no real data needed).

Steps: build synthetic H&E sections with spots and counts whose link to morphology is known; cut
spot-centred patches of a fixed physical size from the image pyramids (chunk by chunk); tile the tissue of
one section with a dense grid and cut patches there too; embed every spot with hand-crafted morphology
features; pretrain a small CNN without labels on tissue tiles of the training sections (an autoencoder) and
embed the spots with it; fit the default expression model (kernel ridge regression on morphology at three
scales, each dimension weighted by its relevance to the training spots' expression) on all but the last
section and predict the held-out one; print per-gene scores next
to the ground truth (learnable genes are predicted, noise genes are not) and compare the embeddings; write
the model, the pretrained encoder, a figure of patches and the SpatialData (zarr) to the output folder.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoseq", description="Learn what tissue morphology says about expression.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="end-to-end demo on the embedded synthetic data",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("histoseq_demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--sections", type=int, default=3, help="number of synthetic sections (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data (default: %(default)s)")
    demo.add_argument(
        "--patch-size-um", type=float, default=112.0, help="physical side of a patch in µm (default: %(default)s)"
    )
    demo.add_argument("--patch-px", type=int, default=224, help="side of a patch in pixels (default: %(default)s)")
    demo.add_argument(
        "--grid-spacing-um", type=float, default=100.0, help="spacing of the dense grid in µm (default: %(default)s)"
    )
    demo.add_argument(
        "--pretrain-epochs",
        type=int,
        default=3,
        help="epochs of the self-supervised pretraining; 0 skips it (default: %(default)s)",
    )
    demo.add_argument(
        "--pretrain-tiles", type=int, default=512, help="tissue tiles for the pretraining (default: %(default)s)"
    )
    demo.add_argument("--no-write", action="store_true", help="do not write the zarr store and the figure")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def demo(args: argparse.Namespace) -> int:
    """Run the demo; return the exit status."""
    import numpy as np

    import histoseq as hs

    progress = not args.quiet
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    say(f"Building {args.sections} synthetic H&E sections (seed {args.seed})...")
    sdata = hs.datasets.synthetic(n_sections=args.sections, random_state=args.seed, progress=progress)
    table = sdata.tables["table"]
    truth = table.var["truth"].value_counts()
    say(
        f"  {len(sdata.images)} images, {table.n_obs} spots × {table.n_vars} genes; genes by ground truth: "
        + ", ".join(f"{k} {v}" for k, v in truth.items())
    )
    for key, info in sdata.attrs["histoseq"]["pixel_size_um"].items():
        lvl = sdata.images[key]["scale0"]["image"]
        say(f"  {key}: {lvl.sizes['x']}×{lvl.sizes['y']} px at {info['value']} µm/px, {len(sdata.images[key])} levels")

    say(f"Cutting {args.patch_size_um:g} µm patches at {args.patch_px} px around every spot...")
    t = time.perf_counter()
    patches = hs.pp.extract_patches(sdata, patch_size_um=args.patch_size_um, patch_px=args.patch_px, progress=progress)
    dt = time.perf_counter() - t
    say(f"  {patches} in {dt:.2f} s ({len(patches) / dt:.0f} patches/s)")
    for key, info in patches.params["images"].items():
        say(f"  {key}: read pyramid level {info['level']} (pixel size from {info['pixel_size_method']})")

    first = str(table.obs["sample_id"].cat.categories[0])
    image_key = f"{first}_image"
    say(f"Tiling the tissue of {image_key} with a {args.grid_spacing_um:g} µm grid...")
    hs.pp.make_grid(sdata, image_key=image_key, spacing_um=args.grid_spacing_um)
    grid_key = f"{image_key}_grid"
    grid = hs.pp.extract_patches(
        sdata, shapes_key=grid_key, patch_size_um=args.patch_size_um, patch_px=args.patch_px, progress=progress
    )
    frac = sdata.shapes[grid_key]["tissue_fraction"].to_numpy()
    say(f"  {len(grid)} grid tiles on tissue (mean tissue fraction {frac.mean():.2f}); patches {grid.images.shape}")

    # what a patch shows is what drives the learnable genes: check it on the ground truth
    dark = (patches.images.astype(np.float32).mean(-1) < 140).mean(axis=(1, 2))
    r = np.corrcoef(dark, table.obs["true_nuclei_count"].to_numpy()[patches.rows])[0, 1]
    say(f"  sanity: dark-pixel fraction of a patch vs true nuclei count of its spot, Pearson r = {r:.2f}")

    samples = list(table.obs["sample_id"].cat.categories)
    train, test = samples[:-1], samples[-1]
    say("Embedding every spot with hand-crafted morphology features (hs.tl.embed)...")
    hs.tl.embed(sdata, encoder="morphology", patch_size_um=args.patch_size_um, patch_px=112, progress=progress)
    say(f"  table.obsm['X_morphology']: {table.obsm['X_morphology'].shape}")
    ssl_path = None
    if args.pretrain_epochs > 0:
        import tempfile

        ssl_dir = args.out if not args.no_write else Path(tempfile.mkdtemp(prefix="histoseq_demo_"))
        ssl_dir.mkdir(parents=True, exist_ok=True)
        say(
            f"Pretraining a small CNN without labels (autoencoder) on {args.pretrain_tiles} tissue tiles of "
            f"{', '.join(train)} (hs.tl.pretrain_encoder)..."
        )
        res = hs.tl.pretrain_encoder(
            sdata,
            ssl_dir / "autoencoder_small_cnn.pt",
            method="autoencoder",
            encoder="small_cnn",
            patch_size_um=224.0,
            patch_px=32,
            train=train,
            n_tiles=args.pretrain_tiles,
            max_epochs=args.pretrain_epochs,
            progress=progress,
        )
        ssl_path = res.path
        say(f"  reconstruction loss by epoch: {', '.join(f'{v:.4f}' for v in res.history)}")
        hs.tl.embed(
            sdata,
            encoder="small_cnn",
            weights=ssl_path,
            patch_size_um=224.0,
            patch_px=32,
            key_added="ssl",
            progress=progress,
        )
        say(f"  table.obsm['X_ssl']: {table.obsm['X_ssl'].shape}")

    say(f"Fitting the default model (hs.tl.fit) on {', '.join(train)}; holding out {test}...")
    say(
        "  kernel ridge on morphology at 224, 448 and 800 µm around each spot (computed by fit, each dimension "
        "weighted by how well it follows the training spots' expression); kernel width, penalty and target "
        "smoothing by leave-one-section-out CV"
    )
    model = hs.tl.fit(sdata, genes=list(table.var_names), train=train, progress=progress)
    say(
        f"  {len(model.genes)} genes, kernel width {model.config['gamma']:g}, penalty {model.alpha:.3g}, "
        f"embedding {model.embedding!r} ({model.n_features} dims)"
    )
    hs.tl.predict(sdata, model, key_added="predicted", progress=progress)
    is_test = (table.obs["sample_id"] == test).to_numpy()
    scores = hs.tl.evaluate(sdata, predicted="predicted", spots=is_test, ceiling=True)
    scores = scores[scores["section"] == test].set_index("gene")
    truth = table.var["truth"].astype(str)
    say(
        f"  held-out {test}: Pearson r per gene, by what the ground truth says drives the gene (the noise ceiling "
        "is the highest r that the counting noise allows)"
    )
    for kind, genes in truth.groupby(truth).groups.items():
        r = scores.loc[list(genes), "pearson"]
        partial = scores.loc[list(genes), "pearson_partial_depth"]
        ceiling = scores.loc[list(genes), "pearson_ceiling"]
        learn = "learnable" if table.var.loc[list(genes), "learnable"].all() else "not learnable"
        line = f"{kind:<16} {learn:<14} n={len(genes):>2}  mean r = {r.mean():+.2f}"
        say(f"    {line}  (depth-partial {partial.mean():+.2f}, noise ceiling {ceiling.mean():.2f})")
    learnable = table.var["learnable"].to_numpy(bool)
    compare = {model.embedding: scores["pearson"]}
    for key in ("X_morphology", "X_ssl") if ssl_path is not None else ("X_morphology",):
        other = hs.tl.fit(sdata, genes=list(table.var_names), train=train, embedding=key, progress=False)
        hs.tl.predict(sdata, other, key_added=f"predicted_{key}", progress=False)
        sc = hs.tl.evaluate(sdata, predicted=f"predicted_{key}", spots=is_test)
        compare[key] = sc[sc["section"] == test].set_index("gene")["pearson"]
    say(f"  held-out {test}, the default model on each embedding: mean r of the learnable genes / of the others")
    for key, r in compare.items():
        r = r.reindex(table.var_names)
        say(f"    {key:<40} {np.nanmean(r[learnable]):+.2f} / {np.nanmean(r[~learnable]):+.2f}")

    if not args.no_write:
        import matplotlib

        matplotlib.use("Agg")
        args.out.mkdir(parents=True, exist_ok=True)
        fig = hs.pl.patches(patches, n=16, ncols=8)
        fig.savefig(args.out / "patches.png", dpi=100)
        model_path = model.save(args.out / "model.pt")
        store = args.out / "synthetic.zarr"
        if store.exists():
            import shutil

            shutil.rmtree(store)
        sdata.write(store)
        say(f"Wrote {args.out / 'patches.png'}, {model_path} and {store}")
    say("Done.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histoseq`` command."""
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        import warnings

        with warnings.catch_warnings():
            # library chatter (zarr sharding notices, docstring helpers) would drown the demo's report
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=SyntaxWarning)
            return demo(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

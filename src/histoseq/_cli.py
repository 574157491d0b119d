"""The ``histoseq`` command line.

``histoseq demo`` runs the end-to-end demo on the embedded synthetic data; ``fit``, ``predict``, ``evaluate`` and
``embed`` are steps for pipelines (Snakemake, Nextflow) on SpatialData zarr stores, implemented in
:mod:`histoseq._commands`. Arguments are parsed here; the libraries (spatialdata, torch, ``histoseq.tl``) are
imported only when a command runs, so ``histoseq --help`` and ``histoseq --version`` are quick.

Exit status: 0 on success; 2 for bad input (a usage error, or a ``ValueError``, ``KeyError``, ``TypeError``,
``FileNotFoundError`` or ``FileExistsError`` from the input; one line on stderr); 1 for any other failure (the
message, and ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


FIT_HELP = """\
Fit an expression model (hs.tl.fit) on the spots of one or several SpatialData zarr stores and save it to a file.

The genes are the N most variable ones of the training spots (--genes N) or a list (--genes A,B,C). The model
reads the embedding of each spot (by default the morphology features at three scales, computed and written into
the store when absent) or, for the methods that read images, the H&E patches. --option KEY=VALUE passes any
other keyword argument of hs.tl.fit or option of the method (VALUE is read as JSON when it parses, e.g.
--option alpha=10 --option 'embed_kwargs={"patch_px": 64}' --option embedding=X_morphology).
"""

PREDICT_HELP = """\
Predict expression with a saved model (hs.tl.predict) and write the table of predictions into the store.

By default the spots of the measured table are predicted (table --key-added, default "predicted"). --shapes KEY
predicts any shapes element (e.g. a grid); --grid-um UM with --image KEY lays a grid of UM µm tiles on the tissue
of an image (an H&E-only slide) and predicts it. When the command fails, the store keeps the elements it had.
"""

EVALUATE_HELP = """\
Score predictions against the measured counts (hs.tl.evaluate): Pearson, Spearman, MSE and depth-partial
Pearson per gene and section. Writes the tidy scores as CSV (-o) and prints the mean Pearson r per section;
the pooled scores are also written into the measured table of the store (var and uns).
"""

EMBED_HELP = """\
Embed the H&E patch around each spot (hs.tl.embed) and write the embedding into the store:
obsm["X_<key>"] and uns["<key>"] of the table (key: --key-added, default the encoder's name). --shapes KEY embeds
the shapes of an element that no table annotates (a grid); a table "<KEY>_table" is made for them.
"""


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _names(text: str) -> list[str]:
    """A comma-separated list of names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


def _genes(text: str) -> int | list[str]:
    """``N`` (a number of genes to select) or ``A,B,C`` (gene names)."""
    if text.strip().isdigit():
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError("the number of genes must be at least 1")
        return n
    return _names(text)


def _sizes(text: str) -> list[float]:
    """One or several positive numbers separated by commas."""
    return [_positive(float)(v) for v in _names(text)]


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is JSON when it parses, else a string."""
    import json

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. alpha=10), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """Add ``--quiet`` and ``--debug`` to the main parser (``default=False``) or to a command.

    On a command they are not set unless given (``argparse.SUPPRESS``), so that ``histoseq --quiet fit ...`` and
    ``histoseq fit ... --quiet`` both work.
    """
    parser.add_argument(
        "--quiet", action="store_true", default=default, help="no progress bars, and only warnings and errors"
    )
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show the traceback of an error (re-raise it)"
    )


def _command(sub: Any, name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_flags(parser, argparse.SUPPRESS)
    return parser


def _build_parser() -> argparse.ArgumentParser:
    from histoseq import __version__

    parser = argparse.ArgumentParser(
        prog="histoseq",
        description="Learn what tissue morphology says about expression.",
        epilog="Run `histoseq COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"histoseq {__version__}")
    _global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    demo.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    fit = _command(
        sub,
        "fit",
        "fit an expression model on stores and save it",
        FIT_HELP,
        _example(
            "histoseq fit a.zarr b.zarr -o model.pt --genes 50 --train section0,section1",
            "histoseq fit a.zarr -o model.pt --genes ERBB2,ESR1 --method ridge --option alpha=100",
        ),
    )
    fit.add_argument("stores", nargs="+", metavar="STORE", help="SpatialData zarr store(s) with spots and counts")
    fit.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (e.g. model.pt)")
    fit.add_argument(
        "--genes",
        type=_genes,
        default=50,
        metavar="N|A,B,C",
        help="number of genes to select, or gene names separated by commas (default: %(default)s)",
    )
    fit.add_argument("--method", default="kernel", help="kernel, ridge, mlp, cnn, ... (default: %(default)s)")
    fit.add_argument(
        "--train",
        type=_names,
        metavar="S1,S2",
        help="training sections (values of obs['sample_id'], separated by commas; default: all spots)",
    )
    fit.add_argument("--table", default="table", help="the measured table (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    fit.add_argument("--max-epochs", type=_positive(int), help="maximal epochs of the methods that train networks")
    fit.add_argument(
        "--option",
        type=_option,
        action="append",
        metavar="KEY=VALUE",
        help="option of the method or keyword argument of hs.tl.fit (repeatable; VALUE as JSON when it parses)",
    )
    fit.add_argument("--overwrite", action="store_true", help="replace an existing model file")

    predict = _command(
        sub,
        "predict",
        "write a table of predictions into a store",
        PREDICT_HELP,
        _example(
            "histoseq predict model.pt sample.zarr --key-added predicted",
            "histoseq predict model.pt slide.zarr --grid-um 100 --image slide_image",
        ),
    )
    predict.add_argument("model", metavar="MODEL", help="model file written by `histoseq fit`")
    predict.add_argument("store", metavar="STORE", help="SpatialData zarr store to predict and write into")
    predict.add_argument(
        "--key-added", help="name of the table of predictions (default: predicted, or <shapes>_predicted)"
    )
    predict.add_argument("--table", default="table", help="the table whose spots are predicted (default: %(default)s)")
    predict.add_argument("--shapes", metavar="KEY", help="predict the shapes of this element (e.g. a grid)")
    predict.add_argument("--image", metavar="KEY", help="with --grid-um: the image whose tissue is tiled")
    predict.add_argument(
        "--grid-um", type=_positive(float), metavar="UM", help="lay a grid of UM µm tiles on the tissue and predict it"
    )
    predict.add_argument("--overwrite", action="store_true", help="replace a table of predictions of the same name")

    evaluate = _command(
        sub,
        "evaluate",
        "score predictions against the measured counts",
        EVALUATE_HELP,
        _example("histoseq evaluate sample.zarr --table predicted -o scores.csv --spots-of section2"),
    )
    evaluate.add_argument("store", metavar="STORE", help="SpatialData zarr store with predictions and counts")
    evaluate.add_argument(
        "--table", default="predicted", help="the table of predictions to score (default: %(default)s)"
    )
    evaluate.add_argument("--measured", default="table", help="the measured table (default: %(default)s)")
    evaluate.add_argument("-o", "--output", metavar="CSV", help="write the scores (one row per section and gene)")
    evaluate.add_argument(
        "--spots-of",
        type=_names,
        metavar="SECTION",
        help="score only the spots of these sections (obs['sample_id']; several separated by commas)",
    )
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing CSV file")

    embed = _command(
        sub,
        "embed",
        "write an embedding of the spots into a store",
        EMBED_HELP,
        _example("histoseq embed sample.zarr --encoder morphology --patch-size-um 112 --patch-px 224"),
    )
    embed.add_argument("store", metavar="STORE", help="SpatialData zarr store with H&E images and spots")
    embed.add_argument(
        "--encoder",
        default="morphology",
        help="morphology, small_cnn, resnet18, imagenet, tissue_position, timm:<name> (default: %(default)s)",
    )
    embed.add_argument("--key-added", help="name of the embedding: obsm['X_<name>'] (default: the encoder's name)")
    embed.add_argument(
        "--patch-size-um",
        type=_sizes,
        default=[112.0],
        metavar="UM[,UM...]",
        help="side of the patch in µm; several (e.g. 224,448,800) are concatenated (default: 112)",
    )
    embed.add_argument("--patch-px", type=_positive(int), default=224, help="side of the patch in px (default: 224)")
    embed.add_argument("--shapes", metavar="KEY", help="embed the shapes of this element (e.g. a grid)")
    embed.add_argument("--table", default="table", help="the table of the spots (default: %(default)s)")
    embed.add_argument("--weights", metavar="FILE", help="local state dict of a network encoder")
    embed.add_argument("--device", default="cpu", help="torch device of network encoders (default: %(default)s)")
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
        "weighted by how well it follows the training spots' expression), trained on each spot and on four views "
        "of it re-embedded blurred (1, 2 µm) and restained (x0.7, x1.4), so that a slide scanned or stained "
        "differently reads as the same tissue; kernel width, penalty and target smoothing by leave-one-section-out CV"
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
    say(
        "  the noise ceiling bounds any prediction given the counting noise of the measurement, not what an image "
        "can explain: the noise and spatial genes vary for real between spots (a high ceiling), but with nothing "
        "the image shows (r near 0)"
    )
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
    say(
        f"  why the default is {model.embedding!r}: in this synthetic tissue a gene follows only the tissue "
        f"inside its spot, which one {args.patch_size_um:g} µm patch ('X_morphology') describes best; in real "
        "tissue expression also follows the neighbourhood, and the context scales won on real data (the "
        "development split of docs/benchmarks.md)"
    )

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
        written = [args.out / "patches.png", model_path, store]
        if ssl_path is not None:  # the pretrained encoder's weights and their record
            written += [Path(ssl_path), *sorted(Path(ssl_path).parent.glob(Path(ssl_path).name + ".*"))]
        here = Path.cwd().resolve()

        def shown(p: Path) -> str:  # one form for every file: relative to where the demo runs, when inside it
            p = Path(p).resolve()
            return str(p.relative_to(here)) if p.is_relative_to(here) else str(p)

        say("Wrote " + ", ".join(shown(p) for p in written))
    say("Done.")
    return 0


#: Third-party warnings that a user of the command line can do nothing about: docrep's complaints about squidpy's
#: docstrings, zarr's notice of a future default, deprecations inside the libraries.
_NOISE = (
    ("ignore", r".*is not a valid key", SyntaxWarning, ""),
    ("ignore", r".*autosharding", UserWarning, ""),
    ("ignore", "", FutureWarning, r"^(?!histoseq)"),
    ("ignore", "", DeprecationWarning, r"^(?!histoseq)"),
)
#: Loggers through which Lightning prints its advertising tips ("💡 Tip: ...").
_TIP_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "lightning.pytorch",
    "lightning.fabric",
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"histoseq: {record.levelname.lower()}: {msg}"


@contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """Set up the environment of a command, and restore it after.

    Noisy warnings and Lightning's tips are filtered, the ``histoseq`` logger prints on stderr (INFO, or WARNING
    with ``--quiet``), and stdout is sent to stderr (the real stdout receives the command's summary only).
    """
    logger = logging.getLogger("histoseq")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    saved = logger.level, logger.propagate
    tips = _NoTips()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        for action, message, category, module in _NOISE:
            warnings.filterwarnings(action, message=message, category=category, module=module)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        logger.propagate = False
        for name in _TIP_LOGGERS:
            logging.getLogger(name).addFilter(tips)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
            for name in _TIP_LOGGERS:
                logging.getLogger(name).removeFilter(tips)


def _run(args: argparse.Namespace) -> int:
    """Run a pipeline command: exit status 0, 2 for bad input (one line), 1 for any other failure."""
    from histoseq import _commands

    out = sys.stdout
    prog = f"histoseq {args.command}"
    try:
        with _quiet_libraries(args.quiet):
            return _commands.COMMANDS[args.command](args, out)
    except _commands.USER_ERRORS as err:
        if args.debug:
            raise
        print(f"{prog}: error: {_commands.error_message(err, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        print(
            f"{prog}: this looks like a bug or a problem of the environment; rerun with --debug to see the traceback.",
            file=sys.stderr,
        )
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histoseq`` command."""
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        with warnings.catch_warnings():
            # library chatter (zarr sharding notices, docstring helpers) would drown the demo's report
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=SyntaxWarning)
            return demo(args)
    return _run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

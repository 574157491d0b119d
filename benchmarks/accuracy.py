"""Accuracy of expression-from-morphology models on real data, every method × encoder, leakage-free.

Run:  python benchmarks/accuracy.py                      (full: her2st and the olfactory bulb, every row)
      python benchmarks/accuracy.py --datasets mob --rows ridge:morphology,control:shuffled
      python benchmarks/accuracy.py --quick               (minutes: subsampled spots, one fold, tiny networks)

Data: ``../shared/data/her2st`` (five serial sections of one HER2+ tumour, legacy ST; leave one section
out) and ``../shared/data/stutility_mob`` (four olfactory bulb sections of two mice; train on one mouse,
test on the other). ``--data`` or ``$HISTOSEQ_DATA_DIR`` points elsewhere.

Every fold is honest: genes are chosen on the training sections only (the 50 most variable genes among
those detected in 10% of training spots, ``hs.tl.select_genes``, and separately the 50 most expressed
training genes, ``flavor="mean"``); scaling, PCA, penalty, early stopping and the self-supervised
encoders (``hs.tl.pretrain_encoder``, trained on tissue tiles of the training sections' images only)
see nothing of the held-out section. Frozen encoders (hand-crafted morphology, ImageNet) learn nothing
from the data, so their embeddings are computed once for all spots.

A row ``method:encoder`` fits ``hs.tl.fit(method=...)`` on that encoder's embedding with the
library's defaults (``encoder_a+encoder_b``: both embeddings as one, ``hs.tl.fit(embedding=[a, b])``;
``cnn:<network>`` trains that network end to end; ``attention:<encoder>`` regresses from bags of tiles around
each spot, each tile embedded by that frozen encoder).
Suffixes change one default (ablations): ``:rank`` and ``:standardise`` normalise the embedding within each
section (``section_norm="rank"`` / ``"standardise"``; the default reads it as it is), ``:raw-targets``
(``target_neighbors=1``: the kernel trains on the raw targets, never on targets averaged over expression
neighbours), ``:equal-weights`` (``relevance_power=0``: every dimension weighs the same within its part) and
``:rbf`` (``kernel="rbf"``), ``:no-augment`` (``augment=False``: the kernel trains on the spots as scanned, without
the blurred and restained views of ``hs.tl.fit``'s scan augmentation). An encoder name ending in ``_raw`` embeds
the patches as scanned (``embed(stain_norm=False)``), one ending in ``_amount`` normalises each stain's amount as
well as its colour (``stain_norm="amount"``); every other encoder sees patches whose stain colours are normalised
(the default). The HEST rows never normalise by section.

**An honest protocol for choosing defaults.** The datasets are split in two (:data:`SPLITS`):

- the *development* split, where defaults may be chosen: her2st, leave one section out (five serial
  sections of one tumour), together with the synthetic shifts of ``benchmarks/shifts.py``;
- the *confirmation* split, looked at only after a choice was made: the olfactory bulb, trained on one
  mouse and tested on the other.

The script prints one table per split, the development table first. A default is kept only if it holds
on the confirmation split too; a gain within the spread between folds is no gain.

Each row prints, averaged over folds, for both gene sets: the mean Pearson over genes of the held-out
section, the depth-partial Pearson (log total counts regressed out of prediction and truth) and the
number of genes with r > 0; then the fit and predict time per fold. Reference rows: ``control:shuffled``
(the default model trained on the default embedding shuffled among the spots of each section: what a
model scores with no image–expression link), ``control:depth`` (a ridge on each spot's log total counts alone,
which an image-only slide does not have: how much of a score sequencing depth explains),
``ridge_hest:*`` (the HEST protocol's fixed penalty) and ``reference:ceiling`` (no model: the estimated
highest mean r that any prediction could reach on the held-out section given the counting noise of its
measurement, ``hs.tl.evaluate(ceiling=True)``, from two random halves of each spot's molecules).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = ("her2st", "mob")
#: Where defaults may be chosen (development) and where a choice is only confirmed (confirmation).
SPLITS = {"development": ("her2st",), "confirmation": ("mob",)}
GENE_SETS = {"hvg": "seurat", "top": "mean"}
#: the embedding ``hs.tl.fit`` reads without ``embedding=``
DEFAULT_ENCODER = "morphology_context"
#: suffix of a frozen encoder that reads the patches as scanned (``embed(stain_norm=False)``)
RAW = "_raw"
#: suffix of a frozen encoder whose patches get each stain's amount normalised too (``stain_norm="amount"``)
AMOUNT = "_amount"
#: what ``hs.tl.fit`` does without ``method=`` and ``embedding=``
DEFAULT_ROW = f"kernel:{DEFAULT_ENCODER}"
#: row suffixes (ablations of one default of ``hs.tl.fit``) and the options they pass
ROW_OPTIONS = {
    "rank": {"section_norm": "rank"},
    "standardise": {"section_norm": "standardise"},
    "raw-targets": {"target_neighbors": 1},
    "equal-weights": {"relevance_power": 0},
    "rbf": {"kernel": "rbf"},
    "no-augment": {"augment": False},
}
#: rows run by default (``method:encoder``, optionally ``:suffix``), in the order of the table
DEFAULT_ROWS = (
    DEFAULT_ROW,
    f"{DEFAULT_ROW}:no-augment",
    f"{DEFAULT_ROW}:rank",
    f"{DEFAULT_ROW}:standardise",
    f"{DEFAULT_ROW}:raw-targets",
    f"{DEFAULT_ROW}:equal-weights",
    f"{DEFAULT_ROW}:rbf",
    f"kernel:{DEFAULT_ENCODER}{RAW}",
    f"kernel:{DEFAULT_ENCODER}{AMOUNT}",
    "kernel:morphology_context+tissue_position",
    "kernel:morphology_context+tissue_position:rank",
    "kernel:tissue_position",
    "ridge:morphology_context",
    "ridge:morphology_context:rank",
    "ridge:morphology",
    "ridge:imagenet",
    "kernel:imagenet",
    "kernel:imagenet_context",
    "kernel:morphology_context+imagenet_context",
    "ridge:autoencoder",
    "ridge:simclr",
    "kernel:simclr",
    f"mlp:{DEFAULT_ENCODER}",
    f"contrastive:{DEFAULT_ENCODER}",
    "cnn:small_cnn",
    "attention:morphology",
    "superres:morphology",
    "ridge_hest:imagenet",
    "ridge_hest:morphology_context",
    "control:shuffled",
    "control:depth",
    "reference:ceiling",
)


@dataclass
class Settings:
    """What a run costs: full benchmark or the CI-sized one."""

    max_spots: int | None = None  # subsample each section to this many spots
    max_folds: int | None = None
    patch_px_cnn: int = 64
    cnn_epochs: int = 30
    pretrain_tiles: int = 2000
    pretrain_epochs: int = 10
    mlp_epochs: int = 200
    random_state: int = 0
    embed_kwargs: dict = field(default_factory=dict)


FULL = Settings(cnn_epochs=15, pretrain_tiles=600, pretrain_epochs=4, mlp_epochs=100)
QUICK = Settings(max_spots=150, max_folds=1, cnn_epochs=3, pretrain_tiles=128, pretrain_epochs=2, mlp_epochs=20)

#: frozen encoders: name -> hs.tl.embed keyword arguments
FROZEN = {
    "morphology": {"encoder": "morphology", "patch_size_um": 112.0, "patch_px": 224},
    "morphology_context": None,  # the default embedding of hs.tl.fit (EMBEDDING_PRESETS), filled in below
    "imagenet": {"encoder": "imagenet", "patch_size_um": 224.0, "patch_px": 224},
    "imagenet_context": None,  # EMBEDDING_PRESETS["X_imagenet_context"]: ImageNet at 224, 448 and 800 µm
    "tissue_position": None,  # EMBEDDING_PRESETS["X_tissue_position"]: distance to the tissue's centroid
}
PRETRAINED = {"autoencoder", "simclr"}


def _frozen(key: str) -> dict:
    if key.endswith(RAW):  # the same encoder on the pixels as scanned (no stain normalisation)
        return {**_frozen(key[: -len(RAW)]), "stain_norm": False}
    if key.endswith(AMOUNT):  # the same encoder with the amount of each stain normalised too
        return {**_frozen(key[: -len(AMOUNT)]), "stain_norm": "amount"}
    if FROZEN[key] is None:  # a preset of hs.tl.fit
        from histoseq.tl._inputs import EMBEDDING_PRESETS

        return dict(EMBEDDING_PRESETS[f"X_{key}"])
    return FROZEN[key]


# --------------------------------------------------------------------------------------------------
# data and folds
# --------------------------------------------------------------------------------------------------


def load(name: str, data_dir: Path, settings: Settings):
    """The dataset as one SpatialData, the obs column that names folds, and the folds' test groups."""
    import histoseq as hs

    if name == "her2st":
        sdata = hs.datasets.her2st(data_dir / "her2st", progress=False)
        fold_key = "sample_id"
    elif name == "mob":
        sdata = hs.datasets.mouse_olfactory_bulb(data_dir / "stutility_mob", progress=False)
        fold_key = "donor_id"
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if settings.max_spots:
        sdata = subsample(sdata, settings.max_spots, settings.random_state)
    groups = sorted(set(sdata.tables["table"].obs[fold_key].astype(str)))
    return sdata, fold_key, groups[: settings.max_folds] if settings.max_folds else groups


def subsample(sdata, n: int, seed: int):
    """At most ``n`` spots of each section (the table only; the images stay whole)."""
    table = sdata.tables["table"]
    rng = np.random.default_rng(seed)
    keep = np.zeros(table.n_obs, bool)
    for s in table.obs["sample_id"].astype(str).unique():
        rows = np.flatnonzero(table.obs["sample_id"].astype(str).to_numpy() == s)
        keep[rng.choice(rows, size=min(n, len(rows)), replace=False)] = True
    sdata.tables["table"] = table[keep].copy()
    return sdata


# --------------------------------------------------------------------------------------------------
# one row on one fold
# --------------------------------------------------------------------------------------------------


def _embed_frozen(sdata, key: str) -> str:
    import histoseq as hs

    obsm_key = f"X_bench_{key}"
    if obsm_key not in sdata.tables["table"].obsm:
        hs.tl.embed(sdata, key_added=f"bench_{key}", progress=False, **_frozen(key))
    return obsm_key


def _embed_pretrained(sdata, method: str, sections: list[str], settings: Settings, tmp: Path):
    """Pretrain a small CNN on the training sections' tissue only, then embed every spot with it.

    The embedding is kept per training set, so rows sharing an encoder share its pretraining.
    """
    import histoseq as hs

    key = f"pre_{method}_{'_'.join(sections)}"
    if f"X_{key}" in sdata.tables["table"].obsm:
        return f"X_{key}"
    path = tmp / f"{method}_{'_'.join(sections)}.pt"
    hs.tl.pretrain_encoder(
        sdata,
        path,
        method=method,
        encoder="small_cnn",
        patch_size_um=224.0,
        patch_px=64,
        train=sections,
        n_tiles=settings.pretrain_tiles,
        max_epochs=settings.pretrain_epochs,
        random_state=settings.random_state,
        progress=False,
    )
    hs.tl.embed(
        sdata, encoder="small_cnn", weights=path, patch_size_um=224.0, patch_px=64, key_added=key, progress=False
    )
    return f"X_{key}"


def _shuffled(sdata, parts: list[str], seed: int) -> str:
    """The embedding of ``parts`` with rows permuted within each section: image and expression unpaired.

    Every part is permuted alike, so the shuffled embedding keeps the parts of each spot together.
    """
    table = sdata.tables["table"]
    rng = np.random.default_rng(seed)
    sections = table.obs["sample_id"].astype(str).to_numpy()
    order = np.arange(table.n_obs)
    for s in np.unique(sections):
        rows = np.flatnonzero(sections == s)
        order[rows] = rng.permutation(rows)
    keys = []
    for i, part in enumerate(parts):
        keys.append(f"X_bench_shuffled{i}")
        table.obsm[keys[-1]] = np.asarray(table.obsm[part])[order]
    return "+".join(keys)


_VIEWS: dict = {}


def _views(sdata, method: str, embedding: str):
    """The scan views ``hs.tl.fit`` trains on by default, computed once per dataset and embedding for all spots.

    A frozen encoder learns nothing from the data, so, like the embeddings, the views of every spot are computed
    once; each fold's fit trains on its own training spots' views only (``hs.tl.fit(augment=views)``). ``None``
    where ``hs.tl.fit`` makes no views (another method, or an embedding without a morphology part; the shuffled
    control's embedding has no record, so the control trains without views).
    """
    from histoseq.tl._views import DEFAULT_AUGMENT, can_augment, scan_views
    from histoseq.tl.methods import get_method

    if not get_method(method).learns_views or can_augment([sdata], "table", embedding) is not None:
        return None
    key = (id(sdata), embedding)
    if key not in _VIEWS:
        t = time.perf_counter()
        _VIEWS[key] = (sdata, scan_views([sdata], "table", embedding, DEFAULT_AUGMENT, progress=False))
        print(f"  scan views of {embedding} for every spot: {time.perf_counter() - t:.0f} s", flush=True)
    return _VIEWS[key][1]


def _depth_key(sdata) -> str:
    table = sdata.tables["table"]
    table.obsm["X_bench_depth"] = np.log1p(np.asarray(table.X.sum(axis=1), dtype=float))
    return "X_bench_depth"


def score(pred, sdata, test: np.ndarray, genes: list[str], target_transform) -> dict[str, float]:
    """Pearson, depth-partial Pearson and number of positive genes of predictions on the ``test`` spots."""
    from histoseq.tl._data import transform_counts
    from histoseq.tl._evaluate import gene_scores

    table = sdata.tables["table"]
    cols = table.var_names.get_indexer(genes)
    truth = transform_counts(table.X[test], target_transform, cols)
    depth = np.log1p(np.asarray(table.X[test].sum(axis=1), dtype=float).ravel())
    s = gene_scores(pred, truth, depth)
    r = s["pearson"]
    return {
        "r": float(np.nanmean(r)),
        "r_partial": float(np.nanmean(s["pearson_partial_depth"])),
        "n_pos": int(np.sum(r > 0)),
    }


def ceiling(sdata, test: np.ndarray, gene_sets: dict[str, list[str]], seed: int) -> dict[str, float]:
    """The noise ceiling of each gene set on the ``test`` spots (mean over genes); no model is fitted."""
    from histoseq.tl._evaluate import noise_ceiling

    table = sdata.tables["table"]
    out: dict[str, float] = {"fit_s": 0.0, "predict_s": 0.0}
    for name, genes in gene_sets.items():
        c = noise_ceiling(table.X[test], "log1p_cp10k", table.var_names.get_indexer(genes), random_state=seed)
        nan = float("nan")
        out.update({f"{name}_r": float(np.nanmean(c)), f"{name}_r_partial": nan, f"{name}_n_pos": nan})
    return out


def run_row(row: str, sdata, fold_key: str, test_group: str, settings: Settings, tmp: Path) -> dict[str, float]:
    """Fit row ``method:encoder`` on all groups but ``test_group``, score it on ``test_group``.

    Both gene sets are chosen on the training spots, and each gets its own model (as a user fitting
    ``genes=50`` would: the penalty, kernel width and early stopping are chosen for those genes). The fit
    and predict times are those of one model.
    """
    import histoseq as hs

    method, encoder, *option = row.split(":")
    if len(option) > 1 or (option and option[0] not in ROW_OPTIONS):
        raise ValueError(f"row {row!r}: the options are one of {list(ROW_OPTIONS)}")
    table = sdata.tables["table"]
    test = table.obs[fold_key].astype(str).to_numpy() == test_group
    train = ~test
    train_sections = sorted(set(table.obs.loc[train, "sample_id"].astype(str)))
    gene_sets = {k: hs.tl.select_genes(table, 50, train=train, flavor=f) for k, f in GENE_SETS.items()}
    if method == "reference":
        if encoder != "ceiling":
            raise ValueError(f"row {row!r}: the only reference row is 'reference:ceiling'")
        return ceiling(sdata, test, gene_sets, settings.random_state)
    kwargs: dict = {"random_state": settings.random_state, "progress": False}
    if option:
        kwargs.update(ROW_OPTIONS[option[0]])
    if method == "ridge_hest":
        kwargs["section_norm"] = False
    fit_method = method
    if method == "control" and encoder == "shuffled":
        fit_method = DEFAULT_ROW.split(":")[0]
        parts = [_embed_frozen(sdata, part) for part in DEFAULT_ENCODER.split("+")]
        embedding = _shuffled(sdata, parts, settings.random_state)
    elif method == "control":
        # linear in each spot's log depth (standardised within its section: depth differs between runs)
        fit_method, embedding = "ridge", _depth_key(sdata)
        kwargs["section_norm"] = "standardise"
    elif method == "cnn":
        embedding = None
        kwargs.update(encoder=encoder, patch_size_um=224.0, patch_px=settings.patch_px_cnn)
        kwargs["max_epochs"] = settings.cnn_epochs
    elif method in ("attention", "superres"):  # bags of tiles, each embedded by the frozen encoder
        embedding = None
        kwargs.update(encoder=encoder, max_epochs=settings.mlp_epochs)
    elif encoder in PRETRAINED:
        embedding = _embed_pretrained(sdata, encoder, train_sections, settings, tmp)
    else:  # "a+b": the embeddings a and b as one (hs.tl.fit with a list of keys)
        embedding = "+".join(_embed_frozen(sdata, part) for part in encoder.split("+"))
    if method in ("mlp", "contrastive"):
        kwargs["max_epochs"] = settings.mlp_epochs
    if embedding is not None:
        kwargs["embedding"] = embedding
        if "augment" not in kwargs:
            views = _views(sdata, fit_method, embedding)
            if views is not None:
                kwargs["augment"] = views
    out: dict[str, float] = {"fit_s": 0.0, "predict_s": 0.0}
    for name, genes in gene_sets.items():
        t = time.perf_counter()
        model = hs.tl.fit(sdata, genes=genes, method=fit_method, train=train, groups="sample_id", **kwargs)
        out["fit_s"] += (time.perf_counter() - t) / len(gene_sets)
        t = time.perf_counter()
        pred = hs.tl.predict(sdata, model, spots=test, inplace=False)
        out["predict_s"] += (time.perf_counter() - t) / len(gene_sets)
        cols = pred.var_names.get_indexer(genes)
        s = score(np.asarray(pred.X, float)[:, cols], sdata, test, genes, model.target_transform)
        out.update({f"{name}_{k}": v for k, v in s.items()})
    return out


# --------------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------------


def run(
    datasets, rows, data_dir: Path, settings: Settings, log: Callable[[str], None] = print, csv: Path | None = None
):
    """Every row on every fold of every dataset; returns a tidy DataFrame (one line per dataset, row, fold).

    With ``csv``, each result is written there as soon as it is known, and the results already in the file
    are kept and not recomputed: an interrupted run resumes where it stopped.
    """
    import tempfile

    import pandas as pd

    records = pd.read_csv(csv).to_dict("records") if csv is not None and Path(csv).is_file() else []
    done = {(r["dataset"], r["row"], str(r["test"])) for r in records}
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in datasets:
            sdata, fold_key, test_groups = load(name, data_dir, settings)
            for row in rows:
                for test_group in test_groups:
                    if (name, row, test_group) in done:
                        continue
                    t = time.perf_counter()
                    res = run_row(row, sdata, fold_key, test_group, settings, Path(tmpdir))
                    records.append({"dataset": name, "row": row, "test": test_group, **res})
                    if csv is not None:
                        pd.DataFrame.from_records(records).to_csv(csv, index=False)
                    log(
                        f"  {name:6s} {row:42s} test {test_group:7s} hvg r={res['hvg_r']:.3f} "
                        f"top r={res['top_r']:.3f} ({time.perf_counter() - t:.0f} s)"
                    )
    df = pd.DataFrame.from_records(records)
    df = df[df["dataset"].isin(datasets) & df["row"].isin(rows)]
    order = {key: i for i, key in enumerate((d, r) for d in datasets for r in rows)}
    return df.iloc[np.argsort([order[k] for k in zip(df["dataset"], df["row"])], kind="stable")].reset_index(drop=True)


def summarise(df):
    """Means over folds, one line per dataset and row, in the order rows were run."""
    cols = [c for c in df.columns if c not in ("dataset", "row", "test")]
    out = df.groupby(["dataset", "row"], sort=False)[cols].mean().reset_index()
    per_fold = df.groupby(["dataset", "row"], sort=False)["hvg_r"].apply(lambda v: " / ".join(f"{x:.2f}" for x in v))
    out["hvg_r_per_fold"] = per_fold.to_numpy()
    return out


def markdown(summary) -> str:
    """The summary as a Markdown table (what docs/benchmarks.md shows)."""
    head = (
        "| dataset | method : encoder | HVG r | HVG r (depth-partial) | HVG genes r>0 | top r | top r (depth-partial) "
        "| top genes r>0 | HVG r per fold | fit s/fold | predict s/fold |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    label = {r: r + (" (default)" if r == DEFAULT_ROW else "") for r in summary["row"]}

    def num(value: float, spec: str = ".3f", suffix: str = "") -> str:
        return f"{value:{spec}}{suffix}" if np.isfinite(value) else "–"

    lines = [
        f"| {r.dataset} | {label[r.row]} | {num(r.hvg_r)} | {num(r.hvg_r_partial)} | "
        f"{num(r.hvg_n_pos, '.0f', '/50')} | "
        f"{num(r.top_r)} | {num(r.top_r_partial)} | {num(r.top_n_pos, '.0f', '/50')} | {r.hvg_r_per_fold} | "
        f"{r.fit_s:.1f} | {r.predict_s:.1f} |"
        for r in summary.itertuples()
    ]
    return head + "\n".join(lines)


def report(summary) -> str:
    """One table and its margins per split of :data:`SPLITS`, the development split first."""
    parts = []
    for split, datasets in SPLITS.items():
        part = summary[summary["dataset"].isin(datasets)]
        if part.empty:
            continue
        what = "defaults may be chosen here" if split == "development" else "looked at only after the choice"
        parts.append(f"### {split.capitalize()} split ({', '.join(datasets)}: {what})\n\n{markdown(part)}")
        text = margins(part)
        if text:
            parts.append(text)
    return "\n\n".join(parts)


def margins(summary) -> str:
    """How far the default row is from the other models (controls and reference rows aside).

    Two comparisons: with the best other row on the default embedding (other methods, and the default
    without its options), which says whether the default *method* is the best; and with the best row of
    all, which may read other embeddings (an optional extra, such as ImageNet weights, that ``hs.tl.fit``
    cannot assume).
    """
    default_encoder = DEFAULT_ROW.split(":")[1]
    lines = []
    for name, part in summary.groupby("dataset", sort=False):
        rows = part.set_index("row")
        if DEFAULT_ROW not in rows.index:
            continue
        others = rows.drop(
            index=[r for r in rows.index if r == DEFAULT_ROW or r.startswith(("control:", "ridge_hest:", "reference:"))]
        )
        same = others[[r.split(":")[1] == default_encoder for r in others.index]]
        d = rows.loc[DEFAULT_ROW]
        for gene_set in GENE_SETS:
            col = f"{gene_set}_r"
            if others.empty:
                continue
            depth = rows.loc["control:depth", col] if "control:depth" in rows.index else float("nan")
            line = f"{name} {gene_set}: default {d[col]:.3f} (depth-partial {d[f'{gene_set}_r_partial']:.3f})"
            if not same.empty:
                best = same[col].idxmax()
                line += f"; best other on {default_encoder} {best} {same.loc[best, col]:.3f} "
                line += f"(default {d[col] - same.loc[best, col]:+.3f})"
            best = others[col].idxmax()
            gap = d[col] - others.loc[best, col]
            line += f"; best other row {best} {others.loc[best, col]:.3f} (default {gap:+.3f})"
            line += f"; log total counts alone {depth:.3f}"
            if "reference:ceiling" in rows.index:
                top = rows.loc["reference:ceiling", col]
                line += f"; noise ceiling {top:.3f} (the default reaches {d[col] / top:.0%} of it)"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder holding her2st/ and stutility_mob/")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated method:encoder rows")
    parser.add_argument("--quick", action="store_true", help="subsampled spots, one fold, tiny networks")
    parser.add_argument(
        "--csv", type=Path, default=None, help="write the per-fold results here as they come; resume from it"
    )
    parser.add_argument("--from-csv", type=Path, default=None, help="print the table of an earlier run's --csv")
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        import pandas as pd

        df = pd.read_csv(args.from_csv)
        order = {key: i for i, key in enumerate((d, r) for d in DATASETS for r in DEFAULT_ROWS)}
        df = df.iloc[np.argsort([order.get(k, len(order)) for k in zip(df["dataset"], df["row"])], kind="stable")]
        summary = summarise(df)
        print(report(summary))
        return 0
    data_dir = args.data or Path(
        os.environ.get("HISTOSEQ_DATA_DIR", Path(__file__).parents[1] / ".." / "shared" / "data")
    )
    if not data_dir.is_dir():
        print(f"No data folder at {data_dir}: pass --data or set HISTOSEQ_DATA_DIR.", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.getLogger("histoseq").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    settings = QUICK if args.quick else FULL
    datasets = [d for d in args.datasets.split(",") if d]
    rows = [r for r in args.rows.split(",") if r]
    print(f"accuracy benchmark: {datasets} × {len(rows)} rows ({'quick' if args.quick else 'full'})", flush=True)
    t = time.perf_counter()
    df = run(datasets, rows, data_dir, settings, log=lambda m: print(m, flush=True), csv=args.csv)
    print()
    summary = summarise(df)
    print(report(summary))
    print(f"\ntotal {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

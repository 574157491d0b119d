"""Transcriptome-supervised classes of tissue: how well a map painted from the H&E agrees with the expression.

Run:  python benchmarks/classes.py --data ../shared/data
      python benchmarks/classes.py --datasets mob --settings default,context

Classes come from marker genes (``hs.tl.expression_classes``: a spot is "<gene>" where the gene is above the
75th percentile of the *training* spots, "tissue" otherwise); ``hs.tl.fit_classifier`` learns them from the
image (every hyper-parameter chosen by cross-validation inside the training sections), ``hs.tl.classify``
paints them over the held-out sections, and ``hs.tl.dice`` scores the map against the held-out expression.

- **Mouse olfactory bulb** (``stutility_mob``: four sections, two mice): Penk (granule cell layer) and S100a5
  (olfactory nerve and glomerular layers). Thresholds and classifier from one mouse, scored on all spots of the
  other. The mouse 1 → mouse 2 direction is the *development* split (settings may be chosen on it); the
  reverse, mouse 2 → mouse 1, is the *confirmation* split, looked at only after a choice.
- **her2st** (five serial sections of one HER2+ tumour): ERBB2 (tumour) and COL1A1 (stroma), leave one
  section out.

Each row prints the per-class and mean Dice (mean over the classes present in truth or prediction), beside a
majority-class baseline (every held-out spot given the most frequent training class) and a shuffled-label
control (the same pipeline trained on labels permuted among the spots of each training section), and the
inner cross-validation's balanced accuracy of the chosen penalty (training sections only: the score a
setting may be chosen by). Datasets absent from ``--data`` are skipped with a message.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import spatialdata

import histoseq as hs

#: Settings tried (each a set of ``fit_classifier`` options): the defaults (the reference study's ensemble of 56,
#: 112 and 224 µm patches, stain-normalised colours), the same with more tissue context (112, 224 and 448 µm),
#: that on the patches as scanned (no stain normalisation), and one model on the features of all the default
#: sizes side by side instead of an average of one model per size.
SETTINGS = {
    "default": {},
    "context": {"patch_sizes_um": (112.0, 224.0, 448.0)},
    "context_raw": {"patch_sizes_um": (112.0, 224.0, 448.0), "stain_norm": False},
    "concat": {"ensemble": "concat"},
}
MOB_GENES = ("Penk", "S100a5")
HER2ST_GENES = ("ERBB2", "COL1A1")


def cv_accuracy(clf: hs.tl.ClassifierModel) -> float:
    """Mean over the ensemble's members of the inner-CV balanced accuracy at the chosen penalty."""
    scores = []
    for _, fitted in clf._members:
        cv = fitted.info.get("cv")
        if cv:
            scores.append(cv["balanced_accuracy"][cv["Cs"].index(fitted.info["C"])])
    return float(np.mean(scores)) if scores else float("nan")


def evaluate(sdata, train: list[str], test: list[str], genes, options: dict, seed: int = 0) -> dict:
    """Classes from the training sections, a classifier, its map of the test sections, and the controls."""
    table = sdata.tables["table"]
    hs.tl.expression_classes(sdata, genes=list(genes), train=train, overwrite=True)
    t0 = time.perf_counter()
    clf = hs.tl.fit_classifier(sdata, train=train, progress=False, random_state=seed, **options)
    fit_s = time.perf_counter() - t0
    test_mask = table.obs["sample_id"].isin(test).to_numpy()
    t0 = time.perf_counter()
    hs.tl.classify(sdata, clf, spots=test_mask, progress=False, overwrite=True)
    predict_s = time.perf_counter() - t0
    scores = hs.tl.dice(sdata, section=test)
    # majority class of the training spots, given to every test spot
    truth = table.obs["expression_class"]
    majority = truth[~test_mask].value_counts().idxmax()
    table.obs["_majority"] = pd.Categorical(np.where(test_mask, majority, None), categories=truth.cat.categories)
    base = hs.tl.dice(sdata, pred="_majority", section=test)
    # shuffled labels: the same pipeline on labels permuted within each training section
    rng = np.random.default_rng(seed)
    shuffled = truth.astype(str).to_numpy().copy()
    for s in train:
        rows = np.flatnonzero(table.obs["sample_id"].to_numpy() == s)
        shuffled[rows] = shuffled[rng.permutation(rows)]
    table.obs["_shuffled"] = pd.Categorical(shuffled, categories=truth.cat.categories)
    clf_s = hs.tl.fit_classifier(sdata, "_shuffled", train=train, progress=False, random_state=seed, **options)
    hs.tl.classify(sdata, clf_s, key_added="_shuffled_pred", spots=test_mask, progress=False, overwrite=True)
    ctrl = hs.tl.dice(sdata, pred="_shuffled_pred", section=test)
    for key in ("_majority", "_shuffled", "_shuffled_pred"):
        table.obs.pop(key)
    return {
        "scores": scores,
        "majority": float(base.loc["mean", "dice"]),
        "shuffled": float(ctrl.loc["mean", "dice"]),
        "cv_bacc": cv_accuracy(clf),
        "fit_s": fit_s,
        "predict_s": predict_s,
    }


def row(name: str, res: dict, genes) -> str:
    s = res["scores"]["dice"]
    per_class = " | ".join(f"{s.get(c, float('nan')):.3f}" for c in (*genes, "tissue"))
    return (
        f"| {name} | {per_class} | **{s['mean']:.3f}** | {res['majority']:.3f} | {res['shuffled']:.3f} | "
        f"{res['cv_bacc']:.3f} | {res['fit_s']:.0f} / {res['predict_s']:.0f} |"
    )


def header(genes, first: str) -> str:
    cols = ["setting" if first == "setting" else first, *genes, "tissue", "mean Dice", "majority", "shuffled"]
    cols += ["inner-CV bal. acc.", "fit / classify s"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def run_mob(root: Path, settings: list[str]) -> None:
    from histoseq.datasets._real import MOB_MOUSE

    sdata = hs.datasets.mouse_olfactory_bulb(root / "stutility_mob", progress=False)
    mice = {m: [s for s, mm in MOB_MOUSE.items() if mm == m] for m in ("mouse1", "mouse2")}
    for split, (train_m, test_m) in (("development", ("mouse1", "mouse2")), ("confirmation", ("mouse2", "mouse1"))):
        print(f"\n### Olfactory bulb, {split}: train {train_m} ({', '.join(mice[train_m])}), test {test_m}\n")
        print(header(MOB_GENES, "setting"))
        for name in settings:
            res = evaluate(sdata, mice[train_m], mice[test_m], MOB_GENES, SETTINGS[name])
            print(row(name, res, MOB_GENES), flush=True)


def run_her2st(root: Path, settings: list[str]) -> None:
    from histoseq.datasets._real import HER2ST_SECTIONS

    sections = list(HER2ST_SECTIONS)
    sdata = hs.datasets.her2st(root / "her2st", progress=False)
    # the reader's images decode their JPEG lazily, once per read of a pyramid level: written to a zarr store once,
    # each fold reads image chunks instead
    tmp = tempfile.TemporaryDirectory()
    sdata.write(Path(tmp.name) / "her2st.zarr")
    sdata = spatialdata.read_zarr(Path(tmp.name) / "her2st.zarr")
    missing = [g for g in HER2ST_GENES if g not in sdata.tables["table"].var_names]
    if missing:
        print(f"her2st lacks the markers {missing}; skipped.")
        return
    for name in settings:
        print(f"\n### her2st, leave one section out, setting {name!r}\n")
        print(header(HER2ST_GENES, "held out"))
        means = []
        for held in sections:
            res = evaluate(sdata, [s for s in sections if s != held], [held], HER2ST_GENES, SETTINGS[name])
            means.append((res["scores"].loc["mean", "dice"], res["majority"], res["shuffled"]))
            print(row(held, res, HER2ST_GENES), flush=True)
        m = np.mean(means, axis=0)
        print(f"| **mean** | | | | **{m[0]:.3f}** | {m[1]:.3f} | {m[2]:.3f} | | |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder of the datasets")
    parser.add_argument("--datasets", default="mob,her2st", help="comma-separated: mob, her2st")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated of {list(SETTINGS)}")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose among {list(SETTINGS)}")
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    print("## Transcriptome-supervised classes of tissue (Dice on held-out sections)")
    runners = {"mob": ("stutility_mob", run_mob), "her2st": ("her2st", run_her2st)}
    for name in args.datasets.split(","):
        folder, run = runners[name]
        if not (args.data / folder).is_dir():
            print(f"\n{name}: {args.data / folder} not found; skipped.")
            continue
        t0 = time.perf_counter()
        run(args.data, settings)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

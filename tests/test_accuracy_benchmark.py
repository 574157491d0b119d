"""The real-data accuracy benchmark (benchmarks/accuracy.py) in CI size: a few spots, one fold, tiny networks."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("histoseq_accuracy_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.slow
def test_mob_one_fold_every_kind_of_row(bench, mob_dir, tmp_path, monkeypatch):
    settings = replace(bench.QUICK, max_spots=90, cnn_epochs=2, pretrain_tiles=64, pretrain_epochs=1, mlp_epochs=10)
    rows = [bench.DEFAULT_ROW, "ridge:morphology:rank", "ridge_hest:morphology", "contrastive:morphology"]
    rows += ["ridge:autoencoder", "kernel:autoencoder", "cnn:small_cnn", "control:shuffled", "control:depth"]
    rows += ["kernel:morphology+morphology_context", "reference:ceiling"]
    rows += [f"{bench.DEFAULT_ROW}:{o}" for o in ("rank", "standardise", "raw-targets", "equal-weights", "rbf")]
    csv = tmp_path / "results.csv"
    df = bench.run(["mob"], rows, mob_dir.parent, settings, log=lambda m: None, csv=csv)
    assert list(df["row"]) == rows
    assert set(df["test"]) == {"mouse1"}  # one fold: train on mouse 2, test on mouse 1
    metrics = [f"{g}_{m}" for g in ("hvg", "top") for m in ("r", "r_partial", "n_pos")]
    models = df[df["row"] != "reference:ceiling"]
    assert np.isfinite(models[metrics].to_numpy(float)).all()
    by_row = df.set_index("row")
    default = by_row.loc[bench.DEFAULT_ROW]
    shuffled, depth = by_row.loc["control:shuffled"], by_row.loc["control:depth"]
    # the layers of the olfactory bulb are visible: morphology predicts the other mouse's expression, and
    # unpairing patches from spots destroys it
    assert default["hvg_r"] > 0.25
    assert default["hvg_r"] > shuffled["hvg_r"] + 0.2
    assert abs(shuffled["hvg_r"]) < 0.15
    # a prediction from depth alone has nothing left once depth is regressed out
    assert depth["hvg_r"] > 0.1
    assert abs(depth["hvg_r_partial"]) < 0.05 and abs(depth["top_r_partial"]) < 0.05
    assert default["hvg_r_partial"] > 0.1
    # two embeddings as one (hs.tl.fit with a list of keys) learn like one
    assert by_row.loc["kernel:morphology+morphology_context", "hvg_r"] > shuffled["hvg_r"] + 0.2
    # the noise ceiling fits no model: it bounds what any model can score on the held-out spots
    ceiling = by_row.loc["reference:ceiling"]
    for gene_set in ("hvg", "top"):
        assert default[f"{gene_set}_r"] < ceiling[f"{gene_set}_r"] <= 1.0
        assert np.isnan(ceiling[f"{gene_set}_r_partial"])
    table = bench.markdown(bench.summarise(df))
    assert f"| mob | {bench.DEFAULT_ROW} (default) |" in table
    assert table.count("\n| mob |") == len(rows)
    # a rerun with the same file resumes: nothing is recomputed, the same results come back in row order
    monkeypatch.setattr(bench, "run_row", lambda *a, **k: pytest.fail("recomputed a stored result"))
    again = bench.run(["mob"], rows[::-1], mob_dir.parent, settings, log=lambda m: None, csv=csv)
    assert list(again["row"]) == rows[::-1]
    stored = again.set_index("row").loc[rows, metrics].to_numpy(float)
    assert np.allclose(stored, df[metrics].to_numpy(float), equal_nan=True)
    margins = bench.margins(bench.summarise(df)).splitlines()
    assert [m.split(":")[0] for m in margins] == ["mob hvg", "mob top"]
    assert f"default {default['hvg_r']:.3f}" in margins[0]
    assert f"noise ceiling {ceiling['hvg_r']:.3f}" in margins[0]
    assert "| mob | reference:ceiling | " in table and "| – |" in table
    # one table per split: the bulb is the confirmation split, looked at after defaults are chosen on her2st
    report = bench.report(bench.summarise(df))
    assert report.startswith("### Confirmation split (mob: looked at only after the choice)")
    assert bench.SPLITS == {"development": ("her2st",), "confirmation": ("mob",)}


@pytest.mark.slow
def test_a_row_option_must_be_known(bench, mob_dir, tmp_path):
    sdata, fold_key, groups = bench.load("mob", mob_dir.parent, bench.Settings(max_spots=20))
    with pytest.raises(ValueError, match="raw-targets"):
        bench.run_row("ridge:morphology:typo", sdata, fold_key, groups[0], bench.QUICK, tmp_path)
    with pytest.raises(ValueError, match="reference:ceiling"):
        bench.run_row("reference:typo", sdata, fold_key, groups[0], bench.QUICK, tmp_path)


def test_folds_never_share_a_section_or_a_mouse(bench, mob_dir):
    sdata, fold_key, groups = bench.load("mob", mob_dir.parent, bench.Settings(max_spots=20))
    obs = sdata.tables["table"].obs
    assert fold_key == "donor_id" and groups == ["mouse1", "mouse2"]
    for g in groups:
        test = obs[fold_key] == g
        assert not set(obs.loc[test, "sample_id"]) & set(obs.loc[~test, "sample_id"])
        assert obs[test].groupby("sample_id", observed=True).size().max() <= 20

"""Slides that differ from the training slides: the defaults do not assume a slide's make-up."""

from __future__ import annotations

import numpy as np
import pytest

import histoseq as hs
from histoseq.tl._data import transform_counts

TRAIN = ["section0", "section1"]


@pytest.fixture(scope="module")
def composition_shift():
    """Training sections half tumour, the test section 90 % tumour; the tumour-driven genes and their truth."""
    sdata = hs.datasets.synthetic(
        n_sections=3, section_size_um=1200, tumour_fraction=[0.5, 0.5, 0.9], random_state=0, progress=False
    )
    table = sdata.tables["table"]
    genes = [g for g in table.var_names if g.startswith("TUM")]
    test = (table.obs["sample_id"] == "section2").to_numpy()
    truth = transform_counts(table.X[test], "log1p_cp10k", table.var_names.get_indexer(genes))
    return sdata, genes, test, truth


def _bias_and_r(sdata, genes, test, truth, **options):
    model = hs.tl.fit(sdata, genes=genes, train=TRAIN, progress=False, **options)
    pred = hs.tl.predict(sdata, model, spots=test, inplace=False).X.astype(float)
    bias = np.abs(pred.mean(axis=0) - truth.mean(axis=0)).mean()
    r = np.mean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(len(genes))])
    return bias, r


@pytest.mark.slow
def test_a_composition_shift_does_not_bias_the_default(composition_shift):
    sdata, genes, test, truth = composition_shift
    shares = sdata.tables["table"].uns["synthetic"]["params"]["tumour_area_fraction"]
    assert shares[2] > shares[0] + 0.3  # the test section really holds more tumour
    bias, r = _bias_and_r(sdata, genes, test, truth)
    assert bias < 0.3  # mean prediction of the tumour genes within 0.3 log units of the truth
    assert r > 0.5
    # ranking within sections assumes every section holds the same tissue: it pulls the tumour-rich section's
    # features back to the training sections' mix, and its predictions with them
    rank_bias, rank_r = _bias_and_r(sdata, genes, test, truth, section_norm="rank")
    assert rank_bias > 0.5 and rank_bias > 2 * bias
    assert r > rank_r

"""What histoseq says: warnings only where the user can act, one line per call, no third-party noise."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

import histoseq as hs
from histoseq.tl._linalg import DEFAULT_ALPHAS, warn_at_edge


def test_penalty_at_the_unpenalised_edge_is_information_and_at_the_other_a_warning(caplog):
    caplog.set_level(logging.INFO, logger="histoseq")
    warn_at_edge(float(DEFAULT_ALPHAS[0]), DEFAULT_ALPHAS)
    (low,) = caplog.records
    assert low.levelno == logging.INFO and "nearly unpenalised" in low.getMessage()
    caplog.clear()
    warn_at_edge(float(DEFAULT_ALPHAS[-1]), DEFAULT_ALPHAS)
    (high,) = caplog.records
    assert high.levelno == logging.WARNING and "training mean" in high.getMessage()
    caplog.clear()
    warn_at_edge(float(DEFAULT_ALPHAS[5]), DEFAULT_ALPHAS)
    assert not caplog.records


def test_coarse_images_are_reported_once_per_call(caplog):
    """Patches finer than two images' pixels: one message for the call, naming how many images."""
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=400, progress=False)
    caplog.set_level(logging.WARNING, logger="histoseq")
    # 0.5 µm/px images, patches of 0.1 µm/px: upsampled
    hs.pp.extract_patches(sdata, patch_size_um=6.4, patch_px=64, progress=False)
    msgs = [r.getMessage() for r in caplog.records if "upsampled" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("2 images are coarser")


@pytest.mark.slow
def test_stain_estimation_does_not_print_squidpy_docstring_notices():
    """squidpy's docrep SyntaxWarnings on first import are hushed (a fresh interpreter shows them otherwise)."""
    code = (
        "import warnings; warnings.simplefilter('default');"
        "import histoseq as hs;"
        "sd = hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False);"
        "hs.pp.estimate_stain(sd, image_key='section0_image')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "is not a valid key" not in out.stderr, out.stderr


def test_network_training_prints_no_lightning_banner(capfd):
    """With a progress bar, Lightning's device lines and tips still stay out of the user's output."""
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=400, progress=False)
    table = sdata.tables["table"]
    table.obsm["X_demo"] = np.random.default_rng(0).normal(size=(table.n_obs, 4))
    hs.tl.fit(sdata, genes=2, embedding="X_demo", method="mlp", max_epochs=1, progress=True)
    out = capfd.readouterr()
    text = out.out + out.err
    assert "GPU available" not in text and "Tip" not in text and "TPU" not in text, text


def test_a_morphology_setting_added_later_is_no_difference_at_its_default():
    """Models saved before ``smooth_um`` existed predict on new embeddings without a warning; other values warn."""
    from histoseq.tl._inputs import _with_morphology_defaults

    old = {"encoder": "morphology", "morphology": {"tissue_od": 0.1}}
    new = {"encoder": "morphology", "morphology": {"tissue_od": 0.1, "smooth_um": 0.0}}
    assert _with_morphology_defaults(old) == _with_morphology_defaults(new)
    smoothed = {"encoder": "morphology", "morphology": {"tissue_od": 0.1, "smooth_um": 2.0}}
    assert _with_morphology_defaults(old) != _with_morphology_defaults(smoothed)

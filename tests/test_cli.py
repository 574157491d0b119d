from __future__ import annotations

import subprocess
import sys

import pytest

import histoseq as hs
from histoseq._cli import main


def test_demo_help_documents_the_demo():
    out = subprocess.run(
        [sys.executable, "-m", "histoseq._cli", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "synthetic" in out
    assert "--patch-size-um" in out


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    import spatialdata as sd

    args = ["demo", "--sections", "3", "--out", str(tmp_path / "demo"), "--patch-px", "32", "--quiet"]
    rc = main([*args, "--pretrain-epochs", "2", "--pretrain-tiles", "128"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "patches" in out
    assert "grid tiles on tissue" in out
    assert (tmp_path / "demo" / "patches.png").stat().st_size > 1000
    back = sd.read_zarr(tmp_path / "demo" / "synthetic.zarr")
    assert "section0_image_grid" in back.shapes
    r = float(out.split("Pearson r = ")[1].split()[0])
    assert r > 0.3  # patches show the nuclei that drive the learnable genes
    rows = {line.split("]", 1)[1].split()[0]: line for line in out.splitlines() if "mean r = " in line}
    mean_r = {k: float(v.split("mean r = ")[1].split()[0]) for k, v in rows.items()}
    assert mean_r["nuclei_count"] > 0.5  # learnable genes are predicted on the held-out section
    assert abs(mean_r["noise"]) < 0.15  # noise genes are not
    ceiling = {k: float(v.split("noise ceiling ")[1].rstrip(")")) for k, v in rows.items()}
    # the noise genes vary for real (a high ceiling), but not with anything the image shows
    assert ceiling["noise"] > 0.5 and all(mean_r[k] < ceiling[k] for k in rows)
    model = hs.tl.load_model(tmp_path / "demo" / "model.pt")
    assert model.embedding == "X_morphology_context" and model.method == "kernel"
    assert model.section_norm is None
    assert (tmp_path / "demo" / "autoencoder_small_cnn.pt").exists()
    assert "X_ssl" in back.tables["table"].obsm
    loss = [float(v) for v in out.split("reconstruction loss by epoch: ")[1].split("\n")[0].split(", ")]
    assert len(loss) == 2 and loss[-1] < loss[0]
    compare = {
        line.split()[3]: (float(line.split()[4]), float(line.split()[6]))
        for line in out.splitlines()
        if line.split()[3:4] and line.split()[3].startswith("X_") and " / " in line
    }
    assert set(compare) == {"X_morphology_context", "X_morphology", "X_ssl"}
    assert all(learnable > others + 0.2 for learnable, others in compare.values())

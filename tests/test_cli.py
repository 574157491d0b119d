from __future__ import annotations

import subprocess
import sys

from histoseq._cli import main


def test_demo_help_documents_the_demo():
    out = subprocess.run(
        [sys.executable, "-m", "histoseq._cli", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "synthetic" in out
    assert "--patch-size-um" in out


def test_demo_runs_end_to_end(tmp_path, capsys):
    import spatialdata as sd

    rc = main(["demo", "--sections", "2", "--out", str(tmp_path / "demo"), "--patch-px", "32", "--quiet"])
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
    assert (tmp_path / "demo" / "ridge_morphology.pt").exists()

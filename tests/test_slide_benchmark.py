"""The whole-slide prediction benchmark (benchmarks/slide.py) in its smoke-test size: it runs and prints its table."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "slide.py"


@pytest.mark.slow
def test_quick_run_prints_its_table_and_the_area_ratio(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--tmp", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode in (0, 2), f"exit code {proc.returncode}\n{out}\n{proc.stderr[-3000:]}"  # 2: a target missed
    rows = [line for line in out.splitlines() if re.match(r"\| [\d,]+ × [\d,]+ \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["4,000 × 4,000", "8,000 × 8,000"], out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9, row
        numbers = [float(c.replace(",", "")) for c in cells[1:]]
        assert all(math.isfinite(v) and v > 0 for v in numbers), row
    tiles = [float(r.split("|")[2].replace(",", "")) for r in rows]
    assert tiles[1] > 2 * tiles[0]  # four times the tissue area
    ratio = re.search(r"^4× area .*: time ×([\d.]+) for tiles ×([\d.]+)", out, re.M)
    assert ratio, out
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in ratio.groups())
    assert "Target peak RSS below 2 GB:" in out and "Target time linear in tissue area" in out
    # the slides are left as they were: image only, ready for a rerun
    for px in (4000, 8000):
        store = tmp_path / f"slide_{px}px.zarr"
        assert (store / "images" / "section0_image").exists()
        assert not any((store / "tables").glob("*/")) and not any((store / "shapes").glob("*/"))

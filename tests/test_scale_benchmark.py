"""The cohort benchmark (benchmarks/scale.py) in its smoke-test size: it runs and prints its table and checks."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_quick_run_prints_its_table_and_the_ratios(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    out = proc.stdout
    assert proc.returncode in (0, 2), f"exit code {proc.returncode}\n{out}\n{proc.stderr[-3000:]}"  # 2: a target missed
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \| \d+ \| in process", line)]
    assert [tuple(c.strip() for c in r.split("|")[1:3]) for r in rows] == [
        ("1", "800"),
        ("2", "800"),
        ("1", "1600"),
        ("2", "1600"),
    ], out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 10, row
        numbers = [float(c.replace(",", "")) for c in cells[3:]]
        assert all(math.isfinite(v) and v > 0 for v in numbers), row
    spots = [int(r.split("|")[4].replace(",", "")) for r in rows]
    assert spots[1] > spots[0] and spots[2] > 2 * spots[0]  # two slides; four times the area
    for what in ("2 vs 1 slide(s) of 800 µm: time per spot", "2 vs 1 slide(s) of 800 µm: peak RSS", "4× area"):
        assert what in out, out
    assert not (tmp_path / "run").exists()  # the copies of the stores are removed

"""The tutorials run as they are written: on the embedded synthetic data, and on real data where it is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))
#: Tutorials on real data, and the fixture (tests/conftest.py) that finds their data or skips.
REAL_DATA = {"bulb": "mob_dir"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.stem, marks=[pytest.mark.realdata] if p.stem in REAL_DATA else []) for p in TUTORIALS],
)
def test_tutorial_runs(path, monkeypatch, tmp_path, request):
    import matplotlib

    if path.stem in REAL_DATA:  # skips when the data are absent; the notebook reads $HISTOSEQ_DATA_DIR
        data = request.getfixturevalue(REAL_DATA[path.stem]).resolve()
        monkeypatch.setenv("HISTOSEQ_DATA_DIR", str(data.parent))
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    for cell in cells:
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}", "exec"), namespace)

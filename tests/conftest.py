from __future__ import annotations

import os
from pathlib import Path

import pytest
from _geometry import make_geometry_sdata

SHARED_DATA = Path(os.environ.get("HISTOSEQ_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _require(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (it is present in CI, beside the clone)")
    return path


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    return _require("her2st")


@pytest.fixture(scope="session")
def mob_dir() -> Path:
    return _require("stutility_mob")


@pytest.fixture
def geometry_sdata():
    return make_geometry_sdata()

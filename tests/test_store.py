"""Writes into a zarr-backed SpatialData are atomic per element: a failed write loses nothing."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import spatialdata as sd

import histoseq as hs
from histoseq._sdata import store_element


def _fingerprint(store: Path) -> dict[str, str]:
    """Every file of a store with the hash of its bytes."""
    return {
        str(p.relative_to(store)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "s.zarr"
    hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False).write(path)
    return path


def test_a_write_replaces_the_element_and_adds_new_kinds(store):
    sdata = sd.read_zarr(store)
    table = sdata.tables["table"]
    table.obsm["X_new"] = np.ones((table.n_obs, 3))
    store_element(sdata, "tables", "table")
    labels = sd.models.Labels2DModel.parse(np.zeros((8, 8), dtype=np.uint8), dims=("y", "x"))
    store_element(sdata, "labels", "mask", labels)  # the store had no labels yet
    back = sd.read_zarr(store)
    assert "X_new" in back.tables["table"].obsm and "mask" in back.labels
    assert not list(store.parent.glob("*.histoseq-write-*"))


def test_an_unwritable_value_leaves_the_store_as_it_was(store):
    sdata = sd.read_zarr(store)
    before = _fingerprint(store)
    sdata.tables["table"].uns["bad"] = {1, 2}  # anndata cannot write a set
    with pytest.raises(Exception, match="set"):
        store_element(sdata, "tables", "table")
    assert _fingerprint(store) == before
    back = sd.read_zarr(store)
    assert back.tables["table"].n_obs == sdata.tables["table"].n_obs and "bad" not in back.tables["table"].uns
    assert not list(store.parent.glob("*.histoseq-write-*"))


def test_a_failed_write_restores_the_element_in_memory(store, monkeypatch):
    sdata = sd.read_zarr(store)
    before = _fingerprint(store)
    original = sdata.tables["table"]

    def broken(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(sd.SpatialData, "write", broken)
    with pytest.raises(OSError, match="No space"):
        store_element(sdata, "tables", "table", original[:3].copy())
    assert sdata.tables["table"] is original  # the object as it was
    with pytest.raises(OSError, match="No space"):
        store_element(sdata, "tables", "other", original[:3].copy())
    assert "other" not in sdata.tables
    assert _fingerprint(store) == before


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_process_killed_while_writing_leaves_the_previous_element(store, when):
    """The process dies half-way through writing the new table, or after it but before the swap."""
    script = textwrap.dedent(
        f"""
        import os
        import spatialdata as sd
        from histoseq._sdata import store_element

        sdata = sd.read_zarr({str(store)!r})
        write = sd.SpatialData.write

        def dying(self, path, *args, **kwargs):
            if {when!r} == "during":
                os.makedirs(os.path.join(path, "tables", "table"), exist_ok=True)  # a half-made element
                os._exit(9)
            write(self, path, *args, **kwargs)
            os._exit(9)

        sd.SpatialData.write = dying
        table = sdata.tables["table"]
        store_element(sdata, "tables", "table", table[:2].copy())
        """
    )
    before = _fingerprint(store)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert _fingerprint(store) == before
    back = sd.read_zarr(store)
    assert back.tables["table"].n_obs == 9


def test_a_grid_never_replaces_measured_spots_and_replaces_a_grid_only_when_asked():
    sdata = hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False)
    spots = sdata.shapes["section0_spots"]
    with pytest.raises(ValueError, match="never replaces"):
        hs.pp.make_grid(sdata, image_key="section0_image", spacing_um=50, key_added="section0_spots")
    assert sdata.shapes["section0_spots"] is spots
    with pytest.raises(ValueError, match="exists already"):
        hs.pp.make_grid(sdata, image_key="section0_image", spacing_um=50, key_added="table")
    hs.pp.make_grid(sdata, image_key="section0_image", spacing_um=50)
    n = len(sdata.shapes["section0_image_grid"])
    with pytest.raises(ValueError, match="overwrite=True"):
        hs.pp.make_grid(sdata, image_key="section0_image", spacing_um=25)
    hs.pp.make_grid(sdata, image_key="section0_image", spacing_um=25, overwrite=True)
    assert len(sdata.shapes["section0_image_grid"]) > n

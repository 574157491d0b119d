"""Readers for the real example datasets, from a local copy (nothing is downloaded)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

HER2ST_SECTIONS = ("C2", "C3", "C4", "C5", "C6")
MOB_SECTIONS = ("MOB1", "MOB2", "MOB3", "MOB4")
#: Mouse of each olfactory bulb section (``metaData.csv`` of STUtility).
MOB_MOUSE = {"MOB1": "mouse1", "MOB2": "mouse1", "MOB3": "mouse2", "MOB4": "mouse2"}
#: Pixel size of the STUtility olfactory bulb JPEGs: the ST 2k array grid spans its ~6.4 × 6.8 mm capture
#: area (see the dataset's SOURCE.md); their spot pitch differs from the 200 µm of the 1k array.
MOB_PIXEL_SIZE_UM = 4.5


def _root(path: str | Path | None, name: str) -> Path:
    if path is None:
        env = os.environ.get("HISTOSEQ_DATA_DIR")
        if env is None:
            raise FileNotFoundError(
                f"Where is the {name} data? Pass `path=` to its folder, or set the environment variable "
                f"HISTOSEQ_DATA_DIR to a folder that holds `{name}/`. histoseq never downloads data."
            )
        path = Path(env) / name
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{name} folder not found: {str(path)!r}.")
    return path


def _check_sections(sections: Sequence[str], known: Sequence[str]) -> list[str]:
    sections = list(sections)
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise ValueError(f"Unknown section(s) {unknown}; choose among {list(known)}.")
    return sections


def her2st(
    path: str | Path | None = None, *, sections: Sequence[str] = HER2ST_SECTIONS, progress: bool = True
) -> SpatialData:
    """The five serial HER2+ breast cancer sections of patient C (Andersson et al. 2021), legacy ST.

    Reads a local copy laid out as the study's repository (``ST-cnts/``, ``ST-spotfiles/``, ``ST-imgs/``).
    The pixel size (≈0.735 µm) is derived from the 200 µm spot pitch.

    Parameters
    ----------
    path
        The ``her2st`` folder; by default ``$HISTOSEQ_DATA_DIR/her2st``.
    sections
        Sections to read.
    progress
        Show a progress bar.

    Returns
    -------
    One SpatialData with ``{section}_image`` and ``{section}_spots`` per section and one ``table``
    (``obs["sample_id"]``, ``obs["donor_id"] == "C"``).

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.her2st("../shared/data/her2st", sections=["C2"])  # doctest: +SKIP

    """
    from ..io import concatenate, read_legacy_st

    root = _root(path, "her2st")
    parts = []
    for s in tqdm(_check_sections(sections, HER2ST_SECTIONS), desc="her2st", disable=not progress):
        images = sorted((root / "ST-imgs" / s[0]).glob(f"{s}/*.jpg"))
        if not images:
            raise FileNotFoundError(f"No image for section {s} under {str(root / 'ST-imgs' / s[0] / s)!r}.")
        parts.append(
            read_legacy_st(
                root / "ST-cnts" / f"{s}.tsv.gz",
                root / "ST-spotfiles" / f"{s}_selection.tsv",
                images[0],
                sample_id=s,
                donor_id=s[0],
            )
        )
    return concatenate(parts)


def mouse_olfactory_bulb(
    path: str | Path | None = None, *, sections: Sequence[str] = MOB_SECTIONS, progress: bool = True
) -> SpatialData:
    """Four mouse olfactory bulb sections from two mice (STUtility example data), ST 2k array, 1,000 genes.

    Ensembl ids are mapped to symbols with ``mouse_genes.tsv.gz`` (ids stay in ``var["gene_ids"]``); only spots
    under the tissue (``selected == 1``) are kept. The JPEGs are about 4.5 µm/px (see
    :data:`MOB_PIXEL_SIZE_UM`).

    Parameters
    ----------
    path
        The ``stutility_mob`` folder; by default ``$HISTOSEQ_DATA_DIR/stutility_mob``.
    sections
        Sections to read.
    progress
        Show a progress bar.

    Returns
    -------
    One SpatialData with ``{section}_image`` and ``{section}_spots`` per section and one ``table`` with
    ``obs["donor_id"]`` (``mouse1``: MOB1, MOB2; ``mouse2``: MOB3, MOB4).

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.mouse_olfactory_bulb("../shared/data/stutility_mob")  # doctest: +SKIP

    """
    from ..io import concatenate, read_legacy_st

    root = _root(path, "stutility_mob")
    parts = []
    for s in tqdm(_check_sections(sections, MOB_SECTIONS), desc="olfactory bulb", disable=not progress):
        parts.append(
            read_legacy_st(
                root / f"{s}.tsv",
                root / f"alignment_table_{s}.tsv",
                root / f"{s}.jpg",
                sample_id=s,
                donor_id=MOB_MOUSE[s],
                pixel_size_um=MOB_PIXEL_SIZE_UM,
                gene_names=root / "mouse_genes.tsv.gz",
            )
        )
    return concatenate(parts)

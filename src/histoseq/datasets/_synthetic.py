"""A synthetic H&E + spot-expression dataset whose morphology→expression link is known exactly.

The generator has two layers:

- an **array layer** that draws tissue in stain space (:func:`_render`): smooth random fields split the
  tissue into cell-type regions, nuclei are placed by a thinned Poisson process and stamped as filled
  ellipses into a haematoxylin optical-density map, stroma fibres go into an eosin map, clefts and
  lumina (glands, vessels) are left unstained, and Beer–Lambert turns both maps into RGB. Every pixel
  also gets a class label (glass, eosin, nucleus, lumen, unstained cleft) and every nucleus a record
  (centre, area, type), so spot features are counted, not estimated;
- a **SpatialData layer** (:func:`synthetic`) that lays a Visium-like hexagonal spot grid over each
  section, measures the ``true_`` features of every spot from those labels and records, and draws
  counts from them.

The large mode renders a small bank of tissue tiles and assembles an arbitrarily large image lazily
from them (each dask block picks its tiles and their rotation/flip from a hash of its position), so the
full image never exists in memory.

The array layer lives in :mod:`._tissue`, the spots, their features and the counts in :mod:`._spots`;
this module builds the sections from them and assembles the SpatialData.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._shifts import _blur_lazy, _blur_rgb, _record_shifts, _section_shifts, _Shift
from ._spots import (
    _MORPHOLOGY_FACTORS,
    _TRUTH_CATEGORIES,
    _counts,
    _Drivers,
    _finish_section,
    _make_genes,
    _Section,
    _SpotFeatures,
    _spots_and_fields,
)
from ._tissue import CELL_TYPES, _lazy_image, _render, _TileBank, _tissue_grid
from ._truth import _section_truth, _truth_elements

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Building one section
# --------------------------------------------------------------------------------------------------


def _build_section_small(
    ss, i, n_donors, size_px, p, spot_diameter_um, spot_pitch_um, genes, shift, ground_truth_um=None
) -> _Section:
    ss_img, ss_spatial, ss_counts = ss.spawn(3)
    rng_img = np.random.default_rng(ss_img)
    size_um = size_px * p
    tissue = _tissue_grid(rng_img, size_um, size_um)
    stain_scale, options = _stain_and_options(rng_img, shift)
    rendered = _render(rng_img, size_px, size_px, p, tissue, stain_scale, **options)
    xy_px, fields = _spots_and_fields(
        np.random.default_rng(ss_spatial), size_um, size_um, p, spot_diameter_um, spot_pitch_um, genes.n_fields
    )
    acc = _SpotFeatures(xy_px, spot_diameter_um / 2 / p)
    acc.add_labels(0, 0, rendered.labels)
    acc.add_nuclei(rendered.nuclei)
    rgb = rendered.rgb
    if shift is not None and shift.blur_um > 0:
        rgb = _blur_rgb(rgb, shift.blur_um / p)
    section = _finish_section(i, n_donors, rgb, xy_px, acc, fields, p, ss_counts)
    if ground_truth_um is not None:
        section.truth = _section_truth(rendered, fields, p, spot_diameter_um, ground_truth_um)
    return _apply_shift(section, shift, rendered.tumour_area_fraction)


def _stain_and_options(rng_img: np.random.Generator, shift: _Shift | None) -> tuple[tuple[float, float], dict]:
    """The section's stain strengths (drawn, then shifted) and the rendering options of its shift."""
    stain_scale = tuple(rng_img.uniform(0.88, 1.12, 2))
    if shift is None:
        return stain_scale, {}
    strength, options = shift.render_options()
    return (stain_scale[0] * strength[0], stain_scale[1] * strength[1]), options


def _apply_shift(section: _Section, shift: _Shift | None, tumour_area_fraction: float) -> _Section:
    section.tumour_area_fraction = tumour_area_fraction
    if shift is not None:
        section.library_size = shift.library_size
    return section


def _build_section_large(ss, i, n_donors, size_px, p, spot_diameter_um, spot_pitch_um, genes, shift, chunk) -> _Section:
    ss_img, ss_spatial, ss_counts = ss.spawn(3)
    rng_img = np.random.default_rng(ss_img)
    size_um = size_px * p
    tissue = _tissue_grid(rng_img, size_um, size_um)
    stain_scale, options = _stain_and_options(rng_img, shift)
    bank = _TileBank(ss_img.spawn(1)[0], size_px, size_px, p, tissue, stain_scale, **options)
    xy_px, fields = _spots_and_fields(
        np.random.default_rng(ss_spatial), size_um, size_um, p, spot_diameter_um, spot_pitch_um, genes.n_fields
    )
    acc = _SpotFeatures(xy_px, spot_diameter_um / 2 / p)
    T = bank.tile
    for ty in range(math.ceil(size_px / T)):
        for tx in range(math.ceil(size_px / T)):
            y0, y1, x0, x1 = ty * T, min((ty + 1) * T, size_px), tx * T, min((tx + 1) * T, size_px)
            if acc.spots_touching(y0, y1, x0, x1).size == 0 or bank.tissue_state(y0, y1, x0, x1) == 0:
                continue
            acc.add_labels(y0, x0, bank.labels(y0, y1, x0, x1))
            acc.add_nuclei(bank.nuclei(ty, tx))
    token = f"{bank.key:x}-{size_px}-{p}-{chunk}"
    if shift is not None:  # the same seed draws other pixels under other options
        token += "-" + hashlib.sha256(repr(shift).encode()).hexdigest()[:12]
    image = _lazy_image(bank, chunk, name=f"histoseq-synthetic-section{i}-{token}")
    if shift is not None and shift.blur_um > 0:
        image = _blur_lazy(image, shift.blur_um / p)
    section = _finish_section(i, n_donors, image, xy_px, acc, fields, p, ss_counts)
    return _apply_shift(section, shift, bank.tumour_area_fraction())


# --------------------------------------------------------------------------------------------------
# Large mode: progress of the zarr write
# --------------------------------------------------------------------------------------------------


def _tqdm_dask_callback(progress: bool, desc: str):
    """A dask callback that reports finished tasks on a tqdm bar (a no-op context when ``progress`` is off)."""
    import contextlib

    if not progress:
        return contextlib.nullcontext()
    from dask.callbacks import Callback
    from tqdm.auto import tqdm

    class _Bar(Callback):
        def __enter__(self):
            self.bar = tqdm(total=0, desc=desc, unit="task")
            return super().__enter__()

        def __exit__(self, *args):
            self.bar.close()
            return super().__exit__(*args)

        def _start_state(self, dsk, state):
            self.bar.total += sum(len(state[k]) for k in ("ready", "waiting", "running")) + len(state["finished"])
            self.bar.refresh()

        def _posttask(self, key, result, dsk, state, worker_id):
            self.bar.update(1)

    return _Bar()


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------


def synthetic(
    *,
    n_sections: int = 3,
    n_donors: int = 2,
    section_size_um: float = 1200.0,
    pixel_size_um: float = 0.5,
    spot_diameter_um: float = 55.0,
    spot_pitch_um: float = 100.0,
    n_genes: int = 60,
    random_state: int | None = 0,
    image_chunks: int = 1024,
    scale_factors: Sequence[int] = (2, 2),
    path: str | Path | None = None,
    progress: bool = True,
    stain_strength: float | Sequence[float | None] | None = None,
    stain_hue: float | Sequence[float | None] | None = None,
    tumour_fraction: float | Sequence[float | None] | None = None,
    library_size: float | Sequence[float | None] | None = None,
    blur_um: float | Sequence[float | None] | None = None,
    ground_truth: bool = False,
    ground_truth_um: float = 10.0,
) -> SpatialData:
    """Synthetic H&E sections with spot expression whose dependence on morphology is known.

    Each section is a square of glass with an irregular piece of tissue on it. Smooth random fields
    split the tissue into three cell-type regions a few spots across: *tumour* (dense, large, round,
    pale-purple nuclei and purple cytoplasm around gland lumina lined by columnar nuclei), *stroma*
    (sparse elongated nuclei along wavy pink fibres, with unstained clefts and small vessels lined by
    flat nuclei) and *immune* infiltrates (very dense, small, round, dark nuclei). Further fields
    modulate the nuclear density and size inside each region. Tissue is drawn as haematoxylin and eosin
    optical densities and turned into RGB by Beer–Lambert, with a slightly different stain strength per
    section.

    A hexagonal (Visium-like) grid of spots covers each section; the spots with at least half of
    their disk on tissue are kept. Their ``true_`` features are counted from the drawn pixels and
    nuclei. Counts are negative binomial (dispersion 0.07) with means
    ``size_factor * base_rate * 2 * sigmoid(2 * effect * z) * exp(donor_shift)``: ``size_factor`` is
    a log-normal library size independent of the image, ``donor_shift`` a small per-donor gene offset
    (sd 0.1) and ``z`` the driving factor, standardised over all spots and clipped to ±3. ``effect``
    is the log fold change per standard deviation of ``z`` at ``z = 0``. Driven genes come in pairs
    with one base rate and opposite effects, so the expected library size does not depend on the
    tissue and normalising by total counts leaves the noise genes independent of morphology.

    - morphology genes (about half; ``var['learnable']`` is ``True``): ``z`` is one ``true_`` feature
      (prefixes ``DENS``: nuclei count, ``NSIZE``: mean nuclear area, ``EOS``: eosin fraction, ``TUM``,
      ``STRO``, ``IMM``: cell-type fractions, ``LUMEN``: the square root of the lumen fraction, which
      is zero in many spots); odd-numbered genes rise with their feature, even-numbered ones fall;
    - spatial genes (about a sixth, ``SPAT``, in pairs sharing one field): ``z`` is a smooth random
      field (length scale ~250 µm) drawn independently of the image, so it is not learnable from
      morphology (though it is from the spot position);
    - noise genes (about a third, ``NOISE``): ``z = 0``.

    The spot features are exact: nuclei are counted by their centre, fractions over the pixels whose
    centre lies in the disk.

    Parameters
    ----------
    n_sections
        Number of sections (tissue pieces, each with its own image and spots).
    n_donors
        Number of donors; sections are assigned to them round-robin (``section{i}`` → ``donor{i % n_donors}``).
    section_size_um
        Side of the square section (image) in µm.
    pixel_size_um
        Size of a level-0 pixel in µm (0.5 µm is a 20× scan).
    spot_diameter_um
        Diameter of the spots in µm.
    spot_pitch_um
        Centre-to-centre distance of neighbouring spots on the hexagonal grid, in µm. Must not be
        smaller than ``spot_diameter_um``.
    n_genes
        Number of genes.
    random_state
        Seed; the same seed gives identical images and counts. Section ``i`` draws from the ``i``-th
        child of ``numpy.random.SeedSequence(random_state)``, so its image does not depend on
        ``n_sections``.
    image_chunks
        Chunk size (y and x) of the image arrays.
    scale_factors
        Downsampling factors of the image pyramid, each relative to the previous level.
    path
        Large mode: when given, each image is a lazy dask array assembled from a bank of 8 pre-rendered
        1024 × 1024 px tissue tiles (each used in 8 rotations / reflections chosen by a hash of the
        tile position; tissue seams every 1024 px), the object is written to this zarr store and read
        back, so the images are zarr-backed and never held in memory whole. The ``true_`` features are
        still exact for the assembled image (they are counted from the tiles' labels and nuclei as
        placed), with one difference from the default mode: nuclei and lumina end at the tile seams
        and at the tissue border instead of being drawn whole. The tissue outline is one smooth shape
        over the whole section. ``synthetic(n_sections=1, section_size_um=20000, spot_pitch_um=250,
        path=...)`` writes a 40,000 × 40,000 px image with about 3,700 spots in a minute or two, in
        about 0.5 GB of memory.
    progress
        Show progress bars (sections, and the zarr write in large mode).
    stain_strength
        Slide-level shifts, for testing how robust a model is to differences between slides. Each of
        these five options takes ``None`` (no change: the default, giving exactly the data drawn
        without it), one number for every section, or a sequence of one number per section, in which a
        ``None`` leaves that section unchanged. The tissue drawn for a section depends only on its seed
        and its ``tumour_fraction``, so for the same ``random_state`` the other four options shift the
        scan or the counts of otherwise identical sections.

        ``stain_strength`` multiplies the haematoxylin and eosin optical densities of the section (on
        top of the per-section variation; ``1.0``: no change). ``0.6`` gives a pale, ``1.5`` a dark
        slide. The ``true_`` features and counts do not change.
    stain_hue
        Angle in degrees (-90 to 90) by which the haematoxylin and eosin optical-density vectors of the
        section are turned about the grey axis ``(1, 1, 1)``, a different stain batch or scanner colour
        profile (``0``: no change). This shifts the hue of both stains by about as many degrees:
        positive angles turn eosin from pink towards red and haematoxylin from blue-purple towards
        violet, negative ones eosin towards magenta and haematoxylin towards blue; 15–20° is a clearly
        visible shift. Components that would turn negative (eosin's red one beyond about +27°) are
        clipped to a small positive floor and the vectors renormalised. The ``true_`` features and
        counts do not change.
    tumour_fraction
        Target share (0–1) of the section's tissue area in tumour regions, a shift in composition.
        The tumour score is shifted against the larger of the stroma and immune scores by the quantile
        of their difference over the tissue pixels, so the realised share matches the target to within
        a pixel (in large mode, each tile is shifted to the target; the section's share is recorded in
        ``uns``); stroma and immune split the rest as they would otherwise. The section's nuclei,
        lumina, ``true_`` features and counts follow the tissue drawn: the expression model is absolute
        (the driving factors are standardised over all spots of the dataset), so a tumour-rich section
        also has more tumour-driven expression. The section's other random draws change with its
        composition.
    library_size
        Multiplier of the expected counts of the section (``0.1``: ten times fewer molecules; ``1.0``:
        no change). The ``true_`` features do not change.
    blur_um
        Standard deviation in µm of a Gaussian blur of the section's RGB image (scanner focus; ``0``: no
        blur). The ``true_`` features and counts describe the tissue, not the scan, and do not change.
    ground_truth
        Add ground-truth maps of every section: the cell-type regions the tissue was drawn from (labels)
        and the expected expression of every gene on a coarse raster (an image; see Returns). Only in
        the default mode: with ``path`` this raises a :class:`ValueError`. The images, counts and
        ``obs`` are the same with and without it.
    ground_truth_um
        Pixel size in µm of the expected-expression raster (with ``ground_truth``).

    Returns
    -------
    A :class:`spatialdata.SpatialData` with, for each section ``sample_id = f"section{i}"``:

    - image ``f"{sample_id}_image"``: ``(c, y, x)`` uint8 RGB pyramid, with an identity transformation
      to the coordinate system ``sample_id`` and a scale by ``pixel_size_um`` to ``f"{sample_id}_um"``;
    - shapes ``f"{sample_id}_spots"``: circles of radius ``spot_diameter_um / 2`` in level-0 pixels,
      indexed ``0..n-1``, with the same two transformations;

    and one table ``"table"`` annotating all spot elements (``region_key="region"``,
    ``instance_key="spot_id"``), with

    - ``X``: raw counts (``scipy.sparse.csr_matrix``, float32), ``obs_names`` ``f"{sample_id}_{j}"``;
    - ``obs``: ``region``, ``spot_id``, ``sample_id``, ``donor_id`` and the ground truth
      ``true_nuclei_count`` (nuclei whose centre is in the disk), ``true_nuclear_area_um2`` (their mean
      area; 0 when there is none), ``true_eosin_fraction`` and ``true_lumen_fraction`` (fractions of the
      disk's pixels that are eosin-stained stroma / cytoplasm, or lumen of a gland or vessel) and ``true_frac_tumour``,
      ``true_frac_stroma``, ``true_frac_immune`` (fractions of the spot's nuclei of each type; 0 when it
      has none);
    - ``obsm['spatial']``: spot centres ``(x, y)`` in level-0 pixels;
    - ``var``: ``truth`` (the driving factor: one of ``'nuclei_count'``, ``'nuclear_area'``, ``'eosin'``,
      ``'celltype_tumour'``, ``'celltype_stroma'``, ``'celltype_immune'``, ``'lumen'``, ``'spatial'``,
      ``'noise'``), ``learnable`` (driven by morphology visible in the image), ``feature`` (the driving
      ``obs`` column, ``''`` if none), ``effect`` (log fold change per standard deviation of the
      driver) and ``base_rate``;
    - ``uns['synthetic']``: ``params`` (the arguments, and ``large_mode``) and ``cell_types``. When
      any slide-level shift is given, ``params`` also holds, for each of ``stain_strength``,
      ``stain_hue``, ``tumour_fraction``, ``library_size`` and ``blur_um``, a list with the value
      applied to each section in ``sample_id`` order (``1.0``, ``0.0``, ``nan``, ``1.0``, ``0.0`` where
      not shifted), and ``tumour_area_fraction``: the realised share of each section's tissue area in
      tumour regions (in large mode the mean over the tiles placed on tissue). Without shifts these
      keys are absent.

    With ``ground_truth=True``, also for each section:

    - labels ``f"{sample_id}_cell_types"``: ``(y, x)`` uint8 at the image's level-0 resolution, with its
      pyramid and transformations: the cell-type region of every pixel, ``0`` glass (no tissue), ``1``
      tumour, ``2`` stroma, ``3`` immune (1 + the index into ``uns['synthetic']['cell_types']``). The
      nuclei of a region are mostly of its type; the cells lining glands and vessels may cross a border;
    - image ``f"{sample_id}_expected"``: ``(c, y, x)`` float32 with ``c`` the gene names, on a raster of
      ``ground_truth_um`` µm pixels: the expected count of every gene in a spot of ``spot_diameter_um``
      centred at the raster pixel's centre: the negative-binomial mean with size factor 1 (the mean
      size factor is ``exp(0.045)``), the donor shift and the library size, its ``true_`` features
      counted exactly from the drawn tissue (a disk's pixels beyond the image count as glass) and
      standardised with the mean and standard deviation over the real spots, as the counts are. It is
      defined on glass too (a spot without tissue). Raster pixel ``i`` covers level-0 pixels
      ``[i * s, (i + 1) * s)`` with ``s = ground_truth_um / pixel_size_um``: a scale by ``s`` to the
      coordinate system ``sample_id`` and by ``ground_truth_um`` to ``f"{sample_id}_um"``. Its float
      dtype marks it as a map, never taken for the section's image;

    and ``uns['synthetic']['ground_truth']``: ``cell_types`` and ``expected`` (``sample_id`` → element
    name), ``cell_type_codes`` (``{'glass': 0, 'tumour': 1, 'stroma': 2, 'immune': 3}``),
    ``expected_um`` (``ground_truth_um``) and ``expected_definition`` (a sentence). Without
    ``ground_truth`` none of these exist.

    ``sdata.attrs['histoseq']`` records ``technology='synthetic'`` and the pixel size of every H&E image.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=2, random_state=0, progress=False)
    >>> sorted(sdata.images)
    ['section0_image', 'section1_image']
    >>> table = sdata.tables["table"]
    >>> int(table.var["learnable"].sum()), int((table.var["truth"] == "noise").sum())
    (30, 20)

    """
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from scipy import sparse
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale
    from tqdm.auto import tqdm

    _check_args(
        n_sections, n_donors, section_size_um, pixel_size_um, spot_diameter_um, spot_pitch_um, n_genes, image_chunks
    )
    _check_ground_truth(ground_truth, ground_truth_um, path)
    shifts = _section_shifts(
        {
            "stain_strength": stain_strength,
            "stain_hue": stain_hue,
            "tumour_fraction": tumour_fraction,
            "library_size": library_size,
            "blur_um": blur_um,
        },
        int(n_sections),
    )
    scale_factors = [int(s) for s in scale_factors]
    params = {
        "n_sections": int(n_sections),
        "n_donors": int(n_donors),
        "section_size_um": float(section_size_um),
        "pixel_size_um": float(pixel_size_um),
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": float(spot_pitch_um),
        "n_genes": int(n_genes),
        "random_state": random_state,
        "image_chunks": int(image_chunks),
        "scale_factors": scale_factors,
        "path": None if path is None else str(path),
        "large_mode": path is not None,
    }
    if path is not None and Path(path).exists():
        raise FileExistsError(f"{str(path)!r} exists; remove it or choose another `path` for the synthetic store.")

    size_px = round(section_size_um / pixel_size_um)
    root = np.random.SeedSequence(random_state)
    (gene_ss,) = root.spawn(1)
    section_ss = root.spawn(n_sections)
    genes = _make_genes(np.random.default_rng(gene_ss), n_genes, n_donors)
    logger.info(
        "Drawing %d synthetic section(s) of %d × %d px%s.", n_sections, size_px, size_px, " (lazy)" if path else ""
    )
    sections = []
    for i in tqdm(range(n_sections), desc="synthetic sections", disable=not progress):
        shift = None if shifts is None else shifts[i]
        args = (section_ss[i], i, n_donors, size_px, pixel_size_um, spot_diameter_um, spot_pitch_um, genes, shift)
        if path is None:
            sections.append(_build_section_small(*args, ground_truth_um=ground_truth_um if ground_truth else None))
        else:
            sections.append(_build_section_large(*args, image_chunks))
    drivers = _Drivers.fit(sections)
    counts = _counts(sections, genes, drivers)
    if shifts is not None:
        _record_shifts(params, shifts, sections)

    images, shapes, obs_parts = {}, {}, []
    for s in sections:
        transformations = {
            s.sample_id: Identity(),
            f"{s.sample_id}_um": Scale([pixel_size_um, pixel_size_um], axes=("y", "x")),
        }
        images[f"{s.sample_id}_image"] = Image2DModel.parse(
            s.image,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=scale_factors or None,
            chunks=(3, image_chunks, image_chunks),
            transformations=transformations,
        )
        n = len(s.xy_px)
        shapes[f"{s.sample_id}_spots"] = ShapesModel.parse(
            s.xy_px.astype(float),
            geometry=0,
            radius=np.full(n, spot_diameter_um / 2 / pixel_size_um),
            index=pd.Index(np.arange(n)),
            transformations={
                s.sample_id: Identity(),
                f"{s.sample_id}_um": Scale([pixel_size_um, pixel_size_um], axes=("x", "y")),
            },
        )
        obs = pd.DataFrame(
            {
                "region": f"{s.sample_id}_spots",
                "spot_id": np.arange(n, dtype=np.int64),
                "sample_id": s.sample_id,
                "donor_id": s.donor_id,
                **s.features,
            },
            index=[f"{s.sample_id}_{j}" for j in range(n)],
        )
        obs_parts.append(obs)
    regions = list(shapes)
    obs = pd.concat(obs_parts)
    obs["region"] = pd.Categorical(obs["region"], categories=regions)
    obs["sample_id"] = pd.Categorical(obs["sample_id"], categories=[s.sample_id for s in sections])
    obs["donor_id"] = pd.Categorical(obs["donor_id"], categories=[f"donor{d}" for d in range(n_donors)])
    var = pd.DataFrame(
        {
            "truth": pd.Categorical(genes.truth, categories=_TRUTH_CATEGORIES),
            "learnable": np.array([t in _MORPHOLOGY_FACTORS for t in genes.truth]),
            "feature": [_MORPHOLOGY_FACTORS[t][0] if t in _MORPHOLOGY_FACTORS else "" for t in genes.truth],
            "effect": genes.effect,
            "base_rate": genes.base_rate,
        },
        index=pd.Index(genes.names),
    )
    uns = {"synthetic": {"params": params, "cell_types": list(CELL_TYPES)}}
    labels, truth_images = {}, {}
    if ground_truth:
        labels, truth_images, uns["synthetic"]["ground_truth"] = _truth_elements(
            sections, genes, drivers, float(ground_truth_um), scale_factors, int(image_chunks)
        )
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=obs,
        var=var,
        obsm={"spatial": np.concatenate([s.xy_px for s in sections]).astype(float)},
        uns=uns,
    )
    table = TableModel.parse(adata, region=regions, region_key="region", instance_key="spot_id")
    sdata = sd.SpatialData(images=images | truth_images, labels=labels, shapes=shapes, tables={"table": table})
    sdata.attrs["histoseq"] = {
        "technology": "synthetic",
        "pixel_size_um": {name: {"value": float(pixel_size_um), "method": "synthetic"} for name in images},
    }
    logger.info(
        "Synthetic data: %d image(s), %d spots, %d genes (%d learnable from morphology).",
        len(images),
        adata.n_obs,
        adata.n_vars,
        int(adata.var["learnable"].sum()),
    )
    if path is None:
        return sdata
    logger.info("Writing the synthetic SpatialData to %s.", path)
    with _tqdm_dask_callback(progress, "writing synthetic zarr"), warnings.catch_warnings():
        # zarr announces a future default once per array; nothing a user of this function can act on
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        sdata.write(path)
    return sd.read_zarr(path)


def _check_args(
    n_sections, n_donors, section_size_um, pixel_size_um, spot_diameter_um, spot_pitch_um, n_genes, image_chunks
) -> None:
    for name, value in {"n_sections": n_sections, "n_donors": n_donors, "n_genes": n_genes}.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"`{name}` must be a whole number, got {value!r} ({type(value).__name__}).")
    if int(n_sections) < 1 or int(n_donors) < 1 or int(n_genes) < 1:
        raise ValueError("`n_sections`, `n_donors` and `n_genes` must be at least 1.")
    for name, value in {
        "section_size_um": section_size_um,
        "pixel_size_um": pixel_size_um,
        "spot_diameter_um": spot_diameter_um,
        "spot_pitch_um": spot_pitch_um,
    }.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise TypeError(f"`{name}` must be a number (µm), got {value!r} ({type(value).__name__}).")
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    if spot_pitch_um < spot_diameter_um:
        raise ValueError(
            f"`spot_pitch_um` ({spot_pitch_um}) is smaller than `spot_diameter_um` ({spot_diameter_um}): spots "
            "would overlap."
        )
    if section_size_um < spot_diameter_um + spot_pitch_um:
        raise ValueError(
            f"`section_size_um` ({section_size_um}) is too small for spots of {spot_diameter_um} µm at a "
            f"{spot_pitch_um} µm pitch."
        )
    if int(image_chunks) < 16:
        raise ValueError(f"`image_chunks` must be at least 16, got {image_chunks!r}.")


def _check_ground_truth(ground_truth: bool, ground_truth_um: float, path: str | Path | None) -> None:
    if not isinstance(ground_truth_um, (int, float, np.number)) or not np.isfinite(ground_truth_um):
        raise ValueError(f"`ground_truth_um` must be a positive number, got {ground_truth_um!r}.")
    if ground_truth_um <= 0:
        raise ValueError(f"`ground_truth_um` must be a positive number, got {ground_truth_um!r}.")
    if ground_truth and path is not None:
        raise ValueError(
            "Ground truth maps are drawn only without `path`: the large mode assembles its images lazily from "
            "tiles and keeps no full-resolution maps. Drop `path` or `ground_truth=True`."
        )

"""A catalogue of bad inputs across the public API: each one fails with an error that names the fix (or, where the
input is legitimate but suspicious, warns), and leaves the user's SpatialData or AnnData as it was.

Every row of :data:`CASES` names the object it is given (the shared tiny synthetic SpatialData, a copy made bad on
purpose, its table, a zarr-backed copy whose store files are hashed too, or none), the call, the error or warning
class, and a regular expression the message must match: the fix it names. Rows are cheap: embeddings are random
``obsm`` arrays, the one model is a ridge model of 3 genes, and patches are 32 px.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import pathlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from PIL import Image
from scipy import sparse

import histoseq as hs

# --- the data, built once ---------------------------------------------------------------------------------------------


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


@pytest.fixture(scope="module")
def base():
    sdata = hs.datasets.synthetic(n_sections=2, section_size_um=500, progress=False)
    table = sdata.tables["table"]
    table.obsm["X_demo"] = np.random.default_rng(0).normal(size=(table.n_obs, 6))
    return sdata


@pytest.fixture(scope="module")
def ctx(base, tmp_path_factory):
    """The model, model files (good and bad), a zarr-backed copy of ``base`` and a tiny legacy ST section."""
    import torch

    tmp = tmp_path_factory.mktemp("bad_input")
    model = hs.tl.fit(base, genes=3, method="ridge", embedding="X_demo", progress=False)
    good = model.save(tmp / "model.pt")
    files = {"model": good}
    rng = np.random.default_rng(0)
    (tmp / "random.pt").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["random"] = tmp / "random.pt"
    torch.save({"meta": "{}", "tensors": {}, "path": pathlib.PurePosixPath("x")}, tmp / "pickled.pt")
    files["pickled"] = tmp / "pickled.pt"

    def edited(name: str, edit: Callable[[dict, dict], None]) -> pathlib.Path:
        obj = torch.load(good, weights_only=True)
        meta = json.loads(obj["meta"])
        edit(meta, obj["tensors"])
        obj["meta"] = json.dumps(meta)
        torch.save(obj, tmp / f"{name}.pt")
        return tmp / f"{name}.pt"

    files["meta_type"] = edited("meta_type", lambda m, t: m.update(n_features="six"))
    files["meta_config"] = edited("meta_config", lambda m, t: m["config"].update(section_norm="sometimes"))
    files["meta_method"] = edited("meta_method", lambda m, t: m.update(method="my_method"))
    files["meta_genes"] = edited("meta_genes", lambda m, t: m.update(genes=m["genes"][:1]))
    files["tensor_shape"] = edited("tensor_shape", lambda m, t: t.update(coef=torch.zeros(2, 2, dtype=torch.float64)))

    store = tmp / "s.zarr"
    _quiet(lambda: copy.deepcopy(base).write(store))
    backed = _quiet(lambda: sd.read_zarr(store))

    # a 3×3 legacy ST section (1 µm/px, 50 µm pitch)
    xs, ys = np.meshgrid([1, 2, 3], [1, 2, 3])
    ids = [f"{x}x{y}" for x, y in zip(xs.ravel(), ys.ravel())]
    spots = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "pixel_x": xs.ravel() * 50.0, "pixel_y": ys.ravel() * 50.0})
    counts = pd.DataFrame(rng.poisson(3, (9, 4)), index=ids, columns=["G1", "G2", "G3", "G4"])
    spots.to_csv(tmp / "spots.tsv", sep="\t", index=False)
    with gzip.open(tmp / "counts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    Image.fromarray(rng.integers(100, 255, (200, 200, 3), dtype=np.uint8)).save(tmp / "he.png")
    nan_spots = spots.copy()
    nan_spots.loc[4, "pixel_x"] = np.nan
    nan_spots.to_csv(tmp / "nan_spots.tsv", sep="\t", index=False)
    return {"model": model, "files": files, "store": store, "backed": backed, "tmp": tmp}


# --- what "unchanged" means -------------------------------------------------------------------------------------------


def _table_fingerprint(t: ad.AnnData) -> dict[str, Any]:
    X = t.X
    data = (X.toarray() if sparse.issparse(X) else np.asarray(X)).tobytes() if X is not None else b""
    return {
        "shape": t.shape,
        "obs_names": list(t.obs_names),
        "var_names": list(t.var_names),
        "obs": list(t.obs.columns),
        "obsm": sorted(t.obsm),
        "layers": sorted(t.layers),
        "uns": sorted(t.uns),
        "X": hashlib.sha1(data).hexdigest(),
    }


def fingerprint(obj: Any) -> dict[str, Any]:
    """Element names per kind, and per table its shape, names, obsm/layers/uns keys and a hash of ``X``."""
    if obj is None:
        return {}
    if isinstance(obj, ad.AnnData):
        return _table_fingerprint(obj)
    out: dict[str, Any] = {kind: sorted(getattr(obj, kind)) for kind in ("images", "labels", "points", "shapes")}
    out["tables"] = {k: _table_fingerprint(t) for k, t in obj.tables.items()}
    out["n_shapes"] = {k: len(s) for k, s in obj.shapes.items()}
    return out


def store_hashes(path: pathlib.Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha1(f.read_bytes()).hexdigest() for f in path.rglob("*") if f.is_file()}


# --- inputs made bad on purpose (on a copy) ---------------------------------------------------------------------------


def dup_obs(s, c=None):
    t = s.tables["table"]
    names = list(t.obs_names)
    names[5] = names[3]
    _quiet(lambda: setattr(t, "obs_names", names))


def dup_var(s, c=None):
    t = s.tables["table"]
    names = list(t.var_names)
    names[1] = names[0]
    _quiet(lambda: setattr(t, "var_names", names))


def normalised(s, c=None):
    t = s.tables["table"]
    X = t.X.toarray().astype(float)
    t.X = sparse.csr_matrix(np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4))


def negative(s, c=None):
    t = s.tables["table"]
    t.X = t.X * -1


def move_spot(s, xy):
    import shapely

    shapes = s.shapes["section0_spots"]
    geoms = shapes.geometry.tolist()
    geoms[0] = shapely.Point(*xy)
    shapes.geometry = geoms


def float_image(s, c=None):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    im = s.images["section0_image"]["scale0"].ds["image"]
    s.images["section0_image"] = Image2DModel.parse(
        im.data.astype("float32"), dims=("c", "y", "x"), transformations=get_transformation(im, get_all=True)
    )


def empty_obsm(s, c=None):
    s.tables["table"].obsm["X_empty"] = np.zeros((s.tables["table"].n_obs, 0))


def user_obsm(s, c=None):
    s.tables["table"].obsm["mine"] = np.zeros((s.tables["table"].n_obs, 2))


def dup_obs_predicted(s, c):
    dup_obs(s)
    _quiet(lambda: hs.tl.predict(s, c["model"], progress=False))


def sections(s, disjoint: int = 0):
    a = s.subset(["section0_image", "section0_spots"], filter_tables=True)
    b = s.subset(["section1_image", "section1_spots"], filter_tables=True)
    tb = b.tables["table"]
    tb.var_names = [f"X{g}" if i < disjoint else g for i, g in enumerate(tb.var_names)]
    return [a, b]


def glass_slide() -> sd.SpatialData:
    """Glass with one disk of tissue (radius 100 px at 2 µm/px), a spot on it and a spot on the glass far from it."""
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:600, 0:600] + 0.5
    img = np.clip(rng.normal(240, 4, (600, 600, 3)), 0, 255)
    disk = (xx - 150) ** 2 + (yy - 150) ** 2 <= 100**2
    img[disk] = np.clip(rng.normal((190, 110, 170), 12, (int(disk.sum()), 3)), 0, 255)
    t = {"s": Identity(), "s_um": Scale([2.0, 2.0], axes=("y", "x"))}
    image = Image2DModel.parse(np.moveaxis(img.astype(np.uint8), -1, 0), dims=("c", "y", "x"), transformations=t)
    xy = np.array([[150.0, 150.0], [550.0, 550.0]])
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(2, 10.0), index=pd.Index([0, 1]), transformations=t)
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * 2), "spot_id": [0, 1]}, index=["on", "off"])
    table = TableModel.parse(
        ad.AnnData(np.ones((2, 2), np.float32), obs=obs), region="spots", region_key="region", instance_key="spot_id"
    )
    return sd.SpatialData(images={"img": image}, shapes={"spots": shapes}, tables={"table": table})


# --- the catalogue ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: what it is given, the call, the error (or warning) class and the fix its message names.

    ``target``: ``"sdata"`` (the shared object), ``"copy"`` (a copy, made bad by ``prepare(obj, ctx)``), ``"table"``
    (the shared table), ``"zarr"`` (the backed copy; its store files must not change either), ``"none"``, or a
    function that builds a fresh object.
    """

    id: str
    target: Any
    call: Callable[[Any, dict], Any]
    expect: type[BaseException] | type[Warning]
    match: str
    prepare: Callable[..., None] | None = None


P = {"progress": False}
FIT = {"genes": 3, "method": "ridge", "embedding": "X_demo", "progress": False}
T = "table"

CASES = [
    # hs.pp.extract_patches
    Case(
        "patches_of_a_table",
        T,
        lambda o, c: hs.pp.extract_patches(o, patch_px=32, **P),
        TypeError,
        "SpatialData that holds this table",
    ),
    Case(
        "patches_size_0",
        "sdata",
        lambda o, c: hs.pp.extract_patches(o, patch_size_um=0, patch_px=32, **P),
        ValueError,
        "positive size in µm",
    ),
    Case(
        "patches_float_positions",
        "sdata",
        lambda o, c: hs.pp.extract_patches(o, spots=[1.0, 2.0], patch_px=32, **P),
        TypeError,
        r"integer positions",
    ),
    Case(
        "patches_01_mask",
        "sdata",
        lambda o, c: hs.pp.extract_patches(o, spots=np.arange(30) % 2, patch_px=32, **P),
        TypeError,
        r"dtype=bool",
    ),
    Case(
        "patches_nan_centre",
        "copy",
        lambda o, c: hs.pp.extract_patches(o, patch_px=32, **P),
        ValueError,
        r"no position .*outside='drop'",
        lambda s, c: move_spot(s, (np.nan, np.nan)),
    ),
    Case(
        "patches_unknown_image",
        "sdata",
        lambda o, c: hs.pp.extract_patches(o, image_key="nope", patch_px=32, **P),
        KeyError,
        r"Pass one of them as `image_key`",
    ),
    Case(
        "patches_level_9",
        "sdata",
        lambda o, c: hs.pp.extract_patches(o, level=9, patch_px=32, **P),
        ValueError,
        r"has levels 0\.\.2",
    ),
    Case(
        "patches_float_image",
        "copy",
        lambda o, c: hs.pp.extract_patches(o, patch_px=32, **P),
        TypeError,
        r"Rescale it first",
        float_image,
    ),
    Case(
        "patches_unknown_spot",
        "sdata",
        lambda o, c: hs.pp.extract_patches(o, spots=["nope"], patch_px=32, **P),
        KeyError,
        r"not in the table",
    ),
    # hs.pp.make_grid, hs.pp.detect_tissue
    Case(
        "grid_spacing_string",
        "sdata",
        lambda o, c: hs.pp.make_grid(o, spacing_um="100", image_key="section0_image"),
        ValueError,
        r"a number",
    ),
    Case(
        "grid_over_the_spots",
        "sdata",
        lambda o, c: hs.pp.make_grid(o, spacing_um=100, image_key="section0_image", key_added="section0_spots"),
        ValueError,
        r"another `key_added`",
    ),
    Case("grid_which_image", "sdata", lambda o, c: hs.pp.make_grid(o, spacing_um=100), ValueError, r"image_key=\.\.\."),
    Case(
        "grid_fraction_2",
        "sdata",
        lambda o, c: hs.pp.make_grid(o, spacing_um=100, image_key="section0_image", min_tissue_fraction=2),
        ValueError,
        r"\[0, 1\]",
    ),
    Case(
        "zarr_grid_over_the_table",
        "zarr",
        lambda o, c: hs.pp.make_grid(o, spacing_um=100, image_key="section0_image", key_added="table"),
        ValueError,
        r"another `key_added`",
    ),
    Case(
        "tissue_max_pixels_0",
        "sdata",
        lambda o, c: hs.pp.detect_tissue(o, image_key="section0_image", max_pixels=0),
        ValueError,
        r"positive whole number of pixels",
    ),
    Case(
        "zarr_tissue_over_the_spots",
        "zarr",
        lambda o, c: hs.pp.detect_tissue(o, image_key="section0_image", key_added="section0_spots"),
        ValueError,
        r"another `key_added`",
    ),
    Case(
        "tissue_over_user_labels",
        "copy",
        lambda o, c: hs.pp.detect_tissue(o, image_key="section0_image", key_added="mine"),
        ValueError,
        r"pass `overwrite=True` to replace them, or another `key_added`",
        prepare=lambda o, c: o.labels.__setitem__(
            "mine", hs.pp.detect_tissue(o, image_key="section0_image", inplace=False)
        ),
    ),
    # hs.tl.embed
    Case(
        "embed_of_a_missing_path",
        "none",
        lambda o, c: hs.tl.embed("no-such-sections.zarr", patch_px=32, **P),
        FileNotFoundError,
        r"No SpatialData zarr store .* `sdata\.write\(path\)`",
    ),
    Case(
        "embed_over_a_user_embedding",
        "sdata",
        lambda o, c: hs.tl.embed(o, key_added="demo", patch_px=32, **P),
        ValueError,
        r"not written by hs\.tl\.embed; choose another `key_added`",
    ),
    Case(
        "embed_unknown_encoder",
        "sdata",
        lambda o, c: hs.tl.embed(o, encoder="nope", patch_px=32, **P),
        ValueError,
        r"Available: \[",
    ),
    Case(
        "embed_size_negative",
        "sdata",
        lambda o, c: hs.tl.embed(o, patch_size_um=-1, patch_px=32, **P),
        ValueError,
        r"positive size in µm",
    ),
    Case(
        "embed_stain_norm",
        "sdata",
        lambda o, c: hs.tl.embed(o, stain_norm="zz", patch_px=32, **P),
        ValueError,
        r"must be one of \['colour'",
    ),
    Case(
        "embed_position_outside_image",
        "copy",
        lambda o, c: hs.tl.embed(o, encoder="tissue_position", inplace=False, **P),
        UserWarning,
        r"outside their image.*NaN.*`spots=`",
        lambda s, c: move_spot(s, (-5000.0, -5000.0)),
    ),
    Case(
        "embed_position_far_off_tissue",
        glass_slide,
        lambda o, c: hs.tl.embed(o, encoder="tissue_position", inplace=False, **P),
        UserWarning,
        r"far off the tissue.*Leave off-tissue spots out",
    ),
    # hs.tl.fit
    Case(
        "fit_genes_true",
        "sdata",
        lambda o, c: hs.tl.fit(o, **{**FIT, "genes": True}),
        TypeError,
        r"whole number of genes",
    ),
    Case("fit_genes_float", "sdata", lambda o, c: hs.tl.fit(o, **{**FIT, "genes": 5.0}), TypeError, r"`genes=5`"),
    Case(
        "fit_train_01",
        "sdata",
        lambda o, c: hs.tl.fit(o, train=np.arange(30) % 2, **FIT),
        TypeError,
        r"np\.asarray\(train, dtype=bool\)",
    ),
    Case("fit_empty_table", T, lambda o, c: hs.tl.fit(o[:0], **FIT), ValueError, r"no rows .*Check how it was subset"),
    Case("fit_no_genes", T, lambda o, c: hs.tl.fit(o[:, :0], **FIT), ValueError, r"no genes"),
    Case(
        "fit_duplicated_genes", "copy", lambda o, c: hs.tl.fit(o, **FIT), ValueError, r"var_names_make_unique", dup_var
    ),
    Case(
        "fit_duplicated_spots", "copy", lambda o, c: hs.tl.fit(o, **FIT), UserWarning, r"obs_names_make_unique", dup_obs
    ),
    Case(
        "fit_normalised_counts",
        "copy",
        lambda o, c: hs.tl.fit(o, **FIT),
        UserWarning,
        r"layers\['counts'\].*target_transform=None",
        normalised,
    ),
    Case("fit_negative_counts", "copy", lambda o, c: hs.tl.fit(o, **FIT), ValueError, r"raw counts in `X`", negative),
    Case(
        "fit_a_missing_path",
        "none",
        lambda o, c: hs.tl.fit("no-such-data.zarr", **FIT),
        FileNotFoundError,
        r"No SpatialData zarr store .* `sdata\.write\(path\)`",
    ),
    Case(
        "fit_classification_method",
        "sdata",
        lambda o, c: hs.tl.fit(o, **{**FIT, "method": "logistic"}),
        ValueError,
        r"hs\.tl\.fit_classifier",
    ),
    Case("fit_unknown_option", "sdata", lambda o, c: hs.tl.fit(o, alpah=1.0, **FIT), TypeError, r"it takes \['alpha'"),
    Case(
        "fit_embedding_without_columns",
        "copy",
        lambda o, c: hs.tl.fit(o, **{**FIT, "embedding": "X_empty"}),
        ValueError,
        r"at least one feature.*hs\.tl\.embed",
        empty_obsm,
    ),
    Case("fit_unknown_groups", "sdata", lambda o, c: hs.tl.fit(o, groups="nope", **FIT), KeyError, r"groups=None"),
    Case(
        "fit_augment_word",
        "sdata",
        lambda o, c: hs.tl.fit(o, augment="blur", **FIT),
        ValueError,
        r"'auto', True, False",
    ),
    Case(
        "fit_augment_ridge",
        "sdata",
        lambda o, c: hs.tl.fit(o, augment=[1.0], **FIT),
        ValueError,
        r"does not learn from views.*augment=False",
    ),
    Case(
        "fit_augment_table",
        T,
        lambda o, c: hs.tl.fit(o, genes=3, embedding="X_demo", augment=True, progress=False),
        ValueError,
        r"no images.*augment=False",
    ),
    Case(
        "fit_augment_not_morphology",
        "sdata",
        lambda o, c: hs.tl.fit(o, genes=3, embedding="X_demo", augment=True, progress=False),
        ValueError,
        r"morphology encoder.*augment=False",
    ),
    Case(
        "zarr_fit_unknown_gene",
        "zarr",
        lambda o, c: hs.tl.fit(
            o, genes=["NOPE"], method="ridge", embedding="X_morphology", embed_kwargs={"patch_px": 32}, progress=False
        ),
        KeyError,
        r"var_names.*pass a number",
    ),
    Case("select_genes_float", "sdata", lambda o, c: hs.tl.select_genes(o, n=2.5), TypeError, r"whole number of genes"),
    # hs.tl.predict
    Case(
        "predict_duplicated_name",
        "copy",
        lambda o, c: hs.tl.predict(o, c["model"], spots=["section0_3"]),
        ValueError,
        r"obs_names_make_unique\(\).*by position",
        dup_obs,
    ),
    Case(
        "predict_duplicated_spots",
        "copy",
        lambda o, c: hs.tl.predict(o, c["model"], inplace=False),
        UserWarning,
        r"obs_names_make_unique",
        dup_obs,
    ),
    Case(
        "predict_into_users_obsm",
        "copy",
        lambda o, c: hs.tl.predict(o, c["model"], into_table=True, key_added="mine"),
        ValueError,
        r"Choose another `key_added`",
        user_obsm,
    ),
    Case(
        "zarr_predict_into_users_obsm",
        "zarr",
        lambda o, c: hs.tl.predict(o, c["model"], into_table=True, key_added="X_demo"),
        ValueError,
        r"Choose another `key_added`",
    ),
    Case(
        "predict_a_path",
        "sdata",
        lambda o, c: hs.tl.predict(o, str(c["files"]["model"])),
        TypeError,
        r"hs\.tl\.load_model",
    ),
    Case(
        "predict_over_the_table",
        "sdata",
        lambda o, c: hs.tl.predict(o, c["model"], key_added="table"),
        ValueError,
        r"must differ",
    ),
    Case(
        "zarr_predict_over_an_image",
        "zarr",
        lambda o, c: hs.tl.predict(o, c["model"], key_added="section0_image"),
        ValueError,
        r"choose another `key_added`",
    ),
    Case(
        "predict_image_without_grid",
        "sdata",
        lambda o, c: hs.tl.predict(o, c["model"], image_key="section0_image"),
        ValueError,
        r"needs `spacing_um`",
    ),
    Case(
        "predict_01_mask",
        "sdata",
        lambda o, c: hs.tl.predict(o, c["model"], spots=np.arange(30) % 2, inplace=False),
        TypeError,
        r"dtype=bool",
    ),
    # hs.tl.evaluate, hs.tl.cross_validate
    Case(
        "evaluate_without_predictions",
        "sdata",
        lambda o, c: hs.tl.evaluate(o),
        KeyError,
        r"hs\.tl\.predict\(sdata, model\)",
    ),
    Case(
        "evaluate_duplicated_spots",
        "copy",
        lambda o, c: hs.tl.evaluate(o),
        ValueError,
        r"obs_names_make_unique\(\)",
        dup_obs_predicted,
    ),
    Case(
        "cross_validate_genes_float",
        "sdata",
        lambda o, c: hs.tl.cross_validate(o, groups="sample_id", **{**FIT, "genes": 5.0}),
        TypeError,
        r"`genes=5`",
    ),
    Case(
        "cross_validate_unknown_groups",
        "sdata",
        lambda o, c: hs.tl.cross_validate(o, groups="nope", **FIT),
        KeyError,
        r"groups",
    ),
    # hs.tl.load_model
    Case(
        "model_random_bytes",
        "none",
        lambda o, c: hs.tl.load_model(c["files"]["random"]),
        ValueError,
        r"not a file written by `torch\.save`",
    ),
    Case(
        "model_pickled_objects",
        "none",
        lambda o, c: hs.tl.load_model(c["files"]["pickled"]),
        ValueError,
        r"refuses to unpickle",
    ),
    Case(
        "model_malformed_field",
        "none",
        lambda o, c: hs.tl.load_model(c["files"]["meta_type"]),
        ValueError,
        r"malformed fields \['n_features'\]",
    ),
    Case(
        "model_malformed_config",
        "none",
        lambda o, c: hs.tl.load_model(c["files"]["meta_config"]),
        ValueError,
        r"section_norm.*save the model again",
    ),
    Case(
        "model_unknown_method",
        "none",
        lambda o, c: hs.tl.load_model(c["files"]["meta_method"]),
        ValueError,
        r"register the method",
    ),
    Case(
        "model_genes_unlike_tensors",
        "none",
        lambda o, c: hs.tl.load_model(c["files"]["meta_genes"]),
        ValueError,
        r"not \(spots, 1 genes\).*save the model again",
    ),
    Case(
        "model_tensor_shape",
        "none",
        lambda o, c: hs.tl.load_model(c["files"]["tensor_shape"]),
        ValueError,
        r"do not fit together.*save the model again",
    ),
    Case(
        "model_missing",
        "none",
        lambda o, c: hs.tl.load_model(c["tmp"] / "nope.pt"),
        FileNotFoundError,
        r"No model file",
    ),
    # hs.io
    Case(
        "concatenate_a_string", "sdata", lambda o, c: hs.io.concatenate([o, "x"]), TypeError, r"spatialdata\.read_zarr"
    ),
    Case(
        "concatenate_one_object",
        "sdata",
        lambda o, c: hs.io.concatenate(o),
        TypeError,
        r"hs\.io\.concatenate\(\[a, b\]\)",
    ),
    Case("concatenate_twice_the_same", "sdata", lambda o, c: hs.io.concatenate([o, o]), ValueError, r"own `sample_id`"),
    Case(
        "concatenate_no_shared_gene",
        "copy",
        lambda o, c: hs.io.concatenate(sections(o, disjoint=60)),
        ValueError,
        r"join='outer'",
    ),
    Case(
        "concatenate_outer_unmeasured",
        "copy",
        lambda o, c: hs.io.concatenate(sections(o, disjoint=5), join="outer"),
        UserWarning,
        r"join='inner'",
    ),
    Case(
        "legacy_st_slash_in_sample_id",
        "none",
        lambda o, c: hs.io.read_legacy_st(
            c["tmp"] / "counts.tsv.gz", c["tmp"] / "spots.tsv", c["tmp"] / "he.png", sample_id="C/2", spot_pitch_um=50
        ),
        ValueError,
        r"sample_id='C_2'",
    ),
    Case(
        "legacy_st_nan_pixel",
        "none",
        lambda o, c: hs.io.read_legacy_st(
            c["tmp"] / "counts.tsv.gz",
            c["tmp"] / "nan_spots.tsv",
            c["tmp"] / "he.png",
            sample_id="S",
            pixel_size_um=1.0,
        ),
        ValueError,
        r"Fix or drop those rows",
    ),
    # hs.tl.expression_map, hs.tl.fit_classifier, hs.tl.classify
    Case(
        "map_without_predictions", "sdata", lambda o, c: hs.tl.expression_map(o, "nope"), KeyError, r"hs\.tl\.predict"
    ),
    Case(
        "map_of_spot_predictions",
        "copy",
        lambda o, c: hs.tl.expression_map(o, "predicted"),
        ValueError,
        r"one grid.*image_key=\.\.\., spacing_um=\.\.\.",
        lambda s, c: _quiet(lambda: hs.tl.predict(s, c["model"])),
    ),
    Case(
        "classifier_unknown_labels",
        "sdata",
        lambda o, c: hs.tl.fit_classifier(o, labels="nope", patch_px=32, **P),
        KeyError,
        r"hs\.tl\.expression_class",
    ),
    Case(
        "classifier_regression_method",
        "sdata",
        lambda o, c: hs.tl.fit_classifier(o, labels="sample_id", method="ridge", patch_px=32, **P),
        ValueError,
        r"\['logistic'\]",
    ),
    Case(
        "classify_with_expression_model",
        "sdata",
        lambda o, c: hs.tl.classify(o, c["model"]),
        TypeError,
        r"hs\.tl\.fit_classifier",
    ),
    # hs.datasets.synthetic
    Case(
        "synthetic_fractional_sections",
        "none",
        lambda o, c: hs.datasets.synthetic(n_sections=1.5, **P),
        TypeError,
        r"whole number",
    ),
    Case(
        "synthetic_negative_size",
        "none",
        lambda o, c: hs.datasets.synthetic(n_sections=1, section_size_um=-1, **P),
        ValueError,
        r"positive number",
    ),
    Case(
        "synthetic_stain_per_section",
        "none",
        lambda o, c: hs.datasets.synthetic(n_sections=2, stain_strength=[1.0], **P),
        ValueError,
        r"one value per section",
    ),
]


def test_the_catalogue_is_large_and_covers_backed_stores():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert sum(c.target == "zarr" for c in CASES) >= 3


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_the_fix_and_changes_nothing(case, base, ctx):
    if case.target == "sdata":
        obj = base
    elif case.target == "copy":
        obj = copy.deepcopy(base)
    elif case.target == "table":
        obj = base.tables["table"]
    elif case.target == "zarr":
        obj = ctx["backed"]
    elif case.target == "none":
        obj = None
    else:
        obj = case.target()
    if case.prepare is not None:
        case.prepare(obj, ctx)
    before = fingerprint(obj)
    on_disk = store_hashes(ctx["store"]) if case.target == "zarr" else None

    if issubclass(case.expect, Warning):
        with pytest.warns(case.expect, match=case.match):
            case.call(obj, ctx)
    else:
        with pytest.raises(case.expect, match=case.match):
            case.call(obj, ctx)

    assert fingerprint(obj) == before
    if on_disk is not None:
        assert store_hashes(ctx["store"]) == on_disk


def test_tissue_position_of_spots_outside_the_image_is_nan(base):
    sdata = copy.deepcopy(base)
    move_spot(sdata, (-5000.0, -5000.0))
    with pytest.warns(UserWarning, match="outside their image"):
        out = hs.tl.embed(sdata, encoder="tissue_position", inplace=False, progress=False)
    table = sdata.tables["table"]
    moved = sdata.shapes["section0_spots"].index[0]
    first = np.flatnonzero((table.obs["region"] == "section0_spots").to_numpy() & (table.obs["spot_id"] == moved))[0]
    assert np.isnan(out[first]).all()
    assert np.isfinite(np.delete(out, first, axis=0)).all() and np.nanmax(out) < 500  # µm, a 500 µm section

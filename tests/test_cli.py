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
def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    import spatialdata as sd

    monkeypatch.chdir(tmp_path)  # the files are listed relative to where the demo runs
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
    assert "why the default is 'X_morphology_context'" in out and "noise ceiling bounds" in out
    # the summary lists every file the demo wrote
    wrote = next(line for line in out.splitlines() if "] Wrote " in line)
    listed = wrote.split("] Wrote ")[1].split(", ")
    assert sorted(listed) == sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "demo").iterdir()), wrote


# --------------------------------------------------------------------------------------------------
# the pipeline commands: fit, predict, evaluate, embed
# --------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.filterwarnings("ignore:.*autosharding:UserWarning")  # zarr's notice, on writing stores

#: what tqdm draws: a bar, or its rate
PROGRESS_MARKS = ("%|", "█", "it/s", "patch/s")


def histoseq(*args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``python -m histoseq._cli *args`` and check its exit status."""
    res = subprocess.run(
        [sys.executable, "-m", "histoseq._cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check_rc is not None:
        assert res.returncode == check_rc, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def listing(store) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.zarr"
    hs.datasets.synthetic(n_sections=2, section_size_um=600, progress=False).write(path)
    return path


@pytest.fixture(scope="module")
def embedded(store):
    """``histoseq embed`` (with progress bars: not quiet) of the spots, as the first step of a pipeline."""
    return histoseq("embed", store, "--encoder", "morphology", "--patch-px", "32", "--key-added", "morph32")


@pytest.fixture(scope="module")
def model(store, embedded):
    path = store.parent / "model.pt"
    res = histoseq("fit", store, "-o", path, "--genes", "4", "--method", "ridge", "--option", "embedding=X_morph32")
    return path, res


@pytest.fixture(scope="module")
def predicted(store, model):
    return histoseq("predict", model[0], store)


def test_version_and_help_are_quick_and_complete():
    assert histoseq("--version").stdout.strip() == f"histoseq {hs.__version__}"
    for command in ("fit", "predict", "evaluate", "embed"):
        out = histoseq(command, "--help").stdout
        assert "example:" in out and f"histoseq {command} " in out.split("example:")[1]
        assert "--quiet" in out and "--debug" in out


def test_embed_writes_the_embedding_into_the_store(store, embedded):
    import spatialdata as sd

    assert "X_morph32" in sd.read_zarr(store).tables["table"].obsm
    assert "obsm['X_morph32']" in embedded.stdout and str(store) in embedded.stdout
    assert any(mark in embedded.stderr for mark in PROGRESS_MARKS)  # not quiet: progress bars, on stderr only
    assert not any(mark in embedded.stdout for mark in PROGRESS_MARKS)


def test_fit_writes_a_model_and_refuses_to_overwrite_it(store, model):
    path, res = model
    fitted = hs.tl.load_model(path)
    assert fitted.method == "ridge" and len(fitted.genes) == 4 and fitted.embedding == "X_morph32"
    assert f"Wrote model {path}" in res.stdout
    again = histoseq("fit", store, "-o", path, "--genes", "4", "--method", "ridge", check_rc=2)
    assert again.stderr.startswith("histoseq fit: error:") and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert hs.tl.load_model(path).genes == fitted.genes


@pytest.mark.slow
def test_predict_writes_a_table_of_the_models_genes(store, model, predicted):
    import spatialdata as sd

    back = sd.read_zarr(store)
    assert list(back.tables["predicted"].var_names) == hs.tl.load_model(model[0]).genes
    assert back.tables["predicted"].n_obs == back.tables["table"].n_obs
    assert "added table 'predicted'" in predicted.stdout


@pytest.mark.slow
def test_predict_on_a_grid_quietly(store, model):
    import spatialdata as sd

    res = histoseq("--quiet", "predict", model[0], store, "--grid-um", "100", "--image", "section0_image")
    back = sd.read_zarr(store)
    assert "section0_image_grid" in back.shapes
    grid = back.tables["section0_image_grid_predicted"]
    assert grid.n_obs == len(back.shapes["section0_image_grid"]) and grid.n_vars == 4
    assert "section0_image_grid_predicted" in res.stdout  # the summary names every element written
    assert not any(mark in res.stderr for mark in PROGRESS_MARKS)
    assert "Predicted" not in res.stderr  # the library's INFO lines are hushed too


@pytest.mark.slow
def test_evaluate_writes_scores(store, predicted, tmp_path):
    import pandas as pd

    csv = tmp_path / "scores.csv"
    res = histoseq("evaluate", store, "--table", "predicted", "-o", csv, "--spots-of", "section1", "--quiet")
    scores = pd.read_csv(csv)
    assert "pearson" in scores.columns and set(scores["section"]) == {"section1", "all"}
    assert "section1" in res.stdout and "mean Pearson" in res.stdout and f"Wrote scores {csv}" in res.stdout


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["fit", "{missing}", "-o", "{tmp}/m.pt"], "No SpatialData store"),
        (["fit", "{store}", "-o", "{tmp}/m.pt", "--method", "nope"], "choose one of"),
        (["fit", "{store}", "-o", "{tmp}/m.pt", "--genes", "DENS1,DENS9X", "--method", "ridge"], "'DENS9X'"),
        (["predict", "{model}", "{store}", "--grid-um", "100", "--image", "nope"], "section0_image"),
        (["predict", "{model}", "{store}", "--overwrite", "--image", "section0_image"], "--grid-um"),
    ],
    ids=["missing-store", "unknown-method", "unknown-gene", "bad-image", "image-without-grid"],
)
def test_bad_input_exits_2_with_the_fix_and_leaves_the_store(store, model, tmp_path, args, fix):
    before = listing(store)
    fields = {"store": store, "model": model[0], "tmp": tmp_path, "missing": tmp_path / "missing.zarr"}
    res = histoseq(*[a.format(**fields) for a in args], check_rc=2)
    assert res.stderr.startswith(f"histoseq {args[0]}: error: ")
    assert fix in res.stderr and "Traceback" not in res.stderr
    assert listing(store) == before
    assert not (tmp_path / "m.pt").exists()


def test_usage_errors_and_failures_exit_codes(monkeypatch, capsys):
    from histoseq import _commands

    with pytest.raises(SystemExit) as exc:
        main(["fit", "s.zarr", "-o", "m.pt", "--option", "no-equals-sign"])
    assert exc.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err

    def broken(args, out):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(_commands.COMMANDS, "embed", broken)
    assert main(["embed", "s.zarr"]) == 1
    err = capsys.readouterr().err
    assert "disk on fire" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["--debug", "embed", "s.zarr"])
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["embed", "s.zarr", "--debug"])


def test_global_flags_go_before_or_after_the_command():
    from histoseq._cli import _build_parser

    parser = _build_parser()
    assert parser.parse_args(["--quiet", "embed", "s.zarr"]).quiet
    assert parser.parse_args(["embed", "s.zarr", "--quiet"]).quiet
    assert not parser.parse_args(["embed", "s.zarr"]).quiet
    assert parser.parse_args(["--quiet", "demo"]).quiet and parser.parse_args(["demo", "--quiet"]).quiet
    args = parser.parse_args(["fit", "a.zarr", "b.zarr", "-o", "m.pt", "--genes", "A,B", "--option", "alpha=10"])
    assert args.stores == ["a.zarr", "b.zarr"] and args.genes == ["A", "B"]
    assert dict(args.option) == {"alpha": 10}
    args = parser.parse_args(["fit", "a.zarr", "-o", "m.pt", "--option", "kernel=rbf", "--option", "gammas=[1, 3]"])
    assert dict(args.option) == {"kernel": "rbf", "gammas": [1, 3]} and args.genes == 50


def test_error_messages_name_the_flags():
    from histoseq._commands import error_message

    err = KeyError("Image 'x' not found. Pass one of them as `image_key`; or `spacing_um=...`.")
    assert error_message(err, "predict") == "Image 'x' not found. Pass one of them as `--image`; or `--grid-um ...`."
    assert error_message(ValueError("pass `overwrite=True`"), "predict") == "pass `--overwrite`"
    assert error_message(ValueError("use `layer`"), "predict") == "use `layer`"


def test_a_failed_command_removes_the_elements_it_wrote(store):
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel

    from histoseq._commands import keep_store_listing

    before = listing(store)
    sdata = sd.read_zarr(store)
    shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=[Point(1, 1)], data={"radius": [1.0]}))
    written = []

    def fail_after_writing():
        with keep_store_listing(sdata):
            sdata.shapes["half_written"] = shapes
            sdata.write_element("half_written")
            written.extend(sdata.elements_paths_on_disk())
            raise RuntimeError("late failure")

    with pytest.raises(RuntimeError, match="late failure"):
        fail_after_writing()
    assert "shapes/half_written" in written
    assert "shapes/half_written" not in sd.read_zarr(store).elements_paths_on_disk()
    assert listing(store) == before

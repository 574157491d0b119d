"""The ONNX Runtime backend of the built-in networks (histoseq.tl._onnx)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import histoseq as hs
from histoseq.tl import _embed, _onnx
from histoseq.tl._embed import TorchRunner, get_encoder
from histoseq.tl._onnx import (
    BACKEND_ENV,
    CACHE_ENV,
    OnnxRunner,
    choose_backend,
    forget_sessions,
    model_digest,
    onnx_or_torch,
)

SIZE = (32, 32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder ($HISTOSEQ_CACHE_DIR) for the module: the seed-0 small_cnn is exported once, then reused."""
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(autouse=True)
def fresh(monkeypatch, cache):
    """Every test loads and checks the files itself, and nothing is written outside the test's cache."""
    forget_sessions()
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    yield
    forget_sessions()


def small_cnn(seed: int = 0) -> torch.nn.Module:
    return get_encoder("small_cnn", random_state=seed)[1]


def images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SIZE, 3), dtype=np.uint8)


def torch_float32(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with TorchRunner(net, builtin=True, autocast=False) as run:
        return run(x)


def test_onnx_runner_matches_torch_runner():
    net, x = small_cnn(0), images()
    ref = torch_float32(net, x)
    with OnnxRunner(TorchRunner(net, builtin=True), "small_cnn") as run:
        out = run(x)
        one = run(x[:1])  # the batch axis is dynamic (exported with 2)
    assert run.backend == "onnxruntime" and run.precision == "float32"
    assert out.dtype == np.float32 and out.shape == (5, 128)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(one, ref[:1], rtol=0, atol=1e-4)


def test_cache_is_reused_and_keyed_by_weights(cache, caplog):
    net, x = small_cnn(0), images()
    with OnnxRunner(TorchRunner(net, builtin=True), "small_cnn") as run:
        first = run(x)
    path = run.file_for(SIZE)
    assert path.is_file() and path.parent == cache / "onnx"  # $HISTOSEQ_CACHE_DIR/onnx
    mtime = path.stat().st_mtime_ns

    forget_sessions()  # a new process: the file is read and checked again, not exported
    again = OnnxRunner(TorchRunner(small_cnn(0), builtin=True), "small_cnn")
    with caplog.at_level(logging.INFO, logger="histoseq.tl._onnx"), again:
        second = again(x)
    assert again.file_for(SIZE) == path and path.stat().st_mtime_ns == mtime
    assert "Exporting" not in caplog.text
    np.testing.assert_array_equal(first, second)

    other = small_cnn(1)  # other weights, same architecture and name: another file
    with OnnxRunner(TorchRunner(other, builtin=True), "small_cnn") as run_other:
        out_other = run_other(x)
    assert run_other.backend == "onnxruntime"
    assert run_other.file_for(SIZE) != path and run_other.file_for(SIZE).is_file()
    np.testing.assert_allclose(out_other, torch_float32(other, x), rtol=0, atol=1e-4)
    assert not np.allclose(out_other, first)
    assert path.stat().st_mtime_ns == mtime

    # the key also covers the input size and every buffer
    assert model_digest(net, "small_cnn", SIZE) != model_digest(net, "small_cnn", (64, 64))
    changed = small_cnn(0)
    changed.normalize.mean += 0.01  # a non-persistent buffer (not in the state dict)
    assert model_digest(changed, "small_cnn", SIZE) != model_digest(net, "small_cnn", SIZE)


def test_embed_with_onnx_and_torch_backends_agree(monkeypatch):
    # torch in float32 (no bf16 autocast even where the CPU has it), to compare the two backends tightly
    monkeypatch.setattr(_embed, "bf16_supported", lambda device: False)
    sdata = hs.datasets.synthetic(n_sections=1, section_size_um=400, progress=False)
    kw = {"encoder": "small_cnn", "patch_px": 32, "stain_norm": False, "progress": False}
    for backend in ("onnx", "torch", "auto"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        hs.tl.embed(sdata, key_added=backend, **kw)
    t = sdata.tables["table"]
    # "auto" runs through ONNX only the networks measured faster there (EfficientNet), not the small CNN
    assert [t.uns[b]["backend"] for b in ("onnx", "torch", "auto")] == ["onnxruntime", "torch", "torch"]
    assert t.uns["onnx"]["precision"] == "float32"
    x_onnx, x_torch = t.obsm["X_onnx"], t.obsm["X_torch"]
    assert np.isfinite(x_onnx).all() and x_onnx.shape == x_torch.shape
    np.testing.assert_allclose(x_onnx, x_torch, rtol=0, atol=1e-4 * max(1.0, float(np.abs(x_torch).max())))
    np.testing.assert_array_equal(t.obsm["X_auto"], x_torch)

    # a module the user passes always runs in torch, even when ONNX is asked for
    monkeypatch.setenv(BACKEND_ENV, "onnx")
    hs.tl.embed(sdata, **{**kw, "encoder": small_cnn(0).eval()}, key_added="user")
    assert t.uns["user"]["backend"] == "torch"
    np.testing.assert_allclose(t.obsm["X_user"], x_torch, rtol=0, atol=1e-5)


def test_corrupted_cache_file_is_exported_again(caplog):
    net, x = small_cnn(0), images()
    run = OnnxRunner(TorchRunner(net, builtin=True), "small_cnn")
    path = run.file_for(SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an onnx graph \x00\xff" * 100)
    with caplog.at_level(logging.INFO, logger="histoseq.tl._onnx"), run:
        out = run(x)
    assert "unusable" in caplog.text and "Exporting" in caplog.text
    assert run.backend == "onnxruntime" and path.stat().st_size > 100_000
    np.testing.assert_allclose(out, torch_float32(net, x), rtol=0, atol=1e-4)


def test_failed_export_or_check_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    net, x = small_cnn(0), images()
    ref = TorchRunner(net, builtin=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(_onnx, "export_onnx", broken)
    run = OnnxRunner(TorchRunner(net, builtin=True), "small_cnn", cache=tmp_path / "empty")
    with caplog.at_level(logging.INFO, logger="histoseq.tl._onnx"), run, ref:
        out = run(x)
        expected = ref(x)
    assert run.backend == "torch" and run.precision == ref.precision
    assert "running through torch" in caplog.text
    np.testing.assert_array_equal(out, expected)

    # a garbage file that cannot be replaced (the export fails): still embeds, through torch
    run = OnnxRunner(TorchRunner(net, builtin=True), "small_cnn", cache=tmp_path / "garbage")
    path = run.file_for(SIZE)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x08\x01garbage")
    with run:
        np.testing.assert_array_equal(run(x), expected)
    assert run.backend == "torch"


def test_backend_choice_never_gpu_nor_user_modules(monkeypatch):
    assert choose_backend(builtin=True, device="cpu") == "onnx"
    assert choose_backend(builtin=True, device="cpu", backend="torch") == "torch"
    for device in ("cuda", "cuda:1", torch.device("cuda", 0), "mps"):
        assert choose_backend(builtin=True, device=device) == "torch"
        assert choose_backend(builtin=True, device=device, backend="onnx") == "torch"
    assert choose_backend(builtin=False, device="cpu", backend="onnx") == "torch"

    net = small_cnn(0)
    on_gpu = TorchRunner(net, "cuda", builtin=True, autocast=False)  # not entered: no GPU needed
    assert onnx_or_torch(on_gpu, "small_cnn", backend="onnx") is on_gpu
    with pytest.raises(ValueError, match="CPU"):
        OnnxRunner(on_gpu, "small_cnn")
    users = TorchRunner(net, "cpu", builtin=False)
    assert onnx_or_torch(users, "small_cnn", backend="onnx") is users
    cpu = TorchRunner(net, "cpu", builtin=True)
    assert isinstance(onnx_or_torch(cpu, "small_cnn", backend="onnx"), OnnxRunner)
    # "auto": only the networks measured faster through ONNX Runtime
    assert onnx_or_torch(cpu, "small_cnn") is cpu
    assert isinstance(onnx_or_torch(cpu, "efficientnet_lite0"), OnnxRunner)
    assert onnx_or_torch(None, "morphology") is None

    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert choose_backend(builtin=True, device="cpu") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "tensorrt")
    with pytest.raises(ValueError, match="HISTOSEQ_BACKEND"):
        choose_backend(builtin=True, device="cpu")
    monkeypatch.setenv(BACKEND_ENV, "auto")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert choose_backend(builtin=True, device="cpu") == "torch"


def test_cache_keeps_the_recently_used_files(tmp_path):
    import os
    import time

    now = time.time()
    for i, age in enumerate([30, 10, 20, 40]):  # access times: b newest, then c, a, d
        f = tmp_path / f"{'abcd'[i]}.onnx"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (now - age, now - 100))
    stale = tmp_path / ".e.onnx.123.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (now - 2 * 86_400, now - 2 * 86_400))
    deleted = _onnx.prune_cache(tmp_path, max_bytes=2500, keep=tmp_path / "d.onnx")
    assert sorted(p.name for p in deleted) == [".e.onnx.123.tmp", "a.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx", "c.onnx", "d.onnx"]

"""Model files written by earlier versions of histoseq still load and predict what they predicted then.

``tests/data/models_v1/`` holds one small model per method, saved by histoseq 0.1.0.dev0 before the methods
moved behind the registry (format version 1), with ``expected.npz``: the inputs they were given and the
predictions they made then.
"""

from pathlib import Path

import numpy as np
import pytest

import histoseq as hs

FIXTURES = Path(__file__).parent / "data" / "models_v1"
EMBEDDING_METHODS = ("kernel", "ridge", "ridge_hest", "mlp", "contrastive")


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_saved_embedding_models_predict_as_when_written(method, expected):
    model = hs.tl.load_model(FIXTURES / f"model_{method}.pt")
    assert model.method == method
    assert len(model.genes) == 4 and model.embedding == "X_demo"
    pred = model.predict_embeddings(expected["X"], sections=expected["sections"])
    np.testing.assert_allclose(pred, expected[f"pred_{method}"], rtol=1e-5, atol=1e-6)
    assert method in repr(model)


def test_saved_cnn_model_predicts_as_when_written(expected):
    model = hs.tl.load_model(FIXTURES / "model_cnn.pt")
    assert model.method == "cnn" and model.uses_images
    pred = model.predict_patches(expected["patches"])
    np.testing.assert_allclose(pred, expected["pred_cnn"], rtol=1e-4, atol=1e-5)

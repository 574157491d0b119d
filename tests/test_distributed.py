"""Training on Lightning's distributed strategies: two CPU processes (DDP over gloo) as one process.

Lightning's ``"ddp"`` strategy starts its other processes by running the calling script again, so the training
runs in a script of its own (``python script.py``), as a user's pipeline would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import histoseq as hs

    mode, batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=2000, random_state=0, progress=False)
    t = sdata.tables["table"]
    counts = np.asarray(t.X.todense() if hasattr(t.X, "todense") else t.X, dtype=float)
    noise = np.random.default_rng(0).normal(scale=0.5, size=(t.n_obs, 30))
    t.obsm["X_demo"] = np.log1p(counts[:, :30]) + noise  # an embedding that says something
    options = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"} if mode == "ddp" else {"devices": 1}
    model = hs.tl.fit(sdata, genes=10, method="mlp", embedding="X_demo", train=["section0", "section1"],
                      max_epochs=30, batch_size=batch, progress=False, **options)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    model.save(out if rank == 0 else f"{out}.rank{rank}")  # every process returns a model: the same one
    """
)


def _train(tmp_path, mode: str, batch: int):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{mode}.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, str(script), mode, str(batch), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    import histoseq as hs

    if mode == "ddp":
        other = hs.tl.load_model(f"{out}.rank1")
        first = hs.tl.load_model(out)
        # the validation loss is summed over both processes, so both kept the same epoch's weights
        assert other.provenance["best_epoch"] == first.provenance["best_epoch"]
        X = np.random.default_rng(1).normal(size=(20, first.n_features))
        np.testing.assert_array_equal(other.predict_embeddings(X), first.predict_embeddings(X))
    return hs.tl.load_model(out)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    import histoseq as hs

    # a batch of 32 on each of two processes averages the gradients of 64 spots: one process's batch of 64
    single = _train(tmp_path, "single", 64)
    ddp = _train(tmp_path, "ddp", 32)
    assert ddp.genes == single.genes
    sdata = hs.datasets.synthetic(n_sections=3, section_size_um=2000, random_state=0, progress=False)
    t = sdata.tables["table"]
    counts = np.asarray(t.X.todense() if hasattr(t.X, "todense") else t.X, dtype=float)
    t.obsm["X_demo"] = np.log1p(counts[:, :30]) + np.random.default_rng(0).normal(scale=0.5, size=(t.n_obs, 30))
    test = (t.obs["sample_id"] == "section2").to_numpy()
    scores = {}
    preds = {}
    for name, model in (("single", single), ("ddp", ddp)):
        hs.tl.predict(sdata, model, key_added=name, progress=False)
        preds[name] = np.asarray(sdata.tables[name].X)
        scores[name] = hs.tl.evaluate(sdata, predicted=name, spots=test)["pearson"].mean()
    # the batches are drawn in another order (one sampler per process), so the weights differ a little
    per_gene = [np.corrcoef(preds["single"][:, j], preds["ddp"][:, j])[0, 1] for j in range(len(single.genes))]
    assert min(per_gene) > 0.97, per_gene
    assert abs(scores["single"] - scores["ddp"]) < 0.03, scores
    assert scores["ddp"] > 0.5  # and both learnt the genes

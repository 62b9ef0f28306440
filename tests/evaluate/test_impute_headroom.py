"""``benchmarks/impute_headroom.py``: its ridge readout against scikit-learn, and its ceilings on
a synthetic section whose gene programs (and so the right neighbours) are known."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "impute_headroom.py"


@pytest.fixture(scope="module")
def headroom():
    spec = importlib.util.spec_from_file_location("impute_headroom", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ridge_readout_equals_sklearn(headroom):
    rng = np.random.default_rng(0)
    targets = rng.gamma(2.0, size=(30, 80))  # (spots, training genes)
    train_vectors, query_vectors = rng.normal(size=(80, 6)), rng.normal(size=(5, 6))
    ours = headroom.ridge_readout(targets, train_vectors, query_vectors, penalty=3.0)
    base = targets.mean(axis=1, keepdims=True)
    # one ridge per spot: that spot's residuals over genes on the genes' vectors, no intercept
    reference = Ridge(alpha=3.0, fit_intercept=False).fit(train_vectors, (targets - base).T)
    np.testing.assert_allclose(ours, base + reference.predict(query_vectors).T, atol=1e-10)


def test_ceilings_on_planted_programs(tmp_path, headroom):
    from stinfer.data.synthetic import (
        SyntheticConfig,
        make_synthetic_sections,
        planted_gene_embeddings,
    )

    config = SyntheticConfig(n_sections=1, target_spots=300, n_genes=150, seed=3)
    (slide,) = make_synthetic_sections(tmp_path / "syn", config)
    table = planted_gene_embeddings(slide, dim=16, noise=0.3, seed=0)
    frame = pd.DataFrame(headroom.section_rows(slide, table, "s1", seed=0, repeats=2))
    score = frame.set_index("method")["pcc_median"]
    # the planted programs make program mates the right neighbours: the embedding k-NN and
    # the ridge readout must beat the mean profile clearly, and knowing the co-expression on
    # the slide itself (the cheat) cannot do worse than the noisy embedding by much
    assert score["knn"] > score["mean_profile"] + 0.1
    assert score["embedding_ridge"] > score["mean_profile"] + 0.1
    assert score["halves_slide_knn"] > score["halves_knn"] - 0.05
    assert {"halves_pc_regression_1", "halves_pc_regression_10"} <= set(score.index)
    assert frame["n_test_genes"].iloc[0] == round(0.2 * frame["n_train_genes"].iloc[0] / 0.8)


def test_command_writes_csv_and_markdown(tmp_path):
    from stinfer.data.synthetic import (
        SyntheticConfig,
        make_synthetic_sections,
        planted_gene_embeddings,
    )

    (slide,) = make_synthetic_sections(
        tmp_path / "syn", SyntheticConfig(n_sections=1, target_spots=200, n_genes=120, seed=1)
    )
    slide.write_h5ad(tmp_path / "S1.h5ad")
    table = planted_gene_embeddings(slide, dim=8, seed=0)
    table.to_csv(tmp_path / "genes.csv")
    out = tmp_path / "headroom.csv"
    command = [sys.executable, str(SCRIPT), "--slides", str(tmp_path), "--embeddings"]
    command += [str(tmp_path / "genes.csv"), "--sections", "S1", "--seeds", "0", "1"]
    command += ["--repeats", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = pd.read_csv(out)
    assert set(rows["seed"]) == {0, 1}
    assert out.with_suffix(".md").read_text().count("| knn |") == 1
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr  # never overwrites unasked

"""`stinfer impute`: both lines of issue 6 as written, on a small planted slide."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stinfer.cli import main
from stinfer.io.gene_embeddings import embeddings_to_anndata
from stinfer.io.slide_data import make_slide, prepare_for_h5ad

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def write_inputs(tmp_path):
    rng = np.random.default_rng(0)
    side, n_genes = 10, 40
    rows, cols = np.divmod(np.arange(side * side), side)
    modules = np.stack([np.sin(3 * cols / side), np.cos(3 * rows / side)], axis=1)
    module_of = np.arange(n_genes) % 2
    counts = rng.poisson(np.exp(1.5 + modules[:, module_of]) * 3).astype(np.float32)
    genes = [f"G{i}" for i in range(n_genes - 1)] + ["ERBB2"]
    slide = make_slide(
        counts=sp.csr_matrix(counts),
        spot_names=[f"{r}x{c}" for r, c in zip(rows, cols, strict=True)],
        gene_names=genes,
        spatial_xy=np.stack([cols, rows], axis=1) * 100.0,
        sample_id="C2",
        source_format="synthetic",
        source="test",
    )
    prepare_for_h5ad(slide).write_h5ad(tmp_path / "C2.h5ad")
    directions = np.eye(6)[:2]
    vectors = directions[module_of] + 0.1 * rng.standard_normal((n_genes, 6))
    table = pd.DataFrame(np.vstack([vectors, directions[1]]), index=[*genes, "GRB7"])
    embeddings_to_anndata(table.to_numpy(), list(table.index)).write_h5ad(tmp_path / "genes.h5ad")


def test_impute_held_out_genes_writes_predictions_and_metrics_beside_them(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = (
        "impute --slide C2.h5ad --embeddings genes.h5ad --test-fraction 0.2 --modality location "
        "--preset fast --out C2_imputed.h5ad"
    ).split()
    assert main([*argv, "--epochs", "2", "--no-progress"]) == 0
    prediction = ad.read_h5ad(tmp_path / "C2_imputed.h5ad")
    metrics = json.loads((tmp_path / "C2_imputed.metrics.json").read_text())
    assert prediction.n_vars == metrics["n_test_genes"] == 8
    assert "truth" in prediction.layers and "knn" in prediction.layers
    for key in ("pcc_median", "scc_median", "pcc_mean", "mse", "n_test_genes"):
        assert key in metrics
        for baseline in ("mean_profile", "knn", "coxformer_shuffled"):
            assert key in metrics["baselines"][baseline]
    # refuses to overwrite without --overwrite, exit 2 and no traceback
    assert main([*argv, "--epochs", "1", "--no-progress"]) == 2


def test_impute_named_genes_including_one_not_on_the_slide(tmp_path, monkeypatch, capsys):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = "impute --slide C2.h5ad --embeddings genes.h5ad --genes ERBB2,GRB7 --out C2_genes.h5ad"
    assert main([*argv.split(), "--epochs", "2", "--no-progress"]) == 0
    prediction = ad.read_h5ad(tmp_path / "C2_genes.h5ad")
    assert list(prediction.var_names) == ["ERBB2", "GRB7"]
    assert list(prediction.var["measured_on_slide"]) == [True, False]
    assert prediction.n_obs == 100 and np.all(np.isfinite(prediction.X))
    capsys.readouterr()
    bad = "impute --slide C2.h5ad --embeddings genes.h5ad --genes NOPE --out other.h5ad"
    assert main(bad.split()) == 2
    assert "no embedding for 1 of the --genes (NOPE)" in capsys.readouterr().err


def test_the_default_preset_is_the_papers_on_a_gpu_and_fast_on_a_cpu(monkeypatch):
    import torch

    from stinfer.cli.impute import resolve_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_preset("auto") == "fast"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_preset("auto") == "paper"
    assert resolve_preset("fast") == "fast" and resolve_preset("paper") == "paper"

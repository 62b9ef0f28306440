"""`stinfer impute`: both lines of issue 6 as written, on a small planted slide."""

from __future__ import annotations

import json
import logging

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


def test_impute_held_out_genes_writes_predictions_and_metrics_beside_them(
    tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = (
        "impute --slide C2.h5ad --embeddings genes.h5ad --test-fraction 0.2 --modality location "
        "--preset fast --out C2_imputed.h5ad"
    ).split()
    assert main([*argv, "--epochs", "2", "--no-progress"]) == 0
    # without a progress bar every stage and every epoch says so in one line
    messages = [record.getMessage() for record in caplog.records]
    epochs = [m.split(":")[0] for m in messages if m.startswith("epoch ")]
    assert epochs == ["epoch 1/2", "epoch 2/2"] * 2  # the model, then the shuffled control
    for stage in (
        "CoxFormer spatial (spatial): training on",
        "held-out genes: shuffled-embedding control",
        "writing C2_imputed.h5ad and",
    ):
        assert any(m.startswith(stage) for m in messages), stage
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
    assert "C2" in prediction.uns["spatial"]  # written through prepare_for_h5ad
    # the convention of every prediction (the same as `stinfer predict`'s): X expected counts
    # with the measured panel's library, layers["log1p_cp10k"] what the model predicts
    record = prediction.uns["stinfer"]["expression"]
    slide = ad.read_h5ad(tmp_path / "C2.h5ad")
    assert record["X"] == "expected_counts" and record["library_size"] == "obs/library_size"
    assert record["normalisation_panel"] == f"the measured panel of {slide.n_vars} genes"
    library = prediction.obs["library_size"].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(library, np.asarray(slide.X.sum(axis=1)).ravel(), rtol=1e-6)
    expected = np.log1p(np.asarray(prediction.X, dtype=np.float64) / library[:, None] * 1e4)
    np.testing.assert_allclose(prediction.layers["log1p_cp10k"], expected, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    bad = "impute --slide C2.h5ad --embeddings genes.h5ad --genes NOPE --out other.h5ad"
    assert main(bad.split()) == 2
    assert "no embedding for 1 of the --genes (NOPE)" in capsys.readouterr().err


def test_the_default_preset_is_the_papers_on_a_gpu_and_fast_on_a_cpu(monkeypatch, caplog):
    import torch

    from stinfer.cli import build_parser
    from stinfer.models.configs import auto_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="stinfer"):
        assert auto_preset("auto") == "fast"
    assert "preset auto: fast (no CUDA GPU is available)" in caplog.text
    assert auto_preset("auto", "gpu") == "paper"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_preset("auto") == "paper" and auto_preset("auto", "cpu") == "fast"
    assert auto_preset("fast") == "fast" and auto_preset("paper") == "paper"
    # the same default in every command with presets
    parser = build_parser()
    impute = parser.parse_args("impute --slide s --embeddings e --genes A --out o.h5ad".split())
    embed = parser.parse_args("embed-genes --corpus c.h5ad --out o.h5ad".split())
    assert impute.preset == embed.preset == "auto"
    train = parser.parse_args("train --train s.h5ad --out r".split())
    assert train.preset is None  # "auto" for a model with presets (an error for one without)


def test_super_resolution_output_opens_in_scanpy_with_the_sub_spot_size(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = (
        "impute --slide C2.h5ad --embeddings genes.h5ad --genes ERBB2,GRB7 --modality location "
        "--sub-spot-grid 2 --preset fast --epochs 1 --no-progress --out C2_sub.h5ad"
    )
    assert main(argv.split()) == 0
    prediction = ad.read_h5ad(tmp_path / "C2_sub.h5ad")
    assert prediction.n_obs == 400
    scalefactors = prediction.uns["spatial"]["C2"]["scalefactors"]
    # sub-spots 50 px apart (2 x 2 tiles of the 100-px spot pitch), not the spot's size
    assert scalefactors["spot_diameter_fullres"] == pytest.approx(0.55 * 50.0)
    assert sc.pl.spatial(prediction, color="ERBB2", show=False) is not None
    plt.close("all")


def test_genes_from_he_alone_on_an_image_only_slide(tmp_path, capsys):
    """`prepare --format image` of a section's H&E, a STEvs run on another section's panel,
    then `impute --run`: the named genes (not in the panel, never measured) on the virtual
    grid, in the prediction layout."""
    from stinfer.data.synthetic import (
        SyntheticConfig,
        make_synthetic_sections,
        planted_gene_embeddings,
    )

    config = SyntheticConfig(n_sections=2, target_spots=120, n_genes=30, seed=2)
    train, test = make_synthetic_sections(tmp_path / "images", config)
    prepare_for_h5ad(train).write_h5ad(tmp_path / "train.h5ad")
    embeddings = planted_gene_embeddings(config, dim=16)
    embeddings_to_anndata(embeddings.to_numpy(), list(embeddings.index)).write_h5ad(
        tmp_path / "genes.h5ad"
    )
    genes = list(train.var_names)
    (tmp_path / "panel.txt").write_text("\n".join(genes[:20]))
    meta = test.uns["stinfer"]
    status = main(
        f"prepare --format image --image {meta['image_path']} --pixel-size-um "
        f"{meta['pixel_size_um']} --grid visium --out {tmp_path / 'he.h5ad'}".split()
    )
    assert status == 0
    run = tmp_path / "run"
    train_args = f"train --model stevs --train {tmp_path / 'train.h5ad'} --genes "
    train_args += f"{tmp_path / 'panel.txt'} --preset fast --epochs 1 --no-progress --out {run}"
    assert main(train_args.split()) == 0
    out = tmp_path / "he_genes.h5ad"
    wanted = ",".join(genes[20:24])
    argv = f"impute --slide {tmp_path / 'he.h5ad'} --run {run} --embeddings "
    argv += f"{tmp_path / 'genes.h5ad'} --genes {wanted} --epochs 2 --no-progress --out {out}"
    assert main(argv.split()) == 0
    prediction = ad.read_h5ad(out)
    slide = ad.read_h5ad(tmp_path / "he.h5ad")
    assert list(prediction.var_names) == genes[20:24]
    assert list(prediction.obs_names) == list(slide.obs_names) and slide.n_vars == 0
    assert np.all(np.isfinite(prediction.X)) and (prediction.X >= 0).all()
    assert prediction.uns["stinfer"]["zero_shot"]["stevs_panel_genes"] == 20
    assert prediction.uns["stinfer"]["expression"]["X"] == "expected_counts"
    capsys.readouterr()
    in_panel = argv.replace(wanted, genes[0]).replace(str(out), str(tmp_path / "x.h5ad"))
    assert main(in_panel.split()) == 2
    assert "in the STEvs panel" in capsys.readouterr().err

"""`stinfer embed-genes` and `stinfer gene-eval` run end to end on tiny corpora."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stinfer import cli
from stinfer.coexpression.synthetic import planted_module_corpus
from stinfer.evaluate.gene_level import gene_level_auc, read_gene_labels

COMMANDS = ("embed_genes", "gene_eval")


@pytest.fixture
def stinfer(monkeypatch):
    """`stinfer` with (at least) this feature's subcommands registered."""
    registered = tuple(name for name in cli.SUBCOMMAND_MODULES if name not in COMMANDS)
    available = []
    for name in registered:  # other engineers' commands may not exist yet in this checkout
        try:
            __import__(f"stinfer.cli.{name}")
            available.append(name)
        except ImportError:
            pass
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", (*available, *COMMANDS))
    return cli.main


@pytest.fixture
def corpora(tmp_path):
    paths = []
    for name, seed in (("A1", 0), ("A2", 1)):
        adata, module = planted_module_corpus(
            n_cells=400, n_modules=3, genes_per_module=20, seed=seed
        )
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    labels = pd.DataFrame({"gene": adata.var_names, "label": (module == 0).astype(int)})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    return paths, tmp_path


def test_embed_genes_then_gene_eval_as_documented(stinfer, corpora, capsys, monkeypatch):
    _paths, folder = corpora
    monkeypatch.chdir(folder)
    status = stinfer(
        [
            "embed-genes",
            "--corpus",
            "A1.h5ad",
            "A2.h5ad",
            "--top-k",
            "50",
            "--preset",
            "fast",
            "--out",
            "genes.h5ad",
        ]
    )
    assert status == 0
    assert "wrote genes.h5ad: 60 genes x 512 dims" in capsys.readouterr().out
    genes = ad.read_h5ad(folder / "genes.h5ad")
    assert genes.shape == (60, 512)
    info = genes.uns["gene_embeddings"]
    assert (
        list(info["corpora"]) == ["A1", "A2"] and info["top_k"] == 50 and info["preset"] == "fast"
    )

    status = stinfer(
        ["gene-eval", "--embeddings", "genes.h5ad", "--labels", "labels.csv", "--out", "auc.json"]
    )
    assert status == 0
    result = json.loads((folder / "auc.json").read_text())
    assert result["n_genes"] == 60 and result["n_positive"] == 20
    # the command reports the API's AUCs of the table it wrote, fold by fold (same seed)
    expected = gene_level_auc(genes, read_gene_labels(folder / "labels.csv"), seed=0)
    for classifier in ("lr", "svm"):
        assert len(result[classifier]["auc_folds"]) == 5
        np.testing.assert_allclose(
            result[classifier]["auc_folds"], expected[classifier]["auc_folds"], rtol=1e-6
        )
        assert result[classifier]["auc_mean"] == pytest.approx(expected[classifier]["auc_mean"])

    # both commands refuse to overwrite without --overwrite, and leave the outputs untouched
    before = (folder / "auc.json").read_bytes()
    status = stinfer(
        ["gene-eval", "--embeddings", "genes.h5ad", "--labels", "labels.csv", "--out", "auc.json"]
    )
    assert status == 2 and "already exists" in capsys.readouterr().err
    assert (folder / "auc.json").read_bytes() == before
    status = stinfer(["embed-genes", "--corpus", "A1.h5ad", "--out", "genes.h5ad"])
    assert status == 2 and "--overwrite" in capsys.readouterr().err


def test_embed_genes_writes_tables_and_saves_the_model(stinfer, corpora, capsys):
    paths, folder = corpora
    status = stinfer(
        [
            "embed-genes",
            "--corpus",
            *map(str, paths),
            "--top-k",
            "10",
            "--preset",
            "fast",
            "--completion-epochs",
            "2",
            "--autoencoder-epochs",
            "2",
            "--correlation",
            "spearman",
            "--label-corpus",
            str(paths[1]),
            "--no-progress",
            "--out",
            str(folder / "genes.parquet"),
            "--save-model",
            str(folder / "model"),
        ]
    )
    assert status == 0, capsys.readouterr().err
    table = pd.read_parquet(folder / "genes.parquet")
    assert table.shape == (60, 513) and table.columns[0] == "gene"
    assert (folder / "model" / "weights.safetensors").is_file()


def test_user_errors_exit_2_with_one_line(stinfer, corpora, capsys):
    _, folder = corpora
    status = stinfer(
        ["embed-genes", "--corpus", str(folder / "missing.h5ad"), "--out", str(folder / "g.h5ad")]
    )
    assert status == 2 and "missing.h5ad" in capsys.readouterr().err
    status = stinfer(
        ["embed-genes", "--corpus", str(folder / "labels.csv"), "--out", str(folder / "g.h5ad")]
    )
    assert status == 2 and ".h5ad" in capsys.readouterr().err
    status = stinfer(
        ["embed-genes", "--corpus", str(folder / "A1.h5ad"), "--out", str(folder / "g.xlsx")]
    )
    assert status == 2 and "suffix" in capsys.readouterr().err
    assert not (folder / "g.h5ad").exists()
    np.testing.assert_equal(sorted(p.name for p in folder.iterdir() if p.name.startswith(".")), [])


def test_svd_baseline_and_pair_report_from_the_command_line(stinfer, corpora, capsys):
    paths, folder = corpora
    svd_out = str(folder / "svd.h5ad")
    status = stinfer(
        [
            "embed-genes",
            "--method",
            "svd",
            "--n-components",
            "3",
            "--corpus",
            str(paths[0]),
            "--out",
            svd_out,
        ]
    )
    assert status == 0, capsys.readouterr().err
    assert "60 genes x 3 dims" in capsys.readouterr().out
    svd = ad.read_h5ad(folder / "svd.h5ad")
    assert svd.uns["gene_embeddings"]["format"] == "svd"

    # the baseline scored against pairs of another corpus (A2), itself as the SVD baseline
    arguments = ["gene-eval", "--embeddings", svd_out, "--corpus", str(paths[1])]
    arguments += ["--svd-corpus", str(paths[0]), "--n-components", "3", "--pairs", "100"]
    arguments += ["--labels", str(folder / "labels.csv"), "--out", str(folder / "report.json")]
    status = stinfer(arguments)
    assert status == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "pair AUC" in printed and "3-d SVD baseline" in printed
    report = json.loads((folder / "report.json").read_text())
    mine, baseline = report["embedding"], report["svd_baseline"]
    assert mine["pairs"]["auc"] == pytest.approx(baseline["pairs"]["auc"])  # same table
    # 3 planted modules: the top pairs share a module, as does about 1/3 of the random pairs,
    # so a perfect module embedding scores about 1 - (1/3) / 2
    assert mine["pairs"]["auc"] > 0.8
    assert mine["pairs"]["n_top"] == 100 and report["pairs_from"] == ["A2"]
    assert report["lr"]["auc_mean"] == mine["labels"]["lr"]["auc_mean"]

    status = stinfer(["gene-eval", "--embeddings", str(folder / "svd.h5ad"), "--out", "x.json"])
    assert status == 2 and "nothing to score" in capsys.readouterr().err

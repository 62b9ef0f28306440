"""Gene-level evaluation (Table S1): LR/SVM ROC-AUC under stratified, shuffled, seeded CV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stinfer.errors import InputError
from stinfer.evaluate.gene_level import (
    coexpressed_pairs,
    embedding_geometry,
    format_table_s1,
    gene_level_auc,
    k_sensitivity,
    pair_auc,
    read_gene_labels,
)
from stinfer.io.gene_embeddings import embeddings_to_anndata


def _embeddings(separation: float, n_genes: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n_genes) < n_genes // 3).astype(int)
    vectors = rng.standard_normal((n_genes, 8))
    vectors[:, 0] += separation * labels
    genes = [f"G{i}" for i in range(n_genes)]
    return embeddings_to_anndata(vectors, genes), pd.Series(labels, index=genes)


def test_separable_classes_score_near_one_and_random_ones_near_half():
    embeddings, labels = _embeddings(separation=6.0)
    result = gene_level_auc(embeddings, labels)
    assert result["lr"]["auc_mean"] > 0.98 and result["svm"]["auc_mean"] > 0.98
    assert len(result["lr"]["auc_folds"]) == 5
    assert result["lr"]["auc_sd"] == pytest.approx(np.std(result["lr"]["auc_folds"], ddof=1))
    noise, noise_labels = _embeddings(separation=0.0, n_genes=300)
    result = gene_level_auc(noise, noise_labels)
    assert 0.35 < result["lr"]["auc_mean"] < 0.65


def test_folds_are_seeded_and_missing_genes_are_counted():
    embeddings, labels = _embeddings(separation=1.0)
    extra = pd.concat([labels, pd.Series([1, 0], index=["NOT_EMBEDDED1", "NOT_EMBEDDED2"])])
    first = gene_level_auc(embeddings, extra, seed=3)
    again = gene_level_auc(embeddings.to_df(), extra, seed=3)
    other = gene_level_auc(embeddings, extra, seed=4)
    assert first["lr"] == again["lr"] and first["svm"] == again["svm"]
    assert first["lr"]["auc_folds"] != other["lr"]["auc_folds"]
    assert (first["n_genes"], first["n_missing"], first["n_positive"]) == (120, 2, 40)


def test_too_few_labelled_genes_or_bad_labels_are_input_errors():
    embeddings, labels = _embeddings(separation=1.0)
    few = labels.copy()
    few[few.index[4:40]] = 0
    with pytest.raises(InputError, match="at least 5"):
        gene_level_auc(embeddings, few)
    with pytest.raises(InputError, match="binary"):
        gene_level_auc(embeddings, labels.replace({1: 2}))
    with pytest.raises(InputError, match="classifier"):
        gene_level_auc(embeddings, labels, classifiers=("rf",))


def test_read_gene_labels(tmp_path):
    (tmp_path / "labels.csv").write_text("gene,label\nERBB2,1\nGRB7,true\nTP53,0\nTP53,0\n")
    labels = read_gene_labels(tmp_path / "labels.csv")
    assert labels.to_dict() == {"ERBB2": 1, "GRB7": 1, "TP53": 0}
    (tmp_path / "conflict.csv").write_text("gene,label\nERBB2,1\nERBB2,0\n")
    with pytest.raises(InputError, match="both 0 and 1"):
        read_gene_labels(tmp_path / "conflict.csv")
    (tmp_path / "columns.csv").write_text("symbol,class\nERBB2,1\n")
    with pytest.raises(InputError, match="'gene' and 'label'"):
        read_gene_labels(tmp_path / "columns.csv")


def test_table_s1_layout():
    table = pd.DataFrame(
        [
            {
                "K": 50,
                "lr_auc_mean": 0.944,
                "lr_auc_sd": 0.01,
                "svm_auc_mean": 0.955,
                "svm_auc_sd": 0.02,
                "completion_seconds": 12.0,
            },
        ]
    )
    text = format_table_s1(table)
    assert text.splitlines()[0] == "| K | LR | SVM | Training time (s) |"
    assert "| 50 | 0.944 ± 0.010 | 0.955 ± 0.020 | 12.0 |" in text


def test_k_sensitivity_reruns_the_pipeline_per_k_in_table_s1_layout():
    from stinfer.coexpression.autoencoder import AutoencoderConfig
    from stinfer.coexpression.completion import CompletionConfig
    from stinfer.coexpression.graph import CorrelationGraphConfig
    from stinfer.coexpression.synthetic import planted_module_corpus
    from stinfer.models.gene_embeddings import GeneEmbeddingConfig
    from stinfer.train import TrainerConfig

    corpus, module = planted_module_corpus(n_cells=400, n_modules=3, genes_per_module=16, seed=1)
    config = GeneEmbeddingConfig(
        graph=CorrelationGraphConfig(min_cells=1),
        completion=CompletionConfig(n_node_features=8, hidden_dim=16, max_epochs=2, t_max=2),
        autoencoder=AutoencoderConfig(
            n_tokens=4, d_model=16, n_heads=2, feedforward_dim=32, latent_dim=8, max_epochs=5
        ),
        trainer=TrainerConfig(accelerator="cpu", progress_bar=False),
    )
    labels = pd.Series((module == 0).astype(int), index=corpus.var_names)
    table = k_sensitivity({"synthetic": corpus}, labels, ks=(5, 10), config=config)

    assert list(table["K"]) == [5, 10]
    assert list(table["n_edges"]) == [48 * 5, 48 * 10]  # every gene keeps its top-K partners
    assert (table["completion_seconds"] > 0).all()
    assert (table["total_seconds"] >= table["completion_seconds"]).all()
    assert (table[["lr_auc_mean", "svm_auc_mean"]] > 0.8).all().all()  # modules are easy
    lines = format_table_s1(table).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 5 | ") and lines[3].startswith("| 10 | ")


# --------------------------------------------------------------------------- co-expression
def _module_corpus(seed: int):
    from stinfer.coexpression.synthetic import planted_module_corpus

    return planted_module_corpus(
        n_cells=600, n_modules=4, genes_per_module=10, n_background_genes=20, seed=seed
    )


def test_coexpressed_pairs_are_the_top_correlations_of_the_corpus():
    from stinfer.preprocess import normalise_log1p_cp10k

    corpus, module = _module_corpus(seed=1)
    genes = list(corpus.var_names)
    top, random = coexpressed_pairs(corpus, genes, n_pairs=30, seed=0)
    dense = np.asarray(normalise_log1p_cp10k(corpus.X).toarray(), dtype=np.float64)
    reference = np.corrcoef(dense, rowvar=False)
    upper = np.sort(reference[np.triu_indices(len(genes), k=1)])[::-1][:30]
    np.testing.assert_allclose(top["correlation"], upper, atol=1e-5)
    index = pd.Index(genes)
    a, b = index.get_indexer(top["gene_a"]), index.get_indexer(top["gene_b"])
    np.testing.assert_allclose(reference[a, b], top["correlation"], atol=1e-5)
    assert (module[a] == module[b]).all() and (module[a] >= 0).all()
    ra, rb = index.get_indexer(random["gene_a"]), index.get_indexer(random["gene_b"])
    assert len(random) == 30 and (ra != rb).all()
    np.testing.assert_allclose(random["correlation"], reference[ra, rb], atol=1e-5)


def test_pair_auc_is_one_for_module_vectors_and_half_for_noise():
    corpus, module = _module_corpus(seed=1)
    genes = list(corpus.var_names)
    top, random = coexpressed_pairs(corpus, genes, n_pairs=150, seed=0)
    onehot = np.eye(5)[np.where(module >= 0, module, 4)]
    onehot[module < 0] = np.random.default_rng(0).standard_normal((int((module < 0).sum()), 5))
    good = pair_auc(pd.DataFrame(onehot, index=genes), top, random)
    assert good["auc"] > 0.9 and good["n_dropped"] == 0
    noise = np.random.default_rng(1).standard_normal((len(genes), 16))
    assert abs(pair_auc(pd.DataFrame(noise, index=genes), top, random)["auc"] - 0.5) < 0.15
    shifted = pair_auc(pd.DataFrame(onehot + 50.0, index=genes), top, random)
    assert shifted["median_cosine_random"] > 0.99  # a common offset hides the structure


def test_embedding_geometry_against_closed_forms():
    rng = np.random.default_rng(0)
    isotropic = pd.DataFrame(rng.standard_normal((400, 8)), index=[f"G{i}" for i in range(400)])
    geometry = embedding_geometry(isotropic)
    assert abs(geometry["median_cosine"]) < 0.05 and geometry["effective_rank"] > 7.5
    one_direction = pd.DataFrame(
        np.outer(rng.uniform(1, 2, 400), rng.standard_normal(8)), index=isotropic.index
    )
    geometry = embedding_geometry(one_direction)
    assert geometry["median_cosine"] == pytest.approx(1.0) and geometry["effective_rank"] < 1.01
    orthonormal = pd.DataFrame(np.eye(4), index=["a", "b", "c", "d"])
    assert embedding_geometry(orthonormal)["effective_rank"] == pytest.approx(4.0)

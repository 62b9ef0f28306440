"""CoxFormer gene embeddings recover planted co-expression modules; presets; save/load."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from stinfer.coexpression.autoencoder import AutoencoderConfig
from stinfer.coexpression.completion import CompletionConfig
from stinfer.coexpression.graph import CorrelationGraphConfig
from stinfer.coexpression.synthetic import planted_module_corpus
from stinfer.errors import InputError
from stinfer.evaluate.gene_level import gene_level_auc
from stinfer.models.gene_embeddings import (
    PRESETS,
    CoxFormerEmbeddings,
    GeneEmbeddingConfig,
    gene_embedding_config,
    upgrade_gene_embedding_config_dict,
)
from stinfer.train import TrainerConfig


def tiny_config(**overrides) -> GeneEmbeddingConfig:
    """A small, fast configuration for CPU tests (the architecture of the paper, narrower)."""
    config = GeneEmbeddingConfig(
        graph=CorrelationGraphConfig(top_k=15, min_cells=1),
        completion=CompletionConfig(n_node_features=16, hidden_dim=32, max_epochs=15, t_max=15),
        autoencoder=AutoencoderConfig(
            n_tokens=8,
            d_model=32,
            n_heads=4,
            feedforward_dim=64,
            latent_dim=16,
            max_epochs=30,
            t_max=30,
            lr=1e-3,
        ),
        trainer=TrainerConfig(accelerator="cpu", progress_bar=False),
        preset="test",
    )
    return replace(config, **overrides)


@pytest.fixture(scope="module")
def trained():
    corpus, module = planted_module_corpus(n_cells=2000, n_modules=6, genes_per_module=20, seed=0)
    model = CoxFormerEmbeddings(tiny_config()).train({"synthetic": corpus})
    return model, module


def test_embeddings_recover_planted_modules(trained):
    model, module = trained
    embeddings = model.get_embeddings()
    assert embeddings.shape == (120, 16)
    clusters = KMeans(6, n_init=10, random_state=0).fit_predict(embeddings.X)
    assert adjusted_rand_score(module, clusters) >= 0.8
    for target in (0, 3):
        labels = pd.Series((module == target).astype(int), index=embeddings.obs_names)
        scores = gene_level_auc(embeddings, labels)
        assert scores["lr"]["auc_mean"] >= 0.9
        assert scores["svm"]["auc_mean"] >= 0.9


def test_embeddings_carry_provenance_and_per_gene_columns(trained):
    model, _ = trained
    embeddings = model.get_embeddings()
    info = embeddings.uns["gene_embeddings"]
    assert info["top_k"] == 15 and info["preset"] == "test"
    assert list(info["corpora"]) == ["synthetic"]
    assert list(info["label_corpora"]) == ["synthetic:label"]
    assert list(info["corpus_cells"]) == [1000] and list(info["label_corpus_cells"]) == [1000]
    for key in ("r2", "mse", "correlation_copy_r2", "seconds"):
        assert key in info["completion"]
    assert info["completion"]["r2"] > 0.3
    assert len(info["autoencoder"]["loss_history"]) == 30
    assert {"graph_seconds", "completion_seconds", "autoencoder_seconds"} <= set(info["timings"])
    assert (embeddings.obs["n_partners"] == 15).all()
    assert np.allclose(embeddings.obs["measured_fraction"], 1.0)
    assert model.completed_coexpression().shape == (120, 120)


def test_save_and_load_round_trip(trained, tmp_path):
    model, _ = trained
    folder = model.save(tmp_path / "model")
    loaded = CoxFormerEmbeddings.load(folder)
    np.testing.assert_allclose(loaded.get_embeddings().X, model.get_embeddings().X)
    assert loaded.config == model.config
    assert (loaded.completed_coexpression() != model.completed_coexpression()).nnz == 0
    np.testing.assert_array_equal(loaded.graph.partner, model.graph.partner)
    with pytest.raises(InputError, match="already exists"):
        model.save(folder)


def test_presets_differ_only_in_the_documented_fields():
    paper, fast = PRESETS["paper"](), PRESETS["fast"]()
    assert paper.graph == fast.graph and paper.graph.top_k == 50
    assert (paper.completion.fanouts, paper.completion.batch_size) == ((15, 10), 512)
    assert (paper.autoencoder.batch_size, paper.autoencoder.latent_dim) == (32, 512)
    assert paper.completion.max_epochs == paper.autoencoder.max_epochs == 200

    def differing(a, b) -> set[str]:
        return {f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)}

    assert paper.completion.message_passing == "sampled"
    assert differing(paper.completion, fast.completion) == {
        "n_node_features",
        "hidden_dim",
        "message_passing",
        "batch_size",
        "lr",
        "max_epochs",
        "t_max",
        "edges_per_epoch",
        "validation_edges",
    }
    assert differing(paper.autoencoder, fast.autoencoder) == {
        "n_tokens",
        "d_model",
        "feedforward_dim",
        "batch_size",
        "lr",
        "max_epochs",
        "t_max",
        "geometry_weight",
        "geometry_target",
        "partner_fraction",
    }
    assert paper.autoencoder.geometry_weight == paper.autoencoder.partner_fraction == 0.0
    assert fast.autoencoder.geometry_target == "low_rank"
    assert (paper.autoencoder_input, fast.autoencoder_input) == ("top_k", "dense")
    assert set(PRESETS) == {"paper", "fast"}
    assert gene_embedding_config("fast", top_k=100).graph.top_k == 100
    quiet = gene_embedding_config("fast", trainer={"seed": 3, "progress_bar": False})
    assert (quiet.trainer.seed, quiet.trainer.progress_bar) == (3, False)
    assert gene_embedding_config("fast", seed=3, progress_bar=False) == quiet  # the old names
    old = {"seed": 1, "accelerator": "cpu", "trainer": {"seed": 2}, "autoencoder": {"lr": 0.1}}
    assert upgrade_gene_embedding_config_dict(old) == {
        "trainer": {"seed": 2, "accelerator": "cpu"},  # the new name wins
        "autoencoder": {"lr": 0.1},
    }
    with pytest.raises(InputError, match="preset"):
        gene_embedding_config("slow")


def test_an_untrained_model_says_what_to_do():
    with pytest.raises(InputError, match="train"):
        CoxFormerEmbeddings().get_embeddings()


def test_svd_baseline_equals_scikit_learn_on_a_small_case():
    from sklearn.decomposition import TruncatedSVD

    from stinfer.models.gene_embeddings import SVDGeneEmbeddings
    from stinfer.preprocess import normalise_log1p_cp10k

    corpus, _ = planted_module_corpus(n_cells=300, n_modules=4, genes_per_module=8, seed=2)
    # 4 components of 4 modules: a well separated spectrum, so the randomised SVD is exact
    embeddings = SVDGeneEmbeddings(n_components=4).train({"c": corpus}).get_embeddings()
    assert embeddings.shape == (32, 4)
    assert embeddings.uns["gene_embeddings"]["format"] == "svd"
    dense = np.asarray(normalise_log1p_cp10k(corpus.X).toarray(), dtype=np.float64)
    z = (dense - dense.mean(0)) / dense.std(0) / np.sqrt(dense.shape[0])  # z . z = correlation
    reference = TruncatedSVD(4, algorithm="arpack").fit(z)
    expected = reference.components_.T * reference.singular_values_
    signs = np.sign(np.sum(expected * embeddings.X, axis=0))
    np.testing.assert_allclose(embeddings.X * signs, expected, atol=5e-4)


def test_dense_rows_with_the_geometry_term_give_cosine_usable_embeddings():
    """The fast preset's fix on planted modules: k-means on the raw (uncentred) unit vectors
    finds the modules, and co-expressed pairs of an unseen corpus are as separable by cosine
    as with an SVD of the same training corpus."""
    from stinfer.evaluate.gene_level import coexpressed_pairs, embedding_geometry, pair_auc
    from stinfer.models.gene_embeddings import SVDGeneEmbeddings

    shape = dict(n_cells=1500, n_modules=6, genes_per_module=20, n_background_genes=60)
    corpus, module = planted_module_corpus(seed=0, **shape)
    unseen, _ = planted_module_corpus(seed=1, **shape)
    config = tiny_config(autoencoder_input="dense")
    config = replace(config, autoencoder=replace(config.autoencoder, geometry_weight=1.0))
    embeddings = CoxFormerEmbeddings(config).train({"train": corpus}).get_embeddings()
    assert embeddings.uns["gene_embeddings"]["autoencoder_input"] == "dense"

    in_module = module >= 0
    vectors = embeddings.X[in_module]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    clusters = KMeans(6, n_init=10, random_state=0).fit_predict(unit)
    assert adjusted_rand_score(module[in_module], clusters) >= 0.8
    assert embedding_geometry(embeddings)["median_cosine"] < 0.2

    svd = SVDGeneEmbeddings(n_components=16).train({"train": corpus}).get_embeddings()
    top, random = coexpressed_pairs(unseen, list(embeddings.obs_names), n_pairs=300, seed=0)
    ours, baseline = pair_auc(embeddings, top, random)["auc"], pair_auc(svd, top, random)["auc"]
    assert ours >= baseline - 0.02, (ours, baseline)


def test_dense_completed_rows_hold_every_measured_correlation(trained, tmp_path):
    from stinfer.coexpression.completion import dense_completed_coexpression
    from stinfer.coexpression.graph import as_corpora, standardise_corpora
    from stinfer.preprocess import normalise_log1p_cp10k

    model, _ = trained
    graph, genes = model.graph, model.graph.gene_names
    corpus, _ = planted_module_corpus(n_cells=2000, n_modules=6, genes_per_module=20, seed=0)
    missing = genes[0]  # a gene the corpus lacks: its graph edges take the completion's values
    partial = corpus[:, [g for g in corpus.var_names if g != missing]].copy()
    standardised = standardise_corpora(
        as_corpora({"c": partial}), replace(CorrelationGraphConfig(), gene_join="outer"), genes
    )
    rows = dense_completed_coexpression(standardised, graph, model.completion, tmp_path / "r.npy")
    assert isinstance(rows, np.memmap) and rows.dtype == np.float16

    kept = genes.get_indexer(partial.var_names)
    dense = np.asarray(normalise_log1p_cp10k(partial.X).toarray(), dtype=np.float64)
    reference = np.corrcoef(dense, rowvar=False)
    np.fill_diagonal(reference, 0.0)
    np.testing.assert_allclose(rows[np.ix_(kept, kept)].astype(np.float64), reference, atol=2e-3)
    edges = graph.gene == 0
    np.testing.assert_allclose(
        rows[0, graph.partner[edges]], model.completion.prediction[edges], atol=2e-3
    )
    others = np.setdiff1d(np.arange(1, len(genes)), graph.partner[edges])
    assert not rows[0, others].any()  # nobody measures these pairs and they are not edges

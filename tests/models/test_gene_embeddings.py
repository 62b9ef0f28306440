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
)


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
            learning_rate=1e-3,
        ),
        accelerator="cpu",
        progress_bar=False,
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
    paper, fast = GeneEmbeddingConfig.paper(), GeneEmbeddingConfig.fast()
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
        "learning_rate",
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
        "learning_rate",
        "max_epochs",
        "t_max",
    }
    assert set(PRESETS) == {"paper", "fast"}
    assert gene_embedding_config("fast", top_k=100).graph.top_k == 100
    with pytest.raises(InputError, match="preset"):
        gene_embedding_config("slow")


def test_an_untrained_model_says_what_to_do():
    with pytest.raises(InputError, match="train"):
        CoxFormerEmbeddings().get_embeddings()

"""GraphSAGE co-expression completion: beats the mean on held-out edges, fills unmeasured pairs."""

from __future__ import annotations

import numpy as np
import pytest

from stinfer.coexpression.completion import (
    CompletionConfig,
    GraphSAGECompletion,
    complete_coexpression,
    split_edges,
)
from stinfer.coexpression.graph import (
    CorrelationGraphConfig,
    as_corpora,
    build_correlation_graph,
    edge_correlations,
    gene_svd_features,
    standardise_corpora,
)
from stinfer.coexpression.synthetic import planted_module_corpus
from stinfer.errors import InputError
from stinfer.train import TrainerConfig

TRAINER = TrainerConfig(accelerator="cpu", progress_bar=False)


def _graph_features_targets(label_genes: slice = slice(None)):
    """A top-30 graph of planted modules, SVD features, and the label corpus's correlations on
    the graph's edges: measured only for ``label_genes``, and for all genes (the truth)."""
    graph_corpus, _ = planted_module_corpus(n_cells=1000, seed=0)
    label_corpus, _ = planted_module_corpus(n_cells=1000, seed=1)
    config = CorrelationGraphConfig(top_k=30, min_cells=1)
    standardised = standardise_corpora(as_corpora([graph_corpus]), config)
    graph = build_correlation_graph(None, config, standardised=standardised)
    features = gene_svd_features(standardised, n_components=16)
    targets = []
    for genes in (label_genes, slice(None)):
        labels = standardise_corpora(
            as_corpora([label_corpus[:, genes].copy()]),
            CorrelationGraphConfig(min_cells=1),
            genes=graph.gene_names,
        )
        targets.append(edge_correlations(labels, graph.gene, graph.partner))
    return graph, features, targets[0], targets[1]


def test_completion_beats_predicting_the_mean_on_held_out_edges():
    graph, features, targets, _ = _graph_features_targets()
    config = CompletionConfig(hidden_dim=32, max_epochs=30, t_max=30)
    result, module = complete_coexpression(graph, features, targets, config, TRAINER)
    scores = result.scores
    assert scores["n_train"] + scores["n_val"] + scores["n_test"] == graph.n_edges
    assert scores["r2"] > 0.3
    assert scores["mse"] < scores["mean_baseline_mse"]
    assert isinstance(module, GraphSAGECompletion) and len(module.convs) == 3


def test_completed_matrix_keeps_measured_values_and_predicts_unmeasured_pairs():
    # the label corpus lacks the first 10 genes (half of module 0): their edges are predicted
    graph, features, targets, truth = _graph_features_targets(label_genes=slice(10, None))
    unmeasured = ~np.isfinite(targets)
    assert unmeasured.any() and (graph.gene[unmeasured] < 10).any()
    config = CompletionConfig(hidden_dim=32, max_epochs=30, t_max=30)
    result, _ = complete_coexpression(graph, features, targets, config, TRAINER)
    matrix = result.matrix
    assert matrix.shape == (graph.n_genes, graph.n_genes)
    assert matrix.nnz <= graph.n_edges
    stored = np.asarray(matrix[graph.gene, graph.partner]).ravel()
    np.testing.assert_allclose(stored[~unmeasured], targets[~unmeasured], atol=1e-6)
    np.testing.assert_allclose(stored[unmeasured], result.prediction[unmeasured], atol=1e-6)
    # predictions for the unmeasured pairs follow what the label corpus would have measured
    assert np.corrcoef(result.prediction[unmeasured], truth[unmeasured])[0, 1] > 0.8
    assert result.scores["n_unmeasured"] == int(unmeasured.sum())


def test_labelled_edges_are_split_8_1_1_without_overlap():
    train, val, test = split_edges(1000, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert len(np.unique(np.concatenate([train, val, test]))) == 1000
    again = split_edges(1000, (0.8, 0.1, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))


def test_completion_refuses_a_label_corpus_without_measured_edges():
    graph, features, targets, _ = _graph_features_targets()
    with pytest.raises(InputError, match="label corpus"):
        complete_coexpression(graph, features, np.full_like(targets, np.nan), trainer=TRAINER)
    with pytest.raises(InputError, match="split"):
        CompletionConfig(split=(0.5, 0.1, 0.1))

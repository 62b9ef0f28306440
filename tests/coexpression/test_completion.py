"""GraphSAGE co-expression completion: beats the mean on held-out edges, fills unmeasured pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _reference_node_embeddings(module, x, edge_index, n_nodes):
    """Dense numpy SAGE layers: ``W_l mean_{s -> t} h_s + b_l + W_r h_t``, ReLU between."""
    adjacency = np.zeros((n_nodes, n_nodes))
    adjacency[edge_index[1], edge_index[0]] = 1.0
    mean = adjacency / np.maximum(adjacency.sum(axis=1, keepdims=True), 1.0)
    h = x.astype(np.float64)
    for index, conv in enumerate(module.convs):
        w_l = conv.lin_l.weight.detach().double().numpy()
        b_l = conv.lin_l.bias.detach().double().numpy()
        w_r = conv.lin_r.weight.detach().double().numpy()
        h = (mean @ h) @ w_l.T + b_l + h @ w_r.T
        if index < len(module.convs) - 1:
            h = np.maximum(h, 0.0)
    return h


def test_full_graph_message_passing_equals_a_dense_reference_and_all_neighbour_sampling():
    from stinfer.coexpression.completion import EdgeBatchCollator, MeanAdjacency
    from stinfer.coexpression.sampling import NeighborSampler

    n_nodes, k = 60, 5
    rng = np.random.default_rng(0)
    partners = np.argsort(rng.random((n_nodes, n_nodes)) + np.eye(n_nodes), axis=1)[:, :k]
    gene = np.repeat(np.arange(n_nodes), k)
    partner = partners.reshape(-1)
    edge_index = torch.from_numpy(np.stack([partner, gene]))  # messages partner -> gene
    x = torch.from_numpy(rng.standard_normal((n_nodes, 8)).astype(np.float32))
    torch.manual_seed(0)
    module = GraphSAGECompletion(8, hidden_dim=16, n_layers=3).eval()
    adjacency = MeanAdjacency(edge_index, n_nodes)

    with torch.no_grad():
        full = module.node_embeddings(x, adjacency).double().numpy()
        pyg = module.node_embeddings(x, edge_index).double().numpy()
    reference = _reference_node_embeddings(module, x.numpy(), edge_index.numpy(), n_nodes)
    np.testing.assert_allclose(full, reference, atol=1e-5)
    np.testing.assert_allclose(pyg, reference, atol=1e-5)

    # sampled mini-batch mode with every neighbour for n_layers hops: same edge predictions
    correlation = torch.from_numpy(rng.uniform(-1, 1, gene.size).astype(np.float32))
    target = torch.zeros(gene.size)
    sampler = NeighborSampler(edge_index, n_nodes, (-1, -1, -1), backend="vectorised")
    collate = EdgeBatchCollator(
        sampler, x, torch.from_numpy(gene), torch.from_numpy(partner), correlation, target
    )
    batch_ids = list(range(0, gene.size, 7))
    batch = collate(batch_ids)
    with torch.no_grad():
        sampled = module(
            batch["x"], batch["edge_index"], batch["src"], batch["dst"], batch["correlation"]
        )
        whole = module(
            x,
            adjacency,
            torch.from_numpy(gene[batch_ids]),
            torch.from_numpy(partner[batch_ids]),
            correlation[batch_ids],
        )
    np.testing.assert_allclose(sampled.numpy(), whole.numpy(), atol=1e-5)


def test_full_graph_gradients_match_pyg_message_passing():
    from stinfer.coexpression.completion import MeanAdjacency

    n_nodes = 40
    rng = np.random.default_rng(1)
    source = rng.integers(0, n_nodes, 200)
    target = rng.integers(0, n_nodes, 200)
    keep = source != target
    pairs = np.unique(np.stack([source[keep], target[keep]]), axis=1)  # distinct edges
    edge_index = torch.from_numpy(pairs)
    x = torch.from_numpy(rng.standard_normal((n_nodes, 6)).astype(np.float32))
    torch.manual_seed(0)
    module = GraphSAGECompletion(6, hidden_dim=8, n_layers=2)
    gradients = []
    for graph in (MeanAdjacency(edge_index, n_nodes), edge_index):
        module.zero_grad()
        module.node_embeddings(x, graph).square().sum().backward()
        gradients.append([p.grad.clone() for p in module.convs.parameters()])
    for full, pyg in zip(*gradients, strict=True):
        torch.testing.assert_close(full, pyg, atol=1e-4, rtol=1e-4)


def test_full_graph_training_reaches_the_sampled_fit_and_monitors_a_validation_subset():
    graph, features, targets, _ = _graph_features_targets()
    config = CompletionConfig(
        hidden_dim=32,
        max_epochs=30,
        t_max=30,
        message_passing="full",
        validation_edges=50,
    )
    result, _ = complete_coexpression(graph, features, targets, config, TRAINER)
    scores = result.scores
    assert scores["sampler"] == "full graph"
    assert scores["r2"] > 0.3
    assert scores["mse"] < scores["mean_baseline_mse"]
    with pytest.raises(InputError, match="message_passing"):
        CompletionConfig(message_passing="dense")

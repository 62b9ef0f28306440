"""CoxFormer spatial module: Fourier features, loss, shapes at thousands of spots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stinfer.nn.coxformer import (
    CoxFormerSpatialModule,
    SpotContext,
    coexpression_graph,
    fourier_location_features,
    positive_output,
    weighted_huber_loss,
)


def test_fourier_features_match_the_closed_form_in_float64():
    coords = torch.tensor([[0.3, -0.7], [1.0, 0.0], [-0.123456, 0.5]])
    features = fourier_location_features(coords, n_frequencies=32)
    assert features.shape == (3, 4 * 32)
    x = coords.double().numpy()
    omega = math.pi * 2.0 ** np.arange(32)
    angles = x[:, :, None] * omega  # float64 reference, slow path of np.sin
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1).reshape(3, -1)
    np.testing.assert_allclose(features.numpy(), expected, atol=1e-5)


def test_weighted_huber_loss_equals_the_closed_form():
    rng = np.random.default_rng(0)
    target = np.where(rng.random((50, 6)) < 0.4, 0.0, rng.gamma(2.0, 1.0, (50, 6)))
    pred = np.abs(target + rng.standard_t(2, (50, 6)))
    residual = pred - target
    delta = residual.std(axis=0)  # per gene (column), population sd
    absolute = np.abs(residual)
    huber = np.where(absolute <= delta, 0.5 * residual**2, delta * (absolute - 0.5 * delta))
    nonzero = target > 0
    expected = 0.5 * huber[nonzero].mean() + 0.5 * huber[~nonzero].mean() + 1e-3 * pred.mean()
    loss = weighted_huber_loss(torch.tensor(pred), torch.tensor(target))
    assert float(loss) == pytest.approx(expected, rel=1e-10)


def test_weighted_huber_loss_weighs_zero_and_nonzero_targets_equally_whatever_their_counts():
    target = torch.tensor([[0.0], [0.0], [0.0], [2.0]])
    pred = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    loss_without_l1 = weighted_huber_loss(pred, target, l1_weight=0.0)
    # residuals (1, 1, 1, -1): sd 0.866..., every |r| = 1 > delta: linear branch, same value
    delta = float(torch.tensor([1.0, 1.0, 1.0, -1.0]).std(unbiased=False))
    per_entry = delta * (1.0 - 0.5 * delta)
    assert float(loss_without_l1) == pytest.approx(0.5 * per_entry + 0.5 * per_entry)


def test_positive_output_is_elu_plus_offset_and_never_negative():
    pre = torch.linspace(-20, 5, 101)
    out = positive_output(pre)
    assert torch.all(out >= 0) and torch.all(out[pre > -5] > 0)
    torch.testing.assert_close(out, torch.nn.functional.elu(pre, alpha=0.01) + 0.01)


@pytest.mark.parametrize(
    ("modality", "conditioning"),
    [("location", "attention"), ("image", "bilinear"), ("both", "additive")],
)
def test_module_predicts_positive_spots_by_genes_at_thousands_of_spots(modality, conditioning):
    torch.manual_seed(0)
    n_spots, n_genes = 3000 if conditioning != "additive" else 600, 7
    module = CoxFormerSpatialModule(
        modality,
        embedding_dim=16,
        image_in_dim=10,
        d_model=32,
        n_heads=4,
        feedforward_dim=64,
        location_dim=32,
        image_dim=32,
        head_width=32,
        rank=4,
        gene_hidden_dim=32,
        n_memory=20,
        gene_conditioning=conditioning,
    )
    coords = torch.rand(n_spots, 2) * 2 - 1
    features = torch.randn(n_spots, 10)
    out = module(coords, features, torch.randn(n_genes, 16), group_size=1024)
    assert out.shape == (n_spots, n_genes)
    assert torch.all(out > 0) and torch.isfinite(out).all()


def test_spot_context_attends_only_within_groups_of_at_most_group_size():
    torch.manual_seed(0)
    context = SpotContext(d_model=8, n_heads=2, feedforward_dim=16, dropout=0.0, n_layers=1)
    context.eval()
    tokens = torch.randn(10, 8)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    out = context(tokens, group_size=5, generator=torch.Generator().manual_seed(3))
    # the same permutation split into two groups of 5, each attended on its own
    expected = torch.empty_like(tokens)
    for group in order.view(2, 5):
        expected[group] = context.layers(tokens[group][None])[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def small_attention_module(
    embedding_dim: int = 4, n_memory: int = 3, d_model: int = 8, top_k: int = 0
):
    return CoxFormerSpatialModule(
        "location",
        embedding_dim=embedding_dim,
        d_model=d_model,
        n_heads=2,
        feedforward_dim=16,
        location_dim=8,
        head_width=8,
        rank=2,
        gene_hidden_dim=8,
        gene_conditioning="attention",
        n_memory=n_memory,
        attention_top_k=top_k,
        dropout=0.0,
    )


def test_attention_readout_masks_each_training_gene_from_its_own_memory_slot():
    torch.manual_seed(0)
    module = small_attention_module()
    memory = torch.randn(3, 4)
    module.readout.set_memory(memory)
    weights = module.readout.attention(memory, exclude=torch.tensor([0, 1, 2]))
    assert torch.all(weights.diagonal() == 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))


def test_attention_readout_starts_as_a_cosine_softmax_over_the_memory_genes():
    torch.manual_seed(0)
    module = small_attention_module(embedding_dim=6, n_memory=10, d_model=16)
    memory, queries = np.random.default_rng(0).standard_normal((2, 10, 6))
    module.readout.set_memory(torch.tensor(memory, dtype=torch.float32))
    weights = module.readout.attention(torch.tensor(queries, dtype=torch.float32)).detach().numpy()
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        memory / np.linalg.norm(memory, axis=1, keepdims=True)
    ).T
    expected = np.exp(cosine / 0.1) / np.exp(cosine / 0.1).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)


def test_top_k_attention_equals_the_knn_baseline_weights_and_masks_the_own_slot():
    from stinfer.models.gene_baselines import knn_profiles

    module = small_attention_module(embedding_dim=6, n_memory=12, top_k=4)
    rng = np.random.default_rng(5)
    memory, queries = rng.standard_normal((12, 6)), rng.standard_normal((3, 6))
    module.readout.set_memory(torch.tensor(memory, dtype=torch.float32))
    weights = module.readout.embedding_attention(torch.tensor(queries, dtype=torch.float32))
    profiles = rng.random((20, 12))
    expected = knn_profiles(profiles, memory, queries, k=4)  # the baseline, in numpy
    np.testing.assert_allclose(profiles @ weights.detach().numpy().T, expected, rtol=1e-5)
    assert np.all((weights > 0).sum(dim=1).numpy() <= 4)
    own = module.readout.embedding_attention(
        torch.tensor(memory[:3], dtype=torch.float32), exclude=torch.tensor([0, 1, 2])
    )
    assert torch.all(own.diagonal() == 0) and torch.allclose(own.sum(dim=1), torch.ones(3))


def test_coexpression_graph_holds_each_genes_k_most_correlated_genes_weighted_by_correlation():
    rng = np.random.default_rng(3)
    profiles = rng.standard_normal((40, 9)) + rng.standard_normal((40, 1))  # shared factor
    graph = coexpression_graph(torch.tensor(profiles, dtype=torch.float64), k=3, chunk=4)
    dense = graph.to_dense().numpy()
    correlation = np.corrcoef(profiles, rowvar=False)
    np.fill_diagonal(correlation, -np.inf)
    expected = np.zeros_like(dense)
    for gene in range(9):
        top = np.argsort(-correlation[gene])[:3]
        weights = np.clip(correlation[gene, top], 0, None) + 1e-12
        expected[gene, top] = weights / weights.sum()
    np.testing.assert_allclose(dense, expected, atol=1e-9)


def test_attention_moves_its_learned_share_one_step_along_the_coexpression_graph():
    torch.manual_seed(0)
    module = small_attention_module(n_memory=6)
    module.readout.set_memory(torch.randn(6, 4))
    graph = coexpression_graph(torch.rand(30, 6), k=2)
    genes = torch.randn(6, 4)
    plain = module.readout.embedding_attention(genes).detach().numpy()
    mixed = module.readout.attention(genes, coexpression=graph).detach().numpy()
    # the mix starts at 1/2
    np.testing.assert_allclose(
        mixed, 0.5 * plain + 0.5 * plain @ graph.to_dense().numpy(), rtol=1e-5
    )
    # leave-one-gene-out: the step along the graph must not lead back to the gene itself
    own = torch.arange(6)
    masked = module.readout.attention(genes, own, graph)
    assert torch.all(masked.diagonal() == 0)
    torch.testing.assert_close(masked.sum(dim=1), torch.ones(6))


def test_attention_readout_starts_as_a_cosine_softmax_knn_and_estimates_a_missing_memory():
    torch.manual_seed(0)
    module = small_attention_module(n_memory=5).eval()
    memory = torch.randn(5, 4)
    module.readout.set_memory(memory)
    tokens = module.spot_tokens(torch.rand(12, 2) * 2 - 1, None, group_size=64)
    profiles = torch.rand(12, 5) * 3
    genes = torch.randn(3, 4)
    base, full = module.readout_pair(tokens, genes, profiles)
    # level 0 and gain 1 at the start: the attention-weighted mean of the memory profiles
    graph = coexpression_graph(profiles, module.readout.coexpression_neighbours)
    weights = module.readout.attention(genes, coexpression=graph)
    torch.testing.assert_close(full, positive_output(profiles @ weights.T))
    torch.testing.assert_close(
        base, positive_output(module.readout.base(module.head(tokens), genes))
    )
    # a slide without the memory genes measured: the base readout predicts their profiles
    estimate = module.memory_estimate(tokens)
    torch.testing.assert_close(estimate, module.readout_pair(tokens, memory, profiles)[0])
    torch.testing.assert_close(
        module.readout_pair(tokens, genes)[1], module.readout_pair(tokens, genes, estimate)[1]
    )


def test_attention_readout_gives_sub_spots_the_base_readouts_detail_around_the_spot_value():
    torch.manual_seed(0)
    module = small_attention_module(n_memory=5).eval()
    module.readout.set_memory(torch.randn(5, 4))
    tokens = module.spot_tokens(torch.rand(12, 2) * 2 - 1, None, group_size=64)  # 3 spots x 4
    profiles, genes = torch.rand(3, 5) * 3, torch.randn(2, 4)
    features = module.head(tokens)
    base, full = module.readout(features, genes, profiles, rows_per_spot=4)
    graph = module.readout.coexpression(profiles)
    spot_value = module.readout.context(genes, profiles, None, graph).repeat_interleave(4, dim=0)
    torch.testing.assert_close((full - spot_value).view(3, 4, 2).mean(dim=1), torch.zeros(3, 2))
    detail = base.view(3, 4, 2) - base.view(3, 4, 2).mean(dim=1, keepdim=True)
    torch.testing.assert_close(full - spot_value, detail.reshape(12, 2))

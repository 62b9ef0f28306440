"""The top-K correlation graph equals a dense numpy reference and handles several corpora."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from stinfer.coexpression.graph import (
    CorrelationGraphConfig,
    as_corpora,
    build_correlation_graph,
    edge_correlations,
    gene_svd_features,
    sparse_column_ranks,
    standardise_corpora,
)
from stinfer.coexpression.synthetic import planted_module_corpus
from stinfer.errors import InputError


def _counts(n_cells: int, n_genes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n_cells, 4))
    loadings = rng.standard_normal((4, n_genes)) * 0.6
    return rng.poisson(np.exp(factors @ loadings - 0.3)).astype(np.float32)


def _anndata(counts: np.ndarray, genes: list[str], name: str) -> ad.AnnData:
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    adata.uns["stinfer"] = {"sample_id": name}
    return adata


def _log1p_cp10k(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


def _dense_top_k(correlation: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    keys = correlation.copy()
    np.fill_diagonal(keys, -np.inf)
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(correlation, order, axis=1)


@pytest.mark.parametrize("block_size", [7, 64, 1000])
def test_pearson_top_k_equals_dense_numpy_reference(block_size):
    counts = _counts(400, 90, seed=1)
    genes = [f"g{i}" for i in range(90)]
    config = CorrelationGraphConfig(top_k=8, block_size=block_size, min_cells=1)
    graph = build_correlation_graph([_anndata(counts, genes, "a")], config)

    reference = np.corrcoef(_log1p_cp10k(counts).T)
    partners, values = _dense_top_k(reference, 8)
    assert graph.n_edges == 90 * 8
    assert list(graph.gene_names) == genes
    got_partners = graph.partner.reshape(90, 8)
    assert all(set(a) == set(b) for a, b in zip(got_partners, partners, strict=True)), (
        "partner sets differ from the dense reference"
    )
    np.testing.assert_allclose(graph.correlation.reshape(90, 8), values, atol=2e-5)
    np.testing.assert_array_equal(graph.gene, np.repeat(np.arange(90), 8))
    assert np.all(np.diff(graph.correlation.reshape(90, 8), axis=1) <= 1e-7), "best partner first"


def test_spearman_and_absolute_ranking_match_dense_reference():
    counts = _counts(300, 40, seed=2)
    normalised = counts / counts.sum(axis=1, keepdims=True)
    reference = stats.spearmanr(normalised).statistic
    config = CorrelationGraphConfig(
        top_k=5, method="spearman", rank_by="absolute", block_size=16, min_cells=1
    )
    graph = build_correlation_graph([_anndata(counts, [f"g{i}" for i in range(40)], "a")], config)
    keys = np.abs(reference)
    np.fill_diagonal(keys, -np.inf)
    expected = np.argsort(-keys, axis=1)[:, :5]
    got = graph.partner.reshape(40, 5)
    assert all(set(a) == set(b) for a, b in zip(got, expected, strict=True))
    # ranks are taken on float32 log1p-CP10k values, where a few near-ties of the float64
    # reference become exact ties: agreement to 1e-3, not to float32 round-off
    np.testing.assert_allclose(
        graph.correlation.reshape(40, 5), np.take_along_axis(reference, got, axis=1), atol=1e-3
    )


def test_sparse_column_ranks_are_shifted_average_ranks():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, (50, 12)).astype(np.float32)
    dense[:, 3] = 0
    matrix = sp.csc_matrix(dense)
    matrix.eliminate_zeros()
    ranks = sparse_column_ranks(matrix, block_size=5).toarray()
    expected = stats.rankdata(dense, axis=0)
    zero_rank = np.where(dense == 0, expected, np.inf).min(axis=0)
    shifted = expected - np.where(np.isfinite(zero_rank), zero_rank, 0)
    np.testing.assert_allclose(ranks, np.where(dense == 0, 0, shifted), atol=1e-5)


def test_several_corpora_average_their_correlations_on_shared_genes():
    genes = [f"g{i}" for i in range(30)]
    first, second = _counts(200, 30, seed=3), _counts(300, 30, seed=4)
    corpora = [_anndata(first, genes, "a"), _anndata(second[:, ::-1], genes[::-1], "b")]
    for combine, weights in (("mean", (1, 1)), ("cells", (200, 300))):
        config = CorrelationGraphConfig(top_k=29, combine=combine, min_cells=1, block_size=8)
        graph = build_correlation_graph(corpora, config)
        per_corpus = [np.corrcoef(_log1p_cp10k(c).T) for c in (first, second)]
        expected = (weights[0] * per_corpus[0] + weights[1] * per_corpus[1]) / sum(weights)
        dense = graph.to_sparse().toarray()
        off_diagonal = ~np.eye(30, dtype=bool)
        np.testing.assert_allclose(dense[off_diagonal], expected[off_diagonal], atol=3e-5)


def test_outer_join_uses_only_corpora_that_measure_both_genes():
    first, second = _counts(250, 12, seed=5), _counts(250, 12, seed=6)
    genes_a = [f"g{i}" for i in range(12)]
    genes_b = [f"g{i}" for i in range(4, 12)] + ["x0", "x1", "x2", "x3"]
    corpora = [_anndata(first, genes_a, "a"), _anndata(second, genes_b, "b")]
    config = CorrelationGraphConfig(top_k=15, gene_join="outer", min_cells=1)
    graph = build_correlation_graph(corpora, config)
    assert list(graph.gene_names) == [*genes_a, "x0", "x1", "x2", "x3"]
    corr_a = np.corrcoef(_log1p_cp10k(first).T)
    corr_b = np.corrcoef(_log1p_cp10k(second).T)
    dense = graph.to_sparse().toarray()
    index = graph.gene_names.get_loc
    # g0 only in a; x0 only in b; g5 in both
    assert dense[index("g0"), index("g1")] == pytest.approx(corr_a[0, 1], abs=3e-5)
    assert dense[index("x0"), index("x1")] == pytest.approx(corr_b[8, 9], abs=3e-5)
    both = (corr_a[5, 6] + corr_b[1, 2]) / 2
    assert dense[index("g5"), index("g6")] == pytest.approx(both, abs=3e-5)
    # g0 and x0 share no corpus: never an edge, and g0 has only its 11 measurable partners
    assert dense[index("g0"), index("x0")] == 0
    assert (graph.gene == index("g0")).sum() == 11


def test_inner_join_keeps_shared_genes_and_min_cells_drops_rare_genes():
    counts = _counts(100, 6, seed=7)
    counts[:, 5] = 0
    counts[:3, 5] = 1
    corpora = [
        _anndata(counts, ["a", "b", "c", "d", "e", "rare"], "one"),
        _anndata(counts[:, :4], ["a", "b", "c", "d"], "two"),
    ]
    graph = build_correlation_graph(corpora, CorrelationGraphConfig(top_k=2, min_cells=1))
    assert list(graph.gene_names) == ["a", "b", "c", "d"]
    graph = build_correlation_graph(corpora[:1], CorrelationGraphConfig(top_k=2, min_cells=5))
    assert "rare" not in graph.gene_names


def test_edge_correlations_and_svd_features_agree_with_the_graph():
    adata, _ = planted_module_corpus(n_cells=600, n_modules=3, genes_per_module=10, seed=1)
    config = CorrelationGraphConfig(top_k=6, block_size=7, min_cells=1)
    standardised = standardise_corpora(as_corpora([adata]), config)
    graph = build_correlation_graph(None, config, standardised=standardised)
    gathered = edge_correlations(standardised, graph.gene, graph.partner, block_size=7)
    np.testing.assert_allclose(gathered, graph.correlation, atol=1e-6)
    features = gene_svd_features(standardised, n_components=30, seed=0)
    full = np.corrcoef(_log1p_cp10k(adata.X.toarray()).T)
    np.testing.assert_allclose(features @ features.T, full, atol=1e-3)


def test_raw_counts_are_required_and_genes_must_be_unique():
    normalised = _anndata(np.array([[0.5, 1.0], [2.0, 0.1]], dtype=np.float32), ["a", "b"], "n")
    with pytest.raises(InputError, match="non-integer"):
        build_correlation_graph([normalised])
    duplicated = _anndata(np.ones((3, 2), dtype=np.float32), ["a", "a"], "d")
    with pytest.raises(InputError, match="more than once"):
        build_correlation_graph([duplicated])
    with pytest.raises(InputError, match="top_k"):
        CorrelationGraphConfig(top_k=0)

"""The expression metrics match their references (scipy, closed forms, docs/DESIGN.md "Metrics")."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from stinfer import metrics
from stinfer.errors import InputError
from stinfer.metrics import (
    cluster_ari,
    depth_normalise,
    evaluate_anndata,
    evaluate_expression,
    hest_pcc_top50,
    mse_log1p,
    per_gene_partial_pearson,
    per_gene_pearson,
    per_gene_spearman,
    top_variable_genes,
)


def _counts(rng: np.random.Generator, n_spots: int = 60, n_genes: int = 12) -> np.ndarray:
    return rng.poisson(rng.gamma(2.0, 2.0, size=(n_spots, n_genes))).astype(np.float64)


def _reference_depth_normalise(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True)
    out = np.zeros_like(matrix)
    nonzero = totals[:, 0] > 0
    out[nonzero] = np.log1p(matrix[nonzero] / totals[nonzero] * 1e4)
    return out


def test_pearson_and_spearman_equal_scipy_column_by_column():
    rng = np.random.default_rng(0)
    truth = _counts(rng)
    pred = truth + rng.normal(0, 2, truth.shape)
    pcc, pcc_constant = per_gene_pearson(pred, truth)
    scc, scc_constant = per_gene_spearman(pred, truth)
    for gene in range(truth.shape[1]):
        assert pcc[gene] == pytest.approx(
            stats.pearsonr(pred[:, gene], truth[:, gene])[0], abs=1e-12
        )
        assert scc[gene] == pytest.approx(
            stats.spearmanr(pred[:, gene], truth[:, gene])[0], abs=1e-12
        )
    assert not pcc_constant.any() and not scc_constant.any()


def test_partial_pearson_equals_the_closed_form_given_the_covariate():
    rng = np.random.default_rng(7)
    log_totals = rng.normal(8.0, 0.5, 80)
    truth = 0.8 * log_totals[:, None] + rng.normal(0, 0.5, (80, 6))
    pred = 0.5 * truth + 0.6 * log_totals[:, None] + rng.normal(0, 0.5, (80, 6))
    partial, constant = per_gene_partial_pearson(pred, sp.csr_matrix(truth), log_totals)
    for gene in range(6):
        r_xy = stats.pearsonr(pred[:, gene], truth[:, gene])[0]
        r_xz = stats.pearsonr(pred[:, gene], log_totals)[0]
        r_yz = stats.pearsonr(truth[:, gene], log_totals)[0]
        expected = (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))
        assert partial[gene] == pytest.approx(expected, abs=1e-10)
    assert not constant.any()
    # a constant covariate controls for nothing: the plain PCC
    plain, _ = per_gene_pearson(pred, truth)
    np.testing.assert_allclose(per_gene_partial_pearson(pred, truth, np.ones(80))[0], plain)


def test_a_depth_only_prediction_has_high_pcc_but_zero_partial_pcc():
    rng = np.random.default_rng(8)
    log_totals = np.log(rng.gamma(4.0, 1000.0, 200))
    truth = 0.7 * log_totals[:, None] + rng.normal(0, 0.3, (200, 4))
    pred = 1.5 + 0.9 * np.repeat(log_totals[:, None], 4, axis=1)  # a + b * log(total)
    assert per_gene_pearson(pred, truth)[0].min() > 0.5
    partial, constant = per_gene_partial_pearson(pred, truth, log_totals)
    np.testing.assert_array_equal(partial, 0.0)
    assert constant.all()
    with pytest.raises(InputError, match="covariate"):
        per_gene_partial_pearson(pred, truth, log_totals[:-1])


def test_sparse_input_gives_the_same_correlations():
    rng = np.random.default_rng(1)
    truth = _counts(rng)
    pred = np.abs(truth + rng.normal(0, 1, truth.shape))
    dense, _ = per_gene_pearson(pred, truth)
    sparse, _ = per_gene_pearson(pred, sp.csr_matrix(truth))
    np.testing.assert_allclose(sparse, dense, atol=1e-12)


def test_constant_genes_count_as_zero_and_are_flagged():
    rng = np.random.default_rng(2)
    truth = _counts(rng, n_genes=5)
    pred = truth + rng.normal(0, 1, truth.shape)
    truth[:, 1] = 3.0
    pred[:, 3] = 0.1  # constant prediction; 0.1 has no exact float mean
    for function in (per_gene_pearson, per_gene_spearman):
        correlation, constant = function(pred, truth)
        assert np.all(np.isfinite(correlation))
        assert correlation[1] == 0.0 and correlation[3] == 0.0
        np.testing.assert_array_equal(constant, [False, True, False, True, False])
    result = evaluate_expression(np.clip(pred, 0, None), truth)
    assert result.n_constant_genes == 2
    assert result.per_gene["constant_truth"].sum() == 1
    assert result.per_gene["constant_pred"].sum() == 1
    assert result.pcc_mean == pytest.approx(result.per_gene["pcc"].mean())
    assert result.per_gene.loc[["1", "3"], "pcc"].eq(0).all()


def test_mse_log1p_is_the_closed_form():
    rng = np.random.default_rng(3)
    truth, pred = _counts(rng), rng.uniform(0, 10, (60, 12))
    expected = np.mean((np.log1p(pred) - np.log1p(truth)) ** 2)
    assert mse_log1p(pred, truth) == pytest.approx(expected, rel=1e-12)
    assert mse_log1p(truth, truth) == 0.0


def test_log1p_metrics_reject_negative_predictions():
    truth = np.ones((4, 3))
    with pytest.raises(InputError, match="negative"):
        mse_log1p(truth - 2, truth)


def test_depth_normalise_matches_direct_formula_and_keeps_empty_spots_zero():
    rng = np.random.default_rng(4)
    counts = _counts(rng, n_spots=20, n_genes=7)
    counts[5] = 0
    expected = _reference_depth_normalise(counts)
    np.testing.assert_allclose(depth_normalise(counts), expected, rtol=1e-12)
    np.testing.assert_allclose(depth_normalise(sp.csr_matrix(counts)), expected, rtol=1e-12)
    assert np.all(depth_normalise(counts)[5] == 0)


def test_hest_pcc_uses_the_50_most_variable_normalised_truth_genes():
    rng = np.random.default_rng(5)
    truth = _counts(rng, n_spots=80, n_genes=70)
    pred = np.abs(truth + rng.normal(0, 2, truth.shape))
    normalised_truth = _reference_depth_normalise(truth)
    normalised_pred = _reference_depth_normalise(pred)
    top = np.argsort(normalised_truth.var(axis=0))[::-1][:50]
    assert set(top_variable_genes(truth)) == set(top)
    expected = np.mean(
        [stats.pearsonr(normalised_pred[:, g], normalised_truth[:, g])[0] for g in top]
    )
    assert hest_pcc_top50(pred, truth) == pytest.approx(expected, abs=1e-12)
    result = evaluate_expression(pred, truth)
    assert result.hest_pcc_top50 == pytest.approx(expected, abs=1e-12)
    assert set(np.flatnonzero(result.per_gene["hest_top50"].to_numpy())) == set(top)


def test_hest_pcc_uses_all_genes_when_fewer_than_50():
    rng = np.random.default_rng(6)
    truth = _counts(rng, n_genes=8)
    pred = np.abs(truth + rng.normal(0, 2, truth.shape))
    correlation, _ = per_gene_pearson(depth_normalise(pred), depth_normalise(truth))
    assert hest_pcc_top50(pred, truth) == pytest.approx(correlation.mean(), abs=1e-12)


def test_evaluate_expression_aggregates_and_depthnorm_metrics(monkeypatch):
    monkeypatch.setattr(metrics, "_GENE_CHUNK", 5)  # exercise chunking across gene blocks
    rng = np.random.default_rng(7)
    truth = _counts(rng, n_genes=13)
    pred = np.abs(truth + rng.normal(0, 2, truth.shape))
    result = evaluate_expression(
        pred, sp.csr_matrix(truth), gene_names=[f"g{i}" for i in range(13)]
    )
    pcc, _ = per_gene_pearson(pred, truth)
    scc, _ = per_gene_spearman(pred, truth)
    pcc_norm, _ = per_gene_pearson(
        _reference_depth_normalise(pred), _reference_depth_normalise(truth)
    )
    scc_norm, _ = per_gene_spearman(
        _reference_depth_normalise(pred), _reference_depth_normalise(truth)
    )
    np.testing.assert_allclose(result.per_gene["pcc"], pcc, atol=1e-12)
    np.testing.assert_allclose(result.per_gene["scc"], scc, atol=1e-12)
    np.testing.assert_allclose(result.per_gene["pcc_depthnorm"], pcc_norm, atol=1e-12)
    np.testing.assert_allclose(result.per_gene["scc_depthnorm"], scc_norm, atol=1e-12)
    assert result.pcc_median == pytest.approx(np.median(pcc))
    assert result.scc_median == pytest.approx(np.median(scc))
    assert result.pcc_median_depthnorm == pytest.approx(np.median(pcc_norm))
    assert result.scc_median_depthnorm == pytest.approx(np.median(scc_norm))
    assert result.pcc_mean_depthnorm == pytest.approx(np.mean(pcc_norm))
    assert result.mse == pytest.approx(mse_log1p(pred, truth), rel=1e-12)
    assert result.per_gene["mse"].mean() == pytest.approx(result.mse, rel=1e-12)
    assert (result.n_spots, result.n_genes) == truth.shape
    assert list(result.per_gene.index[:2]) == ["g0", "g1"]
    assert "per_gene" not in result.summary() and result.summary()["n_genes"] == 13


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="align them"):
        evaluate_expression(np.ones((5, 3)), np.ones((5, 4)))


def _anndata(matrix, spots, genes) -> ad.AnnData:
    return ad.AnnData(
        X=matrix, obs=pd.DataFrame(index=list(spots)), var=pd.DataFrame(index=list(genes))
    )


def test_evaluate_anndata_matches_by_name_and_drops_unshared():
    rng = np.random.default_rng(8)
    truth = _counts(rng, n_spots=30, n_genes=6)
    pred = np.abs(truth + rng.normal(0, 2, truth.shape))
    spots = [f"s{i}" for i in range(30)]
    genes = [f"g{i}" for i in range(6)]
    expected = evaluate_expression(pred[:, :5], truth[:, :5], gene_names=genes[:5])

    truth_adata = _anndata(sp.csr_matrix(truth[:, :5]), spots, genes[:5])
    truth_adata = ad.concat(
        [truth_adata, _anndata(sp.csr_matrix(np.ones((2, 5))), ["x1", "x2"], genes[:5])]
    )
    spot_order, gene_order = rng.permutation(30), rng.permutation(6)
    pred_adata = _anndata(
        pred[spot_order][:, gene_order], np.array(spots)[spot_order], np.array(genes)[gene_order]
    )
    pred_adata.layers["mean"] = pred_adata.X.copy()

    result = evaluate_anndata(pred_adata, truth_adata, layer="mean")
    assert result.per_gene.index.tolist() == genes[:5]
    pd.testing.assert_frame_equal(result.per_gene, expected.per_gene)
    assert result.pcc_median == pytest.approx(expected.pcc_median)
    assert result.n_spots == 30
    assert (result.n_genes_only_pred, result.n_genes_only_truth) == (1, 0)
    assert (result.n_spots_only_pred, result.n_spots_only_truth) == (0, 2)


def test_evaluate_anndata_without_shared_genes_names_both_sides():
    truth = _anndata(np.ones((3, 2)), ["a", "b", "c"], ["TP53", "EGFR"])
    pred = _anndata(np.ones((3, 2)), ["a", "b", "c"], ["ENSG1", "ENSG2"])
    with pytest.raises(InputError, match=r"prediction.*ENSG1.*truth.*TP53"):
        evaluate_anndata(pred, truth)


def test_cluster_ari_recovers_planted_domains():
    rng = np.random.default_rng(9)
    n_per_domain, n_genes = 60, 40
    profiles = rng.gamma(1.0, 5.0, size=(3, n_genes))
    labels = np.repeat(["L1", "L2", "WM"], n_per_domain)
    expression = rng.poisson(np.repeat(profiles, n_per_domain, axis=0)).astype(float)
    assert cluster_ari(expression, labels) > 0.9
    with_missing = labels.astype(object)
    with_missing[:5] = None
    assert cluster_ari(sp.csr_matrix(expression), with_missing, method="gmm") > 0.9

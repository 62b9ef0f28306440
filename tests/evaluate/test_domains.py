"""Spatial-domain recovery: ARI of clusters of predicted and of true expression."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from stinfer.errors import InputError
from stinfer.evaluate.domains import domain_labels, domain_recovery
from stinfer.metrics import cluster_domains, fit_domains


def _slide(n_per_domain: int = 40, n_genes: int = 12, seed: int = 0) -> ad.AnnData:
    """Three domains, each with its own marker genes: counts cluster perfectly by domain."""
    rng = np.random.default_rng(seed)
    domains = np.repeat(["a", "b", "c"], n_per_domain)
    means = np.full((len(domains), n_genes), 5.0)
    for k, name in enumerate("abc"):
        means[domains == name, 4 * k : 4 * k + 4] = 60.0
    counts = rng.poisson(means).astype(np.float32)
    slide = ad.AnnData(counts, obs=pd.DataFrame({"domain": domains}))
    slide.obs_names = [f"s{i}" for i in range(slide.n_obs)]
    slide.var_names = [f"g{j}" for j in range(n_genes)]
    return slide


def test_a_perfect_prediction_recovers_the_domains_as_well_as_the_truth():
    truth = _slide()
    scores = domain_recovery(truth.copy(), truth)
    assert scores["ari"] == pytest.approx(scores["ari_truth"])
    assert scores["ari_truth"] > 0.95
    assert scores["n_domains"] == 3 and scores["n_annotated_spots"] == truth.n_obs


def test_ari_equals_sklearn_on_the_same_clustering():
    truth = _slide(seed=4)
    rng = np.random.default_rng(1)
    prediction = truth.copy()
    prediction.X = prediction.X * rng.uniform(0.2, 3.0, size=prediction.shape).astype(np.float32)
    expected = adjusted_rand_score(
        truth.obs["domain"].to_numpy(), cluster_domains(prediction.X, 3, seed=0)
    )
    assert domain_recovery(prediction, truth, seed=0)["ari"] == pytest.approx(expected)


def test_a_structureless_prediction_scores_near_zero():
    truth = _slide(seed=2)
    rng = np.random.default_rng(0)
    noise = truth.copy()
    noise.X = rng.poisson(20.0, size=truth.shape).astype(np.float32)
    assert abs(domain_recovery(noise, truth)["ari"]) < 0.1


def test_unannotated_spots_are_left_out_and_missing_annotation_is_an_input_error():
    truth = _slide()
    truth.obs["domain"] = truth.obs["domain"].astype(object)
    truth.obs.iloc[:10, 0] = None
    truth.obs.iloc[10:15, 0] = ""
    assert domain_labels(truth, "domain").isna().sum() == 15
    assert domain_recovery(truth.copy(), truth)["n_annotated_spots"] == truth.n_obs - 15
    with pytest.raises(InputError, match="no obs\\['layer'\\]"):
        domain_recovery(truth.copy(), truth, domain_key="layer")
    assert domain_labels(truth, "layer") is None


def test_prediction_is_matched_to_the_truth_by_spot_and_gene_names():
    truth = _slide(seed=3)
    shuffled = truth[np.random.default_rng(0).permutation(truth.n_obs)].copy()
    shuffled = shuffled[:, shuffled.var_names[::-1]].copy()
    assert domain_recovery(shuffled, truth)["ari"] == pytest.approx(
        domain_recovery(truth.copy(), truth)["ari"]
    )


@pytest.fixture(scope="module")
def planted_tissue(tmp_path_factory) -> ad.AnnData:
    """A synthetic ~600-spot Visium section with 4 planted layered domains, weak markers.

    ``domain_log_fold=0.8`` (default 2.0) makes the domains hard enough that k-means on the
    PCs finds them poorly (ARI 0.16-0.44 over data seeds 0-3) while the kNN graph still does.
    """
    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections

    config = SyntheticConfig(
        n_sections=1, target_spots=600, n_genes=100, pixel_size_um=8.0, domain_log_fold=0.8
    )
    return make_synthetic_sections(tmp_path_factory.mktemp("domains"), config)[0]


def test_leiden_finds_the_requested_number_of_planted_domains(planted_tissue):
    """Measured (data seed 0): ARI 0.91 at resolution 0.375; 0.84-0.91 over clustering seeds
    0-3 and 0.73-0.98 over data seeds 0-3."""
    planted = planted_tissue.obs["domain"].to_numpy()
    clustering = fit_domains(planted_tissue.X, 4, seed=0, method="leiden")
    assert clustering.n_domains == 4 and clustering.method == "leiden"
    assert 0 < clustering.resolution < 1
    assert adjusted_rand_score(planted, clustering.labels) >= 0.8
    again = fit_domains(planted_tissue.X, 4, seed=0, method="leiden")
    np.testing.assert_array_equal(again.labels, clustering.labels)  # seeded
    for n_domains in (2, 6):
        assert fit_domains(planted_tissue.X, n_domains, method="leiden").n_domains == n_domains
    assert fit_domains(planted_tissue.X, 4, method="kmeans").resolution is None


def test_domain_recovery_with_leiden_reports_the_chosen_resolutions(planted_tissue):
    scores = domain_recovery(planted_tissue.copy(), planted_tissue, method="leiden")
    assert scores["ari"] == pytest.approx(scores["ari_truth"]) and scores["ari"] >= 0.8
    assert scores["n_clusters"] == scores["n_clusters_truth"] == scores["n_domains"] == 4
    assert scores["leiden_resolution"] == scores["leiden_resolution_truth"] > 0
    assert "leiden_resolution" not in domain_recovery(planted_tissue.copy(), planted_tissue)
    with pytest.raises(InputError, match="must be one of"):
        domain_recovery(planted_tissue.copy(), planted_tissue, method="louvain")

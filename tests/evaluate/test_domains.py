"""Spatial-domain recovery: ARI of clusters of predicted and of true expression."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from stinfer.errors import InputError
from stinfer.evaluate.domains import domain_labels, domain_recovery
from stinfer.metrics import cluster_domains


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

"""Gene-level baselines: k-NN and mean profiles against references, k by cross-validation."""

from __future__ import annotations

import numpy as np
import pytest

from stinfer.models.gene_baselines import choose_knn_k, knn_profiles, mean_profile


def test_knn_profiles_equal_a_brute_force_similarity_weighted_mean():
    rng = np.random.default_rng(0)
    targets, train_vectors, query = (
        rng.random((7, 12)),
        rng.standard_normal((12, 4)),
        rng.standard_normal((3, 4)),
    )
    out = knn_profiles(targets, train_vectors, query, k=5)
    for q in range(3):
        cosine = (
            train_vectors
            @ query[q]
            / np.linalg.norm(train_vectors, axis=1)
            / np.linalg.norm(query[q])
        )
        nearest = np.argsort(-cosine)[:5]
        weights = np.clip(cosine[nearest], 0, None) + 1e-12
        np.testing.assert_allclose(out[:, q], targets[:, nearest] @ weights / weights.sum())


def test_mean_profile_gives_every_test_gene_the_training_genes_mean():
    targets = np.arange(12, dtype=float).reshape(3, 4)
    out = mean_profile(targets, 2)
    np.testing.assert_allclose(out, [[1.5, 1.5], [5.5, 5.5], [9.5, 9.5]])


def test_knn_k_is_chosen_by_cross_validation_over_training_genes():
    rng = np.random.default_rng(1)
    modules = rng.standard_normal((200, 4))  # 200 spots, 4 modules of 25 genes
    module_of = np.repeat(np.arange(4), 25)
    targets = modules[:, module_of] + 1.0 * rng.standard_normal((200, 100))
    vectors = np.eye(4)[module_of] + 0.3 * rng.standard_normal((100, 4))
    best, scores = choose_knn_k(targets, vectors, candidates=(1, 5, 20, 80), seed=0)
    # averaging more module mates helps until the neighbours leave the module (~20 per fold)
    assert best == 20 and scores[20] > scores[1] and scores[20] > scores[80]


def test_knn_cv_scores_equal_a_brute_force_cv_in_float32_and_float64():
    rng = np.random.default_rng(2)
    targets = rng.random((30, 60))
    vectors = rng.standard_normal((60, 5))
    candidates = (3, 10, 40)
    folds = np.array_split(np.random.default_rng([0, 7]).permutation(60), 5)
    expected = {}
    for k in candidates:
        medians = []
        for fold in folds:
            inner = np.setdiff1d(np.arange(60), fold)
            pred = knn_profiles(targets[:, inner], vectors[inner], vectors[fold], k)
            pcc = [np.corrcoef(pred[:, i], targets[:, g])[0, 1] for i, g in enumerate(fold)]
            medians.append(np.median(pcc))
        expected[k] = np.mean(medians)
    for dtype in (np.float64, np.float32):
        _, scores = choose_knn_k(targets.astype(dtype), vectors, candidates, seed=0)
        for k in candidates:
            assert scores[k] == pytest.approx(expected[k], abs=1e-5)

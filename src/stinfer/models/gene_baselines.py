"""Gene-level baselines: predict a gene's spatial profile from the genes most like it.

Training-gene targets ``(S, G)`` (log1p CP10k at ``S`` spots) and gene embeddings in,
``(S, n_query)`` profiles out. They are the references CoxFormer's held-out genes protocol
(:mod:`stinfer.evaluate.held_out_genes`) compares the model with, and
:func:`choose_knn_k` also sets the ``k`` of CoxFormer's top-k gene attention
(:class:`stinfer.models.coxformer_spatial.CoxFormerSpatial`, ``attention_top_k="auto"``), which
is why they live with the models and not with the evaluation, and apart from the model
classes that wrap them (:mod:`stinfer.models.imputation_baselines`, which import
``coxformer_spatial``: one module would be an import cycle). The held-out genes protocol runs
the baselines through those classes (``create_model("gene_mean_profile", ...)``,
``create_model("gene_knn", ...)``):

- :func:`mean_profile`: every query gene gets the per-spot mean of the training genes' profiles;
- :func:`knn_profiles`: a query gene's profile is the similarity-weighted mean of the profiles
  of its ``k`` nearest training genes (cosine similarity of the embeddings, weights = the
  similarity clipped at 0);
- :func:`choose_knn_k`: that ``k``, by cross-validation over the *training* genes only
  (median PCC), never on the genes to be predicted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stinfer.metrics import per_gene_pearson

__all__ = ["KNN_CANDIDATES", "choose_knn_k", "knn_profiles", "mean_profile"]

KNN_CANDIDATES = (5, 10, 20, 50, 100, 200, 500)
"""The ``k`` tried by :func:`choose_knn_k`."""


def mean_profile(train_targets: np.ndarray, n_test: int) -> np.ndarray:
    """``(S, n_test)``: the per-spot mean of the training genes' profiles, for every test gene."""
    profile = np.asarray(train_targets, dtype=np.float64).mean(axis=1, keepdims=True)
    return np.repeat(profile, n_test, axis=1)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _nearest(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar columns, most similar first: ``(index, similarity)``,
    both ``(n_rows, k)``; one partial sort serves every smaller ``k`` (take the first ones)."""
    k = min(k, similarity.shape[1])
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(similarity, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)


def _knn_weights(index: np.ndarray, similarity: np.ndarray, k: int, n_columns: int) -> np.ndarray:
    """``(n_rows, n_columns)`` row-normalised weights on the first ``k`` of ``index`` (the
    similarity clipped at 0, plus 1e-12 so a row of non-positive similarities averages), in
    the similarity's dtype. Dense: a BLAS product with it beats a sparse one down to about 1
    weight in 40."""
    k = min(k, index.shape[1])
    weights = np.clip(similarity[:, :k], 0.0, None) + 1e-12
    weights /= weights.sum(axis=1, keepdims=True)
    dense = np.zeros((index.shape[0], n_columns), dtype=weights.dtype)
    np.put_along_axis(dense, index[:, :k], weights, axis=1)
    return dense


def knn_profiles(
    train_targets: np.ndarray,
    train_embeddings: np.ndarray,
    query_embeddings: np.ndarray,
    k: int,
) -> np.ndarray:
    """``(S, n_query)``: similarity-weighted mean profile of each query's ``k`` nearest genes."""
    similarity = _unit_rows(query_embeddings) @ _unit_rows(train_embeddings).T
    index, values = _nearest(similarity, k)
    weights = _knn_weights(index, values, k, similarity.shape[1])
    return np.asarray(train_targets, dtype=np.float64) @ weights.T


def choose_knn_k(
    train_targets: np.ndarray,
    train_embeddings: np.ndarray,
    candidates: Sequence[int] = KNN_CANDIDATES,
    n_folds: int = 5,
    seed: int = 0,
) -> tuple[int, dict[int, float]]:
    """``k`` with the best median PCC in ``n_folds``-fold CV over the training genes only.

    Returns ``(best k, {k: mean over folds of the median PCC})``; candidates larger than a
    fold's training genes are capped. Each fold sorts its queries' neighbours once, for the
    largest ``k``; the products run in ``train_targets``' dtype (float32 targets: float32
    products, half the time of float64 on a CPU).
    """
    train_targets = np.asarray(train_targets)
    if train_targets.dtype not in (np.float32, np.float64):
        train_targets = train_targets.astype(np.float64)
    n_genes = train_targets.shape[1]
    folds = np.array_split(np.random.default_rng([seed, 7]).permutation(n_genes), n_folds)
    unit = _unit_rows(train_embeddings).astype(train_targets.dtype)
    scores: dict[int, list[float]] = {int(k): [] for k in candidates}
    for fold in folds:
        inner = np.setdiff1d(np.arange(n_genes), fold)
        index, values = _nearest(unit[fold] @ unit[inner].T, max(scores))
        inner_targets, fold_targets = train_targets[:, inner], train_targets[:, fold]
        for k in scores:
            pred = inner_targets @ _knn_weights(index, values, k, len(inner)).T
            pcc, _ = per_gene_pearson(pred, fold_targets)
            scores[k].append(float(np.median(pcc)))
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    best = max(means, key=lambda k: (means[k], -k))
    return best, means

"""Spatial-domain recovery from predicted expression (STEvs Sec. 4.4 / Fig. 5, Appendix H, Table 16).

The question: do the predicted profiles carry the tissue's structure? Cluster the spots of a test
slide on their *predicted* expression into as many clusters as there are annotated domains and
score the clusters against the annotation with the adjusted Rand index (ARI); cluster the
*true* expression of the same spots the same way beside it (the paper's "RNA Counts" row), so a
model's ARI can be read against what the measured counts themselves give.

The clustering is :func:`stinfer.metrics.fit_domains` (log1p-CP10k over the gene panel -> PCA
-> k-means, a Gaussian mixture, or Leiden on the kNN graph of the PCs with its resolution
searched to give k domains), the one implementation the project has; spots without an
annotation are left out of both sides.
"""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.errors import InputError
from stinfer.io.slide_data import as_dense
from stinfer.metrics import DOMAIN_METHODS, domain_ari

__all__ = ["DOMAIN_METHODS", "domain_labels", "domain_recovery"]


def domain_labels(slide: ad.AnnData, domain_key: str) -> pd.Series | None:
    """The slide's annotation ``obs[domain_key]`` as strings (NaN kept), or ``None`` without one.

    Empty strings and the usual "unannotated" spellings (``""``, ``"nan"``, ``"NA"``) count as
    missing, so they are neither clustered nor scored.
    """
    if domain_key not in slide.obs:
        return None
    labels = slide.obs[domain_key].astype(object)
    labels = labels.where(labels.notna(), None).map(lambda v: None if v is None else str(v))
    return labels.where(~labels.isin(["", "nan", "NaN", "NA", "None"]), None)


def domain_recovery(
    prediction: ad.AnnData,
    truth: ad.AnnData,
    domain_key: str = "domain",
    method: Literal["kmeans", "gmm", "leiden"] = "kmeans",
    n_pcs: int = 30,
    seed: int = 0,
) -> dict[str, float | int]:
    """ARI of clusters of predicted and of true expression against the annotated domains.

    Parameters
    ----------
    prediction
        Predicted counts (``X``) of the test spots; matched to ``truth`` by spot and gene name.
    truth
        The test slide: raw counts in ``X`` and the annotation in ``obs[domain_key]``.
    domain_key
        The annotation column; k = the number of distinct annotated domains among these spots.
    method
        ``"kmeans"`` (STEvs Appendix H: k-means, MacQueen 1967), ``"gmm"``, or ``"leiden"``
        (scanpy's Leiden, resolution searched to give k domains).

    Returns
    -------
    dict
        ``ari`` (clusters of the prediction), ``ari_truth`` (clusters of the true counts, the
        "RNA Counts" reference of Table 16), ``n_domains``, ``n_annotated_spots``; with
        Leiden also ``leiden_resolution`` and ``leiden_resolution_truth`` (the resolutions
        chosen) and ``n_clusters``, ``n_clusters_truth`` (the domains found, k unless no
        resolution gave k).

    Raises
    ------
    InputError
        When ``truth`` has no ``obs[domain_key]``, or the prediction shares no spot or gene.
    """
    if method not in DOMAIN_METHODS:
        raise InputError(
            f"domain clustering method must be one of {DOMAIN_METHODS}, got {method!r}."
        )
    labels = domain_labels(truth, domain_key)
    if labels is None:
        raise InputError(
            f"the test slide has no obs[{domain_key!r}] annotation; domain recovery needs one "
            "(set `domains: {key: ...}` in the benchmark config, or leave it out)."
        )
    spots = truth.obs_names[truth.obs_names.isin(prediction.obs_names)]
    genes = truth.var_names[truth.var_names.isin(prediction.var_names)]
    if len(spots) == 0 or len(genes) == 0:
        raise InputError("the prediction shares no spot or no gene with the annotated truth.")
    predicted = _dense(prediction[spots, genes].X)
    observed = _dense(truth[spots, genes].X)
    labels = labels.loc[spots].to_numpy(dtype=object)
    annotated = pd.notna(labels)
    n_domains = len(set(labels[annotated]))
    ari, clustering = domain_ari(predicted, labels, n_pcs=n_pcs, seed=seed, method=method)
    ari_truth, clustering_truth = domain_ari(
        observed, labels, n_pcs=n_pcs, seed=seed, method=method
    )
    scores: dict[str, float | int] = {
        "ari": ari,
        "ari_truth": ari_truth,
        "n_domains": int(n_domains),
        "n_annotated_spots": int(annotated.sum()),
    }
    if method == "leiden":
        scores |= {
            "leiden_resolution": clustering.resolution,
            "leiden_resolution_truth": clustering_truth.resolution,
            "n_clusters": clustering.n_domains,
            "n_clusters_truth": clustering_truth.n_domains,
        }
    return scores


def _dense(matrix) -> np.ndarray:
    return np.clip(as_dense(matrix, np.float64), 0.0, None)

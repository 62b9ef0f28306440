"""Held-out genes protocol: predict measured genes the model never saw (CoxFormer Section 3).

A seeded 80/20 split of a slide's measured genes (those with an embedding, detected in enough
spots); models learn from the 80% and predict the other 20% at every spot. The slide the
models see has the test genes *removed*, so the log1p-CP10k targets (spot totals over the
remaining genes) carry nothing of them; the test truth is normalised by the same totals.

Methods, all registry models (:func:`stinfer.models.create_model`) built on the visible slide
and the training genes, trained, and asked for the test genes (log1p CP10k):

- ``mean_profile`` (``gene_mean_profile``,
  :class:`~stinfer.models.imputation_baselines.GeneMeanProfile`): every test gene gets the
  per-spot mean of the training genes' profiles;
- ``knn`` (``gene_knn``, :class:`~stinfer.models.imputation_baselines.GeneKNN`): a test gene's
  profile is the similarity-weighted mean of the profiles of its ``k`` nearest training genes
  (cosine similarity of standardised embeddings, weights = similarity clipped at 0); ``k`` is
  chosen by 5-fold cross-validation over the *training* genes only (median PCC,
  :func:`~stinfer.models.gene_baselines.choose_knn_k`), never on the test genes;
- ``coxformer`` (``coxformer_spatial``,
  :class:`~stinfer.models.coxformer_spatial.CoxFormerSpatial`);
- ``coxformer_shuffled``: the same model with the embedding table's rows permuted among genes
  (seeded): if the embeddings carry the signal, this must be worse.

Metrics (:func:`held_out_metrics`, from :mod:`stinfer.metrics`): per-gene PCC and SCC
on log1p CP10k (median, mean; constant genes count 0) and MSE = mean of
``(log1p(pred) - log1p(truth))^2`` in CP10k, i.e. the squared error in log1p CP10k.
Much of the plain PCC is sequencing depth (a prediction with no spatial information but the
spot's depth already correlates with every gene), and sparse genes dominate the median, so
two more views go beside it:

- the depth-controlled PCC ``pcc_partial_*``: per gene, the partial correlation of
  prediction and truth given the log of the visible genes' spot total (both regressed on
  ``[1, log total]``, Pearson of the residuals;
  :func:`stinfer.metrics.per_gene_partial_pearson`); a depth-only prediction scores about 0;
- ``hvg_*``: the same medians over the test genes among the ``n_top_variable`` (1,000)
  genes most variable in log1p CP10k, ranked over all the slide's measured genes before the
  split (``prediction.var["highly_variable"]``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.errors import InputError
from stinfer.io.prediction_layout import LOG1P_LAYER, annotate_log1p_cp10k
from stinfer.io.slide_data import panel_counts, spot_coordinates_px, spot_obs
from stinfer.metrics import (
    mse_log1p,
    per_gene_partial_pearson,
    per_gene_pearson,
    per_gene_spearman,
    top_variable_genes,
)
from stinfer.modalities import canonical_modality
from stinfer.models import create_model
from stinfer.models.gene_baselines import KNN_CANDIDATES
from stinfer.preprocess import normalise_log1p_cp10k

logger = logging.getLogger("stinfer")

__all__ = [
    "held_out_genes_evaluation",
    "held_out_metrics",
    "held_out_table",
    "shuffle_embeddings",
    "split_genes",
]


def split_genes(
    genes: Sequence[str], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Seeded random split of ``genes`` into (train, test); test has ``round(fraction * n)``."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    genes = [str(g) for g in genes]
    n_test = round(test_fraction * len(genes))
    if n_test < 1 or len(genes) - n_test < 2:
        raise InputError(
            f"{len(genes)} genes cannot be split with test_fraction {test_fraction}: need at "
            "least 1 test and 2 training genes."
        )
    order = np.random.default_rng(seed).permutation(len(genes))
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [genes[i] for i in train], [genes[i] for i in test]


def held_out_metrics(
    pred_log1p: np.ndarray,
    truth_log1p: np.ndarray,
    log_totals: np.ndarray | None = None,
    highly_variable: np.ndarray | Sequence[int] | None = None,
) -> dict[str, float | int]:
    """PCC/SCC (median, mean) on log1p CP10k and log1p MSE of a spots x genes prediction.

    Parameters
    ----------
    pred_log1p, truth_log1p
        ``(n_spots, n_genes)`` log1p CP10k; the prediction is clipped at 0.
    log_totals
        ``(n_spots,)`` log of each spot's total count (the depth). When given, adds the
        depth-controlled PCC (:func:`stinfer.metrics.per_gene_partial_pearson` given
        ``log_totals``): ``pcc_partial_median``, ``pcc_partial_mean``.
    highly_variable
        The genes of a highly variable subset: a ``(n_genes,)`` bool mask or column indices.
        When given, adds ``n_hvg_test_genes`` and, over that subset, ``hvg_pcc_median``,
        ``hvg_scc_median`` and ``hvg_pcc_partial_median`` (NaN when the subset is empty or,
        for the last, without ``log_totals``).

    Returns
    -------
    dict
        ``pcc_median``, ``pcc_mean``, ``scc_median``, ``scc_mean``, ``mse``,
        ``n_test_genes``, ``n_spots``, ``n_constant_genes``, and the keys above.
    """
    pred = np.clip(np.asarray(pred_log1p, dtype=np.float64), 0.0, None)
    truth = np.asarray(truth_log1p, dtype=np.float64)
    pcc, constant = per_gene_pearson(pred, truth)
    scc, _ = per_gene_spearman(pred, truth)
    metrics: dict[str, float | int] = {
        "pcc_median": float(np.median(pcc)),
        "pcc_mean": float(np.mean(pcc)),
        "scc_median": float(np.median(scc)),
        "scc_mean": float(np.mean(scc)),
        "mse": mse_log1p(np.expm1(pred), np.expm1(truth)),
        "n_test_genes": int(truth.shape[1]),
        "n_spots": int(truth.shape[0]),
        "n_constant_genes": int(constant.sum()),
    }
    partial = None
    if log_totals is not None:
        partial, _ = per_gene_partial_pearson(pred, truth, log_totals)
        metrics["pcc_partial_median"] = float(np.median(partial))
        metrics["pcc_partial_mean"] = float(np.mean(partial))
    if highly_variable is not None:
        subset = _gene_mask(highly_variable, truth.shape[1])

        def subset_median(values: np.ndarray | None) -> float:
            return (
                float(np.median(values[subset])) if values is not None and subset.any() else np.nan
            )

        metrics.update(
            hvg_pcc_median=subset_median(pcc),
            hvg_pcc_partial_median=subset_median(partial),
            hvg_scc_median=subset_median(scc),
            n_hvg_test_genes=int(subset.sum()),
        )
    return metrics


HELD_OUT_TABLE_COLUMNS = (
    "pcc_median",
    "pcc_partial_median",
    "hvg_pcc_median",
    "hvg_pcc_partial_median",
    "scc_median",
    "mse",
    "n_test_genes",
    "n_hvg_test_genes",
)
"""The columns of :func:`held_out_table`: the plain and depth-controlled medians side by side."""


def held_out_table(metrics: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per method of ``{method: held_out_metrics}``, :data:`HELD_OUT_TABLE_COLUMNS`.

    A column a method lacks (e.g. metrics computed without ``log_totals``) holds NaN.
    """
    return pd.DataFrame.from_dict(metrics, orient="index").reindex(
        columns=list(HELD_OUT_TABLE_COLUMNS)
    )


def _gene_mask(genes: np.ndarray | Sequence[int], n_genes: int) -> np.ndarray:
    """A ``(n_genes,)`` bool mask from a bool mask or column indices; InputError otherwise."""
    genes = np.asarray(genes)
    if genes.dtype == bool:
        if genes.shape != (n_genes,):
            raise InputError(
                f"the highly variable mask has shape {genes.shape} for {n_genes} genes."
            )
        return genes
    if genes.size and (genes.dtype.kind not in "iu" or genes.min() < 0 or genes.max() >= n_genes):
        raise InputError(f"highly variable genes must be column indices in [0, {n_genes}).")
    mask = np.zeros(n_genes, dtype=bool)
    mask[genes.astype(np.int64)] = True
    return mask


# --------------------------------------------------------------------------- the control
def shuffle_embeddings(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The embedding table with its rows permuted among genes (same genes, wrong vectors)."""
    order = np.random.default_rng([seed, 11]).permutation(len(table))
    return pd.DataFrame(table.to_numpy()[order], index=table.index, columns=table.columns)


# --------------------------------------------------------------------------- the protocol
def held_out_genes_evaluation(
    slide: ad.AnnData,
    gene_embeddings: Any,
    modality: str = "spatial",
    config: Any = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    genes: Sequence[str] | None = None,
    baselines: bool = True,
    shuffled: bool = True,
    image_features: np.ndarray | None = None,
    knn_candidates: Sequence[int] = KNN_CANDIDATES,
    n_top_variable: int = 1000,
) -> dict[str, Any]:
    """Run the held-out genes protocol on one slide: the model, the baselines, the control.

    Parameters
    ----------
    slide
        A slide with raw counts (``X``) and ``obsm["spatial"]`` (an image for ``image``/``fused``).
    gene_embeddings
        Anything :class:`~stinfer.models.coxformer_spatial.CoxFormerSpatial` accepts.
    modality, config
        Passed to the model (``modality``: ``spatial``, ``image`` or ``fused``, or an older name
        that :func:`stinfer.modalities.canonical_modality` accepts; ``config``: a preset name or
        a config).
    test_fraction, seed
        The seeded split of the measured genes (:func:`split_genes`); ``seed`` also seeds the
        models and the shuffled control.
    genes
        Candidate genes (default: measured genes with an embedding detected in at least
        ``config.training.min_spot_fraction`` of spots).
    baselines, shuffled
        Also run the mean-profile and k-NN baselines / the shuffled-embedding control.
    n_top_variable
        Size of the highly variable gene set whose test genes get their own metrics
        (``hvg_*``): the genes with the largest variance of log1p CP10k across spots, ranked
        over *all* the slide's measured genes before the split
        (:func:`stinfer.metrics.top_variable_genes`, totals over all genes).

    Returns
    -------
    dict
        ``metrics`` (``{method: held_out_metrics + seconds}``, the k-NN one with its chosen
        ``k`` and CV scores), ``prediction`` (AnnData spots x test genes, ``layers["log1p_cp10k"]`` =
        the model's log1p CP10k and ``X`` its expected counts with the visible genes' spot
        totals (:mod:`stinfer.io.prediction_layout`), ``layers["truth"]`` and one layer per
        baseline, log1p CP10k; ``var["highly_variable"]`` marks the test genes among the
        ``n_top_variable``), ``train_genes``,
        ``test_genes``, ``model`` (the trained model).
    """
    from stinfer.models.coxformer_spatial import (
        coxformer_spatial_config,
        embedding_table,
        measured_genes,
    )

    modality = canonical_modality(modality)
    config = coxformer_spatial_config(config, trainer={"seed": seed})
    table = embedding_table(gene_embeddings)
    if genes is None:
        genes = measured_genes(slide, table.index, config.training.min_spot_fraction)
    train_genes, test_genes = split_genes(genes, test_fraction, seed)
    most_variable = slide.var_names[top_variable_genes(slide.X, n_top_variable)]
    highly_variable = np.isin(test_genes, most_variable)
    visible = slide[:, ~slide.var_names.isin(test_genes)].copy()
    totals = np.asarray(visible.X.sum(axis=1), dtype=np.float64).ravel()
    truth = _test_truth(slide, test_genes, totals)
    log_totals = np.log(np.maximum(totals, 1.0))  # a spot with no visible count: total 1

    def scores(values: np.ndarray) -> dict[str, Any]:
        return held_out_metrics(values, truth, log_totals, highly_variable)

    logger.info(
        "held-out genes: %d training, %d test genes, %d spots, modality %s",
        len(train_genes),
        len(test_genes),
        slide.n_obs,
        modality,
    )
    metrics: dict[str, Any] = {}
    layers: dict[str, np.ndarray] = {}

    start = time.perf_counter()
    model = create_model(
        "coxformer_spatial",
        visible,
        table,
        train_genes=train_genes,
        modality=modality,
        config=config,
        image_features=image_features,
    )
    model.train()
    prediction = np.asarray(model.impute(test_genes).layers[LOG1P_LAYER], dtype=np.float64)
    metrics["coxformer"] = scores(prediction)
    metrics["coxformer"]["seconds"] = time.perf_counter() - start
    metrics["coxformer"]["best_epoch"] = model.early_stopping.best_epoch

    if baselines:
        start = time.perf_counter()
        mean_model = create_model("gene_mean_profile", visible, table, train_genes=train_genes)
        mean_model.train()
        layers["mean_profile"] = mean_model.predict_log1p(visible, test_genes)
        metrics["mean_profile"] = scores(layers["mean_profile"])
        metrics["mean_profile"]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        candidates = tuple(int(k) for k in knn_candidates)
        cv_scores = getattr(model, "knn_cv_scores", None)
        if cv_scores is not None and set(cv_scores) == set(candidates):
            # the model chose its top-k by this very CV (same genes, targets, vectors, seed)
            knn_k: int | str = max(cv_scores, key=lambda k: (cv_scores[k], -k))
        else:
            logger.info(
                "held-out genes: k-NN baseline, choosing k by 5-fold CV over %d training genes",
                len(train_genes),
            )
            knn_k = "auto"
        knn_model = create_model(
            "gene_knn",
            visible,
            table,
            train_genes=train_genes,
            k=knn_k,
            candidates=candidates,
            seed=seed,
        )
        knn_model.train()
        cv_scores = cv_scores if knn_model.cv_scores is None else knn_model.cv_scores
        layers["knn"] = knn_model.predict_log1p(visible, test_genes)
        metrics["knn"] = scores(layers["knn"])
        metrics["knn"].update(
            k=knn_model.k,
            cv_pcc_median={str(k): v for k, v in cv_scores.items()},
            seconds=time.perf_counter() - start,
        )
    if shuffled:
        logger.info(
            "held-out genes: shuffled-embedding control (the same model, embedding rows "
            "permuted among genes)"
        )
        start = time.perf_counter()
        control = create_model(
            "coxformer_spatial",
            visible,
            shuffle_embeddings(table, seed),
            train_genes=train_genes,
            modality=modality,
            config=config,
            image_features=image_features,
        )
        # its held-out predictions read the measured training genes and the attention's
        # gene-level parameters only: the spot decoder is trained where it matters
        attention_only = (
            config.module.gene_conditioning == "attention" and config.training.sub_spot_grid == 1
        )
        control.train(spot_decoder=not attention_only)
        shuffled_values = control.impute(test_genes).layers[LOG1P_LAYER]
        layers["coxformer_shuffled"] = np.asarray(shuffled_values, dtype=np.float64)
        metrics["coxformer_shuffled"] = scores(layers["coxformer_shuffled"])
        metrics["coxformer_shuffled"]["seconds"] = time.perf_counter() - start

    result = ad.AnnData(
        X=prediction.astype(np.float32),
        obs=spot_obs(slide),
        var=pd.DataFrame({"highly_variable": highly_variable}, index=pd.Index(test_genes)),
    )
    result.layers["truth"] = truth.astype(np.float32)
    for name, values in layers.items():
        result.layers[name] = np.asarray(values, dtype=np.float32)
    result.obsm["spatial"] = spot_coordinates_px(slide)
    if "stinfer" in slide.uns:
        result.uns["stinfer"] = dict(slide.uns["stinfer"])
    result.uns["coxformer_spatial"] = {
        "kind": "held_out_genes",
        "modality": modality,
        "preset": config.preset,
        "test_fraction": float(test_fraction),
        "seed": int(seed),
        "n_train_genes": len(train_genes),
        "n_top_variable": int(n_top_variable),
    }
    described = {"truth": "the measured log1p CP10k (same totals)"}
    described.update({name: f"the {name} prediction, log1p CP10k" for name in layers})
    annotate_log1p_cp10k(result, totals, visible.n_vars, layers=described)
    return {
        "metrics": metrics,
        "prediction": result,
        "train_genes": train_genes,
        "test_genes": test_genes,
        "model": model,
    }


def _test_truth(slide: ad.AnnData, genes: Sequence[str], totals: np.ndarray) -> np.ndarray:
    """log1p CP10k of the test ``genes``, divided by the visible genes' spot ``totals``."""
    block = panel_counts(slide, genes, dtype=np.float64)
    return normalise_log1p_cp10k(block, spot_totals=totals)

"""Zero-shot genes from H&E: measured genes hidden from every training slide, predicted on a test
slide from its image alone (issue 19; :mod:`stinfer.models.zero_shot` is the method).

Protocol (:func:`zero_shot_evaluation`):

1. the panel: the training slides' most variable genes (:func:`stinfer.preprocess.
   select_genes`, ``hvg``; or, ``panel_method="svg"``, their spatially variable genes as STEvs
   chooses its panel, D.1.4) that have an embedding and that the test slide measures (for the
   truth only);
2. a seeded split of the panel (:func:`~stinfer.evaluate.held_out_genes.split_genes`, 80/20):
   STEvs learns the 80% on the training slides; the 20% are never seen by any model except the
   oracle;
3. on the test slide, stripped of its counts (:func:`~stinfer.evaluate.protocols.strip_counts`),
   STEvs predicts the 80% and the CoxFormer readout the 20%
   (:func:`~stinfer.models.zero_shot.predict_unmeasured_genes`).

Methods, each scored on the 20% against the test slide's counts (:func:`stinfer.metrics.
evaluate_anndata`: raw and depth-normalised median PCC, ...), every one giving expected counts
with the same library (each spot's STEvs-predicted panel total) except the oracle:

- ``zero_shot``: the method;
- ``stevs_oracle``: STEvs trained on the full panel (it saw the 20% on the training slides: the
  ceiling, not a competitor);
- ``knn``: each held-out gene the similarity-weighted mean of its ``k`` nearest panel genes by
  embedding (:func:`~stinfer.models.gene_baselines.knn_profiles`) over the STEvs-predicted
  panel, ``k`` by cross-validation over the panel genes;
- ``mean_profile``: the mean profile of the predicted panel, for every held-out gene;
- ``zero_shot_shuffled``: the method with the embedding rows permuted among genes.
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
from stinfer.evaluate.held_out_genes import shuffle_embeddings, split_genes
from stinfer.evaluate.protocols import strip_counts
from stinfer.io.prediction_layout import LOG1P_LAYER, annotate_log1p_cp10k
from stinfer.io.slide_data import spot_obs
from stinfer.metrics import evaluate_anndata
from stinfer.models.coxformer_spatial import embedding_table, standardise_embeddings
from stinfer.models.gene_baselines import choose_knn_k, knn_profiles, mean_profile
from stinfer.models.stevs import STEvs
from stinfer.models.zero_shot import predict_unmeasured_genes
from stinfer.preprocess import select_genes

logger = logging.getLogger("stinfer")

__all__ = ["zero_shot_evaluation"]

METRIC_KEYS = ("pcc_median", "pcc_median_depthnorm", "scc_median", "pcc_mean", "mse")


def zero_shot_evaluation(
    train_slides: Sequence[ad.AnnData],
    test_slide: ad.AnnData,
    gene_embeddings: Any,
    n_panel_genes: int = 300,
    test_fraction: float = 0.2,
    seed: int = 0,
    stevs_config: Any = "fast",
    coxformer_config: Any = "fast",
    mode: str = "fused",
    panel_method: str = "hvg",
    oracle: bool = True,
    baselines: bool = True,
    shuffled: bool = True,
) -> dict[str, Any]:
    """Run the zero-shot protocol (module docstring) for one (training slides, test slide).

    Returns
    -------
    dict
        ``metrics`` (``{method: {pcc_median, pcc_median_depthnorm, scc_median, pcc_mean, mse,
        seconds}}``), ``predictions`` (``{method: AnnData}``, expected counts in ``X``),
        ``panel_genes`` (the 80% STEvs learns), ``held_out_genes`` (the 20%) and ``stevs``
        (the trained panel model).
    """
    table = embedding_table(gene_embeddings)
    if panel_method not in ("hvg", "svg"):
        raise InputError(f"panel_method must be 'hvg' or 'svg', got {panel_method!r}.")
    candidates = select_genes(list(train_slides), panel_method, n_genes=len(table.index))
    usable = [gene for gene in candidates if gene in table.index and gene in test_slide.var_names][
        :n_panel_genes
    ]
    if len(usable) < 5:
        raise InputError(
            f"only {len(usable)} variable training genes have an embedding and are measured on "
            "the test slide; the protocol needs at least 5."
        )
    panel_genes, held_out = split_genes(usable, test_fraction, seed)
    truth = test_slide[:, held_out]
    stripped = strip_counts(test_slide)
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, ad.AnnData] = {}

    def score(name: str, prediction: ad.AnnData, seconds: float) -> None:
        summary = evaluate_anndata(prediction[:, held_out], truth).summary()
        metrics[name] = {key: float(summary[key]) for key in METRIC_KEYS}
        metrics[name]["seconds"] = seconds
        predictions[name] = prediction
        logger.info(
            "zero-shot %s: median PCC %.3f raw, %.3f depth-normalised",
            name,
            metrics[name]["pcc_median"],
            metrics[name]["pcc_median_depthnorm"],
        )

    start = time.perf_counter()
    stevs = STEvs(list(train_slides), panel_genes, _seeded(stevs_config, seed))
    stevs.train()
    panel = stevs.predict(stripped, mode=mode)
    stevs_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cox = _seeded_coxformer(coxformer_config, seed)
    zero = predict_unmeasured_genes(stevs, stripped, table, held_out, mode, cox, None, panel)
    score("zero_shot", zero, stevs_seconds + time.perf_counter() - start)

    if oracle:
        start = time.perf_counter()
        full = STEvs(list(train_slides), usable, _seeded(stevs_config, seed))
        full.train()
        score("stevs_oracle", full.predict(stripped, mode=mode), time.perf_counter() - start)
    if baselines:
        panel_log1p = np.asarray(panel.layers[LOG1P_LAYER], dtype=np.float64)
        library = panel.obs["library_size"].to_numpy(dtype=np.float64)
        standardised = pd.DataFrame(standardise_embeddings(table)[0], index=table.index)
        vectors = standardised.loc[panel_genes].to_numpy()
        start = time.perf_counter()
        best_k, _ = choose_knn_k(panel_log1p.astype(np.float32), vectors, seed=seed)
        values = knn_profiles(panel_log1p, vectors, standardised.loc[held_out].to_numpy(), best_k)
        score(
            "knn",
            _log1p_prediction(values, held_out, stripped, library, len(panel_genes)),
            time.perf_counter() - start,
        )
        metrics["knn"]["k"] = best_k
        start = time.perf_counter()
        values = mean_profile(panel_log1p, len(held_out))
        score(
            "mean_profile",
            _log1p_prediction(values, held_out, stripped, library, len(panel_genes)),
            time.perf_counter() - start,
        )
    if shuffled:
        start = time.perf_counter()
        control = predict_unmeasured_genes(
            stevs, stripped, shuffle_embeddings(table, seed), held_out, mode, cox, None, panel
        )
        score("zero_shot_shuffled", control, time.perf_counter() - start)
    return {
        "metrics": metrics,
        "predictions": predictions,
        "panel_genes": panel_genes,
        "held_out_genes": held_out,
        "stevs": stevs,
    }


def _seeded(config: Any, seed: int):
    """A STEvs config (or preset name) with the trainer seeded by ``seed``."""
    import dataclasses

    from stinfer.models.stevs import resolve_config

    resolved = resolve_config(config)
    resolved = dataclasses.replace(resolved)  # never modify the caller's config
    resolved.trainer = dataclasses.replace(resolved.trainer, seed=seed)
    return resolved


def _seeded_coxformer(config: Any, seed: int):
    from stinfer.models.coxformer_spatial import coxformer_spatial_config

    return coxformer_spatial_config(config, trainer={"seed": seed})


def _log1p_prediction(
    values: np.ndarray, genes: list[str], slide: ad.AnnData, library: np.ndarray, n_panel: int
) -> ad.AnnData:
    """A baseline's log1p CP10k as a prediction with the given library (expected counts in X)."""
    prediction = ad.AnnData(
        X=np.asarray(values, dtype=np.float32),
        obs=spot_obs(slide),
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    prediction.obsm["spatial"] = np.asarray(slide.obsm["spatial"]).copy()
    return annotate_log1p_cp10k(prediction, library, n_panel)

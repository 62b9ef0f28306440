"""How good a prediction's uncertainty is: interval coverage, PIT coverage, sd vs error.

Reads a prediction written with ``predict(..., uncertainty=...)`` (layers ``predictive_mean``,
``predictive_sd``, ``lower_<pct>``/``upper_<pct>``; ``uns["stinfer"]["uncertainty"]``) and the
test slide's measured counts. Metrics (per level, pooled over spots and genes):

- ``coverage_<pct>``: fraction of measured counts inside the written interval (discrete counts
  make this at least the level for a calibrated model, see :mod:`stinfer.models.uncertainty`);
- ``pit_coverage_<pct>``: fraction of randomised PITs inside the interval's probabilities,
  the level itself for a calibrated model whatever the counts (the calibration target);
- ``width_<pct>``: mean interval width in counts (sharpness: wide intervals cover easily);
- ``sd_error_spearman``: median over genes of the Spearman correlation, across spots, between
  the predicted sd and the absolute error of the predictive mean (is the uncertainty
  informative, not just wide?).
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from stinfer.errors import InputError
from stinfer.io.slide_data import panel_counts
from stinfer.models.uncertainty import (
    interval_layer_names,
    moment_matched_theta,
    pit_coverage,
    sd_error_spearman,
)

__all__ = ["uncertainty_metrics"]


def uncertainty_metrics(prediction: ad.AnnData, truth: ad.AnnData, seed: int = 0) -> dict:
    """Coverage, PIT coverage, width and sd-error correlation of ``prediction`` on ``truth``.

    Parameters
    ----------
    prediction
        A prediction with the uncertainty layers (every spot of it must be in ``truth``).
    truth
        The test slide with raw counts of the prediction's genes.
    seed
        Seeds the PIT's randomisation.

    Returns
    -------
    dict
        The module docstring's metrics, plus ``calibrated`` and ``n_values``.
    """
    record = prediction.uns.get("stinfer", {}).get("uncertainty")
    if record is None or "predictive_sd" not in prediction.layers:
        raise InputError(
            "the prediction has no uncertainty layers: predict with --uncertainty "
            "(uncertainty=True in Python)."
        )
    missing = prediction.obs_names.difference(truth.obs_names)
    if len(missing):
        raise InputError(
            f"{len(missing)} predicted spots are not in the truth slide (e.g. {missing[0]!r})."
        )
    genes = list(prediction.var_names)
    counts = panel_counts(truth[prediction.obs_names], genes, dtype=np.float64)
    mean = np.asarray(prediction.layers["predictive_mean"], dtype=np.float64)
    sd = np.asarray(prediction.layers["predictive_sd"], dtype=np.float64)
    theta = moment_matched_theta(mean, sd * sd)
    levels = [float(level) for level in record["levels"]]
    pit_quantiles = record.get("pit_quantiles") if record.get("calibrated") else None
    result = pit_coverage(counts, mean, theta, levels, pit_quantiles, seed)
    for level in levels:
        lower_name, upper_name = interval_layer_names(level)
        lower = np.asarray(prediction.layers[lower_name], dtype=np.float64)
        upper = np.asarray(prediction.layers[upper_name], dtype=np.float64)
        percent = lower_name.removeprefix("lower_")
        # the written intervals themselves (plain coverage), not a recomputation
        result[f"coverage_{percent}"] = float(((counts >= lower) & (counts <= upper)).mean())
        result[f"width_{percent}"] = float((upper - lower).mean())
    correlation = sd_error_spearman(sd, np.abs(counts - mean))
    result["sd_error_spearman"] = (
        float(np.nanmedian(correlation)) if np.isfinite(correlation).any() else float("nan")
    )
    result["calibrated"] = bool(record.get("calibrated"))
    result["n_values"] = int(counts.size)
    return result

"""What the expression values of a prediction hold: one convention for every prediction.

Every prediction stinfer returns or writes (``stinfer predict``, ``stinfer impute``, sub-spot
super-resolution, benchmark predictions, every baseline) holds the same two representations
(``docs/DESIGN.md`` "Predictions"):

- ``X``: **expected counts** on the slide's count scale (what a count model predicts and what
  scanpy users normalise themselves: ``sc.pp.normalize_total`` + ``sc.pp.log1p``);
- ``layers["log1p_cp10k"]``: ``log1p(1e4 * X / obs["library_size"])``;
- ``obs["library_size"]``: each spot's library size, the total counts of the gene panel the
  normalisation refers to;
- ``uns["stinfer"]["expression"]``: the record of the above, with the panel named
  (``normalisation_panel``: e.g. "the 300 predicted genes" or "the measured panel of 3000
  genes"), so a reader never has to guess.

A count model (STEvs, the expression baselines) predicts ``X``; its library is the predicted
total over its genes (:func:`annotate_counts`). A model that predicts log1p CP10k (CoxFormer
imputation, the gene baselines) gets ``X`` back-transformed with the measured panel's spot
totals (:func:`annotate_log1p_cp10k`); where a spot has no counts (a counts-stripped slide),
its library is taken as 1e4, so ``X`` is CP10k there (``obs["library_size"]`` says which).
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from stinfer.errors import InputError

__all__ = [
    "EXPRESSION_KEY",
    "LIBRARY_COLUMN",
    "LOG1P_LAYER",
    "annotate_counts",
    "annotate_log1p_cp10k",
    "expected_counts",
    "expression_record",
    "log1p_cp10k_of",
]

EXPRESSION_KEY = "expression"  # uns["stinfer"][EXPRESSION_KEY]
LOG1P_LAYER = "log1p_cp10k"
LIBRARY_COLUMN = "library_size"
SCALE = 1e4  # CP10k
DEFAULT_LIBRARY = SCALE  # a spot without counts: X is CP10k there


def expression_record(panel: str, n_panel_genes: int, layers: dict[str, str] | None = None) -> dict:
    """The ``uns["stinfer"]["expression"]`` record of a prediction (all values h5ad-safe)."""
    described = {LOG1P_LAYER: f"log1p(1e4 * X / obs['{LIBRARY_COLUMN}']) (log1p CP10k)"}
    described.update(layers or {})
    return {
        "X": "expected_counts",
        "X_description": "expected counts on the slide's count scale (not normalised)",
        "layers": described,
        "library_size": f"obs/{LIBRARY_COLUMN}",
        "normalisation_panel": panel,
        "n_panel_genes": int(n_panel_genes),
    }


def log1p_cp10k_of(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
    """``log1p(1e4 * counts / library)`` row by row, float32 (a library of 0 gives 0)."""
    counts = np.clip(np.asarray(counts, dtype=np.float64), 0, None)
    library = np.asarray(library, dtype=np.float64).reshape(-1, 1)
    safe = np.where(library > 0, library, 1.0)
    return np.where(library > 0, np.log1p(SCALE * counts / safe), 0.0).astype(np.float32)


def _set_record(prediction: ad.AnnData, record: dict) -> None:
    meta = dict(prediction.uns.get("stinfer", {}))
    meta[EXPRESSION_KEY] = record
    prediction.uns["stinfer"] = meta


def annotate_counts(prediction: ad.AnnData, layers: dict[str, str] | None = None) -> ad.AnnData:
    """Complete a prediction whose ``X`` holds expected counts (STEvs, expression baselines).

    The library of each spot is its predicted total over the predicted genes; adds
    ``obs["library_size"]``, ``layers["log1p_cp10k"]`` and the record. ``layers`` describes
    any other layer the caller sets (name -> what it holds). Modifies and returns
    ``prediction`` (a fresh AnnData the caller built).
    """
    counts = np.asarray(prediction.X, dtype=np.float64)
    library = np.clip(counts, 0, None).sum(axis=1)
    prediction.obs[LIBRARY_COLUMN] = library.astype(np.float32)
    prediction.layers[LOG1P_LAYER] = log1p_cp10k_of(counts, library)
    panel = f"the {prediction.n_vars} predicted genes"
    _set_record(prediction, expression_record(panel, prediction.n_vars, layers))
    return prediction


def annotate_log1p_cp10k(
    prediction: ad.AnnData,
    library: np.ndarray,
    n_panel_genes: int,
    layers: dict[str, str] | None = None,
) -> ad.AnnData:
    """Complete a prediction whose ``X`` holds log1p CP10k (CoxFormer, the gene baselines).

    ``library`` is each row's total counts over the measured panel the CP10k refers to
    (``n_panel_genes`` genes; 0 where unknown, then 1e4 is used). Moves the values to
    ``layers["log1p_cp10k"]`` and sets ``X = expm1(value) * library / 1e4``. Modifies and
    returns ``prediction``.
    """
    values = np.asarray(prediction.X, dtype=np.float32)
    library = np.asarray(library, dtype=np.float64).ravel()
    if library.shape[0] != prediction.n_obs:
        raise ValueError(f"library has {library.shape[0]} rows, prediction {prediction.n_obs}")
    library = np.where(library > 0, library, DEFAULT_LIBRARY)
    prediction.layers[LOG1P_LAYER] = values
    counts = np.expm1(values.astype(np.float64)).clip(min=0) * library[:, None] / SCALE
    prediction.X = counts.astype(np.float32)
    prediction.obs[LIBRARY_COLUMN] = library.astype(np.float32)
    panel = f"the measured panel of {int(n_panel_genes)} genes"
    _set_record(prediction, expression_record(panel, n_panel_genes, layers))
    return prediction


def expected_counts(prediction: ad.AnnData, name: str = "the prediction") -> Any:
    """The prediction's expected counts (``X``), refusing a file that holds something else.

    A prediction with the record holds counts in ``X``; one without it is taken as counts
    unless it says its scale is log1p CP10k (``uns["coxformer_spatial"]["scale"]`` or
    ``uns["gene_baseline"]["scale"]``, files written before the convention), which is an
    :class:`InputError`: those values cannot be scored against counts.
    """
    record = dict(prediction.uns.get("stinfer", {})).get(EXPRESSION_KEY)
    if record is not None:
        if str(record.get("X", "expected_counts")) != "expected_counts":
            raise InputError(f"{name}: X holds {record.get('X')!r}, not expected counts.")
        return prediction.X
    for key in ("coxformer_spatial", "gene_baseline"):
        if str(dict(prediction.uns.get(key, {})).get("scale", "")) == LOG1P_LAYER:
            raise InputError(
                f"{name} holds log1p CP10k in X (written by an older stinfer impute); "
                "re-run `stinfer impute` to write expected counts in X."
            )
    return prediction.X

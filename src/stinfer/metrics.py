"""Expression metrics of the STEvs/CoxFormer papers, in one place (``docs/DESIGN.md`` "Metrics").

All functions take ``(n_spots, n_genes)`` arrays of the *test* spots and work on every gene at
once: column-wise Pearson through centred matrix products, Spearman as Pearson of column
ranks. The definitions that must not drift:

- per-gene Pearson (PCC) and Spearman (SCC) between prediction and truth; a gene that is
  constant in either has no correlation and counts as **0**; aggregates are the median (the
  headline) and the mean over genes, and the number of constant genes is reported;
- ``MSE = mean over all entries of (log1p(pred) - log1p(truth))^2`` in the count scale given;
- the same PCC/SCC after depth normalisation of both sides over the evaluated gene panel
  (divide by the spot's panel total, x 1e4, log1p): correlations on raw counts are dominated
  by sequencing depth, so claims must hold on both;
- HEST-style PCC: mean Pearson over the 50 genes most variable in the depth-normalised truth,
  on depth-normalised prediction and truth.

:func:`evaluate_expression` computes everything over chunks of genes, so memory stays bounded
for large panels; :func:`evaluate_anndata` matches an AnnData prediction to its truth by spot
and gene names first.

The module sits below both :mod:`stinfer.models` (validation PCC, CoxFormer's top-k
cross-validation and region ARI) and :mod:`stinfer.evaluate` (the protocols), so models never
import the evaluation package; ``stinfer.evaluate`` re-exports its public names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from stinfer.errors import InputError
from stinfer.io.prediction_layout import expected_counts
from stinfer.io.slide_data import as_dense, slide_id
from stinfer.preprocess import normalise_log1p_cp10k

logger = logging.getLogger("stinfer")

HEST_TOP_GENES = 50
_GENE_CHUNK = 1024  # genes densified at once by evaluate_expression (bounds memory)
_SINGLE_THREAD_CLUSTERING = 2_000_000  # PCA entries below which k-means runs on one thread

Matrix = np.ndarray | sp.spmatrix

__all__ = [
    "DOMAIN_METHODS",
    "DomainClustering",
    "ExpressionMetrics",
    "cluster_ari",
    "cluster_domains",
    "count_violation",
    "depth_normalise",
    "domain_ari",
    "evaluate_anndata",
    "evaluate_expression",
    "fit_domains",
    "hest_pcc_top50",
    "mse_log1p",
    "per_gene_partial_pearson",
    "per_gene_pearson",
    "per_gene_spearman",
    "section_id",
    "section_mismatch",
    "top_variable_genes",
]


# --------------------------------------------------------------------------- input checks
def _dense(matrix: Matrix, name: str) -> np.ndarray:
    """``matrix`` as a 2-D float64 array; InputError on NaN/inf or a wrong shape."""
    array = as_dense(matrix, np.float64)
    if array.ndim != 2:
        raise InputError(f"{name} must be a 2-D spots x genes matrix, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} holds NaN or infinite values.")
    return array


def _check_pair(pred: Matrix, truth: Matrix) -> None:
    if pred.shape != truth.shape:
        raise InputError(
            f"prediction is {pred.shape[0]} x {pred.shape[1]} but truth is "
            f"{truth.shape[0]} x {truth.shape[1]} (spots x genes); align them first "
            "(evaluate_anndata matches by spot and gene names)."
        )
    if pred.shape[0] < 2:
        raise InputError(f"correlations need at least 2 test spots, got {pred.shape[0]}.")


def _values(matrix: Matrix) -> np.ndarray:
    return matrix.data if sp.issparse(matrix) else np.asarray(matrix)


def _check_nonnegative(matrix: Matrix, name: str) -> None:
    values = _values(matrix)
    if values.size and not np.all(np.isfinite(values)):
        raise InputError(f"{name} holds NaN or infinite values.")
    if values.size and values.min() < 0:
        raise InputError(
            f"{name} holds negative values (min {values.min():g}); log1p metrics need "
            "non-negative expression in count scale (clip predictions at 0 first)."
        )


# --------------------------------------------------------------------------- correlations
def _constant_columns(array: np.ndarray) -> np.ndarray:
    """True where a column holds one value only (exact test, no tolerance)."""
    return np.ptp(array, axis=0) == 0


def _column_pearson(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of matching columns, 0 where either column is constant."""
    constant = _constant_columns(pred) | _constant_columns(truth)
    pred_centred = pred - pred.mean(axis=0)
    truth_centred = truth - truth.mean(axis=0)
    covariance = np.einsum("ij,ij->j", pred_centred, truth_centred)
    scale = np.sqrt(
        np.einsum("ij,ij->j", pred_centred, pred_centred)
        * np.einsum("ij,ij->j", truth_centred, truth_centred)
    )
    correlation = np.zeros(pred.shape[1])
    np.divide(covariance, scale, out=correlation, where=~constant & (scale > 0))
    return np.clip(correlation, -1.0, 1.0), constant


def per_gene_pearson(pred: Matrix, truth: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation between prediction and truth for every gene (column).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` predicted and true expression of the same spots and genes.

    Returns
    -------
    correlation : numpy.ndarray
        ``(n_genes,)`` float64, NaN-free: a gene constant in prediction or truth gets 0.
    constant : numpy.ndarray
        ``(n_genes,)`` bool, True for those constant genes.
    """
    _check_pair(pred, truth)
    return _column_pearson(_dense(pred, "prediction"), _dense(truth, "truth"))


def per_gene_partial_pearson(
    pred: Matrix, truth: Matrix, covariate: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Partial Pearson correlation of prediction and truth for every gene, given a spot covariate.

    The depth-controlled PCC: with ``z`` the per-spot covariate (e.g. the log spot total),
    both the prediction column ``x`` and the truth column ``y`` are regressed on ``[1, z]`` by
    ordinary least squares across spots, and the correlation is the Pearson correlation of the
    residuals::

        r_xy.z = corr(x - P x, y - P y),  P = projection onto span{1, z}
               = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2) (1 - r_yz^2)).

    A prediction that carries only the covariate (``x = a + b z``) has residual 0 and scores 0,
    however high its plain PCC. One projection serves all genes (no loop over genes).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` predicted and true expression of the same spots and genes.
    covariate
        ``(n_spots,)`` the value to control for at each spot. A constant covariate removes
        the mean only, giving the plain PCC.

    Returns
    -------
    correlation : numpy.ndarray
        ``(n_genes,)`` float64, NaN-free: a gene whose residual is constant in prediction or
        truth (the covariate explains it up to rounding, relative norm below
        :data:`_NEGLIGIBLE_RESIDUAL`) gets 0, as in :func:`per_gene_pearson`.
    constant : numpy.ndarray
        ``(n_genes,)`` bool, True for those genes.
    """
    _check_pair(pred, truth)
    covariate = np.asarray(covariate, dtype=np.float64).ravel()
    if covariate.shape[0] != pred.shape[0]:
        raise InputError(
            f"the covariate has {covariate.shape[0]} values for {pred.shape[0]} spots."
        )
    if not np.all(np.isfinite(covariate)):
        raise InputError("the covariate holds NaN or infinite values (log of a zero total?).")
    covariate = covariate - covariate.mean()
    norm = float(covariate @ covariate)
    direction = covariate / np.sqrt(norm) if norm > 0 else np.zeros_like(covariate)
    return _column_pearson(
        _residual(_dense(pred, "prediction"), direction),
        _residual(_dense(truth, "truth"), direction),
    )


_NEGLIGIBLE_RESIDUAL = 1e-9  # residual norm / centred norm below which a column is constant


def _residual(array: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Columns of ``array`` minus their OLS fit on ``[1, direction]`` (``direction`` centred, unit).

    Residuals that are rounding noise (the fit explains the column) are set to exactly 0, so
    that :func:`_column_pearson` counts them as constant instead of correlating noise.
    """
    centred = array - array.mean(axis=0)
    residual = centred - np.outer(direction, direction @ centred)
    negligible = np.linalg.norm(residual, axis=0) <= _NEGLIGIBLE_RESIDUAL * np.linalg.norm(
        centred, axis=0
    )
    residual[:, negligible] = 0.0
    return residual


def per_gene_spearman(pred: Matrix, truth: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """Spearman correlation for every gene: Pearson of the column ranks (ties averaged).

    Same shapes and constant-gene rule as :func:`per_gene_pearson`; equals
    :func:`scipy.stats.spearmanr` column by column.
    """
    _check_pair(pred, truth)
    return _column_spearman(_dense(pred, "prediction"), _dense(truth, "truth"))


def _column_spearman(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _column_pearson(stats.rankdata(pred, axis=0), stats.rankdata(truth, axis=0))


def _column_squared_log_error(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-gene sum over spots of ``(log1p(pred) - log1p(truth))^2``."""
    difference = np.log1p(pred) - np.log1p(truth)
    return np.einsum("ij,ij->j", difference, difference)


def mse_log1p(pred: Matrix, truth: Matrix) -> float:
    """Mean over all entries of ``(log1p(pred) - log1p(truth))^2`` (STEvs D.2.2 MSE).

    Both sides must be non-negative and in the count scale the model was trained on.
    """
    _check_pair(pred, truth)
    _check_nonnegative(pred, "prediction")
    _check_nonnegative(truth, "truth")
    squared = _column_squared_log_error(_dense(pred, "prediction"), _dense(truth, "truth"))
    return float(squared.sum() / (pred.shape[0] * pred.shape[1]))


# --------------------------------------------------------------------------- depth normalisation
def depth_normalise(matrix: Matrix) -> np.ndarray:
    """Per-spot depth normalisation over the evaluated panel: ``log1p(x / total * 1e4)``.

    ``total`` is the spot's sum over the columns given (the gene panel), so prediction and
    truth are normalised over the same genes. Spots with total 0 stay 0. This is
    :func:`stinfer.preprocess.normalise_log1p_cp10k` on the panel, returned dense float64.

    Returns
    -------
    numpy.ndarray
        ``(n_spots, n_genes)`` float64.
    """
    _check_nonnegative(matrix, "expression")
    return _dense(normalise_log1p_cp10k(_as_float64(matrix)), "expression")


def _as_float64(matrix: Matrix) -> Matrix:
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix, dtype=np.float64)
    return np.asarray(matrix, dtype=np.float64)


def top_variable_genes(truth: Matrix, n_top: int = HEST_TOP_GENES) -> np.ndarray:
    """Column indices of the ``n_top`` genes with the largest variance of depth-normalised truth.

    Most variable first; ties keep column order. All genes when there are fewer than ``n_top``.
    The spot totals are over all columns given; the variance is computed over chunks of genes,
    so a sparse slide of any size is never densified whole.
    """
    _check_nonnegative(truth, "expression")
    truth = _column_access(truth)
    totals = np.asarray(truth.sum(axis=1), dtype=np.float64).ravel()
    variance = np.concatenate(
        [
            normalise_log1p_cp10k(
                _dense(truth[:, start : start + _GENE_CHUNK], "expression"), spot_totals=totals
            ).var(axis=0)
            for start in range(0, truth.shape[1], _GENE_CHUNK)
        ]
        or [np.zeros(0)]
    )
    return np.argsort(-variance, kind="stable")[:n_top]


def hest_pcc_top50(pred: Matrix, truth: Matrix, n_top: int = HEST_TOP_GENES) -> float:
    """HEST-benchmark PCC: mean Pearson over the ``n_top`` most variable genes.

    Both sides are depth-normalised over the panel (:func:`depth_normalise`); genes are ranked
    by the variance of the normalised truth (:func:`top_variable_genes`); constant genes
    count as 0.
    """
    _check_pair(pred, truth)
    genes = top_variable_genes(truth, n_top)
    correlation, _ = _column_pearson(
        depth_normalise(pred)[:, genes], depth_normalise(truth)[:, genes]
    )
    return float(correlation.mean())


# --------------------------------------------------------------------------- full report
@dataclass
class ExpressionMetrics:
    """Every expression metric of one evaluation (one model on one set of test spots).

    Correlation aggregates are over genes, with constant genes counted as 0
    (``n_constant_genes`` says how many: constant in truth or prediction, raw values;
    ``n_constant_genes_depthnorm`` the same after depth normalisation). ``per_gene`` is indexed
    by gene name and holds ``pcc``, ``scc``, ``pcc_depthnorm``, ``scc_depthnorm``, ``mse``
    (log1p MSE of that gene), ``constant_truth``, ``constant_pred``, ``constant_depthnorm``,
    ``hest_top50`` (one of the genes behind ``hest_pcc_top50``).

    The ``n_*_only_*`` counts say how many spots/genes :func:`evaluate_anndata` dropped
    because only one side had them (0 for :func:`evaluate_expression`).
    """

    mse: float
    pcc_median: float
    pcc_mean: float
    scc_median: float
    scc_mean: float
    pcc_median_depthnorm: float
    pcc_mean_depthnorm: float
    scc_median_depthnorm: float
    scc_mean_depthnorm: float
    hest_pcc_top50: float
    n_genes: int
    n_spots: int
    n_constant_genes: int
    n_constant_genes_depthnorm: int
    per_gene: pd.DataFrame = field(repr=False)
    n_spots_only_pred: int = 0
    n_spots_only_truth: int = 0
    n_genes_only_pred: int = 0
    n_genes_only_truth: int = 0

    def summary(self) -> dict[str, float | int]:
        """The scalar metrics as a flat dict (one row of a results table)."""
        return {
            item.name: getattr(self, item.name) for item in fields(self) if item.name != "per_gene"
        }


def evaluate_expression(
    pred: Matrix, truth: Matrix, gene_names: list[str] | pd.Index | None = None
) -> ExpressionMetrics:
    """All expression metrics of a prediction against the truth of the same spots and genes.

    Computed over chunks of genes (only a chunk is ever dense), so a sparse truth of any size
    is fine. See the module docstring for the definitions.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` non-negative expression in count scale, same spot and gene
        order; dense or sparse.
    gene_names
        Names of the genes (columns); default ``"0"``, ``"1"``, ...

    Returns
    -------
    ExpressionMetrics

    Raises
    ------
    InputError
        On a shape mismatch, fewer than 2 spots, NaN/inf or negative values.
    """
    _check_pair(pred, truth)
    _check_nonnegative(pred, "prediction")
    _check_nonnegative(truth, "truth")
    n_spots, n_genes = truth.shape
    names = [str(i) for i in range(n_genes)] if gene_names is None else [str(g) for g in gene_names]
    if len(names) != n_genes:
        raise InputError(f"{len(names)} gene names for {n_genes} genes.")
    pred, truth = _column_access(pred), _column_access(truth)
    pred_totals = np.asarray(pred.sum(axis=1), dtype=np.float64).ravel()
    truth_totals = np.asarray(truth.sum(axis=1), dtype=np.float64).ravel()

    columns: dict[str, list[np.ndarray]] = {
        key: []
        for key in (
            "pcc",
            "scc",
            "pcc_depthnorm",
            "scc_depthnorm",
            "squared_error",
            "constant_truth",
            "constant_pred",
            "constant_depthnorm",
            "truth_variance_depthnorm",
        )
    }
    for start in range(0, n_genes, _GENE_CHUNK):
        stop = min(start + _GENE_CHUNK, n_genes)
        pred_block = _dense(pred[:, start:stop], "prediction")
        truth_block = _dense(truth[:, start:stop], "truth")
        pcc, _ = _column_pearson(pred_block, truth_block)
        scc, _ = _column_spearman(pred_block, truth_block)
        columns["pcc"].append(pcc)
        columns["scc"].append(scc)
        columns["squared_error"].append(_column_squared_log_error(pred_block, truth_block))
        columns["constant_truth"].append(_constant_columns(truth_block))
        columns["constant_pred"].append(_constant_columns(pred_block))
        pred_block = normalise_log1p_cp10k(pred_block, spot_totals=pred_totals)
        truth_block = normalise_log1p_cp10k(truth_block, spot_totals=truth_totals)
        pcc, constant = _column_pearson(pred_block, truth_block)
        scc, _ = _column_spearman(pred_block, truth_block)
        columns["pcc_depthnorm"].append(pcc)
        columns["scc_depthnorm"].append(scc)
        columns["constant_depthnorm"].append(constant)
        columns["truth_variance_depthnorm"].append(truth_block.var(axis=0))

    values = {key: np.concatenate(parts) for key, parts in columns.items()}
    hest_genes = np.argsort(-values.pop("truth_variance_depthnorm"), kind="stable")[:HEST_TOP_GENES]
    hest_top50 = np.zeros(n_genes, dtype=bool)
    hest_top50[hest_genes] = True
    squared_error = values.pop("squared_error")
    per_gene = pd.DataFrame(
        {
            "pcc": values["pcc"],
            "scc": values["scc"],
            "pcc_depthnorm": values["pcc_depthnorm"],
            "scc_depthnorm": values["scc_depthnorm"],
            "mse": squared_error / n_spots,
            "constant_truth": values["constant_truth"],
            "constant_pred": values["constant_pred"],
            "constant_depthnorm": values["constant_depthnorm"],
            "hest_top50": hest_top50,
        },
        index=pd.Index(names, name="gene"),
    )
    return ExpressionMetrics(
        mse=float(squared_error.sum() / (n_spots * n_genes)),
        pcc_median=float(np.median(values["pcc"])),
        pcc_mean=float(np.mean(values["pcc"])),
        scc_median=float(np.median(values["scc"])),
        scc_mean=float(np.mean(values["scc"])),
        pcc_median_depthnorm=float(np.median(values["pcc_depthnorm"])),
        pcc_mean_depthnorm=float(np.mean(values["pcc_depthnorm"])),
        scc_median_depthnorm=float(np.median(values["scc_depthnorm"])),
        scc_mean_depthnorm=float(np.mean(values["scc_depthnorm"])),
        hest_pcc_top50=float(values["pcc_depthnorm"][hest_genes].mean()),
        n_genes=n_genes,
        n_spots=n_spots,
        n_constant_genes=int(np.sum(values["constant_truth"] | values["constant_pred"])),
        n_constant_genes_depthnorm=int(np.sum(values["constant_depthnorm"])),
        per_gene=per_gene,
    )


def _column_access(matrix: Matrix) -> Matrix:
    """CSC for sparse input (cheap column slices), float64 array otherwise."""
    if sp.issparse(matrix):
        return sp.csc_matrix(matrix, dtype=np.float64)
    return np.asarray(matrix, dtype=np.float64)


def _expression_of(adata: ad.AnnData, layer: str | None, name: str) -> Matrix:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise InputError(f"{name} has no layer {layer!r}; layers: {list(adata.layers)}.")
    return adata.layers[layer]


def section_id(adata: ad.AnnData) -> str | None:
    """The section an AnnData (a slide or a prediction of one) belongs to, or ``None``.

    ``uns["stinfer"]["sample_id"]`` (stinfer's slides and predictions carry it), else the one
    value of ``obs["sample_id"]`` when every spot has the same.
    """
    name = slide_id(adata, default="")
    if name:
        return name
    if "sample_id" in adata.obs.columns:
        values = pd.unique(adata.obs["sample_id"].astype(str))
        if len(values) == 1:
            return str(values[0])
    return None


def section_mismatch(pred_adata: ad.AnnData, truth_adata: ad.AnnData) -> str | None:
    """Why a prediction and a truth look like different sections, or ``None`` when they do not.

    They differ when both name their section (:func:`section_id`) and the names differ, or
    when they share no spot name (spot names carry the sample id, so the spots of two
    sections never share one). Scoring one section's prediction against another's counts
    gives meaningless, often plausible-looking numbers, so callers refuse it unless told.
    """
    pred_id, truth_id = section_id(pred_adata), section_id(truth_adata)
    if pred_id is not None and truth_id is not None and pred_id != truth_id:
        return f"the prediction is of section {pred_id!r} but the truth is section {truth_id!r}"
    if not truth_adata.obs_names.isin(pred_adata.obs_names).any():
        return (
            f"the prediction (section {pred_id or 'unknown'!r}, spots e.g. "
            f"{list(pred_adata.obs_names[:2])}) and the truth (section {truth_id or 'unknown'!r}, "
            f"spots e.g. {list(truth_adata.obs_names[:2])}) share no spot names"
        )
    return None


def count_violation(matrix: Matrix) -> str | None:
    """How ``matrix`` fails to be raw counts (whole non-negative numbers), or ``None``.

    E.g. ``"negative values (min -0.31)"`` or ``"non-integer values (e.g. 2.47)"``: a
    prediction (non-integer means) or a normalised matrix where raw counts belong.
    """
    values = _values(matrix)
    if values.size == 0:
        return None
    if not np.all(np.isfinite(values)):
        return "NaN or infinite values"
    if values.min() < 0:
        return f"negative values (min {values.min():g})"
    if values.dtype.kind in "biu":
        return None
    fractional = np.abs(values - np.round(values)) > 1e-6
    if fractional.any():
        return f"non-integer values (e.g. {values[fractional][0]:g})"
    return None


def _match_on_spot_ids(pred_adata: ad.AnnData, truth_adata: ad.AnnData) -> ad.AnnData:
    """``pred_adata`` renamed to the truth's spot names where ``obs["spot_id"]`` agrees.

    For a forced comparison of two sections: their spot names differ by the sample id, but
    the same array position (``spot_id``) can be paired. Without ``spot_id`` on both sides
    the prediction is returned unchanged.
    """
    if "spot_id" not in pred_adata.obs or "spot_id" not in truth_adata.obs:
        return pred_adata
    truth_names = pd.Series(
        np.asarray(truth_adata.obs_names), index=truth_adata.obs["spot_id"].astype(str).to_numpy()
    )
    truth_names = truth_names[~truth_names.index.duplicated()]
    matched = truth_names.reindex(pred_adata.obs["spot_id"].astype(str).to_numpy())
    names = np.where(matched.isna(), np.asarray(pred_adata.obs_names), matched.to_numpy())
    renamed = pred_adata.copy()
    renamed.obs_names = pd.Index(names.astype(str))
    return renamed


def evaluate_anndata(
    pred_adata: ad.AnnData,
    truth_adata: ad.AnnData,
    layer: str | None = None,
    truth_layer: str | None = None,
    force: bool = False,
) -> ExpressionMetrics:
    """:func:`evaluate_expression` of a predicted AnnData against the true one, matched by name.

    Spots are matched by ``obs_names`` and genes by ``var_names``; only the shared ones are
    evaluated (in the truth's order), and how many each side had alone is logged and stored in
    the ``n_*_only_*`` fields.

    Parameters
    ----------
    pred_adata
        Predictions (``X``, or the layer ``layer``), e.g. from a model's ``predict``. ``X``
        holds expected counts in every prediction stinfer writes
        (:mod:`stinfer.io.prediction_layout`); a file from before that convention whose
        ``X`` is log1p CP10k is refused rather than scored against counts.
    truth_adata
        The test slide: raw counts in ``X`` (or ``truth_layer``), sparse or dense.
    force
        Score a prediction of one section against the truth of another
        (:func:`section_mismatch`) instead of refusing; spots are then paired by
        ``obs["spot_id"]`` (the same array position) when both sides have it.

    Raises
    ------
    InputError
        When the prediction and the truth are of different sections (unless ``force``), or
        share no spot or no gene name (the message names both sides).
    """
    mismatch = section_mismatch(pred_adata, truth_adata)
    if mismatch is not None:
        if not force:
            raise InputError(f"{mismatch}; pass force=True to score them anyway.")
        logger.warning("scoring anyway (force): %s.", mismatch)
        pred_adata = _match_on_spot_ids(pred_adata, truth_adata)
    spots = truth_adata.obs_names[truth_adata.obs_names.isin(pred_adata.obs_names)]
    genes = truth_adata.var_names[truth_adata.var_names.isin(pred_adata.var_names)]
    if len(spots) == 0:
        raise InputError(
            f"the prediction ({pred_adata.n_obs} spots, e.g. {list(pred_adata.obs_names[:3])}) "
            f"and the truth ({truth_adata.n_obs} spots, e.g. {list(truth_adata.obs_names[:3])}) "
            "share no spot names."
        )
    if len(genes) == 0:
        raise InputError(
            f"the prediction ({pred_adata.n_vars} genes, e.g. {list(pred_adata.var_names[:3])}) "
            f"and the truth ({truth_adata.n_vars} genes, e.g. {list(truth_adata.var_names[:3])}) "
            "share no gene names."
        )
    counts = {
        "n_spots_only_pred": pred_adata.n_obs - len(spots),
        "n_spots_only_truth": truth_adata.n_obs - len(spots),
        "n_genes_only_pred": pred_adata.n_vars - len(genes),
        "n_genes_only_truth": truth_adata.n_vars - len(genes),
    }
    if any(counts.values()):
        logger.warning(
            "evaluation on %d shared spots and %d shared genes; dropped %s.",
            len(spots),
            len(genes),
            ", ".join(
                f"{key.removeprefix('n_')}={value}" for key, value in counts.items() if value
            ),
        )
    if layer is None:
        pred = expected_counts(pred_adata)
    else:
        pred = _expression_of(pred_adata, layer, "the prediction")
    truth = _expression_of(truth_adata, truth_layer, "the truth")
    pred = _take(
        pred, pred_adata.obs_names.get_indexer(spots), pred_adata.var_names.get_indexer(genes)
    )
    truth = _take(
        truth, truth_adata.obs_names.get_indexer(spots), truth_adata.var_names.get_indexer(genes)
    )
    metrics = evaluate_expression(pred, truth, gene_names=list(genes))
    for key, value in counts.items():
        setattr(metrics, key, int(value))
    return metrics


def _take(matrix: Matrix, rows: np.ndarray, columns: np.ndarray) -> Matrix:
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix)[rows][:, columns]
    return np.asarray(matrix)[np.ix_(rows, columns)]


# --------------------------------------------------------------------------- spatial domains
DOMAIN_METHODS = ("kmeans", "gmm", "leiden")
"""Clusterings :func:`fit_domains` offers: k-means, a Gaussian mixture, Leiden (scanpy)."""

LEIDEN_NEIGHBOURS = 15  # scanpy's sc.pp.neighbors default
LEIDEN_ITERATIONS = 2  # scanpy's recommended n_iterations for flavor="igraph"
LEIDEN_MAX_TRIES = 20  # Leiden runs of the resolution search


@dataclass(frozen=True)
class DomainClustering:
    """Spatial domains of spots found by :func:`fit_domains`."""

    labels: np.ndarray  # (n_spots,) int domain of each spot
    method: str  # one of DOMAIN_METHODS
    n_domains: int  # distinct labels; Leiden may fall short of the request (logged)
    resolution: float | None = None  # Leiden's chosen resolution; None for k-means and GMM


def fit_domains(
    expression: Matrix,
    n_clusters: int,
    n_pcs: int = 30,
    seed: int = 0,
    method: Literal["kmeans", "gmm", "leiden"] = "kmeans",
) -> DomainClustering:
    """Cluster spots into ``n_clusters`` domains from their (true or predicted) expression.

    log1p-CP10k over the given genes -> PCA (``n_pcs`` components, capped by the data) -> one of

    - ``"kmeans"``: k-means (``n_init=10``), STEvs Appendix H;
    - ``"gmm"``: a full-covariance Gaussian mixture (the mclust-like choice of spatial-domain
      papers);
    - ``"leiden"``: what the single-cell and spatial field does (``sc.pp.neighbors``, 15
      neighbours on the PCs, then ``sc.tl.leiden(flavor="igraph", n_iterations=2,
      directed=False)``), with the resolution found by bisection (at most
      :data:`LEIDEN_MAX_TRIES` runs: doubling from 1 until too many domains, then halving the
      bracket) so that Leiden returns ``n_clusters`` domains. When no tried resolution gives
      exactly ``n_clusters``, the closest count is kept and a warning logged.

    All are seeded by ``seed``.

    Returns
    -------
    DomainClustering
        The labels, the number of domains found and, for Leiden, the chosen resolution.
    """
    if method not in DOMAIN_METHODS:
        raise InputError(
            f"domain clustering method must be one of {DOMAIN_METHODS}, got {method!r}."
        )
    features = depth_normalise(expression)
    n_spots, n_genes = features.shape
    if not 1 <= n_clusters <= n_spots:
        raise InputError(f"n_clusters must be in [1, {n_spots}], got {n_clusters}.")
    n_components = max(1, min(n_pcs, n_spots - 1, n_genes))
    embedding = PCA(n_components=n_components, random_state=seed).fit_transform(features)
    if method == "leiden":
        labels, resolution = _leiden_domains(embedding, n_clusters, seed)
        return DomainClustering(labels, method, len(np.unique(labels)), resolution)
    if method == "kmeans":
        model = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    else:
        model = GaussianMixture(n_components=n_clusters, covariance_type="full", random_state=seed)
    # OpenMP threads cost more than they save on a few thousand spots (and stall badly on a
    # shared, oversubscribed CPU); large inputs keep sklearn's default threading.
    threads = 1 if embedding.size < _SINGLE_THREAD_CLUSTERING else None
    with threadpool_limits(limits=threads):
        labels = np.asarray(model.fit_predict(embedding))
    return DomainClustering(labels, method, len(np.unique(labels)))


def _leiden_domains(embedding: np.ndarray, n_domains: int, seed: int) -> tuple[np.ndarray, float]:
    """Leiden labels on the kNN graph of ``embedding`` at the resolution giving ``n_domains``."""
    import scanpy as sc  # deferred: scanpy is slow to import and only Leiden needs it

    from stinfer.preprocess import torch_threads_kept

    n_spots = embedding.shape[0]
    graph = ad.AnnData(
        obs=pd.DataFrame(index=pd.RangeIndex(n_spots).astype(str)),
        obsm={"X_latent": np.asarray(embedding, dtype=np.float32)},
    )
    with torch_threads_kept():
        sc.pp.neighbors(
            graph,
            n_neighbors=max(2, min(LEIDEN_NEIGHBOURS, n_spots - 1)),
            use_rep="X_latent",
            random_state=seed,
        )

    def leiden(resolution: float) -> np.ndarray:
        sc.tl.leiden(
            graph,
            resolution=resolution,
            random_state=seed,
            flavor="igraph",
            n_iterations=LEIDEN_ITERATIONS,
            directed=False,
            key_added="domain",
        )
        return graph.obs["domain"].cat.codes.to_numpy(dtype=np.int64)

    too_few, too_many = 0.0, None  # resolutions bracketing the target
    resolution = 1.0
    best: tuple[int, float, np.ndarray] | None = None
    for _ in range(LEIDEN_MAX_TRIES):
        labels = leiden(resolution)
        found = len(np.unique(labels))
        if best is None or abs(found - n_domains) < best[0]:
            best = (abs(found - n_domains), resolution, labels)
        if found == n_domains:
            break
        if found < n_domains:
            too_few = resolution
        else:
            too_many = resolution
        resolution = 2.0 * resolution if too_many is None else (too_few + too_many) / 2.0
    miss, resolution, labels = best
    if miss:
        logger.warning(
            "Leiden: no resolution in %d tries gives %d domains; kept %d at resolution %.4g.",
            LEIDEN_MAX_TRIES,
            n_domains,
            len(np.unique(labels)),
            resolution,
        )
    return labels, float(resolution)


def cluster_domains(
    expression: Matrix,
    n_clusters: int,
    n_pcs: int = 30,
    seed: int = 0,
    method: Literal["kmeans", "gmm", "leiden"] = "kmeans",
) -> np.ndarray:
    """The ``(n_spots,)`` int domain labels of :func:`fit_domains`."""
    return fit_domains(expression, n_clusters, n_pcs=n_pcs, seed=seed, method=method).labels


def domain_ari(
    expression: Matrix,
    labels: np.ndarray | pd.Series | list,
    n_clusters: int | None = None,
    n_pcs: int = 30,
    seed: int = 0,
    method: Literal["kmeans", "gmm", "leiden"] = "kmeans",
) -> tuple[float, DomainClustering]:
    """Adjusted Rand index between annotated domains and clusters of the expression.

    The domain-recovery metric: cluster the spots (:func:`fit_domains`) into as many
    clusters as there are annotated domains and compare with
    :func:`sklearn.metrics.adjusted_rand_score`. Spots without a label (NaN/None) are left out
    of both the clustering and the score (e.g. unannotated DLPFC spots).

    Parameters
    ----------
    expression
        ``(n_spots, n_genes)`` non-negative expression in count scale (truth or prediction).
    labels
        ``(n_spots,)`` annotated domain of each spot.
    n_clusters
        Number of clusters; default the number of distinct annotated domains.

    Returns
    -------
    tuple
        The ARI in [-1, 1] (1 is perfect recovery, about 0 is chance) and the clustering of
        the annotated spots (with Leiden's resolution).
    """
    labels = pd.Series(np.asarray(labels, dtype=object))
    if len(labels) != expression.shape[0]:
        raise InputError(f"{len(labels)} labels for {expression.shape[0]} spots.")
    annotated = labels.notna().to_numpy()
    if annotated.sum() < 2:
        raise InputError("cluster_ari needs at least 2 spots with a domain label.")
    if not annotated.all():
        expression = expression[np.flatnonzero(annotated)]
        labels = labels[annotated]
    if n_clusters is None:
        n_clusters = labels.nunique()
    clustering = fit_domains(expression, n_clusters, n_pcs=n_pcs, seed=seed, method=method)
    return float(adjusted_rand_score(labels.astype(str).to_numpy(), clustering.labels)), clustering


def cluster_ari(
    expression: Matrix,
    labels: np.ndarray | pd.Series | list,
    n_clusters: int | None = None,
    n_pcs: int = 30,
    seed: int = 0,
    method: Literal["kmeans", "gmm", "leiden"] = "kmeans",
) -> float:
    """The ARI of :func:`domain_ari` alone (unannotated spots left out)."""
    return domain_ari(expression, labels, n_clusters, n_pcs=n_pcs, seed=seed, method=method)[0]

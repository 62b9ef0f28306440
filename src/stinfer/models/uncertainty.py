"""Per-spot predictive uncertainty of a negative-binomial expression model, and its calibration.

STEvs decodes NB parameters from a latent whose posterior (the PoE of both experts) is a
Gaussian. The predictive distribution of a spot's count of gene ``g`` integrates the NB
likelihood over that posterior,

    p(y | spot) = E_{z ~ q(z | spot)} NB(y; m_g(z), theta_g(z)),

a mixture that :class:`MixtureMoments` summarises from ``S`` posterior samples by its mean
and variance (law of total variance):

    mean = E_s[m_s],   var = E_s[m_s + m_s^2 / theta_s] + Var_s[m_s].

The mixture is then represented by the NB with the same mean and variance
(:func:`moment_matched_theta`, a standard approximation that is exact when the posterior is
tight), whose quantiles give the central intervals (:func:`central_intervals`).

A model trained on some spots is over-confident on others (the NB dispersion is learned where
the mean was fitted). :func:`fit_calibration` corrects that on held-out *validation* spots of
the training slides, never on a test slide, in two steps:

1. one dispersion scale ``c`` shared by every gene (``var_cal = mean + c (var - mean)``,
   chosen on a log grid by the NB likelihood of the validation counts);
2. quantile recalibration of the intervals (Kuleshov, Fenner & Ermon 2018): the randomised
   probability integral transform (PIT, Czado, Gneiting & Held 2009, the version for counts)
   of every validation count is computed under the scaled predictive, and a central interval of
   nominal level ``a`` is drawn between the predictive quantiles at the PIT quantiles
   ``(1 - a) / 2`` and ``(1 + a) / 2``: where the model is over-confident, those lie further
   out than ``(1 - a) / 2`` and ``(1 + a) / 2``.

Counts are discrete, so a central interval ``[F^-1(p_lo), F^-1(p_hi)]`` holds its end points
with probability mass of their own and covers *more* than its level (at a mean of 0.3 the 50%
interval is ``[0, 0]``, which holds 74% of draws). :func:`interval_coverage` therefore reports
both the plain coverage (the fraction of counts inside the interval) and the PIT coverage (the
fraction of randomised PITs inside ``[p_lo, p_hi]``), which equals the level for a calibrated
predictive whatever the counts; the calibration target is the PIT coverage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from stinfer.errors import InputError

__all__ = [
    "DEFAULT_LEVELS",
    "DISPERSION_SCALES",
    "MixtureMoments",
    "UncertaintyConfig",
    "apply_calibration",
    "central_intervals",
    "fit_calibration",
    "interval_coverage",
    "interval_layer_names",
    "moment_matched_theta",
    "nb_log_pmf",
    "pit_coverage",
    "randomised_pit",
    "sd_error_spearman",
]

DEFAULT_LEVELS = (0.5, 0.9)
"""Central interval levels written by default (the 50% and 90% intervals)."""

DISPERSION_SCALES = tuple(float(2.0**k) for k in np.arange(-2.0, 8.01, 0.25))
"""Grid of the calibration's dispersion scale ``c`` (1/4 to 256, quarter octaves)."""

PIT_GRID = np.linspace(0.0, 1.0, 201)
"""Probabilities at which the validation PIT quantiles are stored (the recalibration map)."""

THETA_MAX = 1e8
"""Inverse dispersion standing for "no over-dispersion" (the Poisson limit)."""


@dataclass(frozen=True)
class UncertaintyConfig:
    """How predictive uncertainty is computed.

    Attributes
    ----------
    samples
        Posterior samples of the latent per spot (the Monte Carlo size of the mixture).
    levels
        Central interval levels in (0, 1); each writes a ``lower_<pct>`` and ``upper_<pct>``
        layer.
    seed
        Seeds the posterior samples (a prediction is reproducible).
    calibrated
        Apply the calibration fitted on the training slides' validation spots, when the model
        has one.
    """

    samples: int = 30
    levels: tuple[float, ...] = DEFAULT_LEVELS
    seed: int = 0
    calibrated: bool = True

    def __post_init__(self) -> None:
        if int(self.samples) < 1:
            raise InputError(f"uncertainty samples must be at least 1, got {self.samples}.")
        levels = tuple(float(level) for level in self.levels)
        if not levels or any(not 0.0 < level < 1.0 for level in levels):
            raise InputError(f"interval levels must lie in (0, 1), got {list(self.levels)}.")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "samples", int(self.samples))


def interval_layer_names(level: float) -> tuple[str, str]:
    """``("lower_<pct>", "upper_<pct>")`` for an interval level (0.9 -> ``lower_90``)."""
    percent = f"{100.0 * float(level):.4g}".replace(".", "p")
    return f"lower_{percent}", f"upper_{percent}"


# --------------------------------------------------------------------------- the predictive
class MixtureMoments:
    """Running mean and variance of the NB mixture over posterior samples.

    ``add`` one sample's decoded ``(mean, theta)`` at a time (any shape, the same each time);
    :meth:`result` gives ``E_s[m]`` and ``E_s[m + m^2 / theta] + Var_s[m]`` (law of total
    variance) in float64. Holding sums, not the samples, keeps memory at a few spots x genes
    arrays whatever the number of samples.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sum_mean: np.ndarray | float = 0.0
        self._sum_square: np.ndarray | float = 0.0
        self._sum_nb_variance: np.ndarray | float = 0.0

    def add(self, mean: np.ndarray, theta: np.ndarray) -> None:
        m = np.asarray(mean, dtype=np.float64)
        theta = np.maximum(np.asarray(theta, dtype=np.float64), 1e-8)
        self.count += 1
        self._sum_mean = self._sum_mean + m
        self._sum_square = self._sum_square + m * m
        self._sum_nb_variance = self._sum_nb_variance + m + m * m / theta

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, variance)`` of the mixture."""
        if self.count == 0:
            raise ValueError("no samples added")
        mean = self._sum_mean / self.count
        spread = np.maximum(self._sum_square / self.count - mean * mean, 0.0)
        return np.asarray(mean), np.asarray(self._sum_nb_variance / self.count + spread)


def moment_matched_theta(
    mean: np.ndarray, variance: np.ndarray, dispersion_scale: float = 1.0
) -> np.ndarray:
    """Inverse dispersion of the NB with ``mean`` and ``mean + scale * (variance - mean)``.

    An excess variance of zero or less (the Poisson limit) gives :data:`THETA_MAX`.
    """
    mean = np.asarray(mean, dtype=np.float64)
    excess = float(dispersion_scale) * (np.asarray(variance, dtype=np.float64) - mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 0, mean * mean / excess, THETA_MAX)
    return np.clip(np.nan_to_num(theta, nan=THETA_MAX), 1e-8, THETA_MAX)


def _nbinom(mean: np.ndarray, theta: np.ndarray):
    """scipy's ``nbinom`` with mean ``mean`` and inverse dispersion ``theta`` (n = theta)."""
    mean = np.maximum(np.asarray(mean, dtype=np.float64), 0.0)
    return stats.nbinom(theta, theta / (theta + mean))


def nb_log_pmf(counts: np.ndarray, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """NB log pmf (STEvs Eq. 36) in float64, elementwise; a zero mean puts all mass on 0."""
    y = np.asarray(counts, dtype=np.float64)
    mean = np.maximum(np.asarray(mean, dtype=np.float64), 1e-12)
    theta = np.asarray(theta, dtype=np.float64)
    return (
        special.gammaln(y + theta)
        - special.gammaln(theta)
        - special.gammaln(y + 1.0)
        + theta * (np.log(theta) - np.log(theta + mean))
        + special.xlogy(y, mean)
        - y * np.log(theta + mean)
    )


def central_intervals(
    mean: np.ndarray,
    theta: np.ndarray,
    levels: Sequence[float],
    pit_quantiles: np.ndarray | None = None,
) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Central predictive intervals ``{level: (lower, upper)}`` in counts (float32).

    The interval of level ``a`` runs from the NB quantile at ``p_lo`` to the one at ``p_hi``:
    ``(1 -+ a) / 2``, or, with ``pit_quantiles`` (the recalibration map of
    :func:`fit_calibration`, values at :data:`PIT_GRID`), the validation PIT's quantiles at
    those probabilities.
    """
    distribution = _nbinom(mean, theta)
    intervals = {}
    for level in levels:
        p_lo, p_hi = _interval_probabilities(level, pit_quantiles)
        lower = np.nan_to_num(distribution.ppf(p_lo), nan=0.0, posinf=0.0)
        upper = np.nan_to_num(distribution.ppf(p_hi), nan=0.0)
        intervals[float(level)] = (
            np.maximum(lower, 0.0).astype(np.float32),
            np.maximum(upper, 0.0).astype(np.float32),
        )
    return intervals


def _interval_probabilities(level: float, pit_quantiles: np.ndarray | None) -> tuple[float, float]:
    """``(p_lo, p_hi)`` of a central interval, recalibrated through ``pit_quantiles``."""
    low, high = (1.0 - float(level)) / 2.0, (1.0 + float(level)) / 2.0
    if pit_quantiles is None:
        return low, high
    quantiles = np.asarray(pit_quantiles, dtype=np.float64)
    p_lo = float(np.interp(low, PIT_GRID, quantiles))
    p_hi = float(np.interp(high, PIT_GRID, quantiles))
    eps = 1e-6
    return min(max(p_lo, eps), 1.0 - eps), min(max(p_hi, eps), 1.0 - eps)


def randomised_pit(
    counts: np.ndarray, mean: np.ndarray, theta: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Randomised PIT ``F(y - 1) + v * P(y)``, ``v ~ U(0, 1)`` seeded (Czado et al. 2009).

    Uniform on (0, 1) when the counts follow the predictive NB, discrete or not.
    """
    y = np.rint(np.asarray(counts, dtype=np.float64))
    distribution = _nbinom(mean, theta)
    below = np.where(y > 0, distribution.cdf(y - 1.0), 0.0)
    mass = np.exp(nb_log_pmf(y, mean, theta))
    v = np.random.default_rng([int(seed), 20]).random(y.shape)
    return np.clip(below + v * mass, 0.0, 1.0)


# --------------------------------------------------------------------------- calibration
def fit_calibration(
    counts: np.ndarray, mean: np.ndarray, variance: np.ndarray, seed: int = 0
) -> dict:
    """Fit the dispersion scale and the PIT recalibration map on validation spots.

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` observed counts of held-out validation spots of the training
        slides (never a test slide).
    mean, variance
        Their predictive moments (:class:`MixtureMoments`), same shape.
    seed
        Seeds the PIT's randomisation.

    Returns
    -------
    dict
        JSON-ready: ``dispersion_scale`` (the :data:`DISPERSION_SCALES` value with the lowest
        NB negative log-likelihood), ``pit_quantiles`` (the validation PIT's quantiles at
        :data:`PIT_GRID`, after the scale), ``validation_spots``, ``validation_nll`` and
        ``validation_nll_unscaled`` (mean per count), ``pit_coverage_before`` (PIT coverage of
        the uncalibrated 50% and 90% intervals on these spots).
    """
    counts = np.asarray(counts, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    if counts.shape != mean.shape or counts.shape != variance.shape or counts.size == 0:
        raise InputError(
            f"calibration needs counts and moments of one non-empty shape, got {counts.shape}, "
            f"{mean.shape}, {variance.shape}."
        )
    scores = np.array(
        [
            -nb_log_pmf(counts, mean, moment_matched_theta(mean, variance, scale)).mean()
            for scale in DISPERSION_SCALES
        ]
    )
    best = int(np.argmin(scores))
    scale = DISPERSION_SCALES[best]
    unscaled_pit = randomised_pit(counts, mean, moment_matched_theta(mean, variance), seed)
    pit = randomised_pit(counts, mean, moment_matched_theta(mean, variance, scale), seed)
    return {
        "dispersion_scale": float(scale),
        "pit_quantiles": [float(q) for q in np.quantile(pit.ravel(), PIT_GRID)],
        "validation_spots": int(counts.shape[0]),
        "validation_nll": float(scores[best]),
        "validation_nll_unscaled": float(scores[DISPERSION_SCALES.index(1.0)]),
        "pit_coverage_before": {
            str(level): float(_pit_inside(unscaled_pit, *_interval_probabilities(level, None)))
            for level in DEFAULT_LEVELS
        },
    }


def apply_calibration(
    mean: np.ndarray, variance: np.ndarray, calibration: Mapping | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(theta, pit_quantiles)`` of the predictive after ``calibration`` (None: as it is)."""
    if not calibration:
        return moment_matched_theta(mean, variance), None
    theta = moment_matched_theta(mean, variance, float(calibration["dispersion_scale"]))
    return theta, np.asarray(calibration["pit_quantiles"], dtype=np.float64)


# --------------------------------------------------------------------------- evaluation
def _pit_inside(pit: np.ndarray, p_lo: float, p_hi: float) -> float:
    return float(np.mean((pit >= p_lo) & (pit <= p_hi)))


def pit_coverage(
    counts: np.ndarray,
    mean: np.ndarray,
    theta: np.ndarray,
    levels: Sequence[float] = DEFAULT_LEVELS,
    pit_quantiles: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """``pit_coverage_<pct>`` per level: the fraction of randomised PITs of ``counts`` inside
    the interval's probabilities ``[p_lo, p_hi]`` (nominal for a calibrated predictive)."""
    pit = randomised_pit(counts, mean, theta, seed)
    return {
        f"pit_coverage_{interval_layer_names(level)[0].removeprefix('lower_')}": _pit_inside(
            pit, *_interval_probabilities(level, pit_quantiles)
        )
        for level in levels
    }


def interval_coverage(
    counts: np.ndarray,
    mean: np.ndarray,
    theta: np.ndarray,
    levels: Sequence[float] = DEFAULT_LEVELS,
    pit_quantiles: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Empirical coverage of the central intervals on observed ``counts``.

    Returns ``coverage_<pct>`` (fraction of counts inside ``[lower, upper]``, over-covers for
    discrete counts, see the module docstring) and :func:`pit_coverage` per level.
    """
    counts = np.asarray(counts, dtype=np.float64)
    result = {}
    for level, (lower, upper) in central_intervals(mean, theta, levels, pit_quantiles).items():
        percent = interval_layer_names(level)[0].removeprefix("lower_")
        result[f"coverage_{percent}"] = float(((counts >= lower) & (counts <= upper)).mean())
    return result | pit_coverage(counts, mean, theta, levels, pit_quantiles, seed)


def sd_error_spearman(sd: np.ndarray, abs_error: np.ndarray) -> np.ndarray:
    """Per-gene Spearman correlation between predicted sd and absolute error across spots.

    ``(n_spots, n_genes)`` inputs; ``(n_genes,)`` output, NaN where either column is constant.
    Positive values mean the spots the model is less sure of are the ones it gets more wrong.
    """
    sd_ranks = stats.rankdata(np.asarray(sd, dtype=np.float64), axis=0)
    error_ranks = stats.rankdata(np.asarray(abs_error, dtype=np.float64), axis=0)
    sd_ranks -= sd_ranks.mean(axis=0)
    error_ranks -= error_ranks.mean(axis=0)
    denominator = np.sqrt((sd_ranks**2).sum(axis=0) * (error_ranks**2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (sd_ranks * error_ranks).sum(axis=0) / denominator, np.nan)

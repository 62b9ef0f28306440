"""Predictive uncertainty of NB models: mixture moments, intervals, calibration, coverage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stinfer.errors import InputError
from stinfer.models.uncertainty import (
    MixtureMoments,
    UncertaintyConfig,
    apply_calibration,
    central_intervals,
    fit_calibration,
    interval_coverage,
    interval_layer_names,
    moment_matched_theta,
    nb_log_pmf,
    randomised_pit,
    sd_error_spearman,
)


def nb_draws(rng, mean, theta):
    """NB counts with mean ``mean`` and inverse dispersion ``theta`` (numpy's n, p form)."""
    return rng.negative_binomial(theta, theta / (theta + mean))


def test_mixture_moments_follow_the_law_of_total_variance():
    rng = np.random.default_rng(0)
    means = rng.gamma(1.0, 3.0, (7, 5, 4))
    thetas = rng.gamma(2.0, 1.0, (7, 5, 4))
    moments = MixtureMoments()
    for mean, theta in zip(means, thetas, strict=True):
        moments.add(mean, theta)
    mean, variance = moments.result()
    expected_variance = (means + means**2 / thetas).mean(0) + means.var(0)
    np.testing.assert_allclose(mean, means.mean(0))
    np.testing.assert_allclose(variance, expected_variance)
    # against draws from the mixture itself (one spot-gene, many draws)
    component = rng.integers(0, 7, 400_000)
    draws = nb_draws(rng, means[component, 0, 0], thetas[component, 0, 0])
    assert draws.mean() == pytest.approx(mean[0, 0], rel=0.02)
    assert draws.var() == pytest.approx(variance[0, 0], rel=0.05)


def test_one_sample_is_the_nb_itself_and_the_moment_match_recovers_theta():
    moments = MixtureMoments()
    mean, theta = np.array([[0.5, 4.0, 30.0]]), np.array([[0.7, 2.0, 11.0]])
    moments.add(mean, theta)
    m, v = moments.result()
    np.testing.assert_allclose(v, mean + mean**2 / theta)
    np.testing.assert_allclose(moment_matched_theta(m, v), theta)
    # a variance at (or below) the mean is the Poisson limit
    assert moment_matched_theta(np.array([2.0]), np.array([2.0]))[0] >= 1e7


def test_nb_log_pmf_matches_scipy():
    y = np.array([0, 1, 3, 17, 250])
    mean, theta = np.array([0.2, 1.5, 4.0, 20.0, 180.0]), np.array([0.3, 1.0, 5.0, 2.0, 9.0])
    expected = stats.nbinom.logpmf(y, theta, theta / (theta + mean))
    np.testing.assert_allclose(nb_log_pmf(y, mean, theta), expected, rtol=1e-10)


def test_central_intervals_are_scipys_nb_intervals():
    mean, theta = np.array([0.3, 2.0, 40.0]), np.array([0.5, 3.0, 8.0])
    intervals = central_intervals(mean, theta, (0.5, 0.9))
    for level, (lower, upper) in intervals.items():
        low, high = stats.nbinom.interval(level, theta, theta / (theta + mean))
        np.testing.assert_array_equal(lower, low)
        np.testing.assert_array_equal(upper, high)
    assert interval_layer_names(0.9) == ("lower_90", "upper_90")
    assert interval_layer_names(0.975) == ("lower_97p5", "upper_97p5")


def test_pit_coverage_is_nominal_for_counts_drawn_from_the_predictive():
    """The randomised PIT is uniform, so its coverage equals the level; the plain interval
    covers at least the level (its end points carry probability mass)."""
    rng = np.random.default_rng(1)
    mean = rng.gamma(0.5, 4.0, (400, 300))
    theta = rng.gamma(2.0, 1.0, (400, 300))
    counts = nb_draws(rng, mean, theta)
    pit = randomised_pit(counts, mean, theta, seed=0)
    assert stats.kstest(pit.ravel()[:20_000], "uniform").pvalue > 1e-3
    coverage = interval_coverage(counts, mean, theta, (0.5, 0.9))
    assert coverage["pit_coverage_50"] == pytest.approx(0.5, abs=0.01)
    assert coverage["pit_coverage_90"] == pytest.approx(0.9, abs=0.01)
    assert coverage["coverage_50"] >= 0.5 and coverage["coverage_90"] >= 0.9


def test_calibration_widens_an_over_confident_predictive_to_nominal_coverage():
    """Counts with 4x the predicted excess variance: the calibration finds the scale 4 on
    validation spots, and the calibrated intervals cover nominally on new spots, where the
    uncalibrated ones under-cover."""
    rng = np.random.default_rng(2)
    mean = rng.gamma(0.8, 5.0, (1000, 200))
    theta = rng.gamma(3.0, 1.0, (1000, 200))
    counts = nb_draws(rng, mean, theta / 4.0)
    variance = mean + mean**2 / theta
    calibration = fit_calibration(counts[:300], mean[:300], variance[:300])
    assert calibration["dispersion_scale"] == pytest.approx(4.0, rel=0.2)
    assert calibration["pit_coverage_before"]["0.9"] < 0.87
    assert calibration["validation_nll"] < calibration["validation_nll_unscaled"]
    new = slice(300, None)
    theta_cal, pit_quantiles = apply_calibration(mean[new], variance[new], calibration)
    after = interval_coverage(counts[new], mean[new], theta_cal, (0.5, 0.9), pit_quantiles)
    before = interval_coverage(
        counts[new], mean[new], moment_matched_theta(mean[new], variance[new])
    )
    assert after["pit_coverage_50"] == pytest.approx(0.5, abs=0.02)
    assert after["pit_coverage_90"] == pytest.approx(0.9, abs=0.02)
    assert before["pit_coverage_90"] < 0.87


def test_quantile_recalibration_fixes_a_wrong_mean_the_scale_cannot():
    """A predictive whose mean is off by a factor 2 everywhere: the PIT map moves the
    interval probabilities so validation-fitted intervals cover nominally elsewhere."""
    rng = np.random.default_rng(3)
    mean = rng.gamma(2.0, 5.0, (1200, 100))
    counts = nb_draws(rng, 2.0 * mean, np.full_like(mean, 5.0))
    variance = mean + mean**2 / 5.0
    calibration = fit_calibration(counts[:400], mean[:400], variance[:400])
    theta, quantiles = apply_calibration(mean[400:], variance[400:], calibration)
    after = interval_coverage(counts[400:], mean[400:], theta, (0.5, 0.9), quantiles)
    assert after["pit_coverage_50"] == pytest.approx(0.5, abs=0.03)
    assert after["pit_coverage_90"] == pytest.approx(0.9, abs=0.03)


def test_sd_error_spearman_is_scipys_per_gene_spearman():
    rng = np.random.default_rng(4)
    sd = rng.random((50, 6))
    error = sd + rng.normal(0, 0.3, (50, 6))
    error[:, 5] = 1.0  # a constant column has no correlation
    result = sd_error_spearman(sd, np.abs(error))
    for gene in range(5):
        assert result[gene] == pytest.approx(
            stats.spearmanr(sd[:, gene], np.abs(error[:, gene]))[0]
        )
    assert np.isnan(result[5])


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="levels"):
        UncertaintyConfig(levels=(0.5, 1.0))
    with pytest.raises(InputError, match="samples"):
        UncertaintyConfig(samples=0)
    with pytest.raises(InputError, match="one non-empty shape"):
        fit_calibration(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((2, 2)))

"""Negative binomial likelihood (STEvs Eq. 36) and the Gaussian KL (Eq. 37)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Normal, kl_divergence

from stinfer.nn.likelihoods import NegativeBinomial, kl_standard_normal

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_nb_case(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    mu = 10 ** rng.uniform(-3, 4, n)
    theta = 10 ** rng.uniform(-3, 3, n)
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(float)
    counts[:200] = 0.0
    counts[200:400] = rng.integers(1_000, 100_000, 200)  # large counts, incl. far in the tail
    return mu, theta, counts


def test_nb_log_prob_equals_scipy_nbinom_logpmf_in_float64():
    mu, theta, counts = _random_nb_case()
    expected = stats.nbinom.logpmf(counts, n=theta, p=theta / (theta + mu))
    got = NegativeBinomial(torch.from_numpy(mu), torch.from_numpy(theta)).log_prob(
        torch.from_numpy(counts)
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_nb_log_prob_is_accurate_and_finite_in_float32():
    mu, theta, counts = _random_nb_case(seed=1)
    expected = stats.nbinom.logpmf(counts, n=theta, p=theta / (theta + mu))
    got = NegativeBinomial(
        torch.tensor(mu, dtype=torch.float32), torch.tensor(theta, dtype=torch.float32)
    ).log_prob(torch.tensor(counts, dtype=torch.float32))
    assert torch.isfinite(got).all()
    # float32 loses ~eps * lgamma(k) nats to cancellation between the lgamma terms
    from scipy.special import gammaln

    tolerance = (
        1e-3 + 1e-3 * np.abs(expected) + 4e-7 * (gammaln(counts + 1) + gammaln(counts + theta))
    )
    assert (np.abs(got.numpy() - expected) <= tolerance).all()


def test_nb_is_torch_negative_binomial_with_total_count_theta_and_logits_log_mu_over_theta():
    mu = torch.tensor([0.5, 3.0, 40.0, 900.0], dtype=torch.float64)
    theta = torch.tensor([0.1, 2.0, 15.0, 0.7], dtype=torch.float64)
    counts = torch.tensor([0.0, 4.0, 37.0, 2500.0], dtype=torch.float64)
    reference = torch.distributions.NegativeBinomial(
        total_count=theta, logits=mu.log() - theta.log()
    )
    nb = NegativeBinomial(mu, theta)
    torch.testing.assert_close(nb.log_prob(counts), reference.log_prob(counts))
    torch.testing.assert_close(nb.mean, reference.mean)
    torch.testing.assert_close(nb.variance, reference.variance)


def test_nb_with_zero_mean_puts_all_mass_on_zero_and_gradients_stay_finite():
    nb = NegativeBinomial(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    log_prob = nb.log_prob(torch.tensor([0.0, 3.0]))
    assert log_prob[0].item() == 0.0
    assert log_prob[1].item() == float("-inf")

    mu = torch.tensor([1e-6, 1e3], requires_grad=True)
    theta = torch.tensor([1e-4, 1e3], requires_grad=True)
    NegativeBinomial(mu, theta).log_prob(torch.tensor([0.0, 5000.0])).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(theta.grad).all()


def test_nb_samples_have_the_nb_mean_and_variance():
    torch.manual_seed(0)
    nb = NegativeBinomial(torch.full((40000,), 6.0), torch.full((40000,), 2.0))
    samples = nb.sample()
    assert samples.mean().item() == pytest.approx(6.0, rel=0.03)
    assert samples.var().item() == pytest.approx(6.0 + 36.0 / 2.0, rel=0.06)


def test_kl_equals_eq37_and_torch_kl_divergence():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    logvar = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    eq37 = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(-1)
    reference = kl_divergence(
        Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ).sum(-1)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), eq37)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), reference)
    assert kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0

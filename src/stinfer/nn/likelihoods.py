"""Likelihoods and closed-form divergences used by the STEvs module.

- :class:`NegativeBinomial` is the count likelihood of the gene decoder in the (mean, inverse
  dispersion) parameterisation of STEvs Eq. 36 (also scVI's ``NegativeBinomial``).
- :func:`kl_standard_normal` is the analytic KL divergence of a diagonal Gaussian from N(0, I)
  (STEvs Eq. 37).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch.distributions import Distribution, Gamma, Poisson, constraints
from torch.distributions.utils import broadcast_all

__all__ = ["NegativeBinomial", "kl_standard_normal"]


class NegativeBinomial(Distribution):
    r"""Negative binomial distribution with mean ``mu`` and inverse dispersion ``theta``.

    .. math::

        P(Y = k \mid \mu, \theta) = \frac{\Gamma(k + \theta)}{\Gamma(k + 1)\Gamma(\theta)}
        \left(\frac{\theta}{\theta + \mu}\right)^{\theta}
        \left(\frac{\mu}{\theta + \mu}\right)^{k}

    (STEvs Eq. 36). ``mean = mu`` and ``variance = mu + mu**2 / theta``. This is
    ``torch.distributions.NegativeBinomial(total_count=theta, logits=log(mu) - log(theta))`` and
    ``scipy.stats.nbinom(n=theta, p=theta / (theta + mu))``.

    ``log_prob`` is written in log space with ``log1p``/``xlogy`` so that it stays finite for
    large counts, small ``theta`` and ``mu -> 0`` (where ``k = 0`` has probability one).
    In float32 the lgamma terms cancel for large counts: the absolute error is about
    ``1e-7 * lgamma(k)`` nats (~0.1 at ``k = 1e5``), harmless for training; score in float64
    when exact values matter.

    ``theta`` is floored at ``eps`` because a Softplus head can underflow to exactly 0 in float32
    (``lgamma(0)`` is infinite); values well above ``eps`` are unaffected.

    Counts need not be integers (the support is the non-negative reals, as in scVI), so scaled or
    imputed counts can be scored with the same continuous extension of the pmf.

    Parameters
    ----------
    mu
        Mean, ``>= 0``, any shape (typically ``(N, M)`` spots x genes).
    theta
        Inverse dispersion, ``> 0``, broadcastable with ``mu``.
    eps
        Floor applied to ``theta`` inside ``log_prob`` and sampling.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.

    Examples
    --------
    >>> nb = NegativeBinomial(mu=torch.tensor([2.0]), theta=torch.tensor([0.5]))
    >>> nb.log_prob(torch.tensor([3.0])).shape
    torch.Size([1])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
    }
    support = constraints.nonnegative
    has_rsample = False

    def __init__(
        self,
        mu: torch.Tensor,
        theta: torch.Tensor,
        eps: float = 1e-8,
        validate_args: bool | None = None,
    ) -> None:
        self.mu, self.theta = broadcast_all(mu, theta)
        self.eps = eps
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu.pow(2) / self._theta

    @property
    def _theta(self) -> torch.Tensor:
        return self.theta.clamp_min(self.eps)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log pmf of ``value`` (counts), same shape as the broadcast of ``value`` and ``mu``."""
        if self._validate_args:
            self._validate_sample(value)
        mu, theta = self.mu, self._theta
        return (
            torch.lgamma(value + theta)
            - torch.lgamma(theta)
            - torch.lgamma(value + 1.0)
            - theta * torch.log1p(mu / theta)
            + torch.xlogy(value, mu)
            - value * torch.log(theta + mu)
        )

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Draw counts through the Gamma-Poisson mixture (no gradient)."""
        with torch.no_grad():
            theta = self._theta
            rate = Gamma(concentration=theta, rate=theta / self.mu.clamp_min(self.eps)).sample(
                sample_shape
            )
            return Poisson(rate).sample()


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""KL divergence of ``N(mu, exp(logvar))`` from ``N(0, I)``, summed over the last dim.

    .. math::

        \mathrm{KL} = \tfrac12 \sum_j \left(\sigma_j^2 + \mu_j^2 - 1 - \log \sigma_j^2\right)

    (STEvs Eq. 37).

    Parameters
    ----------
    mu, logvar
        ``(N, D)`` posterior mean and log-variance.

    Returns
    -------
    torch.Tensor
        ``(N,)`` KL per spot.
    """
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(dim=-1)

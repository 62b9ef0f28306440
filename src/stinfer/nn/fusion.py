"""Fusion of the image and coordinate posteriors into one latent Gaussian (STEvs Sec. 3.2).

The paper's fusion is the Product of Experts (:func:`fuse_poe`, Eq. 1 and 27-30). The ablations of
Tables 3-4 replace it by a concatenation, a deterministic mean, or cross-attention; each variant is
one small module with the same call, ``fusion(image, spatial) -> (mu, logvar)``, where ``image``
and ``spatial`` are the :class:`~stinfer.nn.encoders.ModalityPosterior` of each encoder, and
:func:`build_fusion` creates one by name.

Single-modality inference (Table 5) does not go through these modules: every variant keeps the
per-modality expert heads (they are needed for the alignment loss anyway), so the image-only or
coordinate-only posterior is that modality's own expert. For PoE this is exact (the product with a
missing expert is the other expert); for the other variants the experts are trained only through
the alignment loss and the fusion input, which is why single-modality inference is a PoE feature.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from stinfer.errors import InputError
from stinfer.nn.encoders import GaussianHeads, ModalityPosterior

__all__ = [
    "FUSIONS",
    "LOGVAR_FLOOR_QUANTILE",
    "ConcatFusion",
    "CrossAttentionFusion",
    "FusionName",
    "MeanFusion",
    "PoEFusion",
    "build_fusion",
    "calibration_offsets",
    "fuse_mean",
    "fuse_poe",
    "image_expert_weight",
    "product_of_experts",
    "reparameterize",
]

FusionName = Literal["poe", "concat", "mean", "cross_attention"]

FUSIONS: tuple[str, ...] = ("poe", "concat", "mean", "cross_attention")

#: Quantile, over the training spots, of each latent dimension's log-variance below which the
#: distance-aware fusion does not let an expert go (:class:`PoEFusion`): the experts' own 1 %
#: most confident spots set how confident they may be anywhere.
LOGVAR_FLOOR_QUANTILE = 0.01


def product_of_experts(
    mus: torch.Tensor, logvars: torch.Tensor, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Product of diagonal Gaussian experts, computed in log-variance space.

    With precisions :math:`T_k = \exp(-\log\sigma_k^2)` (Eq. 27-28),

    .. math::

        \log\sigma^2 = -\operatorname{logsumexp}_k(-\log\sigma_k^2), \qquad
        \mu = \sum_k \operatorname{softmax}_k(-\log\sigma_k^2)\, \mu_k

    which equals Eq. 29-30, :math:`\sigma^2 = (\sum_k T_k)^{-1}` and
    :math:`\mu = \sigma^2 \sum_k T_k \mu_k`, without ever forming a precision or a variance: values
    and gradients stay finite for log-variances far beyond ``[-30, 30]`` in float32.

    Parameters
    ----------
    mus, logvars
        Expert means and log-variances stacked along ``dim`` (e.g. ``(K, N, D)``).
    dim
        The expert dimension.

    Returns
    -------
    tuple of torch.Tensor
        ``(mu, logvar)`` of the product, with ``dim`` removed.
    """
    neg_logvars = -logvars
    logvar = -torch.logsumexp(neg_logvars, dim=dim)
    weights = torch.softmax(neg_logvars, dim=dim)
    mu = (weights * mus).sum(dim=dim)
    return mu, logvar


def image_expert_weight(logvar_img: torch.Tensor, logvar_xy: torch.Tensor) -> torch.Tensor:
    r"""How much a spot's fused posterior mean trusts the image expert, in ``[0, 1]``.

    In the Product of Experts (Eq. 29-30) each latent dimension's fused mean weighs the image
    expert by its share of the precision, :math:`T_{img} / (T_{img} + T_{xy}) =
    \operatorname{sigmoid}(\log\sigma^2_{xy} - \log\sigma^2_{img})`; this is the mean of that
    share over the ``D`` latent dimensions. The coordinate expert's weight is one minus it.

    Parameters
    ----------
    logvar_img, logvar_xy
        ``(N, D)`` expert log-variances.

    Returns
    -------
    torch.Tensor
        ``(N,)`` image weight per spot.
    """
    return torch.sigmoid(logvar_xy.float() - logvar_img.float()).mean(dim=-1)


def fuse_poe(
    mu_img: torch.Tensor,
    logvar_img: torch.Tensor,
    mu_xy: torch.Tensor,
    logvar_xy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the image and coordinate posteriors by a Product of Experts (STEvs Eq. 1, 27-30).

    Parameters
    ----------
    mu_img, logvar_img
        ``(N, D)`` image posterior.
    mu_xy, logvar_xy
        ``(N, D)`` coordinate posterior.

    Returns
    -------
    tuple of torch.Tensor
        ``(mu_fused, logvar_fused)``, each ``(N, D)``. See :func:`product_of_experts`.
    """
    return product_of_experts(torch.stack([mu_img, mu_xy]), torch.stack([logvar_img, logvar_xy]))


def fuse_mean(
    mu_img: torch.Tensor,
    logvar_img: torch.Tensor,
    mu_xy: torch.Tensor,
    logvar_xy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Deterministic mean fusion (the "Deterministic" ablation of STEvs Tables 3-4).

    The fused latent is the average of one sample from each expert, :math:`(z_{img} + z_{xy})/2`,
    whose law is :math:`\mathcal N((\mu_{img} + \mu_{xy})/2, (\sigma_{img}^2 + \sigma_{xy}^2)/4)`.
    Unlike PoE the experts get equal weight whatever their uncertainty; this is the property the
    ablation isolates.

    Returns
    -------
    tuple of torch.Tensor
        ``(mu, logvar)``, each ``(N, D)``; ``logvar = logsumexp(logvar_img, logvar_xy) - log 4``.
    """
    mu = 0.5 * (mu_img + mu_xy)
    logvar = torch.logsumexp(torch.stack([logvar_img, logvar_xy]), dim=0) - math.log(4.0)
    return mu, logvar


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Draw ``z = mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` (STEvs Eq. 31)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class PoEFusion(nn.Module):
    """Product-of-Experts fusion of the two expert posteriors (STEvs Eq. 1); no trained parameters.

    Two optional corrections of the experts' log-variances, both buffers (saved with the
    weights) that are neutral until set after training:

    - ``log_precision_offset`` ``(2,)`` (image, coordinates) is added to each expert's
      log-precision before the product, i.e. subtracted from its log-variance: zero (the paper's
      PoE) unless the validation calibration set it (:func:`calibration_offsets`).
    - the distance-aware variance (:meth:`fit_distance`). Each expert's variance is a function
      of its input fitted on the training spots only, so away from them it extrapolates, and
      nothing stops it extrapolating to more confidence than it ever had. Two corrections, in
      eval mode only (training and test-time adaptation see the plain experts):

      1. no expert is more certain than on its most certain training spots: each latent
         dimension's log-variance is floored at its :data:`LOGVAR_FLOOR_QUANTILE` quantile
         over the training spots (a blank patch otherwise drove the image variance far below
         anything seen in training, and its weight up to 0.85);
      2. an expert whose input lies far from the training spots' is extrapolating, so its
         variance is multiplied by ``max(1, d2 / d2_ref)``: ``d2`` the squared Mahalanobis
         distance of the spot's posterior mean from the training spots' means, ``d2_ref`` the
         median of ``d2`` over held-out spots of the training slides (the distance of an
         ordinary unseen spot). For the image expert the same ratio is also taken on the
         backbone features the latent is computed from (``feature_dim`` wide) and the larger
         ratio is used: the latent mean is a linear projection of those features, and a noisy,
         colour-inverted or colour-swapped patch can land near an ordinary latent while its
         features are far from any training patch's (the feature-space Mahalanobis detector
         of Lee et al. 2018).

      The same corrections apply to an expert used alone (image-only or coordinate-only
      inference, :meth:`single_expert_logvar`), so its posterior variance, and the predictive
      uncertainty drawn from it, widens where it extrapolates.

      This is the feature-density view of epistemic uncertainty (DDU, Mukhoti et al. 2023;
      SNGP, Liu et al. 2020) put on each expert, so that an image unlike the training ones no
      longer outweighs the coordinates by a confidence it learned on the training section.

    Parameters
    ----------
    latent_dim
        Latent size ``D`` of the experts (sets the shape of the distance buffers).
    feature_dim
        Width ``F`` of the image backbone features; 0 leaves the feature distance out.
    """

    def __init__(self, latent_dim: int = 128, feature_dim: int = 0) -> None:
        super().__init__()
        self.register_buffer("log_precision_offset", torch.zeros(2))
        self.register_buffer("logvar_floor", torch.full((2, latent_dim), -math.inf))
        self.register_buffer("latent_mean", torch.zeros(2, latent_dim))
        self.register_buffer("latent_precision", torch.eye(latent_dim).repeat(2, 1, 1))
        self.register_buffer("distance_reference", torch.ones(2))
        self.register_buffer("distance_fitted", torch.tensor(False))
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_precision", torch.eye(feature_dim))
        self.register_buffer("feature_reference", torch.ones(()))
        self.register_buffer("feature_distance_fitted", torch.tensor(False))

    @torch.no_grad()
    def fit_distance(
        self, training: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        """Fit the distance-aware variance (see the class) from the experts' posteriors.

        ``training`` holds the posteriors of spots the model was trained on, ``held_out`` those
        of held-out spots of the same slides, as :meth:`STEvsModule.forward
        <stinfer.nn.stevs.STEvsModule.forward>` returns them: ``mu_img``, ``logvar_img``,
        ``mu_xy``, ``logvar_xy`` ``(N, D)`` and, for the feature distance (when the module has
        ``feature_dim > 0``), ``features_img`` ``(N, F)``. From the training spots: each
        expert's log-variance floor and the mean and Ledoit-Wolf shrunk covariance of its means
        (scikit-learn: ``D`` may exceed what a few hundred spots estimate well); from the
        held-out spots: the reference distances. Returns the reference distances
        (``image_reference``, ``spatial_reference``, ``image_feature_reference``), for the log.
        """
        summary: dict[str, float] = {}
        for index, (name, key) in enumerate((("image", "img"), ("spatial", "xy"))):
            logvars = training[f"logvar_{key}"].float()
            self.logvar_floor[index].copy_(torch.quantile(logvars, LOGVAR_FLOOR_QUANTILE, dim=0))
            location, precision = _shrunk_gaussian(training[f"mu_{key}"])
            self.latent_mean[index].copy_(location)
            self.latent_precision[index].copy_(precision)
            distances = self._squared_distances(held_out[f"mu_{key}"].to(self.latent_mean), index)
            reference = float(distances.median().clamp_min(1e-6))
            self.distance_reference[index] = reference
            summary[f"{name}_reference"] = reference
        self.distance_fitted.fill_(True)
        if self.feature_mean.numel() and "features_img" in training:
            location, precision = _shrunk_gaussian(training["features_img"])
            self.feature_mean.copy_(location)
            self.feature_precision.copy_(precision)
            distances = self._feature_distances(held_out["features_img"].to(self.feature_mean))
            self.feature_reference.fill_(float(distances.median().clamp_min(1e-6)))
            self.feature_distance_fitted.fill_(True)
            summary["image_feature_reference"] = float(self.feature_reference)
        return summary

    def reset_distance(self) -> None:
        """Back to the plain experts (before training again)."""
        self.logvar_floor.fill_(-math.inf)
        self.latent_mean.zero_()
        self.latent_precision.copy_(torch.eye(self.latent_mean.shape[1]).repeat(2, 1, 1))
        self.distance_reference.fill_(1.0)
        self.distance_fitted.fill_(False)
        self.feature_mean.zero_()
        self.feature_precision.copy_(torch.eye(self.feature_mean.shape[0]))
        self.feature_reference.fill_(1.0)
        self.feature_distance_fitted.fill_(False)

    def _squared_distances(self, mu: torch.Tensor, index: int) -> torch.Tensor:
        centred = mu.float() - self.latent_mean[index].float()
        return ((centred @ self.latent_precision[index].float()) * centred).sum(-1)

    def _feature_distances(self, features: torch.Tensor) -> torch.Tensor:
        centred = features.float() - self.feature_mean.float()
        return ((centred @ self.feature_precision.float()) * centred).sum(-1)

    def distance_log_inflation(
        self, mu: torch.Tensor, expert: int, features: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``(N, 1)`` log of expert ``expert``'s variance factor (0 image, 1 coordinates),
        ``log max(1, d2 / d2_ref)``, for the image expert the larger of the latent and the
        feature ratio when ``features`` ``(N, F)`` are given and the feature distance is
        fitted; ``None`` when not fitted or in training mode."""
        if self.training or not bool(self.distance_fitted):
            return None
        ratio = self._squared_distances(mu, expert) / self.distance_reference[expert].float()
        if expert == 0 and features is not None and bool(self.feature_distance_fitted):
            feature_ratio = self._feature_distances(features) / self.feature_reference.float()
            ratio = torch.maximum(ratio, feature_ratio)
        return torch.log(ratio.clamp_min(1.0)).unsqueeze(-1).to(mu.dtype)

    def single_expert_logvar(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        expert: int,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(N, D)`` log-variance of expert ``expert`` (0 image, 1 coordinates) when it is the
        only posterior (single-modality inference, STEvs Table 5), after the distance-aware
        floor and inflation: an H&E-only prediction of a patch unlike the training ones is
        then as uncertain as its distance says, not as confident as the extrapolating variance
        head. Unchanged in training mode or when the distance is not fitted."""
        inflation = self.distance_log_inflation(mu, expert, features)
        if inflation is None:
            return logvar
        return torch.maximum(logvar, self.logvar_floor[expert].to(logvar.dtype)) + inflation

    def expert_logvars(
        self,
        mu_img: torch.Tensor,
        logvar_img: torch.Tensor,
        mu_xy: torch.Tensor,
        logvar_xy: torch.Tensor,
        features_img: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' ``(N, D)`` log-variances as the product uses them: after the
        calibration offset and the distance-aware floor and inflation (see the class);
        ``features_img`` ``(N, F)`` are the image backbone features, for the feature distance."""
        offset = self.log_precision_offset.to(logvar_img.dtype)
        logvar_img, logvar_xy = logvar_img - offset[0], logvar_xy - offset[1]
        return (
            self.single_expert_logvar(mu_img, logvar_img, 0, features_img),
            self.single_expert_logvar(mu_xy, logvar_xy, 1),
        )

    def forward(
        self, image: ModalityPosterior, spatial: ModalityPosterior
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logvar_img, logvar_xy = self.expert_logvars(
            image.mu, image.logvar, spatial.mu, spatial.logvar, image.features
        )
        return fuse_poe(image.mu, logvar_img, spatial.mu, logvar_xy)


def _shrunk_gaussian(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Ledoit-Wolf shrunk precision of ``(N, K)`` samples (scikit-learn; ``K`` may
    exceed what a few hundred spots estimate well), as float64 tensors."""
    from sklearn.covariance import LedoitWolf  # scikit-learn is imported only when fitting

    estimate = LedoitWolf().fit(samples.double().cpu().numpy())
    return torch.from_numpy(estimate.location_), torch.from_numpy(estimate.precision_)


def calibration_offsets(shift: float) -> tuple[float, float]:
    """``(image, coordinates)`` log-precision offsets that move the PoE weights by ``shift``.

    ``shift`` is added to the image expert's log-precision relative to the coordinate
    expert's (positive: trust the image more). Only the over-trusted expert is changed, and only
    made less precise (its variance grows), so the fused posterior never becomes more certain
    than the trained experts say.
    """
    return (min(0.0, shift), min(0.0, -shift))


class MeanFusion(nn.Module):
    """Deterministic mean fusion (STEvs Tables 3-4, "Deterministic"); see :func:`fuse_mean`."""

    def forward(
        self, image: ModalityPosterior, spatial: ModalityPosterior
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fuse_mean(image.mu, image.logvar, spatial.mu, spatial.logvar)


class ConcatFusion(nn.Module):
    """Concatenation fusion (STEvs Tables 3-4, "Concat").

    ``[mu_img, logvar_img, mu_xy, logvar_xy]`` (``4 * latent_dim``) is projected by one linear
    layer to ``(mu, logvar)``: a learned, uncertainty-agnostic mixing of the two experts.

    Parameters
    ----------
    latent_dim
        Latent size ``D`` of each expert and of the output.
    """

    def __init__(self, latent_dim: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(4 * latent_dim, 2 * latent_dim)

    def forward(
        self, image: ModalityPosterior, spatial: ModalityPosterior
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = torch.cat([image.mu, image.logvar, spatial.mu, spatial.logvar], dim=-1)
        mu, logvar = self.proj(stacked).chunk(2, dim=-1)
        return mu, logvar


class CrossAttentionFusion(nn.Module):
    """Cross-attention fusion (STEvs Tables 3-4, "Cross-Attention").

    The image features and the coordinate features are projected to two tokens of size
    ``token_dim`` (plus a learned modality embedding); both tokens attend to both
    (``nn.MultiheadAttention``), followed by a residual MLP with LayerNorms; the two tokens are
    averaged and two linear heads give ``(mu, logvar)``. Unlike the public STEvs variant (a single
    coordinate query over a single image key, where the attention weight is always one), each token
    here weighs the two modalities.

    Parameters
    ----------
    image_feature_dim
        Size of the image backbone features (768 for Swin-T).
    coord_feature_dim
        Size of the coordinate encoder features (128, Table 6).
    latent_dim
        Output latent size.
    token_dim
        Attention width; defaults to ``latent_dim``.
    num_heads
        Attention heads (4 in the public STEvs code).
    dropout
        Attention and MLP dropout (0.1 in the public STEvs code).
    """

    def __init__(
        self,
        image_feature_dim: int,
        coord_feature_dim: int = 128,
        latent_dim: int = 128,
        token_dim: int | None = None,
        num_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        token_dim = token_dim or latent_dim
        self.image_proj = nn.Linear(image_feature_dim, token_dim)
        self.coord_proj = nn.Linear(coord_feature_dim, token_dim)
        self.modality_embedding = nn.Parameter(torch.zeros(2, token_dim))
        nn.init.trunc_normal_(self.modality_embedding, std=0.02)
        self.attention = nn.MultiheadAttention(
            token_dim, num_heads=num_heads, dropout=dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(token_dim)
        self.mlp = nn.Sequential(
            nn.Linear(token_dim, 4 * token_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * token_dim, token_dim),
        )
        self.norm2 = nn.LayerNorm(token_dim)
        self.heads = GaussianHeads(token_dim, latent_dim)

    def forward(
        self, image: ModalityPosterior, spatial: ModalityPosterior
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.stack(
            [self.image_proj(image.features), self.coord_proj(spatial.features)], dim=1
        )
        tokens = tokens + self.modality_embedding
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        tokens = self.norm1(tokens + attended)
        tokens = self.norm2(tokens + self.mlp(tokens))
        return self.heads(tokens.mean(dim=1))


def build_fusion(
    name: str,
    image_feature_dim: int,
    coord_feature_dim: int = 128,
    latent_dim: int = 128,
    num_heads: int = 4,
    dropout: float = 0.1,
) -> nn.Module:
    """Create the fusion module called ``name`` (one of :data:`FUSIONS`).

    Raises
    ------
    InputError
        For an unknown name; the message lists the valid ones.
    """
    if name == "poe":
        return PoEFusion(latent_dim, image_feature_dim)
    if name == "mean":
        return MeanFusion()
    if name == "concat":
        return ConcatFusion(latent_dim)
    if name == "cross_attention":
        return CrossAttentionFusion(
            image_feature_dim, coord_feature_dim, latent_dim, num_heads=num_heads, dropout=dropout
        )
    raise InputError(f"unknown fusion {name!r}; choose one of {FUSIONS}")

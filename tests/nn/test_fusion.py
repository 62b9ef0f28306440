"""Product of Experts and the ablation fusions (STEvs Eq. 1, 27-30; Tables 3-4)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from stinfer.errors import InputError
from stinfer.nn.encoders import ModalityPosterior
from stinfer.nn.fusion import (
    FUSIONS,
    PoEFusion,
    build_fusion,
    calibration_offsets,
    fuse_mean,
    fuse_poe,
    image_expert_weight,
    product_of_experts,
    reparameterize,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _closed_form_poe(mu_img, logvar_img, mu_xy, logvar_xy):
    """Eq. 27-30 written out literally, in float64."""
    precision_img = torch.exp(-logvar_img)
    precision_xy = torch.exp(-logvar_xy)
    variance = 1.0 / (precision_img + precision_xy)
    mu = (mu_img * precision_img + mu_xy * precision_xy) * variance
    return mu, torch.log(variance)


def test_poe_equals_closed_form_product_of_two_gaussians():
    generator = torch.Generator().manual_seed(0)
    shape = (64, 16)
    mu_img, mu_xy = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 for _ in "ab")
    logvar_img, logvar_xy = (
        torch.empty(shape, dtype=torch.float64).uniform_(-8, 8, generator=generator) for _ in "ab"
    )
    expected_mu, expected_logvar = _closed_form_poe(mu_img, logvar_img, mu_xy, logvar_xy)

    mu, logvar = fuse_poe(mu_img, logvar_img, mu_xy, logvar_xy)
    torch.testing.assert_close(mu, expected_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logvar, expected_logvar, rtol=1e-12, atol=1e-12)

    mu32, logvar32 = fuse_poe(mu_img.float(), logvar_img.float(), mu_xy.float(), logvar_xy.float())
    torch.testing.assert_close(mu32.double(), expected_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar32.double(), expected_logvar, rtol=1e-5, atol=1e-5)


def test_poe_of_k_experts_equals_precision_weighted_closed_form():
    generator = torch.Generator().manual_seed(1)
    mus = torch.randn(3, 10, 4, generator=generator, dtype=torch.float64)
    logvars = torch.randn(3, 10, 4, generator=generator, dtype=torch.float64) * 2
    precisions = torch.exp(-logvars)
    variance = 1.0 / precisions.sum(0)
    mu, logvar = product_of_experts(mus, logvars)
    torch.testing.assert_close(mu, (mus * precisions).sum(0) * variance)
    torch.testing.assert_close(logvar, variance.log())


def test_poe_values_and_gradients_are_finite_for_logvars_across_minus30_to_30():
    grid = torch.tensor([-30.0, -20.0, -5.0, 0.0, 5.0, 20.0, 30.0])
    pairs = torch.tensor(list(itertools.product(grid.tolist(), repeat=2)))
    logvar_img = pairs[:, :1].repeat(1, 3).requires_grad_(True)
    logvar_xy = pairs[:, 1:].repeat(1, 3).requires_grad_(True)
    mu_img = torch.full_like(logvar_img, 2.0).requires_grad_(True)
    mu_xy = torch.full_like(logvar_xy, -3.0).requires_grad_(True)

    mu, logvar = fuse_poe(mu_img, logvar_img, mu_xy, logvar_xy)
    (mu.sum() + logvar.sum() + logvar.exp().sum()).backward()

    for tensor in (mu, logvar, mu_img.grad, mu_xy.grad, logvar_img.grad, logvar_xy.grad):
        assert torch.isfinite(tensor).all()
    # the fused variance is never larger than either expert's (Eq. 29)
    assert (logvar <= torch.minimum(logvar_img, logvar_xy) + 1e-6).all()
    # mixed extremes: the confident expert dominates the mean
    confident_img = (pairs[:, 0] == -30) & (pairs[:, 1] == 30)
    assert torch.allclose(mu[confident_img], torch.tensor(2.0))
    assert torch.allclose(logvar[confident_img], torch.tensor(-30.0))
    equal = pairs[:, 0] == pairs[:, 1]
    assert torch.allclose(mu[equal], torch.tensor(-0.5))
    assert torch.allclose(logvar[equal], pairs[equal, :1] - math.log(2.0))


def test_mean_fusion_is_the_law_of_the_average_of_one_sample_per_expert():
    mu_img, mu_xy = torch.tensor([[1.0]]), torch.tensor([[3.0]])
    logvar_img, logvar_xy = torch.tensor([[0.0]]), torch.tensor([[math.log(4.0)]])
    mu, logvar = fuse_mean(mu_img, logvar_img, mu_xy, logvar_xy)
    assert mu.item() == pytest.approx(2.0)
    assert logvar.exp().item() == pytest.approx((1.0 + 4.0) / 4.0)


def test_reparameterize_draws_with_the_posterior_mean_and_variance():
    torch.manual_seed(0)
    mu = torch.full((20000, 2), 1.5)
    logvar = torch.full((20000, 2), math.log(0.25))
    z = reparameterize(mu, logvar)
    assert z.mean().item() == pytest.approx(1.5, abs=0.02)
    assert z.var().item() == pytest.approx(0.25, abs=0.02)


def _posteriors(n=5, features_img=12, features_xy=6, latent=4, requires_grad=False):
    generator = torch.Generator().manual_seed(2)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_(requires_grad)

    image = ModalityPosterior(draw(n, features_img), draw(n, latent), draw(n, latent))
    spatial = ModalityPosterior(draw(n, features_xy), draw(n, latent), draw(n, latent))
    return image, spatial


@pytest.mark.parametrize("name", FUSIONS)
def test_every_fusion_gives_latent_shaped_posterior_with_gradients_to_both_modalities(name):
    torch.manual_seed(0)
    fusion = build_fusion(name, image_feature_dim=12, coord_feature_dim=6, latent_dim=4)
    fusion.eval()
    image, spatial = _posteriors(requires_grad=True)
    mu, logvar = fusion(image, spatial)
    assert mu.shape == logvar.shape == (5, 4)
    (mu.sum() + logvar.sum()).backward()
    inputs = ("features",) if name == "cross_attention" else ("mu", "logvar")
    for field in inputs:
        assert getattr(image, field).grad.abs().sum() > 0
        assert getattr(spatial, field).grad.abs().sum() > 0


def test_poe_fusion_module_equals_fuse_poe():
    image, spatial = _posteriors()
    mu, logvar = build_fusion("poe", 12)(image, spatial)
    expected = fuse_poe(image.mu, image.logvar, spatial.mu, spatial.logvar)
    torch.testing.assert_close((mu, logvar), expected)


def test_poe_log_precision_offset_rescales_each_experts_precision():
    """An offset of -log 3 on the image expert divides its precision by 3: with equal expert
    variances the image then takes 1/4 of the fused mean, and the fused variance is
    1 / (1/3 + 1) of one expert's."""
    image, spatial = _posteriors()
    fusion = PoEFusion()
    torch.testing.assert_close(
        fusion(image, spatial), fuse_poe(image.mu, image.logvar, spatial.mu, spatial.logvar)
    )
    spatial = ModalityPosterior(spatial.features, spatial.mu, image.logvar.clone())
    fusion.log_precision_offset.copy_(torch.tensor([-math.log(3.0), 0.0]))
    mu, logvar = fusion(image, spatial)
    torch.testing.assert_close(mu, 0.25 * image.mu + 0.75 * spatial.mu)
    torch.testing.assert_close(logvar, image.logvar - math.log(4.0 / 3.0))
    weights = image_expert_weight(
        *fusion.expert_logvars(image.mu, image.logvar, spatial.mu, spatial.logvar)
    )
    torch.testing.assert_close(weights, torch.full_like(weights, 0.25))
    assert "log_precision_offset" in fusion.state_dict()  # saved with the model


def _experts(mu_img, mu_xy, logvar, features=None):
    """Posteriors as ``STEvsModule.forward`` returns them, both experts with ``logvar``."""
    experts = {"mu_img": mu_img, "logvar_img": logvar, "mu_xy": mu_xy, "logvar_xy": logvar}
    if features is not None:
        experts["features_img"] = features
    return experts


def test_distance_aware_fusion_floors_each_experts_log_variance_at_its_training_quantile():
    """No expert is more certain than on its 1 % most certain training spots: a log-variance
    far below the training range (a blank patch) is raised to the per-dimension 1 % quantile
    (torch.quantile's linear interpolation) in eval mode; training sees the raw values."""
    generator = torch.Generator().manual_seed(3)
    latent = 2
    logvar_img = torch.randn(1000, latent, generator=generator)
    logvar_xy = torch.randn(1000, latent, generator=generator) - 1.0
    means = torch.zeros(1000, latent)
    fusion = PoEFusion(latent).eval()
    fusion.fit_distance(
        {"mu_img": means, "logvar_img": logvar_img, "mu_xy": means, "logvar_xy": logvar_xy},
        _experts(means[:50], means[:50], torch.zeros(50, latent)),
    )
    floor_img = torch.from_numpy(np.quantile(logvar_img.numpy(), 0.01, axis=0)).float()
    floor_xy = torch.from_numpy(np.quantile(logvar_xy.numpy(), 0.01, axis=0)).float()
    torch.testing.assert_close(fusion.logvar_floor, torch.stack([floor_img, floor_xy]))
    at_mean = torch.zeros(2, latent)
    confident = torch.tensor([[-30.0, 0.5], [-30.0, -30.0]])
    out_img, out_xy = fusion.expert_logvars(at_mean, confident, at_mean, confident)
    torch.testing.assert_close(out_img, torch.maximum(confident, floor_img))
    torch.testing.assert_close(out_xy, torch.maximum(confident, floor_xy))
    assert float(out_img[0, 1]) == 0.5  # above the floor: unchanged
    fusion.train()
    torch.testing.assert_close(
        fusion.expert_logvars(at_mean, confident, at_mean, confident)[0], confident
    )


def test_distance_aware_fusion_inflates_each_expert_by_its_distance_from_the_training_latents():
    """After :meth:`PoEFusion.fit_distance` an expert's variance is multiplied by
    ``max(1, d2 / d2_ref)``: ``d2`` the squared Mahalanobis distance (scikit-learn's Ledoit-Wolf
    estimate on the training latents), ``d2_ref`` its median over held-out latents. A spot
    whose image latent lies far from the training latents hands the fused mean to the
    coordinates; typical spots, training mode and a reset fusion keep the plain product."""
    from sklearn.covariance import LedoitWolf

    generator = torch.Generator().manual_seed(0)
    latent = 4
    train_img, train_xy, held_img, held_xy = (
        torch.randn(n, latent, generator=generator) for n in (400, 400, 100, 100)
    )
    fusion = PoEFusion(latent).eval()
    summary = fusion.fit_distance(
        _experts(train_img, train_xy, torch.zeros(400, latent)),
        _experts(held_img, held_xy, torch.zeros(100, latent)),
    )
    estimate = LedoitWolf().fit(train_img.double().numpy())
    reference = float(torch.as_tensor(estimate.mahalanobis(held_img.double().numpy())).median())
    assert summary["image_reference"] == pytest.approx(reference, rel=1e-5)

    far = torch.zeros(3, latent)
    far[:, 0] = torch.tensor([0.0, 6.0, 12.0])  # typical, far, farther (sd ~1 per dimension)
    near_xy = torch.zeros(3, latent)
    logvar = torch.zeros(3, latent)
    image = ModalityPosterior(torch.zeros(3, 1), far, logvar)
    spatial = ModalityPosterior(torch.zeros(3, 1), near_xy, logvar)
    logvar_img, logvar_xy = fusion.expert_logvars(far, logvar, near_xy, logvar)
    d2 = torch.as_tensor(estimate.mahalanobis(far.double().numpy())).float()
    expected = torch.log((d2 / reference).clamp_min(1.0))
    torch.testing.assert_close(
        logvar_img, expected[:, None].expand(3, latent), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(logvar_xy, torch.zeros(3, latent))  # at the training mean
    weights = image_expert_weight(logvar_img, logvar_xy)
    assert weights[0] == pytest.approx(0.5) and 0.5 > weights[1] > weights[2]
    assert float(weights[2]) < 0.1
    mu, _ = fusion(image, spatial)
    torch.testing.assert_close(mu[0], far[0])
    assert float(mu[2, 0]) < 0.1 * 12.0  # the far image latent barely moves the fused mean

    fusion.train()  # training (and test-time adaptation) see the plain experts
    torch.testing.assert_close(fusion(image, spatial), fuse_poe(far, logvar, near_xy, logvar))
    fusion.eval()
    fusion.reset_distance()
    torch.testing.assert_close(fusion(image, spatial), fuse_poe(far, logvar, near_xy, logvar))
    assert {
        "logvar_floor",
        "latent_mean",
        "latent_precision",
        "distance_reference",
        "distance_fitted",
    } <= set(fusion.state_dict())


def test_image_expert_also_inflated_by_the_distance_of_its_backbone_features():
    """A patch whose backbone features are far from every training patch's (a blank or noise
    patch) but whose latent is ordinary (the latent head projects the unusual direction away)
    is caught by the feature distance: the image variance grows by the larger of the latent
    and the feature ratio, the feature ratio as scikit-learn's Ledoit-Wolf Mahalanobis
    distance over its median on held-out features. Without features the latent ratio alone
    applies, as for a module built without ``feature_dim``."""
    from sklearn.covariance import LedoitWolf

    generator = torch.Generator().manual_seed(1)
    latent, width = 3, 6
    train_feat, held_feat = (torch.randn(n, width, generator=generator) for n in (500, 120))
    projection = torch.zeros(width, latent)
    projection[:latent, :latent] = torch.eye(latent)  # the latent sees features 0-2 only
    fusion = PoEFusion(latent, feature_dim=width).eval()
    summary = fusion.fit_distance(
        _experts(
            train_feat @ projection, train_feat @ projection, torch.zeros(500, latent), train_feat
        ),
        _experts(
            held_feat @ projection, held_feat @ projection, torch.zeros(120, latent), held_feat
        ),
    )
    estimate = LedoitWolf().fit(train_feat.double().numpy())
    reference = float(torch.as_tensor(estimate.mahalanobis(held_feat.double().numpy())).median())
    assert summary["image_feature_reference"] == pytest.approx(reference, rel=1e-5)

    features = torch.zeros(2, width)
    features[1, 5] = 15.0  # far along a direction the latent does not see
    mu = features @ projection  # both at the training mean in latent space
    logvar = torch.zeros(2, latent)
    logvar_img, logvar_xy = fusion.expert_logvars(mu, logvar, mu, logvar, features)
    d2 = torch.as_tensor(estimate.mahalanobis(features.double().numpy())).float()
    expected = torch.log((d2 / reference).clamp_min(1.0))
    assert float(expected[1]) > math.log(10.0) and float(expected[0]) == 0.0
    torch.testing.assert_close(
        logvar_img, expected[:, None].expand(2, latent), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(logvar_xy, torch.zeros(2, latent))  # coordinates: latent only
    weights = image_expert_weight(logvar_img, logvar_xy)
    assert weights[0] == pytest.approx(0.5) and float(weights[1]) < 0.1
    # without the features, or in a module without feature buffers, only the latent counts
    plain = fusion.expert_logvars(mu, logvar, mu, logvar)
    torch.testing.assert_close(plain[0], torch.zeros(2, latent))
    fusion.reset_distance()
    assert not bool(fusion.feature_distance_fitted)
    torch.testing.assert_close(
        fusion.expert_logvars(mu, logvar, mu, logvar, features)[0], torch.zeros(2, latent)
    )


def test_calibration_offsets_only_ever_make_the_over_trusted_expert_less_precise():
    assert calibration_offsets(0.0) == (0.0, 0.0)
    assert calibration_offsets(-2.5) == (-2.5, 0.0)  # trust the image less
    assert calibration_offsets(4.0) == (0.0, -4.0)  # trust the coordinates less
    for shift in (-3.0, -0.5, 0.5, 3.0):
        offset_img, offset_xy = calibration_offsets(shift)
        assert offset_img <= 0 and offset_xy <= 0 and offset_img - offset_xy == shift


def test_unknown_fusion_is_an_input_error():
    with pytest.raises(InputError, match="unknown fusion"):
        build_fusion("sum", 12)

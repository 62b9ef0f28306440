"""The STEvs module: architecture (Table 6), variants (Tables 3-4), losses (Eq. 3, 34-38)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stinfer.errors import InputError
from stinfer.nn.decoders import GeneDecoder, ImageDecoder
from stinfer.nn.encoders import (
    CoordinateNormaliser,
    ImageEncoder,
    SlideColourNormaliser,
    colour_moments,
    create_backbone,
)
from stinfer.nn.fusion import FUSIONS
from stinfer.nn.likelihoods import NegativeBinomial, kl_standard_normal
from stinfer.nn.stevs import STEvsConfig, STEvsModule, kl_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY_SWIN = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
PATCH = 32
GENES = 6


def tiny_config(**overrides) -> STEvsConfig:
    """A CPU-cheap configuration: timm's 200k-parameter test ConvNeXt, 32-px patches."""
    values = dict(
        backbone="test_convnext",
        patch_size=PATCH,
        latent_dim=8,
        coord_hidden_dims=(16, 16),
        decoder_channels=(16, 8, 8, 4),
        gene_hidden_dims=(16, 16),
        fourier_num_frequencies=8,
    )
    values.update(overrides)
    return STEvsConfig(**values)


def batch(n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    patches = torch.rand(n, 3, PATCH, PATCH, generator=generator) * 2 - 1
    coords = torch.rand(n, 2, generator=generator) * 2 - 1
    counts = torch.poisson(torch.full((n, GENES), 4.0), generator=generator)
    return patches, coords, counts


# ---------------------------------------------------------------- architecture (Table 6)
def test_default_swin_t_on_160px_gives_40_20_10_5_maps_and_768_features():
    encoder = ImageEncoder()  # the paper's Swin-T, random init
    patch = torch.rand(1, 3, 160, 160) * 2 - 1
    with torch.no_grad():
        _, maps = encoder.backbone.forward_intermediates(patch)
        posterior = encoder(patch)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (96, 40, 40),
        (192, 20, 20),
        (384, 10, 10),
        (768, 5, 5),
    ]
    assert [len(stage.blocks) for stage in encoder.backbone.layers] == [2, 2, 6, 2]
    assert posterior.features.shape == (1, 768)
    assert posterior.mu.shape == posterior.logvar.shape == (1, 128)


def test_backbones_without_img_size_argument_and_unknown_names():
    assert create_backbone("test_convnext", img_size=PATCH)(torch.zeros(1, 3, PATCH, PATCH)).shape[
        1
    ] == (64)
    with pytest.raises(InputError, match="not a timm model"):
        create_backbone("no_such_backbone_xyz")


def test_image_decoder_starts_at_patch_over_8_and_rejects_other_sizes():
    decoder = ImageDecoder(latent_dim=4, patch_size=64, channels=(8, 8, 8, 4))
    assert decoder.start_size == 8
    assert ImageDecoder(latent_dim=4, patch_size=160).start_size == 20
    recon = decoder(torch.randn(2, 4))
    assert recon.shape == (2, 3, 64, 64)
    assert recon.abs().max() <= 1
    with pytest.raises(InputError, match="divisible by 8"):
        ImageDecoder(patch_size=100)


def test_config_defaults_are_the_papers():
    config = STEvsConfig()
    assert (config.image_weight, config.rna_weight, config.kl_weight) == (1.0, 10.0, 0.5)
    assert config.alignment_weight == 0.5
    assert (config.latent_dim, config.lr, config.weight_decay) == (128, 1e-4, 0.01)
    assert (config.fusion, config.coord_encoder, config.coord_hidden_dims) == (
        "poe",
        "mlp",
        (64, 128),
    )
    assert config.gene_hidden_dims == (256, 512)
    assert STEvsConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="fusion"):
        STEvsConfig(fusion="product")
    with pytest.raises(InputError, match="unknown STEvsConfig fields"):
        STEvsConfig.from_dict({"latent": 3})


# ---------------------------------------------------------------- variants (Tables 3-4)
@pytest.mark.parametrize(
    ("fusion", "coord_encoder", "image_decoder"),
    [
        (f, c, d)
        for (f, c), d in zip(  # noqa: B905
            itertools.product(FUSIONS, ("mlp", "fourier", "none")), [True, False] * 6
        )
    ]
    + [("poe", "mlp", False), ("cross_attention", "fourier", True)],
)
def test_every_variant_gives_the_expected_shapes_and_a_finite_loss(
    fusion, coord_encoder, image_decoder
):
    torch.manual_seed(0)
    module = STEvsModule(
        GENES, tiny_config(fusion=fusion, coord_encoder=coord_encoder, image_decoder=image_decoder)
    )
    patches, coords, counts = batch()
    outputs = module(patches, coords)
    for key in ("mu", "logvar", "z", "mu_img", "logvar_img"):
        assert outputs[key].shape == (4, 8)
    assert outputs["nb_mean"].shape == outputs["nb_theta"].shape == (4, GENES)
    assert ("image_recon" in outputs) == image_decoder
    if image_decoder:
        assert outputs["image_recon"].shape == patches.shape
    assert ("mu_xy" in outputs) == (coord_encoder != "none")
    losses = module.loss(outputs, counts, patches, epoch=1)
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert (losses["alignment"] > 0) == (coord_encoder != "none")


def test_single_modality_modes_use_each_expert_alone():
    module = STEvsModule(GENES, tiny_config(fusion="concat"))
    patches, coords, _ = batch()
    image_only = module.predict_mean(patches, None, mode="image")
    spatial_only = module.predict_mean(None, coords, mode="spatial")
    fused = module.predict_mean(patches, coords, mode="fused")
    torch.testing.assert_close(image_only["mu"], fused["mu_img"])
    torch.testing.assert_close(spatial_only["mu"], fused["mu_xy"])
    assert spatial_only["nb_mean"].shape == (4, GENES)
    with pytest.raises(InputError, match="needs coordinates"):
        module(patches, None, mode="fused")
    no_coords = STEvsModule(GENES, tiny_config(coord_encoder="none"))
    with pytest.raises(InputError, match="coordinate encoder"):
        no_coords(None, coords, mode="spatial")


def test_poe_posterior_is_sharper_than_either_expert():
    module = STEvsModule(GENES, tiny_config())
    outputs = module.predict_mean(*batch()[:2])
    assert (outputs["logvar"] < outputs["logvar_img"]).all()
    assert (outputs["logvar"] < outputs["logvar_xy"]).all()
    torch.testing.assert_close(outputs["variance"], outputs["logvar"].exp())


# ---------------------------------------------------------------- losses (Eq. 3, 34-38)
def test_kl_weight_anneals_linearly_to_beta_max_as_eq38():
    assert [kl_weight(e, 0.5, 50) for e in (0, 1, 25, 50, 51, 100)] == [
        0.0,
        0.01,
        0.25,
        0.5,
        0.5,
        0.5,
    ]
    assert kl_weight(3, 0.5, 0) == 0.5


def test_loss_is_the_weighted_sum_of_closed_form_terms():
    torch.manual_seed(0)
    module = STEvsModule(GENES, tiny_config(kl_anneal_epochs=10))
    patches, coords, counts = batch()
    outputs = module(patches, coords)
    losses = module.loss(outputs, counts, patches, epoch=4)

    image = ((outputs["image_recon"] - patches) ** 2).sum(dim=(1, 2, 3)).mean()
    rna = -NegativeBinomial(outputs["nb_mean"], outputs["nb_theta"]).log_prob(counts).sum(1).mean()
    kl = kl_standard_normal(outputs["mu"], outputs["logvar"]).mean()
    alignment = ((outputs["z_img"] - outputs["z_xy"]) ** 2).mean()
    torch.testing.assert_close(losses["image"], image)
    torch.testing.assert_close(losses["rna"], rna)
    torch.testing.assert_close(losses["kl"], kl)
    torch.testing.assert_close(losses["alignment"], alignment)
    assert losses["kl_weight"].item() == pytest.approx(0.2)
    expected = 1.0 * image + 10.0 * rna + 0.2 * kl + 0.5 * alignment
    torch.testing.assert_close(losses["loss"], expected)

    no_alignment = STEvsModule(GENES, tiny_config(alignment=False))
    assert no_alignment.loss(no_alignment(patches, coords), counts, patches)["alignment"] == 0
    with pytest.raises(InputError, match="patches_target"):
        module.loss(outputs, counts, None)


def test_adaptation_loss_drops_the_rna_term_and_leaves_the_gene_decoder_untouched():
    torch.manual_seed(0)
    module = STEvsModule(GENES, tiny_config())
    patches, coords, _ = batch()
    losses = module.adaptation_loss(module(patches, coords), patches, epoch=100)
    assert losses["rna"] == 0
    torch.testing.assert_close(
        losses["loss"], losses["image"] + 0.5 * losses["kl"] + 0.5 * losses["alignment"]
    )
    losses["loss"].backward()
    assert all(p.grad is None for p in module.gene_decoder.parameters())
    assert module.coord_encoder.heads.mu.weight.grad is not None


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval_mode():
    module = STEvsModule(GENES, tiny_config())
    module.train()
    assert not module.image_encoder.backbone.training
    assert module.image_encoder.heads.training
    assert not any(p.requires_grad for p in module.image_encoder.backbone.parameters())
    assert all(p.requires_grad for p in module.image_encoder.heads.parameters())
    trainable = STEvsModule(GENES, tiny_config(freeze_encoder=False)).train()
    assert trainable.image_encoder.backbone.training


@pytest.mark.parametrize("image_decoder", [False, True])
def test_cached_features_give_the_same_losses_as_patches(image_decoder):
    config = tiny_config(
        backbone="swin_tiny_patch4_window7_224",
        backbone_kwargs=TINY_SWIN,
        image_decoder=image_decoder,
        fusion="cross_attention",
    )
    torch.manual_seed(0)
    module = STEvsModule(GENES, config).train()
    patches, coords, counts = batch(n=6)
    features = module.encode_image_features(patches)
    assert features.shape == (6, module.image_encoder.num_features) and not features.requires_grad

    losses = []
    for inputs in (patches, features):
        torch.manual_seed(123)
        outputs = module(inputs, coords)
        losses.append(module.loss(outputs, counts, patches, epoch=7))
    for key in losses[0]:
        torch.testing.assert_close(losses[0][key], losses[1][key], rtol=1e-6, atol=1e-6)
    assert (losses[0]["image"] > 0) == image_decoder


def test_predict_mean_is_deterministic_and_restores_training_mode():
    module = STEvsModule(GENES, tiny_config()).train()
    patches, coords, _ = batch()
    first = module.predict_mean(patches, coords)
    second = module.predict_mean(patches, coords)
    assert module.training
    torch.testing.assert_close(first["nb_mean"], second["nb_mean"])
    assert set(first) >= {"nb_mean", "nb_theta", "mu", "variance"}


def test_gene_decoder_trains_on_a_batch_of_one_spot():
    decoder = GeneDecoder(latent_dim=4, num_genes=3, hidden_dims=(8,)).train()
    outputs = decoder(torch.randn(1, 4))
    assert outputs["nb_mean"].shape == (1, 3)
    assert decoder.training


def test_profile_scale_uses_the_observed_library_and_fits_the_predicted_one():
    module = STEvsModule(GENES, tiny_config(expression_scale="profile", image_decoder=False))
    patches, coords, counts = batch()
    library = counts.sum(1)
    outputs = module(patches, coords, library_size=library)
    torch.testing.assert_close(outputs["nb_profile"].sum(1), torch.ones(4))
    torch.testing.assert_close(outputs["nb_mean"].sum(1), library)
    losses = module.loss(outputs, counts)
    torch.testing.assert_close(
        losses["library"], ((outputs["log_library"] - library.log()) ** 2).mean()
    )
    predicted = module.predict_mean(patches, coords)
    torch.testing.assert_close(predicted["nb_mean"].sum(1), predicted["log_library"].exp())


# ---------------------------------------------------------------- coordinates
def test_coordinate_normaliser_centres_each_slide_and_is_saved_with_the_module():
    slide = torch.rand(100, 2) * torch.tensor([3000.0, 2000.0])
    shifted = slide + torch.tensor([500.0, -800.0])  # a serial section scanned with an offset
    module = STEvsModule(GENES, tiny_config())
    module.coord_normalizer.fit([slide, shifted])
    normalised = module.coord_normalizer(slide)
    torch.testing.assert_close(normalised, module.coord_normalizer(shifted))
    assert normalised.abs().max().item() == pytest.approx(1.0)
    subset = module.coord_normalizer(slide[:10], centre=slide.mean(0))
    torch.testing.assert_close(subset, normalised[:10])

    restored = STEvsModule(GENES, tiny_config())
    restored.load_state_dict(module.state_dict())
    torch.testing.assert_close(restored.coord_normalizer(slide), normalised)
    assert "coord_normalizer.scale" in module.state_dict()  # saved models rely on the key
    with pytest.raises(RuntimeError, match="not fitted"):
        CoordinateNormaliser()(slide)


# ---------------------------------------------------------------- colour
def random_slide_patches(generator: torch.Generator, gain, offset, n: int = 40) -> torch.Tensor:
    """uint8 patches of one slide: a common tissue pattern under a slide-wide stain change."""
    base = torch.rand(n, 3, 16, 16, generator=generator) * 120 + 60
    gain = torch.tensor(gain)[None, :, None, None]
    offset = torch.tensor(offset)[None, :, None, None]
    return (base * gain + offset).round().clamp(0, 255).to(torch.uint8)


def test_colour_moments_equal_numpy_over_all_pixels_of_each_channel():
    patches = random_slide_patches(torch.Generator().manual_seed(0), [1.0, 0.8, 1.1], [0, 10, -5])
    pixels = patches.numpy().transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    moments = colour_moments(patches, chunk=7)  # chunks that do not divide N
    np.testing.assert_allclose(moments[0].numpy(), pixels.mean(1), rtol=1e-6)
    np.testing.assert_allclose(moments[1].numpy(), pixels.std(1), rtol=1e-5)
    streamed = colour_moments(chunk.numpy() for chunk in patches.split(9))  # read block by block
    torch.testing.assert_close(streamed, moments)


def test_colour_transform_applied_per_batch_equals_the_whole_slide_normalisation():
    generator = torch.Generator().manual_seed(2)
    normaliser = SlideColourNormaliser().fit(
        [colour_moments(random_slide_patches(generator, [1.0, 1.0, 1.0], [0, 0, 0]))]
    )
    stained = random_slide_patches(generator, [0.7, 0.85, 1.2], [30, -20, 10])
    transform = normaliser.transform(colour_moments(stained))
    batch = SlideColourNormaliser.apply(stained[5:17], transform.expand(12, -1, -1))
    torch.testing.assert_close(batch, normaliser(stained)[5:17].float())


def test_slide_colour_normaliser_maps_each_slide_to_the_training_moments_and_is_saved():
    generator = torch.Generator().manual_seed(1)
    train_a = random_slide_patches(generator, [1.0, 1.0, 1.0], [0, 0, 0])
    train_b = random_slide_patches(generator, [0.9, 1.0, 1.05], [5, 0, -5])
    stained = random_slide_patches(generator, [0.7, 0.85, 1.2], [30, -20, 10])  # another lab
    module = STEvsModule(GENES, tiny_config())
    module.colour_normalizer.fit([colour_moments(train_a), colour_moments(train_b)])
    reference = (colour_moments(train_a) + colour_moments(train_b)) / 2
    torch.testing.assert_close(module.colour_normalizer.reference, reference)

    normalised = module.colour_normalizer(stained)
    assert normalised.dtype == torch.uint8 and normalised.shape == stained.shape
    torch.testing.assert_close(colour_moments(normalised), reference, atol=0.6, rtol=0.01)
    # within-slide differences survive: per channel, a spot's mean is an affine map of its own
    before, after = stained.float().mean((2, 3)), normalised.float().mean((2, 3))
    for channel in range(3):
        assert np.corrcoef(before[:, channel], after[:, channel])[0, 1] > 0.999

    restored = STEvsModule(GENES, tiny_config())
    restored.load_state_dict(module.state_dict())
    torch.testing.assert_close(restored.colour_normalizer(stained), normalised)
    with pytest.raises(RuntimeError, match="not fitted"):
        SlideColourNormaliser()(stained)


# ---------------------------------------------------------------- learning
def test_module_learns_counts_that_depend_on_coordinates():
    torch.manual_seed(0)
    n, genes = 256, 8
    coords = torch.rand(n, 2) * 2 - 1
    loadings = torch.randn(3, genes)
    basis = torch.stack([torch.sin(3 * coords[:, 0]), coords[:, 1], coords[:, 0] * coords[:, 1]], 1)
    true_mean = 8 * torch.exp(basis @ loadings * 0.8)
    counts = torch.poisson(true_mean)
    config = tiny_config(
        image_decoder=False,
        latent_dim=8,
        coord_hidden_dims=(64, 64),
        gene_hidden_dims=(64, 64),
        dropout=0.0,
        lr=1e-2,
        kl_anneal_epochs=0,
        kl_weight=0.01,
    )
    module = STEvsModule(genes, config)
    features = torch.randn(n, module.image_encoder.num_features)  # uninformative image
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    module.train()
    history = []
    for _ in range(150):
        losses = module.loss(module(features, coords), counts)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["rna"].item())
    assert history[-1] < 0.8 * history[0]

    for mode in ("fused", "spatial"):
        predicted = module.predict_mean(features, coords, mode=mode)["nb_mean"]
        correlations = [
            torch.corrcoef(torch.stack([predicted[:, g], true_mean[:, g]]))[0, 1]
            for g in range(genes)
        ]
        assert torch.stack(correlations).median() > 0.7, mode


# ---------------------------------------------------------------- stinfer additions
def test_smaller_image_reconstruction_is_compared_to_the_pooled_patch_at_full_patch_scale():
    config = tiny_config(image_recon_size=PATCH // 2, decoder_channels=(8, 4, 4, 4))
    module = STEvsModule(GENES, config)
    patches, coords, counts = batch()
    outputs = module(patches, coords)
    assert outputs["image_recon"].shape == (4, 3, PATCH // 2, PATCH // 2)
    pooled = torch.nn.functional.avg_pool2d(patches, 2)
    expected = (outputs["image_recon"] - pooled).pow(2).sum((1, 2, 3)).mean() * 4
    torch.testing.assert_close(module.loss(outputs, counts, patches)["image"], expected)
    same_size = STEvsModule(GENES, tiny_config())
    full = same_size(patches, coords)
    torch.testing.assert_close(
        same_size.loss(full, counts, patches)["image"],
        (full["image_recon"] - patches).pow(2).sum((1, 2, 3)).mean(),
    )
    with pytest.raises(InputError, match="image_recon_size"):
        STEvsConfig(patch_size=160, image_recon_size=48)


def test_library_weight_scales_the_log_library_term():
    patches, coords, counts = batch()
    library = counts.sum(1)
    totals = []
    for weight in (1.0, 3.0):
        torch.manual_seed(0)
        module = STEvsModule(GENES, tiny_config(expression_scale="profile", library_weight=weight))
        torch.manual_seed(1)
        losses = module.loss(module(patches, coords, library_size=library), counts, patches)
        totals.append((losses["loss"], losses["library"]))
    (loss_1, library_1), (loss_3, library_3) = totals
    torch.testing.assert_close(library_1, library_3)
    torch.testing.assert_close(loss_3 - loss_1, 2 * library_1)


def test_expert_outputs_decode_each_expert_as_the_single_modality_forward_does():
    module = STEvsModule(GENES, tiny_config(expression_scale="profile")).eval()
    patches, coords, _ = batch()
    fused = module(patches, coords, sample=False, decode_image=False)
    for expert in ("image", "spatial"):
        alone = module(patches, coords, mode=expert, sample=False, decode_image=False)
        decoded = module.expert_outputs(fused, expert, sample=False)
        for key in ("mu", "logvar", "nb_mean", "nb_theta", "log_library"):
            torch.testing.assert_close(decoded[key], alone[key])


def test_subset_loss_adds_each_experts_expression_elbo_and_needs_both_experts():
    config = tiny_config(kl_anneal_epochs=0, expression_scale="profile", library_weight=2.0)
    module = STEvsModule(GENES, config)
    patches, coords, counts = batch()
    library = counts.sum(1)
    outputs = module(patches, coords, library_size=library)
    torch.manual_seed(5)
    total = module.subset_loss(outputs, counts, epoch=1, library_size=library)
    torch.manual_seed(5)
    expected = 0
    for expert in ("image", "spatial"):
        decoded = module.expert_outputs(outputs, expert, library_size=library)
        nll = -NegativeBinomial(decoded["nb_mean"], decoded["nb_theta"]).log_prob(counts).sum(-1)
        kl = kl_standard_normal(decoded["mu"], decoded["logvar"]).mean()
        library_error = (decoded["log_library"] - library.log()).pow(2).mean()
        expected = expected + 10.0 * nll.mean() + 0.5 * kl + 2.0 * library_error
    torch.testing.assert_close(total, expected)
    image_only = module(patches, coords, mode="image")
    assert float(module.subset_loss(image_only, counts)) == 0.0


def test_fusion_shift_nll_scores_the_decoded_fused_mean_and_reaches_each_expert():
    """Shift 0 scores the PoE as trained; a very negative shift leaves the coordinate
    expert alone and a very positive one the image expert, each decoded at its mean."""
    module = STEvsModule(GENES, tiny_config(expression_scale="profile")).eval()
    patches, coords, counts = batch(n=6)
    outputs = module(patches, coords, sample=False, decode_image=False)
    scores = module.fusion_shift_nll(outputs, counts, [-40.0, 0.0, 40.0])

    def nll(mu):
        decoded = module.gene_decoder(mu)
        likelihood = NegativeBinomial(decoded["nb_mean"], decoded["nb_theta"])
        return -likelihood.log_prob(counts).sum(-1).mean()

    torch.testing.assert_close(scores[0], nll(outputs["mu_xy"]))
    torch.testing.assert_close(scores[1], nll(outputs["mu"]))
    torch.testing.assert_close(scores[2], nll(outputs["mu_img"]))
    with pytest.raises(InputError, match="Product-of-Experts"):
        STEvsModule(GENES, tiny_config(fusion="concat")).fusion_shift_nll(outputs, counts, [0.0])


# ---------------------------------------------------------------- patches of another side
def test_patches_of_another_side_are_resized_to_the_encoders_input_and_pooled_for_the_loss():
    """A patch spec in microns gives patches of any side on slides of other resolutions: a
    fixed-size Swin reads them resized (as timm's pipelines do), and the image loss compares
    the decoder's output with the patch area-averaged to its size."""
    import torch.nn.functional as F

    from stinfer.nn.stevs import image_reconstruction_error

    torch.manual_seed(0)
    encoder = ImageEncoder(
        "swin_tiny_patch4_window7_224",
        8,
        img_size=32,
        backbone_kwargs={**TINY_SWIN, "window_size": 4},
    )
    odd = torch.rand(2, 3, 45, 45) * 2 - 1
    resized = F.interpolate(
        odd, size=(32, 32), mode="bilinear", antialias=True, align_corners=False
    )
    torch.testing.assert_close(encoder.encode_features(odd), encoder.encode_features(resized))

    recon = torch.rand(2, 3, 8, 8)
    target = torch.rand(2, 3, 45, 45)
    pooled = F.adaptive_avg_pool2d(target, (8, 8))
    expected = ((recon - pooled) ** 2).sum(dim=(1, 2, 3)).mean() * (45 / 8) ** 2
    torch.testing.assert_close(image_reconstruction_error(recon, target), expected)
    # a side that r divides: exactly the average pooling of the full-patch design
    target = torch.rand(2, 3, 32, 32)
    expected = ((recon - F.avg_pool2d(target, 4)) ** 2).sum(dim=(1, 2, 3)).mean() * 16
    torch.testing.assert_close(image_reconstruction_error(recon, target), expected)

    module = STEvsModule(GENES, tiny_config(image_recon_size=8))
    patches, coords, counts = batch()
    odd_patches = F.interpolate(patches, size=(45, 45), mode="bilinear", align_corners=False)
    losses = module.loss(module(odd_patches, coords), counts, odd_patches, epoch=1)
    assert torch.isfinite(losses["loss"])

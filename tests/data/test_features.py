"""Patch features: colour statistics, colour deconvolution, handcrafted and backbone features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stinfer.data.features import (
    HANDCRAFTED_FEATURE_NAMES,
    HED_FROM_RGB,
    RGB_FROM_HED,
    backbone_features,
    backbone_input,
    color_statistics,
    handcrafted_features,
    rgb_to_hed,
)
from stinfer.errors import InputError
from stinfer.nn.encoders import create_backbone

TINY_BACKBONE = "resnet10t"  # smallest timm ResNet: keeps these tests at a few seconds on CPU


@pytest.fixture
def patches() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (7, 3, 12, 10), dtype=np.uint8)


def test_color_statistics_equal_numpy_channel_mean_and_sd(patches):
    pixels = patches.reshape(7, 3, -1).astype(np.float64)
    expected = np.concatenate([pixels.mean(axis=2), pixels.std(axis=2)], axis=1)
    result = color_statistics(patches)
    assert result.shape == (7, 6)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-4)


def test_color_statistics_do_not_depend_on_chunking_or_streaming(patches):
    whole = color_statistics(patches)
    np.testing.assert_array_equal(color_statistics(patches, chunk_size=2), whole)
    np.testing.assert_array_equal(color_statistics(iter([patches[:3], patches[3:]])), whole)


def test_features_reject_channel_last_patches(patches):
    with pytest.raises(InputError, match=r"\(n_spots, 3, height, width\)"):
        color_statistics(np.moveaxis(patches, 1, -1))


def test_hed_matrix_is_the_inverse_of_the_ruifrok_johnston_stain_matrix():
    np.testing.assert_allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("stain", [0, 1, 2])
def test_rgb_to_hed_recovers_a_pure_stain_in_its_own_channel(stain):
    concentration = 0.4
    optical_density = concentration * RGB_FROM_HED[stain]  # in log(1e-6) units, per RGB channel
    intensity = 1e-6**optical_density  # Beer-Lambert: transmitted fraction
    hed = rgb_to_hed(intensity.reshape(1, 3, 1, 1))
    expected = np.zeros(3)
    expected[stain] = concentration
    np.testing.assert_allclose(hed.reshape(3), expected, atol=1e-5)

    as_uint8 = np.round(intensity * 255).astype(np.uint8).reshape(1, 3, 1, 1)
    quantised = rgb_to_hed(as_uint8).reshape(3)
    assert np.argmax(quantised) == stain
    assert abs(quantised[stain] - concentration) < 0.02


def test_rgb_to_hed_keeps_shape_and_channel_axis(patches):
    first = rgb_to_hed(patches)
    last = rgb_to_hed(np.moveaxis(patches, 1, -1), channel_axis=-1)
    assert first.shape == patches.shape
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), first, rtol=1e-6)
    assert (first >= 0).all()


def test_handcrafted_features_columns_match_their_names(patches):
    features = handcrafted_features(patches)
    assert features.shape == (7, len(HANDCRAFTED_FEATURE_NAMES))
    column = dict(zip(HANDCRAFTED_FEATURE_NAMES, features.T, strict=True))
    pixels = patches.reshape(7, 3, -1).astype(np.float64)
    np.testing.assert_allclose(column["g_mean"], pixels[:, 1].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(column["b_p25"], np.percentile(pixels[:, 2], 25, axis=1), rtol=1e-6)
    np.testing.assert_allclose(column["r_p90"], np.percentile(pixels[:, 0], 90, axis=1), rtol=1e-6)
    hematoxylin = rgb_to_hed(patches)[:, 0].reshape(7, -1)
    np.testing.assert_allclose(column["hematoxylin_mean"], hematoxylin.mean(axis=1), rtol=1e-5)


def test_handcrafted_features_of_flat_white_glass_have_no_texture_and_no_tissue():
    glass = np.full((2, 3, 16, 16), 255, dtype=np.uint8)
    column = dict(zip(HANDCRAFTED_FEATURE_NAMES, handcrafted_features(glass).T, strict=True))
    for name in ("gradient_mean", "gradient_p90", "tissue_fraction", "hematoxylin_mean", "r_sd"):
        np.testing.assert_array_equal(column[name], 0.0)


def test_backbone_input_scales_by_the_data_config_and_resizes_only_when_asked():
    patches = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    images = backbone_input(patches, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images, torch.full_like(images, 2.0))
    assert backbone_input(patches, (0.5,) * 3, (0.25,) * 3, size=(16, 16)).shape == (2, 3, 16, 16)


def test_backbone_features_are_batch_independent_and_frozen(patches, one_torch_thread):
    torch.manual_seed(0)
    model = create_backbone(TINY_BACKBONE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    whole = backbone_features(patches, model, batch_size=7, device="cpu")
    batched = backbone_features(patches, model, batch_size=2, device="cpu")
    assert whole.shape == (7, model.num_features)
    assert whole.dtype == np.float32
    np.testing.assert_allclose(batched, whole, rtol=1e-4, atol=1e-5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])  # BatchNorm statistics untouched (eval)


def test_backbone_features_load_a_local_weights_file(tmp_path, patches, one_torch_thread):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_backbone(TINY_BACKBONE)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    expected = backbone_features(patches, source, device="cpu")
    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded = backbone_features(patches, TINY_BACKBONE, pretrained=path, device="cpu")
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)

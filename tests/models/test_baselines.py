"""Baseline models: mean expression, coordinate k-NN, patch-feature ridge, ST-Net."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from stinfer.errors import InputError
from stinfer.evaluate.protocols import ExpressionModel
from stinfer.io.slide_data import SPLIT_KEY, make_slide, spot_coordinates_px, spot_coordinates_um
from stinfer.models.baselines import (
    STNET_PRESETS,
    CoordinateKNN,
    CoordinateKNNConfig,
    MeanExpression,
    PatchFeatureRidge,
    PatchFeatureRidgeConfig,
    STNet,
    random_dihedral,
    stnet_fast_preset,
    upgrade_stnet_config_dict,
)
from stinfer.models.registry import model_config


def hand_made_slide(
    counts: np.ndarray,
    xy: np.ndarray,
    sample_id: str = "slide",
    pixel_size_um: float | None = 1.0,
    genes: list[str] | None = None,
):
    """A counts-only slide (no image): models that need patches get them passed in."""
    genes = genes or [f"gene{g}" for g in range(counts.shape[1])]
    return make_slide(
        counts,
        [f"{sample_id}_spot{i}" for i in range(len(counts))],
        genes,
        xy,
        sample_id=sample_id,
        source_format="h5ad",
        source="test",
        pixel_size_um=pixel_size_um,
        require_counts=False,  # test slides hold zeros where their truth is not needed
    )


def colour_patches(rng: np.random.Generator, n: int, size: int = 16):
    """Patches whose per-channel mean and sd vary per spot; returns (patches, colour stats)."""
    means = rng.uniform(60, 190, (n, 3))
    sds = rng.uniform(5, 40, (n, 3))
    noise = rng.standard_normal((n, 3, size * size))
    noise = (noise - noise.mean(axis=2, keepdims=True)) / noise.std(axis=2, keepdims=True)
    pixels = means[:, :, None] + sds[:, :, None] * noise
    patches = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(n, 3, size, size)
    return patches, np.concatenate([means, sds], axis=1)


# --------------------------------------------------------------------------- mean expression
def test_mean_expression_predicts_the_pooled_training_mean_for_every_spot():
    rng = np.random.default_rng(0)
    first = hand_made_slide(rng.poisson(3, (5, 4)), rng.uniform(0, 100, (5, 2)), "a")
    second = hand_made_slide(rng.poisson(9, (3, 4)), rng.uniform(0, 100, (3, 2)), "b")
    genes = ["gene2", "gene0"]
    model = MeanExpression([first, second], genes)
    assert isinstance(model, ExpressionModel)
    start = time.perf_counter()
    fit = model.train()
    elapsed = time.perf_counter() - start
    assert 0 < fit.train_seconds <= elapsed  # its own clock reading, not FitResult's default 0
    prediction = model.predict(second)
    pooled = np.concatenate([first[:, genes].X.toarray(), second[:, genes].X.toarray()])
    assert list(prediction.obs_names) == list(second.obs_names)
    assert list(prediction.var_names) == genes
    assert prediction.X.dtype == np.float32
    np.testing.assert_allclose(prediction.X, np.tile(pooled.mean(axis=0), (3, 1)), rtol=1e-6)
    # the one convention of every prediction: X counts, log1p CP10k over the predicted genes
    record = prediction.uns["stinfer"]["expression"]
    assert (
        record["X"] == "expected_counts"
        and record["normalisation_panel"] == "the 2 predicted genes"
    )
    library = prediction.X.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        prediction.obs["library_size"].to_numpy()[:, None], library, rtol=1e-6
    )
    np.testing.assert_allclose(
        prediction.layers["log1p_cp10k"], np.log1p(prediction.X / library * 1e4), rtol=1e-5
    )


def test_predictions_keep_the_slide_spot_names_grid_and_sample_id():
    slide = make_slide(
        np.ones((3, 2)),
        ["1x2", "3x4", "5x6"],
        ["gene0", "gene1"],
        np.zeros((3, 2)),
        sample_id="C3",
        source_format="legacy-st",
        source="test",
        array_row=[2, 4, 6],
        array_col=[1, 3, 5],
    )
    model = MeanExpression([slide], ["gene1"])
    model.train()
    prediction = model.predict(slide)
    assert list(prediction.obs_names) == ["C3_1x2", "C3_3x4", "C3_5x6"]
    assert list(prediction.obs["sample_id"]) == ["C3"] * 3
    assert list(prediction.obs["spot_id"]) == ["1x2", "3x4", "5x6"]
    assert list(prediction.obs["array_row"]) == [2, 4, 6]
    assert list(prediction.obs["array_col"]) == [1, 3, 5]


def test_models_reject_genes_missing_from_a_training_slide():
    slide = hand_made_slide(np.ones((3, 2)), np.zeros((3, 2)))
    with pytest.raises(InputError, match="lacks 1 of the 2 genes"):
        MeanExpression([slide], ["gene0", "not_a_gene"])


# --------------------------------------------------------------------------- coordinate k-NN
def test_coordinates_are_centred_on_the_spot_centroid_and_scaled_to_microns():
    slide = hand_made_slide(
        np.ones((3, 1)), np.array([[10.0, 0.0], [20.0, 0.0], [30.0, 6.0]]), pixel_size_um=0.5
    )
    centre = spot_coordinates_px(slide).mean(axis=0)  # what CoordinateKNN centres on
    coordinates = spot_coordinates_um(slide, centre)
    np.testing.assert_allclose(centre, [20.0, 2.0])
    np.testing.assert_allclose(coordinates, [[-5.0, -1.0], [0.0, -1.0], [5.0, 2.0]])


def planted_field(xy_um: np.ndarray) -> np.ndarray:
    """Two smooth log-expression fields of position (microns)."""
    u, v = xy_um[:, 0] / 500.0, xy_um[:, 1] / 500.0
    return np.stack([3 + np.sin(u) + 0.5 * v, 3 + 0.5 * np.cos(v) * u], axis=1)


def test_coordinate_knn_reproduces_a_shifted_and_rescaled_copy_of_the_training_slide():
    grid = np.stack(np.meshgrid(np.arange(15), np.arange(15)), -1).reshape(-1, 2) * 100.0  # microns
    counts = np.rint(np.expm1(planted_field(grid - grid.mean(axis=0))))
    train = hand_made_slide(counts, grid / 2.0 + 300.0, "train", pixel_size_um=2.0)
    # the same tissue at another place on another slide, scanned at 0.5 um per pixel
    test = hand_made_slide(counts, grid / 0.5 + 4000.0, "test", pixel_size_um=0.5)
    model = CoordinateKNN([train], list(train.var_names), CoordinateKNNConfig(n_neighbors=1))
    model.train()
    np.testing.assert_allclose(model.predict(test).X, counts, rtol=1e-5)


def test_coordinate_knn_interpolates_a_smooth_field_at_held_out_positions():
    rng = np.random.default_rng(1)
    train_xy = rng.uniform(-2000, 2000, (1500, 2))
    test_xy = rng.uniform(-1500, 1500, (200, 2))
    train = hand_made_slide(np.rint(np.expm1(planted_field(train_xy))), train_xy, "train")
    # held-out spots of the same slide keep the training slide's frame (same sample id)
    test = hand_made_slide(np.zeros((200, 2)), test_xy, "train")
    model = CoordinateKNN([train], list(train.var_names))
    model.train()
    predicted = np.log1p(model.predict(test).X)
    truth = planted_field(test_xy)
    for gene in range(2):
        assert np.corrcoef(predicted[:, gene], truth[:, gene])[0, 1] > 0.97
    assert np.abs(predicted - truth).mean() < 0.1


def test_coordinate_knn_keeps_the_training_frame_for_held_out_spots_of_the_same_slide():
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [1000.0, 0.0], [1100.0, 0.0]])
    counts = np.array([[1.0], [2.0], [50.0], [60.0]])
    train = hand_made_slide(counts[:3], xy[:3], "same")
    held_out = hand_made_slide(np.zeros((1, 1)), xy[3:], "same")  # its own centroid is far away
    model = CoordinateKNN([train], ["gene0"], CoordinateKNNConfig(n_neighbors=1))
    model.train()
    np.testing.assert_allclose(model.predict(held_out).X, [[50.0]])


# --------------------------------------------------------------------------- feature ridge
def test_patch_feature_ridge_learns_a_planted_linear_map_from_colour_statistics():
    rng = np.random.default_rng(2)
    patches, stats = colour_patches(rng, 400)
    weights = rng.normal(0, 1, (6, 5))
    standardised = (stats - stats.mean(axis=0)) / stats.std(axis=0)
    log_mean = 4.0 + 0.5 * standardised @ weights
    counts = np.rint(np.expm1(log_mean))
    xy = rng.uniform(0, 1000, (400, 2))
    train = hand_made_slide(counts[:300], xy[:300], "train")
    test = hand_made_slide(np.zeros((100, 5)), xy[300:], "test")
    model = PatchFeatureRidge([train], list(train.var_names), patches=[patches[:300]])
    fit_info = model.train()
    assert fit_info.history[0]["n_components"] == 6  # fewer than 256 features: all of them
    predicted = np.log1p(model.predict(test, patches=patches[300:]).X)
    truth = np.log1p(counts[300:])
    r_squared = 1 - ((predicted - truth) ** 2).sum(axis=0) / (
        (truth - truth.mean(axis=0)) ** 2
    ).sum(axis=0)
    assert r_squared.min() > 0.95


def test_patch_feature_ridge_uses_given_patches_instead_of_the_image_and_checks_them():
    rng = np.random.default_rng(3)
    patches, _ = colour_patches(rng, 30)
    train = hand_made_slide(rng.poisson(5, (30, 3)), rng.uniform(0, 100, (30, 2)), "train")
    model = PatchFeatureRidge([train], ["gene0", "gene1"], patches=[patches])
    model.train()
    prediction = model.predict(train, patches=patches)
    assert prediction.shape == (30, 2)
    assert (prediction.X >= 0).all()
    with pytest.raises(InputError, match=r"must be \(30, 3, H, W\) uint8"):
        model.predict(train, patches=patches[:5])


def test_patch_feature_ridge_on_handcrafted_and_backbone_features(one_torch_thread):
    rng = np.random.default_rng(4)
    patches, _ = colour_patches(rng, 40)
    train = hand_made_slide(rng.poisson(5, (40, 3)), rng.uniform(0, 100, (40, 2)), "train")
    for config in (
        PatchFeatureRidgeConfig(features="handcrafted"),
        PatchFeatureRidgeConfig(features="backbone", backbone="resnet10t", device="cpu"),
    ):
        model = PatchFeatureRidge([train], ["gene0", "gene1"], config, patches=[patches])
        assert model.train().history[0]["n_components"] == 40  # capped by the 40 spots
        assert model.predict(train, patches=patches).shape == (40, 2)


def test_patch_feature_ridge_never_overflows_under_extreme_extrapolation():
    rng = np.random.default_rng(5)
    patches, stats = colour_patches(rng, 60)
    counts = np.rint(np.expm1(1 + stats[:, :1] / 40))
    train = hand_made_slide(counts, rng.uniform(0, 100, (60, 2)), "train")
    model = PatchFeatureRidge([train], ["gene0"], patches=[patches])
    model.train()
    black = np.zeros_like(patches)
    black[:, 2] = 255  # far outside the colours seen in training
    predicted = model.predict(train, patches=black).X
    assert np.isfinite(predicted).all()
    assert predicted.max() <= counts.max() * (1 + 1e-5)


# --------------------------------------------------------------------------- ST-Net
def test_stnet_presets_are_named_configs():
    assert STNET_PRESETS["paper"]().module.backbone == "densenet121"
    assert STNET_PRESETS["paper"]().trainer.max_epochs == 50
    fast = model_config("stnet", "fast", epochs=3)
    assert fast.module.backbone == "resnet18" and fast.training.lr == 1e-3
    assert fast.trainer.max_epochs == 3
    assert stnet_fast_preset().trainer.max_epochs == 10  # the preset is untouched
    with pytest.raises(InputError, match="unknown ST-Net preset"):
        model_config("stnet", "huge")


def test_stnet_old_flat_config_names_map_onto_module_training_and_trainer():
    old = {"epochs": 7, "learning_rate": 2e-3, "seed": 4, "accelerator": "cpu", "lr": 1e-2}
    upgraded = upgrade_stnet_config_dict({**old, "backbone": "resnet10t"})
    assert upgraded == {
        "module": {"backbone": "resnet10t"},
        "training": {"lr": 1e-2},  # the newer name wins over the older one
        "trainer": {"max_epochs": 7, "seed": 4, "accelerator": "cpu"},
    }
    config = model_config("stnet", "fast", **old)
    assert (config.training.lr, config.trainer.max_epochs, config.trainer.seed) == (1e-2, 7, 4)
    both = model_config("stnet", "fast", batch_size=8, training={"batch_size": 16})
    assert both.training.batch_size == 16


def test_random_dihedral_applies_one_of_the_eight_square_symmetries_per_image():
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4).repeat(20, 1, 1, 1)
    transformed = random_dihedral(images, torch.Generator().manual_seed(0))
    seen = set()
    for original, result in zip(images, transformed, strict=True):
        candidates = [
            torch.rot90(base, k, (-2, -1))
            for base in (original, original.transpose(-1, -2))
            for k in range(4)
        ]
        matches = [i for i, c in enumerate(candidates) if torch.equal(c, result)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 4  # several different symmetries drawn


def test_stnet_learns_expression_from_the_patch(one_torch_thread):
    rng = np.random.default_rng(6)
    n_spots = 64
    level = rng.uniform(0, 1, n_spots)
    patches = np.clip(
        rng.normal(40 + 170 * level[:, None, None, None], 10, (n_spots, 3, 16, 16)), 0, 255
    )
    patches = patches.astype(np.uint8)
    log_mean = 2 + np.array([2.0, -1.5, 1.0]) * (2 * level[:, None] - 1)
    slide = hand_made_slide(
        rng.poisson(np.exp(log_mean)), rng.uniform(0, 1000, (n_spots, 2)), "tiny"
    )
    slide.obs[SPLIT_KEY] = np.where(np.arange(n_spots) < 56, "train", "val")
    config = model_config(
        "stnet",
        "fast",
        epochs=8,
        module={"backbone": "resnet10t"},
        training={"batch_size": 16},
        trainer={"accelerator": "cpu"},
    )
    model = STNet([slide], list(slide.var_names), config, patches=[patches])
    fit_info = model.train()
    assert fit_info.train_seconds > 0
    assert fit_info.best_epoch is not None  # validation on the 8 "val" spots picked the weights
    assert fit_info.history[-1]["train/mse"] < 0.25 * fit_info.history[0]["train/mse"]

    new_level = rng.uniform(0, 1, n_spots)
    new_patches = np.clip(
        rng.normal(40 + 170 * new_level[:, None, None, None], 10, patches.shape), 0, 255
    )
    prediction = model.predict(slide, patches=new_patches.astype(np.uint8))
    predicted = np.log1p(prediction.X)
    signs = np.sign([2.0, -1.5, 1.0])
    for gene in range(3):
        assert signs[gene] * np.corrcoef(predicted[:, gene], new_level)[0, 1] > 0.8

"""STEvs over AnnData: learning on synthetic sections, prediction layout, save/load, caching."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from stinfer.data.patches import spot_patches
from stinfer.data.spot_dataset import PatchSource
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.errors import InputError
from stinfer.metrics import evaluate_anndata
from stinfer.models.baselines import MeanExpression
from stinfer.models.stevs import (
    STEvs,
    STEvsModelConfig,
    STEvsTask,
    fast_preset,
    paper_preset,
    resolve_config,
    validation_split,
)
from stinfer.models.uncertainty import UncertaintyConfig, interval_coverage, moment_matched_theta
from stinfer.train import TrainerConfig

SYNTHETIC = SyntheticConfig(seed=3, target_spots=600, n_genes=40)
EPOCHS = 30  # the fast preset's own number


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sections(tmp_path_factory) -> list[ad.AnnData]:
    return make_synthetic_sections(tmp_path_factory.mktemp("synthetic"), SYNTHETIC)


def quick_fast_config(epochs: int = EPOCHS):
    """The ``fast`` preset with fewer epochs, no progress bar and no test-time augmentation
    (which makes every prediction 8 forward passes): the test's only changes."""
    config = fast_preset()
    config.training.test_time_augmentation = False
    config.trainer = dataclasses.replace(config.trainer, max_epochs=epochs, progress_bar=False)
    return config


@pytest.fixture(scope="module")
def trained(sections) -> STEvs:
    """The quick ``fast`` model (distance-aware fusion, the preset's), trained on section 1."""
    model = STEvs([sections[0]], genes=list(sections[0].var_names), config=quick_fast_config())
    model.train()
    return model


def median_pcc(prediction: ad.AnnData, truth: ad.AnnData) -> float:
    return evaluate_anndata(prediction, truth).pcc_median


def test_presets_are_named_configs_and_unknown_names_fail():
    assert resolve_config("paper").to_dict() == paper_preset().to_dict()
    assert resolve_config(None).module.backbone == "swin_tiny_patch4_window7_224"
    assert resolve_config("fast").module.backbone == "stinfer_histology_cnn"
    with pytest.raises(InputError, match="unknown STEvs preset"):
        resolve_config("slow")


def test_epochs_and_batch_size_have_one_place_and_old_configs_map_onto_it():
    fast = fast_preset()
    assert (fast.trainer.max_epochs, fast.training.batch_size) == (30, 32)
    assert not hasattr(fast.module, "epochs") and not hasattr(fast.module, "batch_size")
    assert not hasattr(fast.training, "trainer")
    saved = fast.to_dict()
    saved["training"]["trainer"] = saved.pop("trainer")  # an older config.json: trainer in training
    assert STEvsModelConfig.from_dict(saved) == fast
    saved["module"].update(epochs=100, batch_size=128)  # older still: module copies
    assert STEvsModelConfig.from_dict(saved) == fast  # ignored: training used its own values
    del saved["training"]["batch_size"], saved["training"]["trainer"]["max_epochs"]
    upgraded = STEvsModelConfig.from_dict(saved)  # only the module's: they move to their place
    assert (upgraded.trainer.max_epochs, upgraded.training.batch_size) == (100, 128)


def test_fast_preset_predicts_held_out_sections_far_above_the_mean_baseline(trained, sections):
    genes = trained.genes
    baseline = MeanExpression([sections[0]], genes)
    baseline.train()
    for section in sections[1:]:
        stevs_pcc = median_pcc(trained.predict(section), section)
        baseline_pcc = median_pcc(baseline.predict(section), section)
        assert stevs_pcc >= 0.5, stevs_pcc
        assert stevs_pcc > baseline_pcc + 0.4


def test_fused_prediction_beats_image_only_and_spatial_only(trained, sections):
    """Domain genes are visible in both modalities, gradient genes only in the coordinates and
    texture genes only in the image: the fused posterior should use both."""
    scores = {
        mode: np.mean([median_pcc(trained.predict(s, mode=mode), s) for s in sections[1:]])
        for mode in ("fused", "image", "spatial")
    }
    assert scores["fused"] > scores["image"], scores
    assert scores["fused"] > scores["spatial"], scores


def test_prediction_is_deterministic_anndata_with_the_documented_layout(trained, sections):
    section = sections[1]
    first, second = trained.predict(section), trained.predict(section)
    np.testing.assert_array_equal(first.X, second.X)
    assert first.shape == (section.n_obs, len(trained.genes))
    assert list(first.obs_names) == list(section.obs_names)
    for column in ("sample_id", "spot_id", "array_row", "array_col"):
        assert list(first.obs[column]) == list(section.obs[column])
    assert list(first.var_names) == trained.genes
    assert first.X.dtype == np.float32 and (first.X >= 0).all()
    assert first.layers["nb_theta"].shape == first.shape and (first.layers["nb_theta"] > 0).all()
    latent_dim = trained.config.module.latent_dim
    assert first.obsm["X_stevs"].shape == (section.n_obs, latent_dim)
    assert (first.obsm["stevs_posterior_var"] > 0).all()
    np.testing.assert_array_equal(first.obsm["spatial"], section.obsm["spatial"])
    assert first.uns["stevs_prediction"]["mode"] == "fused"
    np.testing.assert_allclose(trained.get_latent(section, which="fused"), first.obsm["X_stevs"])
    assert trained.fit_result.best_epoch is None  # the fast preset keeps its last epoch
    assert {"train/loss", "train/rna", "val/pcc_median"} <= set(trained.fit_result.history[-1])


def test_prediction_says_how_much_each_spot_trusted_each_expert(trained, sections):
    """The PoE precision share of the image expert per spot, from the experts' variances,
    in obs; logged after training as the mean over the validation spots."""
    from stinfer.nn.fusion import image_expert_weight

    section = sections[1]
    fused = trained.predict(section)
    image = fused.obs["stevs_image_expert_weight"].to_numpy()
    assert image.dtype == np.float32 and ((image > 0) & (image < 1)).all()
    np.testing.assert_allclose(image + fused.obs["stevs_spatial_expert_weight"], 1.0, atol=1e-6)
    # recomputed from each expert's own posterior variance (single-modality predictions),
    # which carries the distance-aware corrections the product applies: the variance floored
    # at the expert's training range, then multiplied by max(1, d2 / d2_ref), for the image
    # expert the larger of its latent's and its backbone features' ratio
    fusion = trained.module.fusion
    assert bool(fusion.distance_fitted) and bool(fusion.feature_distance_fitted)
    raw = []
    hook = trained.module.image_encoder.register_forward_hook(
        lambda module, inputs, output: raw.append(output)
    )
    try:
        image_only = trained.predict(section, mode="image")
    finally:
        hook.remove()
    var_img = image_only.obsm["stevs_posterior_var"].astype(float)
    var_xy = trained.predict(section, mode="spatial").obsm["stevs_posterior_var"].astype(float)
    mu, logvar, features = (
        torch.cat([getattr(p, name) for p in raw]) for name in ("mu", "logvar", "features")
    )
    inflation = fusion.distance_log_inflation(mu, 0, features)
    assert (inflation >= fusion.distance_log_inflation(mu, 0)).all()
    expected = torch.maximum(logvar, fusion.logvar_floor[0]) + inflation
    np.testing.assert_allclose(var_img, expected.exp().double().numpy(), rtol=1e-4)
    np.testing.assert_allclose(image, (var_xy / (var_img + var_xy)).mean(1), rtol=1e-4)
    spatial = trained.predict(section, mode="spatial")
    assert (spatial.obs["stevs_image_expert_weight"] == 0).all()
    assert (spatial.obs["stevs_spatial_expert_weight"] == 1).all()
    assert 0 < trained.validation_image_expert_weight < 1
    assert "val/image_expert_weight" in trained.fit_result.history[-1]
    # closed form: precisions 1 (image) and 1/3 (coordinates) give the image 3/4 of the mean
    logvar_img = torch.zeros(2, 4)
    logvar_xy = torch.full((2, 4), float(np.log(3.0)))
    torch.testing.assert_close(image_expert_weight(logvar_img, logvar_xy), torch.full((2,), 0.75))


def test_spatial_mode_needs_no_image_and_image_mode_needs_one(trained, sections):
    counts_only = sections[1].copy()
    counts_only.uns["stinfer"] = {**counts_only.uns["stinfer"], "image_path": None}
    assert trained.predict(counts_only, mode="spatial").shape[0] == counts_only.n_obs
    with pytest.raises(InputError, match="has no image"):
        trained.predict(counts_only, mode="image")
    with pytest.raises(InputError, match="mode must be one of"):
        trained.predict(sections[1], mode="sound")  # "both" is an alias of "fused" now


def test_save_then_load_gives_identical_predictions(trained, sections, tmp_path):
    trained.save(tmp_path / "run")
    restored = STEvs.load(tmp_path / "run")
    assert restored.genes == trained.genes
    assert restored.config.to_dict() == trained.config.to_dict()
    for mode in ("fused", "image", "spatial"):
        np.testing.assert_array_equal(
            restored.predict(sections[2], mode=mode).X, trained.predict(sections[2], mode=mode).X
        )
    with pytest.raises(InputError, match="already exists"):
        trained.save(tmp_path / "run")
    with pytest.raises(InputError, match=r"not a saved stevs model; missing config\.json"):
        STEvs.load(tmp_path)


def test_the_distance_aware_fusion_trusts_an_image_unlike_the_training_ones_less(
    trained, sections, tmp_path
):
    """The ``fast`` fusion fits each expert's latent distribution on the training spots and its
    reference distance on the validation spots. Patches of uniform noise (a texture unlike any
    training patch, which the image expert reads as nothing: image-only PCC ~0) get a clearly
    lower image weight than the same section's own patches, and only through the distance:
    the plain product of the same experts weighs them as it weighs the real patches. Blank
    grey patches, which drive the image expert's raw variance below anything it had in
    training, are handed to the coordinates: the fused prediction is then the spatial one, and
    the image-only prediction's posterior variance is wide.
    The fit is saved with the weights."""
    calibration = trained.fusion_calibration
    n_val = round(0.1 * trained.train_slides[0].n_obs)
    assert calibration["method"] == "distance" and calibration["validation_spots"] == n_val
    assert calibration["training_spots"] == trained.train_slides[0].n_obs - n_val
    section = sections[1]
    patches = spot_patches(section, trained.config.training.patch)
    noise = np.random.default_rng(0).integers(0, 256, patches.shape, dtype=np.uint8)
    blank = np.full_like(patches, 200)
    weight, fused = {}, {}
    for name, images in (("real", patches), ("noise", noise), ("blank", blank)):
        prediction = trained.predict(section, patches=images)
        weight[name] = float(prediction.obs["stevs_image_expert_weight"].mean())
        fused[name] = median_pcc(prediction, section)
    assert weight["noise"] < 0.8 * weight["real"], weight
    assert weight["blank"] < 0.25 * weight["real"], weight
    spatial_only = median_pcc(trained.predict(section, mode="spatial"), section)
    assert fused["blank"] > spatial_only - 0.03, (fused, spatial_only)
    # an H&E-only prediction of the blank patches says it knows little: its posterior variance
    # is many times that of the real patches
    variance = {
        name: float(
            trained.predict(section, mode="image", patches=images)
            .obsm["stevs_posterior_var"]
            .mean()
        )
        for name, images in (("real", patches), ("blank", blank))
    }
    assert variance["blank"] > 10 * variance["real"], variance
    assert median_pcc(trained.predict(section, mode="image", patches=noise), section) < 0.1
    fusion = trained.module.fusion
    fitted = {name: value.clone() for name, value in fusion.state_dict().items()}
    fusion.distance_fitted.fill_(False)  # the plain product of the same experts
    try:
        plain_noise = trained.predict(section, patches=noise).obs["stevs_image_expert_weight"]
    finally:
        fusion.load_state_dict(fitted)
    assert float(plain_noise.mean()) > weight["noise"] + 0.05, (float(plain_noise.mean()), weight)
    restored = STEvs.load(trained.save(tmp_path / "run"))
    for name, value in trained.module.fusion.state_dict().items():
        torch.testing.assert_close(restored.module.fusion.state_dict()[name], value)
    assert restored.fusion_calibration == calibration


def test_the_fusion_calibration_is_fitted_on_validation_spots_and_saved(sections, tmp_path):
    """The calibration chooses the PoE shift on the validation spots: never worse there than the
    uncalibrated product, only ever lowering an expert's precision, saved with the weights."""
    config = quick_fast_config()
    config.training.fusion_calibration = "validation"
    trained = STEvs([sections[0]], genes=list(sections[0].var_names), config=config)
    trained.train()
    assert not bool(trained.module.fusion.distance_fitted)  # one calibration at a time
    calibration = trained.fusion_calibration
    assert calibration["method"] == "validation"
    assert calibration["validation_nll"] <= calibration["validation_nll_uncalibrated"]
    assert calibration["validation_spots"] == round(0.1 * trained.train_slides[0].n_obs)
    offsets = trained.module.fusion.log_precision_offset
    assert (offsets <= 0).all() and float(offsets[0] - offsets[1]) == calibration["shift"]
    restored = STEvs.load(trained.save(tmp_path / "run"))
    torch.testing.assert_close(restored.module.fusion.log_precision_offset, offsets)


def permuted_rows(array: np.ndarray, seed: int) -> np.ndarray:
    return np.asarray(array)[np.random.default_rng(seed).permutation(len(array))]


def trained_scores(sections, patches) -> dict[str, float]:
    """Median PCC per mode on sections 2.. of a quick ``fast`` model trained on section 1."""
    model = STEvs([sections[0]], list(sections[0].var_names), quick_fast_config())
    model.train(patches=patches[:1])
    return scores_by_mode(model, sections[1:], patches[1:])


def scores_by_mode(model: STEvs, tests, patches) -> dict[str, float]:
    return {
        mode: float(
            np.mean(
                [
                    median_pcc(model.predict(s, mode=mode, patches=p), s)
                    for s, p in zip(tests, patches, strict=True)
                ]
            )
        )
        for mode in ("fused", "image", "spatial")
    }


@pytest.mark.slow  # two 30-epoch trainings (~80 s each on 2 cores); -m slow
def test_fused_follows_the_spatial_expert_when_the_image_carries_no_signal(sections):
    """Patches shuffled between the spots of every section: texture independent of
    expression. The ``fast`` product (modality dropout trains each expert alone) stays with
    the coordinates."""
    spec = quick_fast_config().training.patch
    patches = [permuted_rows(spot_patches(s, spec), seed) for seed, s in enumerate(sections)]
    scores = trained_scores(sections, patches)
    assert scores["fused"] >= scores["spatial"] - 0.02, scores
    assert scores["image"] < 0.1 < scores["spatial"], scores  # the scenario is what it says


@pytest.mark.slow  # two 30-epoch trainings (~80 s each on 2 cores); -m slow
def test_fused_follows_the_image_expert_when_the_coordinates_carry_no_signal(sections):
    """Spot coordinates shuffled within every section (each spot keeps its own patch): the
    ``fast`` product stays with the image."""
    spec = quick_fast_config().training.patch
    patches = [spot_patches(s, spec) for s in sections]
    shuffled = []
    for seed, section in enumerate(sections):
        section = section.copy()
        section.obsm["spatial"] = permuted_rows(section.obsm["spatial"], seed)
        shuffled.append(section)
    scores = trained_scores(shuffled, patches)
    assert scores["fused"] >= scores["image"] - 0.02, scores
    assert scores["spatial"] < 0.1 < scores["image"], scores  # the scenario is what it says


def test_missing_genes_are_reported_by_name(sections):
    with pytest.raises(InputError, match=r"lacks 1 of the 1 genes.*not_a_gene"):
        STEvs([sections[0]], genes=["not_a_gene"], config=quick_fast_config())


def frozen_model(section: ad.AnnData, cache_features: bool) -> STEvs:
    config = quick_fast_config(epochs=1)
    config.module.freeze_encoder = True
    config.training.cache_features = cache_features
    config.training.augment = False  # cached features cannot be flipped
    return STEvs([section], list(section.var_names[:10]), config)


def test_cached_feature_training_step_gives_the_same_losses_as_the_uncached_path(sections):
    """A training step on cached backbone features equals the step on the patches."""
    losses = []
    for cache in (True, False):
        model = frozen_model(sections[0], cache)
        assert model._uses_cached_features() is cache
        sources = [PatchSource(spot_patches(sections[0]))]
        dataset, transforms = model._dataset(model.train_slides, sources, with_counts=True)
        batch = dataset.__getitems__(list(range(32)))
        assert batch[0].dim() == (2 if cache else 4)
        model.module.gene_decoder.initialise_from_totals(*dataset.count_totals())
        task = STEvsTask(model.module, model.config.training, colour_transforms=transforms)
        model.module.train()
        logged = {}
        task.log = lambda name, value, store=logged, **_: store.__setitem__(name, float(value))
        torch.manual_seed(0)
        loss = task.training_step(batch, 0)
        loss.backward()
        gradient = model.module.image_encoder.heads.mu.weight.grad.clone()
        losses.append((float(loss), logged, gradient))
    (cached, cached_terms, cached_grad), (uncached, uncached_terms, uncached_grad) = losses
    assert cached == pytest.approx(uncached, rel=1e-5)
    for key in ("train/rna", "train/image", "train/kl", "train/alignment"):
        assert cached_terms[key] == pytest.approx(uncached_terms[key], rel=1e-4, abs=1e-5), key
    torch.testing.assert_close(cached_grad, uncached_grad, rtol=1e-4, atol=1e-5)


def test_cached_feature_training_gives_the_same_epoch_losses_and_weights_as_uncached(sections):
    """Whole epochs (shuffling, modality dropout, validation) agree, not just one step."""
    runs = []
    for cache in (True, False):
        model = frozen_model(sections[0], cache)
        model.config.trainer = dataclasses.replace(model.config.trainer, max_epochs=2)
        history = model.train().history
        runs.append((history, model.module.state_dict()))
    (cached_history, cached_weights), (uncached_history, uncached_weights) = runs
    for cached_row, uncached_row in zip(cached_history, uncached_history, strict=True):
        for key in ("train/loss", "train/rna", "train/image", "val/pcc_median"):
            assert cached_row[key] == pytest.approx(uncached_row[key], rel=1e-4, abs=1e-5), key
    for name, value in cached_weights.items():
        torch.testing.assert_close(value, uncached_weights[name], rtol=1e-3, atol=1e-5)


def test_with_a_monitor_the_best_validation_epoch_is_restored(sections):
    model = frozen_model(sections[0], cache_features=True)
    model.config.trainer = dataclasses.replace(
        model.config.trainer, max_epochs=3, monitor="val/pcc_median"
    )
    result = model.train()
    scores = [row["val/pcc_median"] for row in result.history]
    assert result.best_epoch == int(np.argmax(scores))
    assert result.best_score == pytest.approx(max(scores))


def test_test_time_adaptation_changes_the_encoders_but_not_the_gene_decoder(sections):
    config = quick_fast_config(epochs=1)
    model = STEvs([sections[0]], list(sections[0].var_names[:10]), config)
    model.train()
    decoder_before = {k: v.clone() for k, v in model.module.gene_decoder.state_dict().items()}
    encoder_before = [p.clone() for p in model.module.image_encoder.heads.parameters()]
    model.adapt([sections[1]], epochs=1)
    for key, value in model.module.gene_decoder.state_dict().items():
        torch.testing.assert_close(value, decoder_before[key])
    changed = [
        not torch.equal(a, b)
        for a, b in zip(encoder_before, model.module.image_encoder.heads.parameters(), strict=True)
    ]
    assert any(changed)
    assert all(p.requires_grad for p in model.module.gene_decoder.parameters())


def test_task_validation_metric_is_the_median_pcc_of_the_fused_prediction(trained, sections):
    task = STEvsTask(trained.module, trained.config.training)
    assert isinstance(trained.config.trainer, TrainerConfig)
    assert task.configure_optimizers().defaults["lr"] == trained.config.module.lr


# ---------------------------------------------------------------- streaming at scale
def test_training_from_the_patch_cache_equals_training_on_patches_in_memory(sections, tmp_path):
    """Two slides, patches streamed per batch from the on-disk cache or handed in as arrays:
    the same losses and weights, epoch by epoch."""
    runs = []
    for in_memory in (True, False):
        config = quick_fast_config(epochs=2)
        config.training.patch_cache_dir = str(tmp_path / "cache")
        model = STEvs(sections[:2], list(sections[0].var_names[:12]), config)
        patches = [np.array(spot_patches(s)) for s in sections[:2]] if in_memory else None
        history = model.train(patches=patches).history
        runs.append((history, model.module.state_dict()))
    (memory_history, memory_weights), (cache_history, cache_weights) = runs
    assert len(list((tmp_path / "cache").glob("patches-*.npy"))) == 2
    for memory_row, cache_row in zip(memory_history, cache_history, strict=True):
        for key in ("train/loss", "train/rna", "train/image", "val/pcc_median"):
            assert memory_row[key] == pytest.approx(cache_row[key], rel=1e-6), key
    for name, value in memory_weights.items():
        torch.testing.assert_close(value, cache_weights[name], rtol=1e-6, atol=1e-7)


PEAK_RSS_SCRIPT = """
import dataclasses, re, sys, numpy as np, torch
torch.set_num_threads(1)
from stinfer.data.patches import spot_patches
from stinfer.io.h5ad import read_h5ad_slide
from stinfer.models.stevs import STEvs, fast_preset
in_memory, paths = sys.argv[1] == "memory", sys.argv[2:]
slides = [read_h5ad_slide(path) for path in paths]
config = fast_preset()
config.trainer = dataclasses.replace(
    config.trainer, max_epochs=1, progress_bar=False, swa_epoch_start=None
)
config.training.batch_size = 128
model = STEvs(slides, list(slides[0].var_names), config)
model.train(patches=[np.array(spot_patches(s)) for s in slides] if in_memory else None)
# VmHWM: this program's own peak (ru_maxrss would start at the forking parent's RSS)
print(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


@pytest.mark.slow  # four training processes (~2.5 min); benchmarks/scale.py measures it too
@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)"
)
def test_training_memory_does_not_grow_with_the_number_of_slides(tmp_path):
    """Peak RSS of training on 3 slides is within a fraction of one slide's patches of
    training on 1: the patches (~75 MiB per 1,000-spot slide) stay in the on-disk cache, read
    per batch. The control, the same slides' patches handed in as arrays, grows by at least
    the two extra slides' patches, so the measurement can see what it guards against."""
    import os
    import subprocess
    import sys

    from stinfer.io.slide_data import prepare_for_h5ad

    sections = make_synthetic_sections(
        tmp_path, SyntheticConfig(seed=5, n_sections=3, target_spots=1000, n_genes=20)
    )
    paths = []
    for section in sections:
        paths.append(str(tmp_path / f"{section.uns['stinfer']['sample_id']}.h5ad"))
        prepare_for_h5ad(section).write_h5ad(paths[-1])
    slide_mib = np.mean([s.n_obs for s in sections]) * 3 * 160 * 160 / 2**20

    def peak_mib(mode: str, slide_paths: list[str]) -> float:
        result = subprocess.run(
            [sys.executable, "-c", PEAK_RSS_SCRIPT, mode, *slide_paths],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return int(result.stdout.split()[-1]) / 1024

    streamed = peak_mib("cache", paths[:1]), peak_mib("cache", paths)
    held = peak_mib("memory", paths[:1]), peak_mib("memory", paths)
    message = f"streamed {streamed}, in memory {held} MiB; {slide_mib:.0f} MiB of patches per slide"
    print(message)
    assert streamed[1] - streamed[0] < 0.4 * slide_mib, message
    assert held[1] - held[0] > 1.0 * slide_mib, message


def test_chunked_prediction_equals_one_shot_and_writes_the_same_h5ad(
    trained, sections, tmp_path, monkeypatch
):
    """Streaming the image chunk by chunk (as for a Visium HD slide) and writing each chunk
    to the output file give exactly what one in-memory prediction gives."""
    import stinfer.models.stevs as stevs_module

    section = sections[1]
    one_shot = trained.predict(section)
    monkeypatch.setattr(stevs_module, "IN_MEMORY_PATCH_BYTES", 0)
    monkeypatch.setattr(trained.config.training, "predict_batch_size", 64)
    streamed = trained.predict(section)
    np.testing.assert_array_equal(streamed.X, one_shot.X)
    np.testing.assert_array_equal(streamed.obsm["X_stevs"], one_shot.obsm["X_stevs"])

    path = trained.write_prediction(section, tmp_path / "pred.h5ad")
    written = ad.read_h5ad(path)
    assert list(written.obs_names) == list(section.obs_names)
    for column in ("sample_id", "array_row", "array_col"):
        assert list(written.obs[column]) == list(section.obs[column])
    assert list(written.var_names) == trained.genes
    np.testing.assert_array_equal(written.X, one_shot.X)
    np.testing.assert_array_equal(written.layers["nb_theta"], one_shot.layers["nb_theta"])
    np.testing.assert_allclose(written.layers["log1p_cp10k"], one_shot.layers["log1p_cp10k"])
    np.testing.assert_allclose(written.obs["library_size"], one_shot.obs["library_size"])
    assert written.uns["stinfer"]["expression"] == one_shot.uns["stinfer"]["expression"]
    for key in ("X_stevs", "stevs_posterior_var", "spatial"):
        np.testing.assert_array_equal(written.obsm[key], one_shot.obsm[key])
    for key in ("stevs_image_expert_weight", "stevs_spatial_expert_weight"):
        np.testing.assert_array_equal(written.obs[key].to_numpy(), one_shot.obs[key].to_numpy())
    assert written.uns["stevs_prediction"]["mode"] == "fused"
    backed = ad.read_h5ad(path, backed="r")
    np.testing.assert_array_equal(backed.X[10:20], one_shot.X[10:20])
    with pytest.raises(InputError, match="exists"):
        trained.write_prediction(section, path)


def tiny_slide(n_spots: int, sample_id: str) -> ad.AnnData:
    from stinfer.io.slide_data import make_slide

    rng = np.random.default_rng(0)
    return make_slide(
        rng.poisson(3.0, (n_spots, 4)),
        [f"{sample_id}_spot{i}" for i in range(n_spots)],
        [f"gene{g}" for g in range(4)],
        rng.uniform(0, 1000, (n_spots, 2)),
        sample_id=sample_id,
        source_format="h5ad",
        source="test",
    )


def test_validation_spots_are_the_intra_slice_splits_val_spots():
    from stinfer.evaluate.protocols import SPLIT_KEY, protocol_tasks

    task = protocol_tasks([tiny_slide(50, "s")], "intra_slice", seeds=(4,))[0]
    training = task.train_slides[0]
    train_idx, val_idx = validation_split([training], val_fraction=0.3, seed=0)
    marks = training.obs[SPLIT_KEY].astype(str).to_numpy()
    np.testing.assert_array_equal(val_idx, np.flatnonzero(marks == "val"))
    np.testing.assert_array_equal(train_idx, np.flatnonzero(marks == "train"))
    assert len(val_idx) == task.extra["n_val"]


def test_validation_spots_follow_the_slide_order_and_are_drawn_without_a_split():
    from stinfer.io.slide_data import SPLIT_KEY

    marked, unmarked = tiny_slide(6, "a"), tiny_slide(30, "b")
    marked.obs[SPLIT_KEY] = ["train", "val", "train", "train", "val", "train"]
    train_idx, val_idx = validation_split([unmarked, marked], 0.1, seed=0)
    np.testing.assert_array_equal(val_idx, [31, 34])  # spots of the unmarked slide: training
    assert len(train_idx) == 34

    train_idx, val_idx = validation_split([unmarked], 0.1, seed=0)
    assert len(val_idx) == 3 and set(train_idx).isdisjoint(val_idx)
    assert len(train_idx) + len(val_idx) == 30

    marked.obs[SPLIT_KEY] = ["train", "test", "train", "train", "val", "train"]
    with pytest.raises(InputError, match="holds"):
        validation_split([marked], 0.1, seed=0)


# --------------------------------------------------------------------------- uncertainty
def test_uncertainty_layers_are_ordered_seeded_and_never_read_the_test_counts(
    trained, sections, tmp_path
):
    """Predictive mean, sd and nested intervals per spot and gene; the same seed gives the
    same layers, the written file holds the same values, and poisoning the test slide's
    counts changes nothing (they are never read)."""
    section = sections[1]
    config = UncertaintyConfig(samples=12, levels=(0.5, 0.9), seed=3)
    prediction = trained.predict(section, uncertainty=config)
    layers = prediction.layers
    assert layers["lower_90"].shape == (section.n_obs, len(trained.genes))
    assert (layers["lower_90"] <= layers["lower_50"]).all()
    assert (layers["lower_50"] <= layers["upper_50"]).all()
    assert (layers["upper_50"] <= layers["upper_90"]).all()
    assert (layers["predictive_sd"] > 0).all()
    # the predictive mean integrates over the posterior around the point prediction X
    pcc = [np.corrcoef(layers["predictive_mean"][:, g], prediction.X[:, g])[0, 1] for g in range(5)]
    assert min(pcc) > 0.9, pcc
    record = prediction.uns["stinfer"]["uncertainty"]
    assert record["calibrated"] and record["levels"] == [0.5, 0.9] and record["samples"] == 12
    assert "predictive_sd" in prediction.uns["stinfer"]["expression"]["layers"]

    poisoned = section.copy()
    poisoned.X = np.random.default_rng(0).poisson(50.0, poisoned.shape).astype(np.float32)
    again = trained.predict(poisoned, uncertainty=config)
    for name in ("predictive_mean", "predictive_sd", "lower_50", "upper_90"):
        np.testing.assert_array_equal(again.layers[name], layers[name])
    other_seed = trained.predict(section, uncertainty=dataclasses.replace(config, seed=4))
    assert not np.array_equal(other_seed.layers["predictive_sd"], layers["predictive_sd"])

    written = ad.read_h5ad(
        trained.write_prediction(section, tmp_path / "p.h5ad", uncertainty=config)
    )
    for name in ("predictive_mean", "predictive_sd", "lower_50", "upper_50", "lower_90"):
        np.testing.assert_array_equal(written.layers[name], layers[name])
    assert written.uns["stinfer"]["uncertainty"]["calibrated"]
    assert "lower_50" not in trained.predict(section).layers  # off by default


def test_uncalibrated_intervals_cover_nominally_counts_drawn_from_the_models_own_likelihood(
    trained, sections
):
    """Counts drawn from the model's predictive (a posterior sample of the latent per spot,
    decoded, then an NB draw): the PIT coverage of its own intervals is nominal."""
    section = sections[2]
    config = UncertaintyConfig(samples=40, levels=(0.5, 0.9), calibrated=False)
    prediction = trained.predict(section, mode="fused", uncertainty=config)
    generator = torch.Generator().manual_seed(99)
    mu = torch.from_numpy(prediction.obsm["X_stevs"])
    sd = torch.from_numpy(prediction.obsm["stevs_posterior_var"]).sqrt()
    draws = []
    with torch.no_grad():
        for _ in range(5):  # five count draws per spot and gene
            z = mu + sd * torch.randn(mu.shape, generator=generator)
            decoded = trained.module.gene_decoder(z)
            rng = np.random.default_rng(len(draws))
            mean, theta = decoded["nb_mean"].double().numpy(), decoded["nb_theta"].double().numpy()
            draws.append(rng.negative_binomial(theta, theta / (theta + mean)))
    mean = prediction.layers["predictive_mean"].astype(np.float64)
    variance = prediction.layers["predictive_sd"].astype(np.float64) ** 2
    theta = moment_matched_theta(mean, variance)
    for counts in draws[:2]:
        coverage = interval_coverage(counts, mean, theta, (0.5, 0.9))
        assert coverage["pit_coverage_50"] == pytest.approx(0.5, abs=0.03), coverage
        assert coverage["pit_coverage_90"] == pytest.approx(0.9, abs=0.03), coverage
    lower, upper = prediction.layers["lower_90"], prediction.layers["upper_90"]
    inside = np.mean([((c >= lower) & (c <= upper)).mean() for c in draws])
    assert inside >= 0.89  # discrete intervals cover at least their level


def calibration_of(model: STEvs, slides: list[ad.AnnData]) -> dict:
    """The uncertainty calibration the trained ``model`` fits on ``slides``' validation spots."""
    with model._training_sources(slides, None) as sources:
        dataset, transforms = model._dataset(slides, sources, with_counts=True)
        _, val_loader = model._loaders(dataset, model.config.trainer.seed)
        task = STEvsTask(model.module, model.config.training, colour_transforms=transforms)
        return model._fit_uncertainty_calibration(task, val_loader)


def test_the_uncertainty_calibration_reads_the_validation_spots_only_and_is_saved(
    trained, tmp_path
):
    """Poisoning the training spots outside the validation split leaves the calibration as it
    is; changing the validation spots' counts changes it. Saved with the model."""
    stored = trained.uncertainty_calibration
    slide = trained.train_slides[0]
    assert set(stored) == {"fused", "image", "spatial"}  # one per inference mode
    for calibration in stored.values():
        assert calibration["validation_spots"] == round(0.1 * slide.n_obs)
        assert calibration["validation_nll"] <= calibration["validation_nll_unscaled"]
    _, val_idx = validation_split([slide], trained.config.training.val_fraction, 0)
    is_val = np.zeros(slide.n_obs, bool)
    is_val[val_idx] = True

    def with_counts(factor_val: float, factor_other: float) -> ad.AnnData:
        changed = slide.copy()
        counts = np.asarray(changed.X.todense() if hasattr(changed.X, "todense") else changed.X)
        scale = np.where(is_val, factor_val, factor_other)[:, None]
        changed.X = np.rint(counts * scale).astype(np.float32)
        return changed

    assert calibration_of(trained, [with_counts(1.0, 1.0)]) == stored
    assert calibration_of(trained, [with_counts(1.0, 40.0)]) == stored
    assert calibration_of(trained, [with_counts(6.0, 1.0)]) != stored
    restored = STEvs.load(trained.save(tmp_path / "run"))
    assert restored.uncertainty_calibration == stored

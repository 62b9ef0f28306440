"""STEvs with a feature store: the frozen encoder's features read from the store, not recomputed."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import anndata as ad
import numpy as np
import pytest
import torch

from stinfer.data.feature_store import FeatureStore
from stinfer.data.patches import PatchSpec
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.errors import InputError
from stinfer.models.baselines import PatchFeatureRidge, PatchFeatureRidgeConfig
from stinfer.models.stevs import STEvs, STEvsModelConfig, fast_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCH = PatchSpec(patch_size_px=64)


@pytest.fixture(scope="module")
def sections(tmp_path_factory) -> list[ad.AnnData]:
    config = SyntheticConfig(n_sections=2, target_spots=80, n_genes=20, seed=5)
    return make_synthetic_sections(tmp_path_factory.mktemp("synthetic"), config)


def frozen_config(store=None, colour: str = "slide") -> STEvsModelConfig:
    """The ``fast`` preset with its encoder frozen, one epoch, 64-px patches, no augmentation."""
    config = fast_preset()
    config.module.freeze_encoder = True
    config.module.patch_size = PATCH.patch_size_px
    config.module.image_recon_size = 16
    config.training.patch = PATCH
    config.training.augment = False
    config.training.test_time_augmentation = False
    config.training.colour_normalization = colour
    config.training.predict_batch_size = 32  # several batches per slide
    config.training.feature_store = None if store is None else str(store)
    config.trainer = dataclasses.replace(config.trainer, max_epochs=1, progress_bar=False)
    return config


@contextlib.contextmanager
def counted_backbone_calls(model: STEvs):
    """A list that grows by one at every forward pass of the model's backbone meanwhile."""
    calls: list[int] = []
    hook = model.module.image_encoder.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return tmp_path_factory.mktemp("store") / "features.zarr"


@pytest.fixture(scope="module")
def with_store(sections, store_path) -> STEvs:
    model = STEvs([sections[0]], list(sections[0].var_names), frozen_config(store_path))
    model.train()
    return model


def test_training_and_prediction_with_a_store_equal_those_without(sections, with_store):
    without = STEvs([sections[0]], list(sections[0].var_names), frozen_config())
    without.train()
    for name, value in without.module.state_dict().items():
        torch.testing.assert_close(with_store.module.state_dict()[name], value, rtol=0, atol=0)
    for section in sections:
        np.testing.assert_array_equal(with_store.predict(section).X, without.predict(section).X)


def test_a_second_model_on_the_same_store_reads_instead_of_recomputing(
    sections, with_store, store_path, caplog
):
    with_store.predict(sections[1])  # stores the other section's features too
    second = STEvs([sections[0]], list(sections[0].var_names), frozen_config(store_path))
    with counted_backbone_calls(second) as calls, caplog.at_level("INFO", logger="stinfer"):
        second.train()
        prediction = second.predict(sections[1])
    assert calls == []
    assert f"read from {store_path}" in caplog.text
    assert "computed into" not in caplog.text
    np.testing.assert_array_equal(prediction.X, with_store.predict(sections[1]).X)


def test_explicit_patches_bypass_the_store(sections, with_store, store_path):
    from stinfer.data.patches import spot_patches

    patches = spot_patches(sections[1], PATCH)
    with counted_backbone_calls(with_store) as calls:
        from_patches = with_store.predict(sections[1], patches=patches)
    assert calls  # computed from the given patches, not read
    np.testing.assert_array_equal(from_patches.X, with_store.predict(sections[1]).X)


def test_stevs_and_the_ridge_probe_keep_separate_keys_on_one_store(sections, tmp_path):
    store = tmp_path / "shared.zarr"
    section = sections[0]
    genes = list(section.var_names)
    ridge_config = PatchFeatureRidgeConfig(
        features="backbone", backbone="stinfer_histology_cnn", patch=PATCH, feature_store=str(store)
    )
    PatchFeatureRidge([section], genes, ridge_config).train()
    stevs = STEvs([section], genes, frozen_config(store, colour="none"))
    stevs.train()
    slide_folder = FeatureStore(store).group_path(section, "key").parent
    keys = sorted(path.name for path in slide_folder.iterdir() if path.is_dir())
    assert len(keys) == 2, keys
    stevs_key = stevs._feature_extractor(None).feature_key(section)
    assert stevs_key in keys
    recorded = json.loads((slide_folder / stevs_key / "zarr.json").read_text())["attributes"]
    assert recorded["input_scaling"]["pipeline"] == "stevs"
    assert recorded["input_scaling"]["patch_normalization"] == "fixed"
    minmax = STEvs([section], genes, frozen_config(store, colour="none"))
    minmax.config.training.patch_normalization = "minmax"
    keys_of = {
        "fixed": stevs_key,
        "minmax": minmax._feature_extractor(None).feature_key(section),
        "colour transform": stevs._feature_extractor(torch.ones(2, 3)).feature_key(section),
    }
    assert len(set(keys_of.values()) | set(keys)) == 4, keys_of


def test_a_loaded_model_reads_the_store_and_predicts_the_same(
    sections, with_store, store_path, tmp_path
):
    expected = with_store.predict(sections[1]).X
    folder = with_store.save(tmp_path / "model")
    loaded = STEvs.load(folder)
    assert loaded.feature_weights_id == with_store.feature_weights_id
    assert loaded.config.training.feature_store == str(store_path)
    with counted_backbone_calls(loaded) as calls:
        np.testing.assert_array_equal(loaded.predict(sections[1]).X, expected)
    assert calls == []


def test_a_store_with_an_encoder_that_trains_is_an_input_error(sections, tmp_path):
    config = frozen_config(tmp_path / "store.zarr")
    config.module.freeze_encoder = False
    with pytest.raises(InputError, match=r"feature_store.*frozen"):
        STEvs([sections[0]], list(sections[0].var_names), config)


def test_frozen_features_are_computed_on_the_runs_gpu_when_there_is_one(sections, monkeypatch):
    """Features are cached before Lightning moves the module to its device: they go to the GPU
    the trainer may use (this process's, under DDP), and stay where the module is otherwise."""
    genes = list(sections[0].var_names[:5])
    model = STEvs([sections[0]], genes, frozen_config())
    assert model.feature_device() == torch.device("cpu")  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert model.feature_device() == torch.device("cuda", 1)
    model.config.trainer.accelerator = "cpu"
    assert model.feature_device() == torch.device("cpu")

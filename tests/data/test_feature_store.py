"""The feature store: frozen encoder features computed once per slide and key, then read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

from stinfer import cli
from stinfer.data.feature_store import (
    FeatureExtractor,
    FeatureExtractorSpec,
    FeatureStore,
    weights_identity,
)
from stinfer.data.features import backbone_features
from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.errors import InputError
from stinfer.io.slide_data import prepare_for_h5ad
from stinfer.models.baselines import PatchFeatureRidge, PatchFeatureRidgeConfig
from stinfer.nn.encoders import create_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIT = "vit_tiny_patch16_224"
TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}  # a ViT of the same family, tiny
PATCH = PatchSpec(patch_size_px=64)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    config = SyntheticConfig(n_sections=2, target_spots=40, n_genes=20, seed=1)
    return make_synthetic_sections(folder, config)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A randomly initialised tiny ViT saved to a local safetensors file (nothing downloads)."""
    torch.manual_seed(7)
    model = create_backbone(VIT, None, **TINY_VIT)
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def vit_spec(weights_file, **changes) -> FeatureExtractorSpec:
    values = {
        "encoder": VIT,
        "encoder_kwargs": TINY_VIT,
        "weights": str(weights_file),
        "patch": PATCH,
        "batch_size": 16,
        "chunk_size": 20,
        **changes,
    }
    return FeatureExtractorSpec(**values)


def count_computed_chunks(monkeypatch) -> list[int]:
    """Record the size of every chunk of patches the encoder runs on."""
    calls: list[int] = []
    original = FeatureExtractor.chunk_features

    def counting(self, patches):
        calls.append(len(patches))
        return original(self, patches)

    monkeypatch.setattr(FeatureExtractor, "chunk_features", counting)
    return calls


def test_round_trip_equals_direct_backbone_features_and_records_the_key(
    slides, weights_file, tmp_path
):
    slide = slides[0]
    store = FeatureStore(tmp_path / "store.zarr")
    result = store.get_or_compute(slide, vit_spec(weights_file))
    encoder = create_backbone(VIT, str(weights_file), **TINY_VIT)
    direct = backbone_features(spot_patches(slide, PATCH), encoder, batch_size=16)
    assert result.computed
    assert result.features.dtype == np.float32
    assert result.features.shape == (slide.n_obs, 32)
    np.testing.assert_allclose(result.features, direct, rtol=1e-5, atol=1e-6)
    assert result.path == tmp_path / "store.zarr" / "synthetic_section1" / result.key
    assert result.key.startswith(f"{VIT}-")
    attributes = json.loads((result.path / "zarr.json").read_text())["attributes"]
    assert attributes["obs_names"] == list(slide.obs_names)
    assert attributes["weights"] == weights_identity(weights_file, VIT)
    assert attributes["weights"].startswith("sha256:")
    assert attributes["weights_file"] == "tiny_vit.safetensors"
    # the synthetic slide has 2 um pixels: a 64-px patch is 128 um wide
    assert attributes["patch"] == {
        "footprint_um": 128.0,
        "output_px": 64,
        "output_pixel_size_um": 2.0,
    }
    assert attributes["input_scaling"]["resize_to"] == [224, 224]
    assert attributes["stinfer_version"]
    # nothing temporary is left behind
    assert sorted(p.name for p in result.path.parent.iterdir()) == [result.key, "zarr.json"]


def test_second_call_reads_without_running_the_encoder(slides, weights_file, tmp_path, monkeypatch):
    calls = count_computed_chunks(monkeypatch)
    store = FeatureStore(tmp_path / "store.zarr")
    start = time.perf_counter()
    first = store.get_or_compute(slides[0], vit_spec(weights_file))
    compute_seconds = time.perf_counter() - start
    assert first.computed and sum(calls) == slides[0].n_obs
    assert max(calls) <= 32  # chunk_size 20 rounded up to whole batches of 16
    calls.clear()
    start = time.perf_counter()
    again = FeatureStore(tmp_path / "store.zarr").get_or_compute(slides[0], vit_spec(weights_file))
    read_seconds = time.perf_counter() - start
    assert calls == [] and not again.computed
    np.testing.assert_array_equal(again.features, first.features)
    assert read_seconds < compute_seconds
    # a subset of the stored spots (an intra-slice training split) is read too, in its order
    subset = slides[0][np.arange(slides[0].n_obs)[::-3]].copy()
    part = store.get_or_compute(subset, vit_spec(weights_file))
    assert calls == [] and not part.computed
    np.testing.assert_array_equal(part.features, first.features[::-3])


def test_the_key_changes_with_weights_patch_and_seed_but_not_with_the_units(
    slides, weights_file, tmp_path
):
    slide = slides[0]
    base = FeatureExtractor(vit_spec(weights_file)).feature_key(slide)
    torch.manual_seed(8)
    other_file = tmp_path / "other.safetensors"
    save_file(create_backbone(VIT, None, **TINY_VIT).state_dict(), str(other_file))
    other_weights = FeatureExtractor(vit_spec(other_file)).feature_key(slide)
    other_patch = FeatureExtractor(
        vit_spec(weights_file, patch=PatchSpec(patch_size_px=96))
    ).feature_key(slide)
    random_0 = FeatureExtractor(vit_spec(weights_file, weights=None)).feature_key(slide)
    random_1 = FeatureExtractor(vit_spec(weights_file, weights=None, seed=1)).feature_key(slide)
    assert len({base, other_weights, other_patch, random_0, random_1}) == 5
    # the same 128-um patch at 2 um/px, given in microns: the same features, the same key
    in_microns = FeatureExtractor(vit_spec(weights_file, patch=PatchSpec(patch_size_um=128.0)))
    assert in_microns.feature_key(slide) == base
    # a copy of the weights file elsewhere is the same weights; speed settings are not in it
    copied = tmp_path / "copy.safetensors"
    copied.write_bytes(weights_file.read_bytes())
    same = vit_spec(copied, batch_size=3, chunk_size=7, device="cpu")
    assert FeatureExtractor(same).feature_key(slide) == base
    assert weights_identity(None, VIT, seed=4) == "random-seed4"
    assert weights_identity("hub", VIT) == f"hub:{VIT}"


def test_the_key_follows_the_image_pixels_not_its_path(slides, weights_file, tmp_path):
    """A degraded copy of a section (other bytes) must never read the clean section's
    features; the same image moved elsewhere keeps its key (the store travels with it)."""
    import shutil

    from stinfer.io.slide_data import slide_meta

    slide = slides[0]
    extractor = FeatureExtractor(vit_spec(weights_file))
    image = Path(slide_meta(slide)["image_path"])

    def pointing_to(path: Path):
        moved = slide.copy()
        moved.uns["stinfer"] = {**moved.uns["stinfer"], "image_path": str(path)}
        return moved

    copy = tmp_path / f"copy{image.suffix}"
    shutil.copyfile(image, copy)
    assert extractor.feature_key(pointing_to(copy)) == extractor.feature_key(slide)
    degraded = tmp_path / f"degraded{image.suffix}"
    pixels = bytearray(image.read_bytes())
    pixels[-10] ^= 0xFF  # one byte of the last block
    degraded.write_bytes(bytes(pixels))
    assert extractor.feature_key(pointing_to(degraded)) != extractor.feature_key(slide)


def test_a_models_own_input_pipeline_gets_its_own_key_and_computes_with_its_encode(
    slides, weights_file, tmp_path
):
    """The same encoder and weights on patches scaled another way: another key, and the
    stored features are exactly what the model's ``encode`` returns, batch by batch."""
    slide = slides[0]
    encoder = create_backbone(VIT, str(weights_file), **TINY_VIT).eval()
    weights_id = weights_identity(weights_file, VIT)
    batches: list[int] = []

    def encode(patches: np.ndarray) -> torch.Tensor:
        batches.append(len(patches))
        scaled = torch.from_numpy(np.asarray(patches)).float() / 127.5 - 1.0
        with torch.no_grad():
            return encoder(torch.nn.functional.interpolate(scaled, size=224))

    def extractor(scaling, **changes) -> FeatureExtractor:
        spec = vit_spec(weights_file, input_scaling=scaling, **changes)
        return FeatureExtractor(spec, encoder, weights_id, encode=encode if scaling else None)

    timm_scaled = extractor(None).feature_key(slide)
    fixed = extractor({"pipeline": "test", "scale": "fixed"})
    minmax = extractor({"pipeline": "test", "scale": "minmax"})
    assert len({timm_scaled, fixed.feature_key(slide), minmax.feature_key(slide)}) == 3
    result = FeatureStore(tmp_path / "store.zarr").get_or_compute(slide, fixed)
    assert result.key == fixed.feature_key(slide)
    assert set(batches) <= {16, slide.n_obs % 16} and sum(batches) == slide.n_obs
    np.testing.assert_array_equal(result.features, encode(spot_patches(slide, PATCH)).numpy())
    attributes = json.loads((result.path / "zarr.json").read_text())["attributes"]
    assert attributes["input_scaling"] == {"pipeline": "test", "scale": "fixed"}
    with pytest.raises(ValueError, match="encode together with"):
        FeatureExtractor(vit_spec(weights_file, input_scaling={"pipeline": "test"}))
    with pytest.raises(ValueError, match="name its pipeline"):
        extractor({"scale": "fixed"})


def test_a_slide_whose_spots_are_not_in_the_store_is_an_input_error(slides, weights_file, tmp_path):
    store = FeatureStore(tmp_path / "store.zarr")
    store.get_or_compute(slides[0], vit_spec(weights_file))
    renamed = slides[0].copy()
    renamed.obs_names = [f"{name}_x" for name in renamed.obs_names]
    with pytest.raises(InputError, match=r"store\.zarr.*synthetic_section1.*not among"):
        store.get_or_compute(renamed, vit_spec(weights_file))
    moved = slides[0].copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] + 10.0
    with pytest.raises(InputError, match="other positions"):
        store.get_or_compute(moved, vit_spec(weights_file))


def test_a_folder_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(InputError, match="not a stinfer feature store"):
        FeatureStore(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_an_interrupted_computation_leaves_no_group(slides, weights_file, tmp_path, monkeypatch):
    def failing(self, patches):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureExtractor, "chunk_features", failing)
    store = FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(KeyboardInterrupt):
        store.get_or_compute(slides[0], vit_spec(weights_file))
    slide_folder = tmp_path / "store.zarr" / "synthetic_section1"
    assert [p.name for p in slide_folder.iterdir()] == ["zarr.json"]


def test_the_features_command_computes_then_reuses_each_slide(
    slides, weights_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("features",))
    paths = []
    for slide in slides:
        path = tmp_path / f"{slide.uns['stinfer']['sample_id']}.h5ad"
        prepare_for_h5ad(slide).write_h5ad(path)
        paths.append(str(path))
    store = tmp_path / "features.zarr"
    command = [
        "features",
        "--encoder",
        VIT,
        "--encoder-kwargs",
        json.dumps(TINY_VIT),
        "--weights",
        str(weights_file),
        "--slides",
        *paths,
        "--out",
        str(store),
        "--patch-um",
        "128",
        "--batch-size",
        "16",
        "--device",
        "cpu",
    ]
    assert cli.main(command) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in first] == [
        f"{s}.h5ad" for s in ("synthetic_section1", "synthetic_section2")
    ]
    assert all(" computed " in line for line in first)
    calls = count_computed_chunks(monkeypatch)
    assert cli.main(command) == 0
    second = capsys.readouterr().out.splitlines()
    assert all(" reused " in line for line in second) and calls == []
    # the API reads what the command wrote
    spec = vit_spec(weights_file, patch=PatchSpec(patch_size_um=128.0))
    assert not FeatureStore(store).get_or_compute(slides[1], spec).computed
    # user errors: one line, exit status 2
    missing = [*command[:6], str(tmp_path / "absent.safetensors"), *command[7:]]
    assert cli.main(missing) == 2
    assert "not found" in capsys.readouterr().err


def test_feature_ridge_with_a_store_predicts_as_without_and_reuses_it(
    slides, tmp_path, monkeypatch
):
    genes = list(slides[0].var_names[:5])
    settings = {
        "features": "backbone",
        "backbone": VIT,
        "backbone_kwargs": TINY_VIT,
        "patch": PATCH,
        "n_components": 8,
    }
    plain = PatchFeatureRidge([slides[0]], genes, PatchFeatureRidgeConfig(**settings))
    plain.train()
    store = str(tmp_path / "store.zarr")
    config = PatchFeatureRidgeConfig(**settings, feature_store=store)
    stored = PatchFeatureRidge([slides[0]], genes, config)
    stored.train()
    expected = plain.predict(slides[1]).X
    np.testing.assert_allclose(stored.predict(slides[1]).X, expected, rtol=1e-4, atol=1e-5)
    # a second model on the same store, and the saved-and-loaded one, compute nothing
    calls = count_computed_chunks(monkeypatch)
    again = PatchFeatureRidge(
        [slides[0]], genes, PatchFeatureRidgeConfig(**settings, feature_store=store)
    )
    again.train()
    loaded = PatchFeatureRidge.load(stored.save(tmp_path / "model"))
    np.testing.assert_allclose(loaded.predict(slides[1]).X, expected, rtol=1e-4, atol=1e-5)
    assert calls == []
    # patches given explicitly (a colour shift) bypass the store
    shifted = spot_patches(slides[1], PATCH) // 2
    assert not np.allclose(loaded.predict(slides[1], patches=shifted).X, expected)


def test_the_benchmark_hands_a_store_model_no_patches_so_its_cells_read_the_store(
    weights_file, tmp_path, monkeypatch
):
    """In the harness the probe's features of each section are computed once into the store
    and read by every later cell (the harness's shared patches would bypass it)."""
    from stinfer.evaluate.benchmark import parse_config, run_benchmark

    store = tmp_path / "features.zarr"
    probe = {
        "name": "Probe",
        "type": "feature_ridge",
        "features": "backbone",
        "backbone": VIT,
        "backbone_kwargs": TINY_VIT,
        "pretrained": str(weights_file),
        "patch": {"patch_size_px": 64},
        "feature_store": str(store),
        "n_components": 4,
    }
    raw = {
        "name": "store",
        "cohorts": [
            {
                "name": "syn",
                "format": "synthetic",
                "synthetic": {"target_spots": 40, "n_genes": 20, "seed": 3, "n_sections": 2},
                "genes": {"method": "hvg", "n_genes": 8},
            }
        ],
        "protocols": ["cross_slice"],
        "models": [probe],
        "figures": {"umap": False},
    }
    chunks = count_computed_chunks(monkeypatch)
    result = run_benchmark(parse_config(raw), tmp_path / "out", progress=None, figures=False)
    assert result.n_computed == 2 and len(result.failures) == 0
    groups = [path.parent for path in store.glob("*/*/zarr.json")]  # STORE/<slide>/<key>
    assert len(groups) == 2  # one feature group per section
    # each section's features were computed once: the second cell read what the first wrote
    n_spots = sum(int(zarr.open_group(str(g), mode="r").attrs["n_spots"]) for g in groups)
    assert sum(chunks) == n_spots

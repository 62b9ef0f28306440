"""Blue-shift robustness (STEvs Appendix J.1, Eq. 40) and degraded H&E images (issue 14)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.errors import InputError
from stinfer.evaluate.robustness import (
    BLUE_SHIFT_ALPHAS,
    DEGRADED_JPEG_QUALITY,
    ImageDegradation,
    blue_shift,
    blue_shift_sweep,
    degrade_slide_image,
    stain_lookup_tables,
)
from stinfer.io.slide_data import make_slide
from stinfer.metrics import evaluate_anndata
from stinfer.models.baselines import (
    MeanExpression,
    PatchFeatureRidge,
    PatchFeatureRidgeConfig,
    prediction_anndata,
)

SMALL_PATCHES = PatchSpec(patch_size_um=160, target_pixel_size_um=8.0)


def test_blue_shift_follows_equation_40_and_clips_to_0_255():
    pixel = np.array([100, 20, 240], dtype=np.uint8).reshape(1, 3, 1, 1)
    shifted = blue_shift(pixel, 0.1).reshape(3)
    expected = np.clip(np.array([100.0, 20.0, 240.0]) + 255 * np.array([-0.1, -0.1, 0.1]), 0, 255)
    np.testing.assert_array_equal(shifted, np.rint(expected).astype(np.uint8))
    np.testing.assert_array_equal(shifted, [74, 0, 255])  # 74.5 rounds to even, G and B clip
    np.testing.assert_array_equal(blue_shift(pixel, 0.8).reshape(3), [0, 0, 255])


def test_blue_shift_of_zero_is_the_identity_and_never_modifies_its_input():
    patches = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    original = patches.copy()
    np.testing.assert_array_equal(blue_shift(patches, 0.0), patches)
    blue_shift(patches, 0.5)
    np.testing.assert_array_equal(patches, original)


def test_blue_shift_works_on_channel_last_images_and_rejects_floats():
    image = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    expected = np.moveaxis(blue_shift(np.moveaxis(image, -1, 0), 0.3), 0, -1)
    np.testing.assert_array_equal(blue_shift(image, 0.3, channel_axis=-1), expected)
    with pytest.raises(InputError, match="uint8"):
        blue_shift(image / 255.0, 0.3, channel_axis=-1)


def test_default_alphas_are_0_to_0_8_in_steps_of_0_1():
    assert BLUE_SHIFT_ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@pytest.fixture(scope="module")
def sections(tmp_path_factory) -> list[ad.AnnData]:
    config = SyntheticConfig(target_spots=100, n_genes=30, n_sections=2, seed=4)
    return make_synthetic_sections(tmp_path_factory.mktemp("synthetic"), config)


class RecordsPatches(MeanExpression):
    """Mean model that records the mean blue-minus-red of the patches it is given."""

    def __init__(self, slides, genes):
        super().__init__(slides, genes)
        self.blueness: list[float] = []

    def predict(self, slide, patches=None):
        self.blueness.append(float(patches[:, 2].mean()) - float(patches[:, 0].mean()))
        return prediction_anndata(slide, self.genes, np.ones((slide.n_obs, len(self.genes))))


def test_sweep_shifts_only_the_test_patches_and_reports_every_alpha(sections):
    genes = list(sections[0].var_names)
    model = RecordsPatches([sections[0]], genes)
    model.train()
    alphas = (0.0, 0.2, 0.4)
    df = blue_shift_sweep(model, [sections[1]], genes, alphas, patch_spec=SMALL_PATCHES)
    assert list(df["alpha"]) == list(alphas)
    assert (df["test_slice"] == "synthetic_section2").all()
    assert {"pcc_median", "mse", "pcc_median_depthnorm", "predict_seconds"} <= set(df.columns)
    assert np.all(np.diff(model.blueness) > 0)  # the model saw bluer patches as alpha grew


def test_sweep_degrades_an_image_model_and_leaves_the_original_patches_intact(sections):
    genes = list(sections[0].var_names)
    config = PatchFeatureRidgeConfig(patch=SMALL_PATCHES)
    model = PatchFeatureRidge([sections[0]], genes, config)
    model.train()
    originals = spot_patches(sections[1], SMALL_PATCHES)
    before = originals.copy()
    df = blue_shift_sweep(
        model, {"s2": sections[1]}, genes, (0.0, 0.8), patches={"s2": originals}
    ).set_index("alpha")
    np.testing.assert_array_equal(originals, before)
    assert df.loc[0.0, "mse"] < df.loc[0.8, "mse"]
    unshifted = model.predict(sections[1])
    assert df.loc[0.0, "pcc_median"] == pytest.approx(
        evaluate_anndata(unshifted, sections[1][:, genes]).pcc_median
    )


# --------------------------------------------------------------------------- degraded images
JPEG_TOLERANCE = 3.0  # grey levels: quality-95 JPEG of a noisy image, plus interpolation


def _image_slide(folder, pixels: np.ndarray, pixel_size_um: float | None = 0.5) -> ad.AnnData:
    """A four-spot slide over ``pixels`` (written as PNG); its file pixels are 1 um wide.

    ``image_scale`` 0.5 with 0.5 um per full-resolution pixel: the degradation must divide
    the two to get the file's pixel size.
    """
    path = folder / "section.png"
    Image.fromarray(pixels).save(path)
    height, width = pixels.shape[:2]
    return make_slide(
        np.ones((4, 2)),
        [f"spot{i}" for i in range(4)],
        ["GENE_A", "GENE_B"],
        np.array([[width / 2, height / 2], [width, height], [width / 2, height], [width, 0.0]]),
        sample_id="S1",
        source_format="synthetic",
        source="test",
        image_path=str(path),
        image_scale=0.5,
        pixel_size_um=pixel_size_um,
    )


def _textured_image(noise: float = 30.0, height: int = 96, width: int = 128) -> np.ndarray:
    """Smooth per-channel gradients plus pixel noise (+-``noise`` grey levels).

    The noise is detail for the resolution and blur steps to remove; pixel-exact comparisons
    use little of it, as JPEG loses most on per-pixel noise (more than on H&E).
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    smooth = np.stack([60 + 0.8 * x + 0.5 * y, 200 - 0.6 * x, 90 + 0.9 * y], axis=-1)
    jitter = np.random.default_rng(0).uniform(-noise, noise, (height, width, 3))
    return np.clip(np.rint(smooth + jitter), 0, 255).astype(np.uint8)


def _pixels(slide: ad.AnnData) -> np.ndarray:
    with Image.open(slide.uns["stinfer"]["image_path"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def _jpeg_round_trip(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` after the JPEG encoding the degraded images get, and nothing else."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, format="JPEG", quality=DEGRADED_JPEG_QUALITY, subsampling=0
    )
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def _blocks(pixels: np.ndarray, size: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    return pixels.reshape(height // size, size, width // size, size, 3).astype(np.float64)


def test_coarser_pixel_size_averages_blocks_and_keeps_the_pixel_grid(tmp_path):
    original = _textured_image()
    slide = _image_slide(tmp_path, original)
    degraded = _pixels(degrade_slide_image(slide, ImageDegradation(pixel_size_um=8.0), 0, tmp_path))
    assert degraded.shape == original.shape
    before, after = _blocks(original, 8), _blocks(degraded, 8)
    block_error = np.abs(after.mean(axis=(1, 3)) - before.mean(axis=(1, 3)))
    assert block_error.mean() < 1.5 and block_error.max() < 2 * JPEG_TOLERANCE
    within_before = before.var(axis=(1, 3)).mean()
    within_after = after.var(axis=(1, 3)).mean()
    assert within_before > 250  # the noise
    assert within_after < 0.05 * within_before  # gone: one value per 8-um pixel


def test_a_target_finer_than_the_image_changes_nothing(tmp_path):
    original = _textured_image(noise=4.0)
    slide = _image_slide(tmp_path, original)
    degraded = _pixels(degrade_slide_image(slide, ImageDegradation(pixel_size_um=0.5), 0, tmp_path))
    np.testing.assert_array_equal(degraded, _jpeg_round_trip(original))


def test_blur_lowers_the_pixel_variance_and_keeps_the_mean(tmp_path):
    original = _textured_image()
    slide = _image_slide(tmp_path, original)
    blurred = _pixels(degrade_slide_image(slide, ImageDegradation(blur_sigma_um=3.0), 0, tmp_path))
    noise_before = np.diff(original.astype(np.float64), axis=1).var()
    noise_after = np.diff(blurred, axis=1).var()
    assert noise_after < 0.1 * noise_before
    assert blurred.var() < original.var()
    np.testing.assert_allclose(blurred.mean(axis=(0, 1)), original.mean(axis=(0, 1)), atol=1.0)


def test_no_change_requested_gives_the_same_pixels_up_to_jpeg(tmp_path):
    original = _textured_image(noise=4.0)
    slide = _image_slide(tmp_path, original)
    same = _pixels(degrade_slide_image(slide, ImageDegradation(), 0, tmp_path))
    np.testing.assert_array_equal(same, _jpeg_round_trip(original))  # exactly the JPEG's error
    assert np.abs(same - original).mean() < 2.0
    identity = np.tile(np.arange(256), (3, 1))
    np.testing.assert_array_equal(stain_lookup_tables(0.0, 0, 3), identity)


def test_stain_variation_differs_between_sections_and_is_reproducible(tmp_path):
    original = _textured_image()
    slide = _image_slide(tmp_path, original)
    stain = ImageDegradation(stain_variation=0.15, seed=7)
    first = _pixels(degrade_slide_image(slide, stain, 0, tmp_path / "a"))
    second = _pixels(degrade_slide_image(slide, stain, 1, tmp_path / "a"))
    again = _pixels(degrade_slide_image(slide, stain, 0, tmp_path / "b"))
    other_seed = ImageDegradation(stain_variation=0.15, seed=8)
    other = _pixels(degrade_slide_image(slide, other_seed, 0, tmp_path / "c"))
    np.testing.assert_array_equal(first, again)
    mean_colour = first.mean(axis=(0, 1))
    assert np.abs(mean_colour - second.mean(axis=(0, 1))).max() > 2 * JPEG_TOLERANCE
    assert np.abs(mean_colour - other.mean(axis=(0, 1))).max() > 2 * JPEG_TOLERANCE
    tables = stain_lookup_tables(0.15, 7, 0)
    assert (tables[:, 255] == 255).all()  # no stain stays white
    assert all(np.all(np.diff(row.astype(int)) >= 0) for row in tables)  # order of intensities kept


def test_the_degraded_slide_points_to_a_new_file_and_the_original_is_untouched(tmp_path):
    slide = _image_slide(tmp_path, _textured_image())
    source = slide.uns["stinfer"]["image_path"]
    source_bytes = Path(source).read_bytes()
    out_dir = tmp_path / "degraded"
    degraded = degrade_slide_image(slide, ImageDegradation(blur_sigma_um=2.0), 0, out_dir)
    path = degraded.uns["stinfer"]["image_path"]
    assert path != source and os.path.dirname(path) == str(out_dir.resolve())
    assert os.path.basename(path).startswith("S1-") and path.endswith(".jpg")
    assert slide.uns["stinfer"]["image_path"] == source  # the input is not modified
    assert Path(source).read_bytes() == source_bytes
    for key in ("sample_id", "image_scale", "pixel_size_um"):
        assert degraded.uns["stinfer"][key] == slide.uns["stinfer"][key]
    np.testing.assert_array_equal(degraded.obsm["spatial"], slide.obsm["spatial"])
    mtime = os.stat(path).st_mtime_ns
    again = degrade_slide_image(slide, ImageDegradation(blur_sigma_um=2.0), 0, out_dir)
    assert again.uns["stinfer"]["image_path"] == path
    assert os.stat(path).st_mtime_ns == mtime  # reused, not rewritten
    other = degrade_slide_image(slide, ImageDegradation(blur_sigma_um=3.0), 0, out_dir)
    assert other.uns["stinfer"]["image_path"] != path
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(  # no temporary files left
        os.path.basename(s.uns["stinfer"]["image_path"]) for s in (degraded, other)
    )


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"pixel_size_um": 0}, "pixel_size_um"),
        ({"pixel_size_um": -3.0}, "pixel_size_um"),
        ({"blur_sigma_um": -1.0}, "blur_sigma_um"),
        ({"blur_sigma_um": "8"}, "blur_sigma_um"),
        ({"stain_variation": -0.1}, "stain_variation"),
        ({"stain_variation": float("nan")}, "stain_variation"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_a_bad_degradation_value_is_refused_naming_the_field(fields, named):
    with pytest.raises(InputError, match=f"image_degradation.{named}"):
        ImageDegradation(**fields)


def test_an_unknown_pixel_size_is_refused_naming_the_slide(tmp_path):
    slide = _image_slide(tmp_path, _textured_image(), pixel_size_um=None)
    with pytest.raises(InputError, match=r"slide 'S1'.*pixel size is unknown"):
        degrade_slide_image(slide, ImageDegradation(pixel_size_um=12.7), 0, tmp_path)
    stained = degrade_slide_image(slide, ImageDegradation(stain_variation=0.1), 0, tmp_path)
    assert stained.uns["stinfer"]["image_path"].endswith(".jpg")  # stain needs no microns

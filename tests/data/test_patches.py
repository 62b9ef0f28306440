"""Tests for spot patch extraction (stinfer.data.patches)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from stinfer.data import patches as patches_module
from stinfer.data.patches import (
    PatchSpec,
    block_mean_patches,
    iter_spot_patches,
    minmax_to_unit_range,
    patch_cache_key,
    patch_geometry,
    resize_patches,
    spot_patches,
)
from stinfer.errors import InputError
from stinfer.io.slide_data import make_slide


def make_image_slide(image_path, spatial_xy, image_scale=1.0, pixel_size_um=None):
    """A minimal slide AnnData (one dummy gene) whose spots sit at ``spatial_xy``."""
    spatial_xy = np.asarray(spatial_xy, dtype=np.float64)
    n_spots = len(spatial_xy)
    return make_slide(
        np.ones((n_spots, 1)),
        [f"spot{i}" for i in range(n_spots)],
        ["GENE"],
        spatial_xy,
        sample_id="test",
        source_format="synthetic",
        source="test",
        image_path=str(image_path),
        image_scale=image_scale,
        pixel_size_um=pixel_size_um,
    )


def white_padded_crop(image, left, top, size):
    """Reference crop ``(3, size, size)`` of an ``(h, w, 3)`` image, white outside it."""
    crop = np.full((size, size, 3), 255, dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + size, image.shape[1]), min(top + size, image.shape[0])
    if x1 > x0 and y1 > y0:
        crop[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return crop.transpose(2, 0, 1)


def wave_texture(height, width):
    """Smooth RGB texture (so resampled patches can be compared with block means)."""
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)
    red = 128 + 60 * np.sin(x / 19)[None, :] + 40 * np.cos(y / 23)[:, None]
    green = 128 + 90 * np.sin(x / 37)[None, :] * np.cos(y / 31)[:, None]
    blue = 128 + 100 * np.cos(x / 43)[None, :] + 0 * y[:, None]
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def png_image(tmp_path_factory):
    image = np.random.default_rng(0).integers(0, 256, (500, 600, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("png") / "slide.png"
    Image.fromarray(image).save(path)
    return path, image


@pytest.fixture(scope="module")
def tiff_pyramid(tmp_path_factory):
    """A 2048 x 2048 tiled TIFF with levels at downsample 1, 2 and 8."""
    base = wave_texture(2048, 2048)
    levels = [base, base.reshape(1024, 2, 1024, 2, 3).mean(axis=(1, 3)).astype(np.uint8)]
    levels.append(base.reshape(256, 8, 256, 8, 3).mean(axis=(1, 3)).astype(np.uint8))
    path = tmp_path_factory.mktemp("tiff") / "slide.tif"
    with tifffile.TiffWriter(path) as writer:
        for index, level in enumerate(levels):
            options = {"subifds": 2} if index == 0 else {"subfiletype": 1}
            writer.write(level, tile=(256, 256), photometric="rgb", compression="zstd", **options)
    return path, levels


def test_default_patch_is_the_crop_centred_on_the_spot(png_image):
    path, image = png_image
    centres = np.array([[300.0, 250.0], [100.4, 80.6], [200.5, 120.5], [450.0, 301.0]])
    slide = make_image_slide(path, centres)
    patches = spot_patches(slide, PatchSpec(patch_size_px=64))
    assert patches.shape == (4, 3, 64, 64) and patches.dtype == np.uint8
    corners = np.floor(centres - 32 + 0.5).astype(int)  # round(centre - size / 2), halves up
    for patch, (left, top) in zip(patches, corners, strict=True):
        np.testing.assert_array_equal(patch, white_padded_crop(image, left, top, 64))


def test_image_scale_maps_full_resolution_spots_into_the_image(png_image):
    path, image = png_image
    full_resolution = np.array([[600.0, 500.0], [1000.0, 300.0]])
    slide = make_image_slide(path, full_resolution, image_scale=0.5)
    patches = spot_patches(slide, PatchSpec(patch_size_px=40))
    np.testing.assert_array_equal(patches[0], white_padded_crop(image, 280, 230, 40))
    np.testing.assert_array_equal(patches[1], white_padded_crop(image, 480, 130, 40))


def test_patches_at_borders_are_padded_white(png_image):
    path, image = png_image
    centres = np.array([[5.0, 5.0], [598.0, 499.0], [-100.0, 250.0], [300.0, 0.0]])
    patches = spot_patches(make_image_slide(path, centres), PatchSpec(patch_size_px=32))
    for patch, (x, y) in zip(patches, centres.astype(int), strict=True):
        np.testing.assert_array_equal(patch, white_padded_crop(image, x - 16, y - 16, 32))
    assert (patches[2] == 255).all()
    assert (patches[0][:, :11, :] == 255).all() and (patches[0][:, 11:, 11:] != 255).any()


def test_chunks_stream_in_spot_order_and_match_the_full_array(png_image):
    path, image = png_image
    centres = np.random.default_rng(1).uniform(-20, 620, (37, 2))
    slide = make_image_slide(path, centres)
    spec = PatchSpec(patch_size_px=24)
    chunks = list(iter_spot_patches(slide, spec, chunk_size=10))
    assert [len(chunk) for chunk in chunks] == [10, 10, 10, 7]
    streamed = np.concatenate(chunks)
    np.testing.assert_array_equal(streamed, spot_patches(slide, spec))
    corners = np.floor(centres - 12 + 0.5).astype(int)
    for patch, (left, top) in zip(streamed, corners, strict=True):
        np.testing.assert_array_equal(patch, white_padded_crop(image, left, top, 24))


def test_tiff_patches_equal_crops_of_level_zero(tiff_pyramid):
    path, levels = tiff_pyramid
    centres = np.random.default_rng(2).uniform(0, 2048, (50, 2))
    patches = spot_patches(make_image_slide(path, centres), PatchSpec(patch_size_px=40))
    corners = np.floor(centres - 20 + 0.5).astype(int)
    for patch, (left, top) in zip(patches, corners, strict=True):
        np.testing.assert_array_equal(patch, white_padded_crop(levels[0], left, top, 40))


def test_target_pixel_size_reads_the_matching_pyramid_level(tiff_pyramid):
    path, levels = tiff_pyramid
    centres = np.array([[1000.0, 800.0], [64.0, 2000.0]])
    slide = make_image_slide(path, centres, pixel_size_um=0.5)
    spec = PatchSpec(patch_size_px=32, target_pixel_size_um=1.0)  # 64 file px at level 1
    patches = spot_patches(slide, spec)
    assert patches.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(patches[0], white_padded_crop(levels[1], 484, 384, 32))
    np.testing.assert_array_equal(patches[1], white_padded_crop(levels[1], 16, 984, 32))


def test_target_pixel_size_resamples_to_approximate_a_downsampled_crop(tiff_pyramid):
    path, levels = tiff_pyramid
    centres = np.array([[1024.0, 1024.0], [500.0, 1500.0]])
    slide = make_image_slide(path, centres, pixel_size_um=0.25)
    # 40 px at 1.5 um = 60 um = 240 file px; level 1 (0.5 um) is the coarsest finer level.
    spec = PatchSpec(patch_size_px=40, target_pixel_size_um=1.5)
    patches = spot_patches(slide, spec)
    assert patches.shape == (2, 3, 40, 40)
    for patch, (x, y) in zip(patches, centres.astype(int), strict=True):
        crop = levels[0][y - 120 : y + 120, x - 120 : x + 120].astype(np.float64)
        expected = crop.reshape(40, 6, 40, 6, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
        assert np.abs(patch - expected).mean() < 2.0
        assert np.abs(patch - expected).max() < 12.0


def test_patch_size_in_microns_sets_footprint_and_output(png_image):
    path, image = png_image
    slide = make_image_slide(path, [[300.0, 250.0]], pixel_size_um=0.5)
    patches = spot_patches(slide, PatchSpec(patch_size_um=20.0))  # 40 file px, no resampling
    np.testing.assert_array_equal(patches[0], white_padded_crop(image, 280, 230, 40))
    resized = spot_patches(slide, PatchSpec(patch_size_um=20.0, output_size_px=20))
    assert resized.shape == (1, 3, 20, 20)
    block_mean = white_padded_crop(image, 280, 230, 40).reshape(3, 20, 2, 20, 2).mean(axis=(2, 4))
    assert np.abs(resized[0] - block_mean).max() <= 0.5 + 1e-9


def test_resize_shrinks_by_area_averaging_and_enlarges_bilinearly():
    patches = np.random.default_rng(5).integers(0, 256, (4, 3, 48, 48), dtype=np.uint8)
    halved = resize_patches(patches, 24)  # whole factor: numpy block mean
    block_mean = patches.reshape(4, 3, 24, 2, 24, 2).astype(np.float64).mean(axis=(3, 5))
    np.testing.assert_array_equal(halved, np.floor(block_mean + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(block_mean_patches(patches, 3).shape, (4, 3, 16, 16))
    torch_area = torch.nn.functional.interpolate(
        torch.from_numpy(patches).float(), size=(24, 24), mode="area"
    )
    assert np.abs(halved - torch_area.numpy()).max() <= 0.5
    fractional = resize_patches(patches, 32)  # 1.5x: torch area
    assert fractional.shape == (4, 3, 32, 32) and fractional.dtype == np.uint8
    assert abs(fractional.astype(float).mean() - patches.astype(float).mean()) < 1.0
    constant = np.full((2, 3, 10, 10), 77, dtype=np.uint8)
    assert (resize_patches(constant, 25) == 77).all()  # enlarging a flat patch keeps it flat


def test_patch_geometry_table():
    assert patch_geometry(PatchSpec(), None).footprint_px == 160
    assert patch_geometry(PatchSpec(patch_size_um=100.0), 0.5).output_px == 200
    geometry = patch_geometry(PatchSpec(patch_size_um=100.0, target_pixel_size_um=1.0), 0.25)
    assert (geometry.footprint_px, geometry.output_px) == (400.0, 100)
    geometry = patch_geometry(PatchSpec(patch_size_px=160, target_pixel_size_um=0.5), 0.25)
    assert (geometry.footprint_px, geometry.output_px) == (320.0, 160)
    with pytest.raises(InputError, match="pixel size is unknown"):
        patch_geometry(PatchSpec(target_pixel_size_um=1.0), None)
    with pytest.raises(InputError, match="positive integer"):
        PatchSpec(patch_size_px=0)


def test_slide_without_image_raises(png_image):
    slide = make_image_slide(png_image[0], [[1.0, 1.0]])
    slide.uns["stinfer"]["image_path"] = None
    with pytest.raises(InputError, match="has no image"):
        spot_patches(slide)


def test_cache_round_trip_and_reuse_without_reading_the_image(png_image, tmp_path, monkeypatch):
    path, _ = png_image
    slide = make_image_slide(path, np.random.default_rng(3).uniform(0, 600, (300, 2)))
    spec = PatchSpec(patch_size_px=32)
    expected = spot_patches(slide, spec)
    cached = spot_patches(slide, spec, cache_dir=tmp_path)
    assert isinstance(cached, np.memmap)
    np.testing.assert_array_equal(cached, expected)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]

    def fail(*args, **kwargs):
        raise AssertionError("the image was read although the cache is valid")

    monkeypatch.setattr(patches_module, "open_slide", fail)
    np.testing.assert_array_equal(spot_patches(slide, spec, cache_dir=tmp_path), expected)


def test_cache_is_rebuilt_when_an_input_changes(tmp_path, monkeypatch):
    image = np.random.default_rng(4).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    image_path = tmp_path / "slide.png"
    Image.fromarray(image).save(image_path)
    cache_dir = tmp_path / "cache"
    slide = make_image_slide(image_path, [[50.0, 40.0], [10.0, 90.0]])
    spec = PatchSpec(patch_size_px=16)
    spot_patches(slide, spec, cache_dir=cache_dir)
    key = patch_cache_key(slide, spec)

    moved = slide.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] + [1.0, 0.0]
    assert patch_cache_key(moved, spec) != key
    assert patch_cache_key(slide, PatchSpec(patch_size_px=17)) != key
    np.testing.assert_array_equal(
        spot_patches(moved, spec, cache_dir=cache_dir)[0], white_padded_crop(image, 43, 32, 16)
    )

    new_image = 255 - image
    Image.fromarray(new_image).save(image_path)
    os.utime(image_path, ns=(1, 1_000_000_000))
    assert patch_cache_key(slide, spec) != key
    np.testing.assert_array_equal(
        spot_patches(slide, spec, cache_dir=cache_dir)[0], white_padded_crop(new_image, 42, 32, 16)
    )

    monkeypatch.setattr(patches_module, "open_slide", lambda *a, **k: pytest.fail("re-read"))
    spot_patches(slide, spec, cache_dir=cache_dir)  # unchanged inputs: cached
    with pytest.raises(pytest.fail.Exception):
        spot_patches(slide, PatchSpec(patch_size_px=18), cache_dir=cache_dir)


def test_minmax_transform_closed_form_and_bounds():
    patch = np.array([[[10, 20], [30, 40]], [[50, 60], [70, 110]], [[10, 10], [10, 10]]], np.uint8)
    normalised = minmax_to_unit_range(patch)  # single (3, H, W) patch
    assert normalised.dtype == torch.float32 and normalised.shape == (3, 2, 2)
    expected = 2.0 * (patch.astype(np.float32) - 10) / (110 - 10) - 1.0  # seed Eq. 39
    np.testing.assert_allclose(normalised.numpy(), expected, rtol=0, atol=1e-6)

    batch = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    batch[3] = 77  # constant patch
    out = minmax_to_unit_range(batch)
    assert out.shape == (5, 3, 16, 16)
    assert torch.all(out >= -1) and torch.all(out <= 1)
    for index in (0, 1, 2, 4):
        assert out[index].min().item() == -1.0 and out[index].max().item() == 1.0
    assert torch.count_nonzero(out[3]) == 0
    np.testing.assert_allclose(minmax_to_unit_range(batch.numpy()).numpy(), out.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("section", ["C2", "C3", "C4"])
def test_her2st_patches_equal_pil_crops_of_the_reader_slide(her2st_dir, monkeypatch, section):
    """Through the legacy ST reader: the patch at a spot is the 160-px crop centred on it."""
    from stinfer.io import read_legacy_st

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the sections are ~92 megapixels
    image_path = her2st_dir / "images" / f"{section}.jpg"
    slide = read_legacy_st(
        her2st_dir / "counts" / f"{section}.tsv.gz",
        her2st_dir / "spots" / f"{section}_selection.tsv",
        image=image_path,
    )
    patches = spot_patches(slide)
    assert patches.shape == (slide.n_obs, 3, 160, 160)
    centres = slide.obsm["spatial"]
    with Image.open(image_path) as image:
        pixels = np.asarray(image.convert("RGB"))
    # first, middle, last spot, and the spots nearest each image border
    chosen = {0, slide.n_obs // 2, slide.n_obs - 1}
    chosen |= set(np.argmin(centres, axis=0)) | set(np.argmax(centres, axis=0))
    for index in sorted(chosen):
        left, top = np.floor(centres[index] - 80 + 0.5).astype(int)
        expected = white_padded_crop(pixels, left, top, 160)
        np.testing.assert_array_equal(patches[index], expected)

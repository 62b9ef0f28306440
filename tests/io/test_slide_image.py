"""Tests for the lazy slide reader (stinfer.io.slide_image)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from stinfer.errors import InputError
from stinfer.io import slide_image as slide_image_module
from stinfer.io.slide_image import OpenSlideSlide, PillowSlide, TiffSlide, open_slide

TILE = 256


def smooth_texture(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic RGB texture built from separable waves (fast to make and compress)."""
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)
    red = 128 + 60 * np.sin(x / (17 + seed))[None, :] + 40 * np.cos(y / 23)[:, None]
    green = 128 + 50 * np.sin(x / 41)[None, :] * np.cos(y / 29)[:, None]
    green = green + 50 * np.cos(x / 31 + seed)[None, :]
    blue = (x[None, :] // 5 + y[:, None] // 3) % 256
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def write_pyramid(path, levels, pixel_size_um=None, compression="zstd"):
    """Write ``levels`` (finest first) as a tiled pyramidal TIFF with sub-IFDs."""
    resolution = {}
    if pixel_size_um is not None:
        resolution = {"resolution": (1e4 / pixel_size_um, 1e4 / pixel_size_um)}
        resolution["resolutionunit"] = "CENTIMETER"
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for index, level in enumerate(levels):
            options = {"subifds": len(levels) - 1} if index == 0 else {"subfiletype": 1}
            writer.write(
                level,
                tile=(TILE, TILE),
                photometric="rgb",
                compression=compression,
                **options,
                **(resolution if index == 0 else {}),
            )
    return path


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 4096 x 4096 tiled zstd TIFF with levels at downsample 1, 4 and 16 (0.5 um/px)."""
    levels = [smooth_texture(4096, 4096, 0), smooth_texture(1024, 1024, 1)]
    levels.append(smooth_texture(256, 256, 2))
    path = tmp_path_factory.mktemp("pyramid") / "slide.tif"
    write_pyramid(path, levels, pixel_size_um=0.5)
    return path, levels


def padded_crop(image: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    """The numpy reference: crop of ``image`` with white beyond its borders."""
    crop = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, image.shape[1]), min(top + height, image.shape[0])
    if x1 > x0 and y1 > y0:
        crop[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return crop


def test_tiff_pyramid_levels_dimensions_and_pixel_size(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide)
        assert slide.dimensions == (4096, 4096)
        assert slide.level_dimensions == [(4096, 4096), (1024, 1024), (256, 256)]
        assert slide.level_downsamples == [1.0, 4.0, 16.0]
        assert slide.pixel_size_um == pytest.approx(0.5)
        assert slide.tile_shape == (TILE, TILE)
        assert slide.level_pixel_size_um(2) == pytest.approx(8.0)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_tiff_region_equals_numpy_crop_at_every_level(pyramid, level):
    path, levels = pyramid
    downsample = [1, 4, 16][level]
    with open_slide(path) as slide:
        for left, top, width, height in [(0, 0, 160, 160), (37, 101, 160, 90), (200, 7, 33, 57)]:
            x, y = left * downsample, top * downsample
            region = slide.read_region(x, y, width, height, level=level)
            assert region.shape == (height, width, 3)
            assert region.dtype == np.uint8
            np.testing.assert_array_equal(
                region, levels[level][top : top + height, left : left + width]
            )


def test_region_origin_is_rounded_half_up_in_level_pixels(pyramid):
    path, levels = pyramid
    with open_slide(path) as slide:
        region = slide.read_region(4 * 10 + 2, 4 * 20 + 1, 8, 8, level=1)  # 10.5 -> 11, 20.25 -> 20
    np.testing.assert_array_equal(region, levels[1][20:28, 11:19])


@pytest.mark.parametrize("level", [0, 2])
def test_regions_outside_the_image_are_padded_white(pyramid, level):
    path, levels = pyramid
    height, width = levels[level].shape[:2]
    with open_slide(path) as slide:
        for left, top in [(-50, -30), (width - 40, height - 70), (-10, height - 5)]:
            region = slide.read_level_region(left, top, 100, 120, level)
            np.testing.assert_array_equal(region, padded_crop(levels[level], left, top, 100, 120))
        outside = slide.read_level_region(width + 5, 0, 20, 20, level)
        assert (outside == 255).all()


def test_region_read_touches_only_the_tiles_it_overlaps(pyramid, monkeypatch):
    path, _ = pyramid
    chunk_keys: list[str] = []
    original_get = tifffile.zarr.ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        if not key.rsplit("/", 1)[-1].startswith("."):
            chunk_keys.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(tifffile.zarr.ZarrTiffStore, "get", counting_get)
    with open_slide(path) as slide:
        chunk_keys.clear()
        slide.read_region(1000, 1000, 160, 160)  # spans tiles 3-4 in x and y
        assert len(chunk_keys) == 4
        assert all(key.startswith("0/") for key in chunk_keys)
        chunk_keys.clear()
        slide.read_region(1010, 1010, 100, 100)  # the same tiles: served from the tile cache
        assert chunk_keys == []
    with open_slide(path, tile_cache_bytes=0) as slide:
        chunk_keys.clear()
        slide.read_region(0, 0, 256, 256)
        slide.read_region(0, 0, 256, 256)
        assert len(chunk_keys) == 2


def test_level_for_pixel_size_picks_coarsest_level_at_least_as_fine(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:  # level pixel sizes 0.5, 2.0, 8.0 um
        assert slide.level_for_pixel_size(0.25) == 0
        assert slide.level_for_pixel_size(0.5) == 0
        assert slide.level_for_pixel_size(1.99) == 0
        assert slide.level_for_pixel_size(2.0) == 1
        assert slide.level_for_pixel_size(7.9) == 1
        assert slide.level_for_pixel_size(100.0) == 2


def test_read_region_at_pixel_size_approximates_a_downsampled_crop(pyramid):
    path, levels = pyramid
    with open_slide(path) as slide:
        region = slide.read_region(800, 400, 50, 40, pixel_size_um=1.0)  # 2x2 blocks of level 0
        coarse = slide.read_region(800, 400, 50, 40, pixel_size_um=2.0)  # level 1 as stored
    assert region.shape == (40, 50, 3)
    crop = levels[0][400:480, 800:900].astype(np.float64)
    block_mean = crop.reshape(40, 2, 50, 2, 3).mean(axis=(1, 3))
    assert np.abs(region - block_mean).max() <= 1.0
    np.testing.assert_array_equal(coarse, levels[1][100:140, 200:250])


def test_unknown_pixel_size_raises_input_error(tmp_path):
    path = write_pyramid(tmp_path / "plain.tif", [smooth_texture(64, 64, 0)])
    with open_slide(path) as slide:
        assert slide.pixel_size_um is None
        with pytest.raises(InputError, match="pixel size is unknown"):
            slide.level_for_pixel_size(1.0)
    with open_slide(path, pixel_size_um=0.25) as slide:
        assert slide.pixel_size_um == 0.25


def test_ome_tiff_pixel_size_and_planar_channels(tmp_path):
    image = smooth_texture(300, 200, 3)
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(
        path,
        np.moveaxis(image, -1, 0),
        ome=True,
        photometric="minisblack",
        tile=(128, 128),
        metadata={"axes": "CYX", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm"},
    )
    with open_slide(path) as slide:
        assert slide.dimensions == (200, 300)
        assert slide.pixel_size_um == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(10, 20, 50, 60), image[20:80, 10:60])


def test_greyscale_and_16_bit_tiff_become_rgb(tmp_path):
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 65536).astype(np.uint16) * 16
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, grey)
    with open_slide(path) as slide:
        region = slide.read_region(0, 0, 64, 64)
    expected = np.round(grey.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert region.shape == (64, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(region[:, :, channel], expected)


def test_png_region_equals_crop_and_image_is_decoded_once(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    path = tmp_path / "slide.png"
    Image.fromarray(image).save(path)
    with open_slide(path) as slide:
        assert isinstance(slide, PillowSlide)
        assert slide.dimensions == (150, 120)
        assert slide.level_dimensions == [(150, 120)] and slide.level_downsamples == [1.0]
        assert slide._pixels is None  # opening reads the header only
        np.testing.assert_array_equal(slide.read_region(30, 40, 50, 20), image[40:60, 30:80])
        cached = slide._pixels
        assert cached is not None
        np.testing.assert_array_equal(
            slide.read_region(-5, 100, 30, 30), padded_crop(image, -5, 100, 30, 30)
        )
        assert slide._pixels is cached
        region = slide.read_region(0, 0, 10, 10)
        region[:] = 0  # a returned region is a copy, never a view of the cache
        np.testing.assert_array_equal(slide.read_region(0, 0, 10, 10), image[:10, :10])


def test_jpeg_region_equals_pillow_crop(tmp_path):
    image = smooth_texture(200, 300, 4)
    path = tmp_path / "slide.jpg"
    Image.fromarray(image).save(path, quality=90)
    with open_slide(path) as slide:
        region = slide.read_region(100, 50, 64, 64)
    with Image.open(path) as reference:
        expected = np.asarray(reference.crop((100, 50, 164, 114)).convert("RGB"))
    np.testing.assert_array_equal(region, expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_every_jpeg_mode_decodes_to_pillows_rgb(tmp_path, mode, monkeypatch):
    """RGB and grey JPEGs go through imagecodecs, CMYK through Pillow: all equal Pillow's RGB."""
    path = tmp_path / f"slide_{mode}.jpg"
    Image.fromarray(smooth_texture(90, 120, 2)).convert(mode).save(path, quality=85)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    used_pillow = []
    pillow_pixels = slide_image_module._pillow_pixels
    monkeypatch.setattr(
        slide_image_module,
        "_pillow_pixels",
        lambda image: used_pillow.append(True) or pillow_pixels(image),
    )
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 120, 90), expected)
    assert bool(used_pillow) == (mode == "CMYK")


def test_rgba_drops_alpha_and_grey_png_repeats(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    grey = np.random.default_rng(2).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    with open_slide(tmp_path / "rgba.png") as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 30, 20), rgba[:, :, :3])
    with open_slide(tmp_path / "grey.png") as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 30, 20), np.stack([grey] * 3, -1))


def test_pillow_decompression_bomb_limit_does_not_block_large_slides(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is a "bomb" under this limit
    with open_slide(path) as slide:
        assert slide.read_region(0, 0, 64, 64).shape == (64, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_openslide_only_format_without_openslide_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(slide_image_module, "_openslide_available", lambda: False)
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"not really a slide")
    with pytest.raises(InputError, match="openslide"):
        open_slide(path)


def test_svs_without_openslide_falls_back_to_tifffile(tmp_path, monkeypatch, pyramid):
    monkeypatch.setattr(slide_image_module, "_openslide_available", lambda: False)
    source, levels = pyramid
    path = tmp_path / "slide.svs"
    path.write_bytes(source.read_bytes())
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide) and not isinstance(slide, OpenSlideSlide)
        np.testing.assert_array_equal(
            slide.read_region(64, 64, 16, 16, level=2), levels[2][4:20, 4:20]
        )


def test_bad_inputs_raise_input_error(tmp_path, pyramid):
    with pytest.raises(InputError, match="not found"):
        open_slide(tmp_path / "missing.tif")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable"):
        open_slide(tmp_path / "broken.png")
    with open_slide(pyramid[0]) as slide:
        with pytest.raises(InputError, match="level 3 does not exist"):
            slide.read_region(0, 0, 10, 10, level=3)
        with pytest.raises(InputError, match="must be positive"):
            slide.read_region(0, 0, 0, 10)


def test_openslide_backend_reads_levels_mpp_and_whitens_transparent_pixels(tmp_path, monkeypatch):
    import sys
    import types

    level0 = smooth_texture(64, 96, 5)
    alpha = np.full((64, 96), 255, dtype=np.uint8)
    alpha[:8, :8] = 0  # a corner the scanner skipped
    level1 = smooth_texture(16, 24, 6)

    class FakeOpenSlide:
        level_dimensions = ((96, 64), (24, 16))
        level_downsamples = (1.0, 4.0)

        def __init__(self, path):
            self.properties = {"openslide.mpp-x": "0.25"}
            self.closed = False

        def read_region(self, location, level, size):
            x, y = location
            width, height = size
            if level == 0:
                rgba = np.dstack([level0, alpha])[y : y + height, x : x + width]
            else:
                x, y = x // 4, y // 4
                rgba = np.dstack([level1, np.full((16, 24), 255, np.uint8)])
                rgba = rgba[y : y + height, x : x + width]
            return Image.fromarray(np.ascontiguousarray(rgba), mode="RGBA")

        def close(self):
            self.closed = True

    fake = types.ModuleType("openslide")
    fake.OpenSlide = FakeOpenSlide
    fake.OpenSlideError = RuntimeError
    fake.PROPERTY_NAME_MPP_X = "openslide.mpp-x"
    monkeypatch.setitem(sys.modules, "openslide", fake)
    monkeypatch.setattr(slide_image_module, "_openslide_available", lambda: True)
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"fake")
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert slide.pixel_size_um == 0.25 and slide.level_downsamples == [1.0, 4.0]
        region = slide.read_region(-4, 0, 40, 30)
        expected = padded_crop(level0, -4, 0, 40, 30)
        expected[:8, 4:12] = 255  # transparent -> white
        np.testing.assert_array_equal(region, expected)
        np.testing.assert_array_equal(slide.read_region(8, 4, 10, 8, level=1), level1[1:9, 2:12])

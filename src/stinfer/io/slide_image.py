"""Lazy slide-image reader: regions of an H&E image without loading more than they need.

:func:`open_slide` opens an image file and returns a :class:`SlideImage`, whose
:meth:`~SlideImage.read_region` returns an RGB ``uint8`` array of one region. Three back-ends:

- **JPEG / PNG** (:class:`PillowSlide`): only the header is read when the slide is opened.
  A JPEG cannot be decoded in part, so the first region read decodes the whole image once
  (imagecodecs' libjpeg-turbo for RGB/greyscale JPEGs, else Pillow)
  and keeps the decoded array for the life of the :class:`SlideImage` (about
  ``width * height * 3`` bytes; 275 MB for a 9,300 x 9,900 HER2ST section); every later region
  is a numpy slice of that array, so extracting thousands of patches decodes the file once.
  Pillow's decompression-bomb limit is lifted for the files opened here (large slides are
  legitimate).
- **TIFF / OME-TIFF / tiled pyramidal TIFF, and SVS / NDPI without OpenSlide**
  (:class:`TiffSlide`): ``tifffile`` exposes the pyramid of ``series[0]`` as a zarr group, so a
  region reads and decodes only the tiles (or strips) it touches. Decoded tiles are kept in a
  small LRU cache (``tile_cache_bytes``) so neighbouring regions do not decode a tile twice.
- **OpenSlide formats** (:class:`OpenSlideSlide`; SVS, NDPI, MRXS, ...): used when the optional
  ``openslide`` package is importable (``pip install stinfer[openslide]``). MRXS and other
  formats that only OpenSlide reads raise :class:`~stinfer.errors.InputError` without it.
- **An image stored inside an .h5ad** (:class:`H5adImageSlide`): a reference
  ``"<file.h5ad>#uns/spatial/<library_id>/images/hires"`` (see :func:`h5ad_image_reference`)
  names scanpy's ``uns["spatial"]`` image of a file written by scanpy; only that dataset is
  read (with h5py, whole on the first region read; it is at most a few thousand pixels wide).

Conventions shared by every back-end:

- a **level** is one resolution of the pyramid; level 0 is the finest (the file's own pixels).
  ``level_downsamples[k]`` is how many level-0 pixels one level-``k`` pixel spans (the mean of
  the width and height ratios, as OpenSlide reports it). JPEG/PNG files have one level;
- region origins ``(x, y)`` are always the **top-left corner in level-0 pixels** (x to the
  right, y down); ``width``/``height`` are in the pixels of the level being read. A level-``k``
  read starts at level-``k`` pixel ``round(x / downsample), round(y / downsample)`` (half up);
- pixels outside the image are **white** (255), so regions at or beyond a border keep their
  requested shape;
- output is always ``(height, width, 3)`` ``uint8`` RGB: greyscale is repeated to three
  channels, an alpha channel is dropped (not composited), 16-bit images are scaled by
  ``255 / 65535`` and float images are taken as 0-1 and scaled by 255;
- ``pixel_size_um`` is microns per **level-0 pixel of this file** (note: a slide AnnData's
  ``uns["stinfer"]["pixel_size_um"]`` is per full-resolution pixel; divide it by
  ``image_scale`` for the file). It comes from the caller, else from the file's metadata
  (OME ``PhysicalSizeX``, the SVS ``MPP`` field, or the TIFF resolution tags), else is ``None``.

A :class:`SlideImage` is not thread-safe: open one per worker process or thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

WHITE = 255

PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
#: Formats OpenSlide reads; of these, TIFF-based ones fall back to tifffile without it.
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
TIFF_READABLE_OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")

DEFAULT_TILE_CACHE_BYTES = 256 * 2**20

_UNIT_TO_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


def round_half_up(values: np.ndarray | float) -> np.ndarray:
    """Round to the nearest integer, halves up (``floor(v + 0.5)``), as int64.

    Used for every pixel position stinfer derives from a float coordinate, so a centre at
    ``.5`` always goes the same way (``np.round`` rounds halves to even).
    """
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.int64)


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """Return an ``(h, w, 3)`` uint8 RGB view or copy of ``(h, w)`` or ``(h, w, c)`` pixels.

    One channel is repeated to three; two channels are grey + alpha (alpha dropped); four
    are RGBA (alpha dropped). ``uint16`` is scaled by 255/65535, floats are clipped to 0-1 and
    scaled by 255, booleans map to 0/255.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels in (1, 2):
        pixels = np.repeat(pixels[:, :, :1], 3, axis=2)
    elif channels in (3, 4):
        pixels = pixels[:, :, :3]
    else:
        raise InputError(
            f"image has {channels} channels; stinfer reads RGB(A) or greyscale H&E images."
        )
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if pixels.dtype == np.uint16:
        return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.floating):
        return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.integer):
        return np.clip(pixels, 0, 255).astype(np.uint8)
    raise InputError(f"image pixels have unsupported dtype {pixels.dtype}.")


class SlideImage:
    """A slide image read lazily by region (see the module docstring for the conventions).

    Use :func:`open_slide` to create one; it is a context manager that closes the file.

    Attributes
    ----------
    path
        The image file.
    level_dimensions
        ``(width, height)`` of each pyramid level, finest first, in that level's pixels.
    level_downsamples
        Level-0 pixels per level pixel for each level (1.0 for level 0).
    pixel_size_um
        Microns per level-0 pixel of this file, or ``None`` when unknown.
    """

    def __init__(
        self,
        path: Path,
        level_dimensions: list[tuple[int, int]],
        pixel_size_um: float | None,
    ) -> None:
        self.path = path
        self.level_dimensions = [(int(w), int(h)) for w, h in level_dimensions]
        width0, height0 = self.level_dimensions[0]
        self.level_downsamples = [
            (width0 / max(w, 1) + height0 / max(h, 1)) / 2.0 for w, h in self.level_dimensions
        ]
        self.pixel_size_um = None if pixel_size_um is None else float(pixel_size_um)

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0 in the file's pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, pixel_size_um={self.pixel_size_um})"
        )

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle and any cached pixels. Idempotent."""

    def level_pixel_size_um(self, level: int) -> float | None:
        """Microns per pixel of ``level`` (``None`` when the slide's pixel size is unknown)."""
        self._check_level(level)
        if self.pixel_size_um is None:
            return None
        return self.pixel_size_um * self.level_downsamples[level]

    def level_for_downsample(self, downsample: float) -> int:
        """Return the coarsest level whose downsample is <= ``downsample`` (level 0 if none).

        Reading at that level and shrinking never upsamples a coarser level, so detail is
        never invented; a relative tolerance of 1e-6 absorbs rounding in the factors.
        """
        if not downsample > 0:
            raise InputError(f"downsample must be positive, got {downsample}.")
        limit = downsample * (1 + 1e-6)
        candidates = [k for k, d in enumerate(self.level_downsamples) if d <= limit]
        if not candidates:
            return 0
        return max(candidates, key=lambda k: self.level_downsamples[k])

    def level_for_pixel_size(self, target_um: float) -> int:
        """Return the coarsest level whose pixel size is <= ``target_um`` (finer or equal).

        Resampling that level to ``target_um`` only ever shrinks it. A target finer than
        level 0 returns level 0 (which is then enlarged). Raises :class:`InputError` when the
        slide's pixel size is unknown.
        """
        if not target_um > 0:
            raise InputError(f"target pixel size must be positive, got {target_um} um.")
        return self.level_for_downsample(target_um / self._require_pixel_size())

    def read_level_region(
        self, left: int, top: int, width: int, height: int, level: int = 0
    ) -> np.ndarray:
        """Read a region given in the pixels of ``level`` itself.

        Parameters
        ----------
        left, top
            Top-left corner in level-``level`` pixels (may be negative or beyond the image).
        width, height
            Region size in level-``level`` pixels.
        level
            Pyramid level (0 = finest).

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB; pixels outside the image are white (255).
        """
        self._check_level(level)
        left, top, width, height = int(left), int(top), int(width), int(height)
        if width <= 0 or height <= 0:
            raise InputError(f"region size must be positive, got {width} x {height} px.")
        level_width, level_height = self.level_dimensions[level]
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, level_width), min(top + height, level_height)
        if x0 == left and y0 == top and x1 - x0 == width and y1 - y0 == height:
            window = to_rgb_uint8(self._read_window(level, x0, y0, x1, y1))
            return np.array(window, dtype=np.uint8, order="C", copy=True)
        region = np.full((height, width, 3), WHITE, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            window = to_rgb_uint8(self._read_window(level, x0, y0, x1, y1))
            region[y0 - top : y1 - top, x0 - left : x1 - left] = window
        return region

    def read_region(
        self,
        x: float,
        y: float,
        width: int,
        height: int,
        level: int = 0,
        pixel_size_um: float | None = None,
    ) -> np.ndarray:
        """Read a region whose top-left corner is given in level-0 pixels.

        Parameters
        ----------
        x, y
            Top-left corner in **level-0 pixels** of this file, whatever level is read.
        width, height
            Output size in pixels of the level read (or of ``pixel_size_um``).
        level
            Pyramid level to read (0 = finest). Ignored when ``pixel_size_um`` is given.
        pixel_size_um
            Output pixel size in microns. The region is read at
            :meth:`level_for_pixel_size` and resized (box filter when shrinking, bilinear
            when enlarging) with sub-pixel accuracy; needs a known :attr:`pixel_size_um`.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB; pixels outside the image are white (255).
        """
        if pixel_size_um is not None:
            return self._read_resampled(x, y, int(width), int(height), float(pixel_size_um))
        self._check_level(level)
        downsample = self.level_downsamples[level]
        left, top = (int(v) for v in round_half_up(np.array([x, y]) / downsample))
        return self.read_level_region(left, top, width, height, level)

    def _read_resampled(
        self, x: float, y: float, width: int, height: int, target_um: float
    ) -> np.ndarray:
        from PIL import Image

        if width <= 0 or height <= 0:
            raise InputError(f"region size must be positive, got {width} x {height} px.")
        level = self.level_for_pixel_size(target_um)
        downsample = self.level_downsamples[level]
        scale = target_um / (self._require_pixel_size() * downsample)
        source_x, source_y = x / downsample, y / downsample
        source_width, source_height = width * scale, height * scale
        left, top = math.floor(source_x), math.floor(source_y)
        right = math.ceil(source_x + source_width)
        bottom = math.ceil(source_y + source_height)
        window = self.read_level_region(left, top, right - left, bottom - top, level)
        resample = Image.Resampling.BOX if scale >= 1 else Image.Resampling.BILINEAR
        box = (
            source_x - left,
            source_y - top,
            source_x - left + source_width,
            source_y - top + source_height,
        )
        resized = Image.fromarray(window).resize((width, height), resample=resample, box=box)
        return np.asarray(resized)

    def _require_pixel_size(self) -> float:
        if self.pixel_size_um is None:
            raise InputError(
                f"{self.path}: the pixel size is unknown (no OME, MPP or resolution metadata); "
                "give it with `stinfer prepare --pixel-size-um` (uns['stinfer']['pixel_size_um']"
                " of the slide, or pixel_size_um= of open_slide)."
            )
        return self.pixel_size_um

    def _check_level(self, level: int) -> None:
        if not 0 <= int(level) < self.level_count:
            raise InputError(
                f"{self.path}: level {level} does not exist; the slide has "
                f"{self.level_count} level(s) (0 to {self.level_count - 1})."
            )

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Return the in-bounds pixels ``[y0:y1, x0:x1]`` of ``level`` as ``(h, w[, c])``."""
        raise NotImplementedError


MAX_IMAGE_PIXELS_ENV = "STINFER_MAX_IMAGE_PIXELS"
"""Environment variable that overrides :data:`MAX_IMAGE_PIXELS` (a whole number of pixels)."""

MAX_IMAGE_PIXELS = 2**31
"""Largest JPEG/PNG (width x height) stinfer decodes: ~2.1 gigapixels, ~6 GB of RGB pixels.

A JPEG or PNG is decoded whole into memory (``width * height * 3`` bytes), so a header that
declares an absurd size (a corrupt or hostile file) would exhaust memory; the cap is checked
from the header before any decoding (:func:`check_image_pixels`). Real whole-slide JPEG/PNGs
(a HER2ST section is ~0.1 gigapixel) are far below it; tiled TIFF/SVS slides are read by tile
and are not capped. Raise it with the environment variable ``STINFER_MAX_IMAGE_PIXELS``, the
CLI flag ``--max-image-pixels``, or by setting this attribute.
"""


def max_image_pixels() -> int:
    """The pixel cap in force: ``STINFER_MAX_IMAGE_PIXELS`` when set, else :data:`MAX_IMAGE_PIXELS`."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if value is None or not value.strip():
        return int(MAX_IMAGE_PIXELS)
    try:
        return int(float(value))
    except ValueError as error:
        raise InputError(
            f"{MAX_IMAGE_PIXELS_ENV}={value!r} is not a number of pixels (e.g. 4e9)."
        ) from error


def check_image_pixels(path: Path, width: int, height: int) -> None:
    """Raise :class:`InputError` when a JPEG/PNG of ``width`` x ``height`` exceeds the cap."""
    cap = max_image_pixels()
    if width * height > cap:
        raise InputError(
            f"{path}: the header declares {width} x {height} px ({width * height / 1e9:.3g} "
            f"gigapixels, ~{width * height * 3 / 2**30:.3g} GiB decoded), above the cap of "
            f"{cap / 1e9:.3g} gigapixels for JPEG/PNG images, which are decoded whole. If the "
            f"image is real, raise the cap (environment variable {MAX_IMAGE_PIXELS_ENV}=N or "
            "`stinfer --max-image-pixels N`) or convert it to a tiled pyramidal TIFF; otherwise "
            "the file is corrupt."
        )


def truncated_image_error(path: Path, error: object) -> InputError:
    """The :class:`InputError` for an image whose data ends early or does not decode."""
    return InputError(
        f"{path}: the image is truncated or corrupt ({error}); copy or export it again."
    )


def _jpeg_is_truncated(path: Path, chunk_bytes: int = 2**20) -> bool:
    """True when a JPEG's last scan has no end-of-image marker (the file was cut short).

    Entropy-coded data cannot hold a marker (0xFF is byte-stuffed), so the last of the markers
    start-of-scan (FFDA) and end-of-image (FFD9) in the file is FFD9 in a complete JPEG. The
    file is read backwards in chunks until either is found: one chunk for a complete file.
    libjpeg-turbo (imagecodecs) decodes a truncated JPEG without complaint, filling the
    missing part with flat grey.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        end = size
        while end > 0:
            start = max(0, end - chunk_bytes)
            handle.seek(start)
            chunk = handle.read(end - start + 1)  # one byte of overlap: a marker split in two
            last_end, last_scan = chunk.rfind(b"\xff\xd9"), chunk.rfind(b"\xff\xda")
            if last_end >= 0 or last_scan >= 0:
                return last_scan > last_end
            end = start
    return True


@contextlib.contextmanager
def _without_decompression_bomb_limit() -> Iterator[None]:
    """Let Pillow open whole-slide-sized images (its default limit is ~89 megapixels).

    stinfer's own cap (:func:`check_image_pixels`) replaces it. Truncated files always raise
    (``LOAD_TRUNCATED_IMAGES`` is off inside), never decode with a grey remainder.
    """
    from PIL import Image, ImageFile

    saved = Image.MAX_IMAGE_PIXELS
    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved
        ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated


def _pillow_band(image) -> np.ndarray:
    """A decoded Pillow image (or band) as ``(h, w[, c])`` in a mode :func:`to_rgb_uint8` takes."""
    if image.mode in ("RGB", "RGBA", "L", "LA", "I;16", "I;16L", "I;16B", "F"):
        return np.asarray(image)
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    if image.mode == "P" and "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _pillow_pixels(image, band_rows: int = 1024) -> np.ndarray:
    """Copy a loaded Pillow image into one numpy array, ``band_rows`` rows at a time.

    Converting band by band keeps the transient copies (Pillow's ``tobytes``) to one band
    instead of the whole image, which would double the peak memory of a large slide.
    """
    width, height = image.size
    first = _pillow_band(image.crop((0, 0, width, min(band_rows, height))))
    pixels = np.empty((height, *first.shape[1:]), dtype=first.dtype)
    pixels[: first.shape[0]] = first
    for top in range(band_rows, height, band_rows):
        bottom = min(top + band_rows, height)
        pixels[top:bottom] = _pillow_band(image.crop((0, top, width, bottom)))
    pixels.flags.writeable = False
    return pixels


def _decode_jpeg(path: Path) -> np.ndarray | None:
    """Decode a whole RGB or greyscale JPEG with imagecodecs (libjpeg-turbo), or ``None``.

    The pixels equal Pillow's (same library, same IDCT), but decoding straight into one numpy
    array is much faster than Pillow's decode plus copy and needs less peak memory (figures
    for a HER2ST section in ``docs/results.md``). ``None`` (then Pillow decodes) when
    imagecodecs is missing or refuses the file.
    """
    try:
        import imagecodecs

        pixels = imagecodecs.jpeg8_decode(path.read_bytes())
    except Exception as error:  # any failure falls back to Pillow, which raises a clear error
        logger.debug("%s: imagecodecs cannot decode it (%s); decoding with Pillow.", path, error)
        return None
    pixels.flags.writeable = False
    return pixels


JPEG_DCT_DOWNSAMPLES = (8, 4, 2)
"""The reduced sizes libjpeg decodes directly (DCT scaling), coarsest first."""


def read_jpeg_reduced(
    path: str | os.PathLike, max_downsample: float
) -> tuple[np.ndarray, int] | None:
    """Decode an RGB or greyscale JPEG at 1/2, 1/4 or 1/8 of its size, for thumbnails.

    libjpeg scales while decoding (Pillow's ``draft``), so a thumbnail of a large JPEG costs a
    fraction of a full decode in time and memory. Pixel ``i`` of the result is the mean of
    level-0 pixels ``i * d`` to ``i * d + d - 1`` (``d`` the downsample), as a pyramid level.

    Returns
    -------
    tuple or None
        ``((h, w, 3) uint8 RGB, d)`` with ``d`` the largest of :data:`JPEG_DCT_DOWNSAMPLES`
        not above ``max_downsample``; ``None`` when none is, or the file is not an RGB or
        greyscale JPEG (read it with :func:`open_slide` then).
    """
    from PIL import Image, UnidentifiedImageError

    downsamples = [d for d in JPEG_DCT_DOWNSAMPLES if d <= max_downsample * (1 + 1e-6)]
    if not downsamples:
        return None
    path = Path(path)
    try:
        with _without_decompression_bomb_limit(), Image.open(path) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            width, height = image.size
            check_image_pixels(path, width, height)
            if _jpeg_is_truncated(path):
                raise truncated_image_error(path, "no end-of-image marker")
            downsample = downsamples[0]
            image.draft(image.mode, (-(-width // downsample), -(-height // downsample)))
            if image.size != (-(-width // downsample), -(-height // downsample)):
                return None
            try:
                pixels = to_rgb_uint8(np.asarray(image))
            except (OSError, SyntaxError, ValueError) as error:
                raise truncated_image_error(path, error) from error
    except (OSError, UnidentifiedImageError):
        return None
    return pixels, downsample


class PillowSlide(SlideImage):
    """A JPEG or PNG slide: one level, decoded whole on the first read and cached.

    Pillow decodes a JPEG from its start, so a crop costs a full decode; decoding once and
    slicing the cached array makes many small reads cheap. The cached array holds the file's
    own channels (``width * height * channels`` bytes) until :meth:`close`.
    """

    def __init__(self, path: Path, pixel_size_um: float | None = None) -> None:
        from PIL import Image, ImageFile, UnidentifiedImageError

        try:
            with _without_decompression_bomb_limit():
                self._image = Image.open(path)
        except UnidentifiedImageError as error:
            raise InputError(f"{path}: not a readable JPEG/PNG image ({error}).") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise truncated_image_error(path, error) from error
        # Pillow "identifies" some non-image formats (HDF5, FITS, ...) as stubs it cannot decode
        width, height = self._image.size
        if isinstance(self._image, ImageFile.StubImageFile) or width <= 0 or height <= 0:
            kind = self._image.format or "unknown"
            self._image.close()
            raise InputError(
                f"{path}: not a readable image (Pillow sees a {kind} file of {width} x {height} "
                "px); give the H&E image as JPEG, PNG or TIFF."
            )
        try:
            check_image_pixels(path, width, height)
        except InputError:
            self._image.close()
            raise
        self._pixels: np.ndarray | None = None
        super().__init__(path, [self._image.size], pixel_size_um)

    def _decoded(self) -> np.ndarray:
        if self._pixels is None:
            if self._image is None:
                raise InputError(f"{self.path}: the slide is closed.")
            if self._image.format == "JPEG":
                if _jpeg_is_truncated(self.path):
                    raise truncated_image_error(self.path, "no end-of-image marker")
                if self._image.mode in ("RGB", "L"):
                    self._pixels = _decode_jpeg(self.path)
            if self._pixels is None:
                with _without_decompression_bomb_limit():
                    try:
                        self._image.load()
                        self._pixels = _pillow_pixels(self._image)
                    except (OSError, SyntaxError, ValueError) as error:
                        raise truncated_image_error(self.path, error) from error
                    except MemoryError as error:
                        width, height = self.dimensions
                        raise InputError(
                            f"{self.path}: not enough memory to decode {width} x {height} px "
                            "(JPEG/PNG images are decoded whole); convert the image to a tiled "
                            "pyramidal TIFF, which is read tile by tile."
                        ) from error
            self._image.close()
            self._image = None
        return self._pixels

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._decoded()[y0:y1, x0:x1]

    def close(self) -> None:
        if self._image is not None:
            self._image.close()
            self._image = None
        self._pixels = None


def _lru_tile_store(store, max_bytes: int):
    """Wrap a zarr (v3) store so decoded chunks are kept in an LRU cache of ``max_bytes``.

    tifffile's store returns decoded tiles, so a cache hit skips both the file read and the
    decompression. Returns ``store`` unchanged when zarr has no ``WrapperStore`` (zarr 2) or
    when ``max_bytes`` is 0.
    """
    try:
        from zarr.storage import WrapperStore
    except ImportError:
        return store
    if max_bytes <= 0:
        return store

    class LRUTileStore(WrapperStore):
        def __init__(self, inner) -> None:
            super().__init__(inner)
            self._cache: OrderedDict[str, object] = OrderedDict()
            self._cached_bytes = 0

        def _with_store(self, inner):
            return LRUTileStore(inner)

        async def get(self, key, prototype, byte_range=None):
            if byte_range is None and key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            value = await self._store.get(key, prototype, byte_range)
            if byte_range is None and value is not None:
                size = len(value)
                if size <= max_bytes:
                    self._cache[key] = value
                    self._cached_bytes += size
                    while self._cached_bytes > max_bytes:
                        _, evicted = self._cache.popitem(last=False)
                        self._cached_bytes -= len(evicted)
            return value

    return LRUTileStore(store)


def _tiff_pixel_size_um(tiff) -> float | None:
    """Microns per level-0 pixel from OME, SVS or TIFF resolution metadata, else ``None``."""
    if tiff.is_ome and tiff.ome_metadata:
        try:
            root = ElementTree.fromstring(tiff.ome_metadata)
        except ElementTree.ParseError:
            root = None
        if root is not None:
            for element in root.iter():
                if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
                    unit = element.get("PhysicalSizeXUnit", "µm")
                    if unit in _UNIT_TO_UM:
                        return float(element.get("PhysicalSizeX")) * _UNIT_TO_UM[unit]
    page = tiff.pages.first
    if tiff.is_svs:
        import tifffile

        with contextlib.suppress(Exception):
            mpp = tifffile.svs_description_metadata(page.description).get("MPP")
            if mpp:
                return float(mpp)
    unit = page.tags.valueof(296, default=2)
    if 282 in page.tags and unit in (3, 4, 5):  # cm, mm, um: inch tags are usually screen dpi
        pixels_per_um = page.get_resolution("MICROMETER")[0]
        if pixels_per_um > 0:
            return 1.0 / pixels_per_um
    return None


class TiffSlide(SlideImage):
    """A TIFF slide (plain, OME, pyramidal; also SVS/NDPI) read tile by tile through zarr.

    Levels are ``tifffile.TiffFile(path).series[0].levels``. Only the tiles (or strips) a
    region overlaps are read and decoded; decoded tiles stay in an LRU cache of
    ``tile_cache_bytes`` bytes. Axes other than Y, X and the sample/channel axis (time,
    z-planes, ...) are read at index 0.
    """

    def __init__(
        self,
        path: Path,
        pixel_size_um: float | None = None,
        tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES,
    ) -> None:
        import tifffile
        import zarr

        try:
            self._tiff = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError) as error:
            raise InputError(f"{path}: not a readable TIFF file ({error}).") from error
        try:
            series = self._tiff.series[0]
            self._store = series.aszarr()
            store = _lru_tile_store(self._store, tile_cache_bytes)
            try:
                root = zarr.open(store, mode="r", zarr_format=2)
            except TypeError:  # zarr 2 has no zarr_format argument
                root = zarr.open(store, mode="r")
            if isinstance(root, zarr.Group):
                self._arrays = [root[str(k)] for k in range(len(series.levels))]
            else:
                self._arrays = [root]
            axes = series.get_axes(None)
            if "X" not in axes or "Y" not in axes or len(axes) != self._arrays[0].ndim:
                raise InputError(f"{path}: TIFF series has axes {axes!r}; expected Y and X axes.")
        except Exception:
            self._tiff.close()
            raise
        self._axes = axes
        dimensions = [(a.shape[axes.index("X")], a.shape[axes.index("Y")]) for a in self._arrays]
        if pixel_size_um is None:
            pixel_size_um = _tiff_pixel_size_um(self._tiff)
        super().__init__(path, dimensions, pixel_size_um)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """``(height, width)`` of a level-0 tile (or strip) in pixels."""
        chunks = self._arrays[0].chunks
        return chunks[self._axes.index("Y")], chunks[self._axes.index("X")]

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        selection: list[object] = []
        kept: list[str] = []
        for axis in self._axes:
            if axis == "Y":
                selection.append(slice(y0, y1))
            elif axis == "X":
                selection.append(slice(x0, x1))
            elif axis in "SC" and "S" not in kept and "C" not in kept:
                selection.append(slice(None))
            else:
                selection.append(0)
                continue
            kept.append(axis)
        pixels = np.asarray(self._arrays[level][tuple(selection)])
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "SC"]
        return np.transpose(pixels, order)

    def close(self) -> None:
        if getattr(self, "_tiff", None) is not None:
            self._store.close()
            self._tiff.close()
            self._tiff = None
            self._arrays = []


class OpenSlideSlide(SlideImage):
    """A slide read through OpenSlide (SVS, NDPI, MRXS, ...); needs ``openslide-python``.

    Transparent pixels OpenSlide returns (areas the scanner skipped) become white.
    """

    def __init__(self, path: Path, pixel_size_um: float | None = None) -> None:
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as error:
            raise InputError(f"{path}: OpenSlide cannot read this file ({error}).") from error
        if pixel_size_um is None:
            mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
            pixel_size_um = float(mpp) if mpp else None
        super().__init__(path, list(self._slide.level_dimensions), pixel_size_um)
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        location = (round(x0 * downsample), round(y0 * downsample))
        rgba = np.asarray(self._slide.read_region(location, level, (x1 - x0, y1 - y0)))
        rgb = rgba[:, :, :3].copy()
        rgb[rgba[:, :, 3] == 0] = WHITE
        return rgb

    def close(self) -> None:
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
            self._slide = None


H5AD_IMAGE_SEPARATOR = "#"
"""Separates the .h5ad file from the dataset in an image reference (:func:`h5ad_image_reference`)."""


def h5ad_image_reference(h5ad_path: str | os.PathLike, dataset: str) -> str:
    """``"<absolute h5ad path>#<dataset>"``: an image stored in an .h5ad, for :func:`open_slide`.

    ``dataset`` is the HDF5 path of the image array in the file, e.g.
    ``"uns/spatial/<library_id>/images/hires"`` (scanpy's layout). Stored as a slide's
    ``uns["stinfer"]["image_path"]`` so that a slide read from a scanpy-written .h5ad keeps
    its image without copying it to another file.
    """
    return f"{Path(h5ad_path).resolve()}{H5AD_IMAGE_SEPARATOR}{dataset.strip('/')}"


def split_h5ad_image_reference(path: str | os.PathLike) -> tuple[Path, str] | None:
    """``(h5ad file, dataset)`` of an image reference, or ``None`` for an ordinary image path.

    A reference is ``"<path ending in .h5ad>#uns/..."`` (see :func:`h5ad_image_reference`).
    """
    file, separator, dataset = str(path).rpartition(H5AD_IMAGE_SEPARATOR)
    if not separator or not file.lower().endswith(".h5ad") or not dataset.startswith("uns/"):
        return None
    return Path(file), dataset


def image_source_file(path: str | os.PathLike) -> Path:
    """The file holding the image ``path`` names: the path itself, or a reference's .h5ad."""
    reference = split_h5ad_image_reference(path)
    return Path(path) if reference is None else reference[0]


class H5adImageSlide(SlideImage):
    """An image array stored in an .h5ad (scanpy's ``uns["spatial"][lib]["images"][key]``).

    Opened from a reference ``"<file.h5ad>#<dataset>"`` (:func:`h5ad_image_reference`):
    only the dataset's shape is read when the slide is opened; the first region read loads
    that one dataset (never the rest of the file) and keeps it until :meth:`close`. scanpy
    stores images as float 0-1 (converted by :func:`to_rgb_uint8`) or uint8.
    """

    def __init__(self, reference: str, pixel_size_um: float | None = None) -> None:
        import h5py

        parts = split_h5ad_image_reference(reference)
        if parts is None:
            raise InputError(f"{reference}: not an image reference '<file.h5ad>#uns/...'.")
        file, dataset = parts
        if not file.is_file():
            raise InputError(
                f"{file}: the .h5ad holding the slide image ({dataset}) not found; check "
                "uns['stinfer']['image_path']."
            )
        try:
            with h5py.File(file, "r") as handle:
                node = handle.get(dataset)
                shape = node.shape if isinstance(node, h5py.Dataset) else None
        except OSError as error:
            raise InputError(f"{file}: not a readable .h5ad (HDF5) file ({error}).") from error
        if shape is None or len(shape) not in (2, 3) or 0 in shape[:2]:
            raise InputError(
                f"{file}: {dataset} is not an image array (found "
                f"{'nothing' if shape is None else f'shape {shape}'}); the image reference in "
                "uns['stinfer']['image_path'] must name an (height, width[, channels]) dataset."
            )
        self._file, self._dataset = file, dataset
        self._pixels: np.ndarray | None = None
        super().__init__(Path(reference), [(shape[1], shape[0])], pixel_size_um)

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._pixels is None:
            import h5py

            with h5py.File(self._file, "r") as handle:
                pixels = np.asarray(handle[self._dataset][()])
            pixels.flags.writeable = False
            self._pixels = pixels
        return self._pixels[y0:y1, x0:x1]

    def close(self) -> None:
        self._pixels = None


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def open_slide(
    path: str | os.PathLike,
    pixel_size_um: float | None = None,
    *,
    tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES,
) -> SlideImage:
    """Open a slide image lazily; only its header is read here.

    Parameters
    ----------
    path
        JPEG/PNG, TIFF/OME-TIFF/pyramidal TIFF, an OpenSlide format (SVS, NDPI, MRXS, ...),
        or a reference to an image array in an .h5ad (:func:`h5ad_image_reference`).
    pixel_size_um
        Microns per level-0 pixel of this file; overrides the file's metadata.
    tile_cache_bytes
        Size of the decoded-tile LRU cache of TIFF slides (0 disables it).

    Returns
    -------
    SlideImage
        Use as a context manager (``with open_slide(path) as slide:``) to close the file.

    Raises
    ------
    InputError
        When the file is missing, not an image, or needs OpenSlide and it is not installed.
    """
    if split_h5ad_image_reference(path) is not None:
        return H5adImageSlide(str(path), pixel_size_um)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: slide image not found; check uns['stinfer']['image_path'].")
    name = path.name.lower()
    if name.endswith(OPENSLIDE_SUFFIXES):
        if _openslide_available():
            return OpenSlideSlide(path, pixel_size_um)
        if not name.endswith(TIFF_READABLE_OPENSLIDE_SUFFIXES):
            raise InputError(
                f"{path}: this format needs OpenSlide, which is not installed; "
                "run `pip install stinfer[openslide]` (openslide-python + openslide-bin)."
            )
        logger.info("%s: OpenSlide not installed; reading it with tifffile.", path)
        return TiffSlide(path, pixel_size_um, tile_cache_bytes)
    if name.endswith(TIFF_SUFFIXES):
        return TiffSlide(path, pixel_size_um, tile_cache_bytes)
    if name.endswith(PILLOW_SUFFIXES):
        return PillowSlide(path, pixel_size_um)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TiffSlide(path, pixel_size_um, tile_cache_bytes)
    return PillowSlide(path, pixel_size_um)

"""Spot patches: the one patch extractor of stinfer.

Every model that looks at histology gets its image patches from here: :func:`iter_spot_patches`
streams them in chunks, :func:`spot_patches` returns them all (optionally cached on disk), and
:func:`minmax_to_unit_range` applies the STEvs per-patch normalisation.

Geometry
--------
A patch is a square centred on a spot. Spot centres are ``obsm["spatial"]`` (full-resolution
pixels, columns x, y) times ``uns["stinfer"]["image_scale"]``, i.e. pixels of the image file.
The square covers ``footprint`` level-0 file pixels (see :class:`PatchSpec`); read at pyramid
level ``k`` (downsample ``d``) its top-left corner is
``round((centre - footprint / 2) / d)`` and its side ``round(footprint / d)`` level-``k``
pixels, rounding halves up. Without resampling (the default) that is simply
``top-left = round(centre - patch_size_px / 2)``, and the patch equals the crop
``image[top:top + size, left:left + size]``. Pixels outside the image are white (255).

When the output size differs from the side read, patches are resized as a batch: area
averaging when shrinking (what a pyramid level does; an exact integer block mean in numpy when
the factor is whole, torch otherwise), bilinear (torch) when enlarging.

Speed
-----
Spots are read a chunk at a time. Within a chunk, spots are grouped by the
``block_px``-square block of the slide their top-left corner falls in; each group is one region
read (for a tiled TIFF that decodes only the tiles the group touches, each once, and the
reader's tile cache spares neighbouring groups a second decode), and the group's patches are
cut out of that region with one numpy fancy-indexing gather on a ``sliding_window_view``.
:func:`iter_spot_patches` keeps the AnnData's spot order, so it is fastest when spots are listed
in a spatially coherent order (raster, as legacy ST gives); :func:`spot_patches` extracts in
:func:`spatial_order` (block rows) whatever the spot order, so consecutive chunks reuse the
tiles still in the reader's cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output
from stinfer.io.slide_data import image_pixel_size_um, slide_meta, spot_coordinates_px
from stinfer.io.slide_image import SlideImage, image_source_file, open_slide, round_half_up

logger = logging.getLogger("stinfer")

CACHE_FORMAT_VERSION = "stinfer-spot-patches-v1"
DEFAULT_BLOCK_PX = 1024


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """What a spot patch is: its footprint on the slide and its size in pixels.

    ============================  ======================================  =====================
    given                         footprint on the slide                  output side (px)
    ============================  ======================================  =====================
    nothing (default)             ``patch_size_px`` file pixels           ``patch_size_px``
    ``patch_size_um``             ``patch_size_um`` microns               ``patch_size_um`` /
                                                                          output pixel size
    ``target_pixel_size_um``      ``patch_size_px * target`` microns      ``patch_size_px``
    ============================  ======================================  =====================

    The output pixel size is ``target_pixel_size_um`` when given, else the file's pixel size.
    ``output_size_px``, when given, overrides the output side (the footprint is unchanged).
    Any option in microns needs the slide's pixel size (``uns["stinfer"]["pixel_size_um"]``
    or the image's metadata).

    Attributes
    ----------
    patch_size_px
        Patch side in output pixels. STEvs (seed Appendix D.1.2) uses a 5 x 5 grid of 32-px
        base patches centred on the spot, i.e. 160 px.
    patch_size_um
        Patch side in microns; overrides ``patch_size_px``.
    target_pixel_size_um
        Microns per output pixel. Slides scanned at different resolutions then give patches
        of the same physical scale: the region is read at the coarsest pyramid level that is
        at least this fine and resized.
    output_size_px
        Side of the returned patches; defaults to the footprint in output pixels.
    """

    patch_size_px: int = 160  # STEvs D.1.2: 5 x 5 base patches of 32 px
    patch_size_um: float | None = None
    target_pixel_size_um: float | None = None
    output_size_px: int | None = None

    def __post_init__(self) -> None:
        for name in ("patch_size_px", "output_size_px"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value <= 0):
                raise InputError(f"PatchSpec.{name} must be a positive integer, got {value!r}.")
        for name in ("patch_size_um", "target_pixel_size_um"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"PatchSpec.{name} must be positive (microns), got {value!r}.")


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
    """How a :class:`PatchSpec` is read from one image file.

    Attributes
    ----------
    footprint_px
        Patch side in level-0 pixels of the image file (may be fractional).
    output_px
        Side of the returned patches.
    """

    footprint_px: float
    output_px: int


def patch_geometry(spec: PatchSpec, file_pixel_size_um: float | None) -> PatchGeometry:
    """Resolve ``spec`` against the file's pixel size (microns per level-0 file pixel).

    Raises :class:`InputError` when the spec is in microns and the pixel size is unknown.
    """
    uses_microns = spec.patch_size_um is not None or spec.target_pixel_size_um is not None
    if uses_microns and file_pixel_size_um is None:
        raise InputError(
            "PatchSpec gives sizes in microns but the slide's pixel size is unknown; set "
            "uns['stinfer']['pixel_size_um'] (microns per full-resolution pixel)."
        )
    output_pixel_um = spec.target_pixel_size_um or file_pixel_size_um
    if spec.patch_size_um is not None:
        footprint_px = spec.patch_size_um / file_pixel_size_um
        natural_output = spec.patch_size_um / output_pixel_um
    elif spec.target_pixel_size_um is not None:
        footprint_px = spec.patch_size_px * spec.target_pixel_size_um / file_pixel_size_um
        natural_output = spec.patch_size_px
    else:
        footprint_px = float(spec.patch_size_px)
        natural_output = spec.patch_size_px
    output_px = spec.output_size_px or max(1, int(round_half_up(natural_output)))
    return PatchGeometry(footprint_px=float(footprint_px), output_px=int(output_px))


def spot_centres_file_px(slide: ad.AnnData) -> np.ndarray:
    """Spot centres in level-0 pixels of the slide's image file, ``(n_spots, 2)`` (x, y).

    ``obsm["spatial"]`` (full-resolution pixels) times ``uns["stinfer"]["image_scale"]``.
    """
    return spot_coordinates_px(slide) * float(slide_meta(slide)["image_scale"])


def _image_path(meta: dict) -> Path:
    if meta["image_path"] is None:
        raise InputError(
            f"slide {meta.get('sample_id', '')!r} has no image (uns['stinfer']['image_path'] "
            "is empty); patches need the H&E image."
        )
    return Path(meta["image_path"])


def gather_windows(image: np.ndarray, lefts: np.ndarray, tops: np.ndarray, size: int) -> np.ndarray:
    """Cut ``size`` x ``size`` windows out of an ``(h, w, 3)`` image, as ``(n, 3, size, size)``.

    All windows must lie inside ``image``. One fancy-indexing copy on a
    ``sliding_window_view``; no loop over windows.
    """
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(0, 1))
    return windows[tops, lefts]


def read_windows(
    slide_image: SlideImage,
    lefts: np.ndarray,
    tops: np.ndarray,
    size: int,
    level: int = 0,
    block_px: int = DEFAULT_BLOCK_PX,
) -> np.ndarray:
    """Read square windows of ``slide_image`` at ``level``, as ``(n, 3, size, size)`` uint8.

    Parameters
    ----------
    lefts, tops
        Top-left corners in level-``level`` pixels, int ``(n,)``; windows may cross the image
        border (outside pixels are white).
    size
        Window side in level-``level`` pixels.
    block_px
        Windows whose top-left corners share a ``block_px`` block are read as one region.
    """
    lefts = np.asarray(lefts, dtype=np.int64)
    tops = np.asarray(tops, dtype=np.int64)
    out = np.empty((len(lefts), 3, size, size), dtype=np.uint8)
    if len(lefts) == 0:
        return out
    block_keys = np.stack([tops // block_px, lefts // block_px], axis=1)
    _, group_of_spot = np.unique(block_keys, axis=0, return_inverse=True)
    group_of_spot = group_of_spot.reshape(-1)
    order = np.argsort(group_of_spot, kind="stable")
    boundaries = np.flatnonzero(np.diff(group_of_spot[order])) + 1
    for members in np.split(order, boundaries):
        left, top = int(lefts[members].min()), int(tops[members].min())
        right = int(lefts[members].max()) + size
        bottom = int(tops[members].max()) + size
        region = slide_image.read_level_region(left, top, right - left, bottom - top, level)
        out[members] = gather_windows(region, lefts[members] - left, tops[members] - top, size)
    return out


def block_mean_patches(patches: np.ndarray, factor: int) -> np.ndarray:
    """Shrink ``(n, 3, h, w)`` uint8 patches by an integer ``factor``: mean of each block.

    Exact area averaging (rounded half up) in integer arithmetic: one vectorised add per
    offset inside the ``factor`` x ``factor`` block, no float copy of the batch.
    """
    n_patches, channels, height, width = patches.shape
    blocks = patches.reshape(n_patches, channels, height // factor, factor, width // factor, factor)
    total = np.zeros((n_patches, channels, height // factor, width // factor), np.uint32)
    for row in range(factor):
        for col in range(factor):
            total += blocks[:, :, :, row, :, col]
    area = factor * factor
    return ((total + area // 2) // area).astype(np.uint8)


def resize_patches(patches: np.ndarray, size: int, batch_size: int = 32) -> np.ndarray:
    """Resize ``(n, 3, h, w)`` uint8 square patches to ``(n, 3, size, size)``.

    Shrinking averages the input pixels each output pixel covers (area averaging, as a
    pyramid level is made): :func:`block_mean_patches` for an integer factor, else torch
    ``interpolate(mode="area")``; enlarging is bilinear (torch). Torch sees ``batch_size``
    patches at a time, bounding its float32 copy.
    """
    side = patches.shape[-1]
    if patches.shape[-2:] == (size, size) or len(patches) == 0:
        return np.ascontiguousarray(patches)
    if side > size and side % size == 0:
        return block_mean_patches(patches, side // size)
    import torch
    import torch.nn.functional as functional

    shrinking = side >= size
    out = np.empty((len(patches), 3, size, size), dtype=np.uint8)
    for start in range(0, len(patches), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size]))
        batch = batch.float()
        if shrinking:
            resized = functional.interpolate(batch, size=(size, size), mode="area")
        else:
            resized = functional.interpolate(
                batch, size=(size, size), mode="bilinear", align_corners=False
            )
        out[start : start + batch_size] = resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


@dataclasses.dataclass(frozen=True)
class PatchReadPlan:
    """Where every patch of a slide is read: one pyramid level, one window side, all corners.

    Attributes
    ----------
    level
        Pyramid level read: the coarsest whose downsample is <= footprint / output side.
    side_px
        Window side in pixels of ``level`` (``round(footprint / downsample)``).
    output_px
        Side of the returned patches (windows are resized to it when it differs).
    lefts, tops
        ``(n_spots,)`` int64 top-left corners in pixels of ``level``:
        ``round((centre - footprint / 2) / downsample)``, halves up.
    """

    level: int
    side_px: int
    output_px: int
    lefts: np.ndarray
    tops: np.ndarray


def plan_patch_reads(
    slide_image: SlideImage, centres: np.ndarray, geometry: PatchGeometry
) -> PatchReadPlan:
    """Resolve ``geometry`` for spot ``centres`` (level-0 file pixels) on ``slide_image``."""
    level = slide_image.level_for_downsample(geometry.footprint_px / geometry.output_px)
    downsample = slide_image.level_downsamples[level]
    side = max(1, int(round_half_up(geometry.footprint_px / downsample)))
    corners = round_half_up((centres - geometry.footprint_px / 2.0) / downsample)
    return PatchReadPlan(level, side, geometry.output_px, corners[:, 0], corners[:, 1])


def spatial_order(lefts: np.ndarray, tops: np.ndarray, block_px: int) -> np.ndarray:
    """Spot indices sorted by block row, then block column (``block_px`` blocks), stably.

    Consecutive chunks then cover neighbouring parts of the slide, so a tile decoded for one
    chunk is still in the reader's tile cache for the next.
    """
    return np.lexsort((lefts // block_px, tops // block_px))


def _iter_patch_chunks(
    slide: ad.AnnData,
    spec: PatchSpec,
    chunk_size: int,
    block_px: int,
    in_spatial_order: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(spot indices, patches)`` chunks, in spot order or in :func:`spatial_order`."""
    if chunk_size <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}.")
    meta = slide_meta(slide)
    centres = spot_centres_file_px(slide)
    # the slide's own pixel size, when it has one, overrides the image file's
    with open_slide(_image_path(meta), image_pixel_size_um(slide)) as slide_image:
        plan = plan_patch_reads(
            slide_image, centres, patch_geometry(spec, slide_image.pixel_size_um)
        )
        if in_spatial_order:
            order = spatial_order(plan.lefts, plan.tops, block_px)
        else:
            order = np.arange(len(centres))
        for start in range(0, len(order), chunk_size):
            indices = order[start : start + chunk_size]
            windows = read_windows(
                slide_image,
                plan.lefts[indices],
                plan.tops[indices],
                plan.side_px,
                plan.level,
                block_px,
            )
            yield indices, resize_patches(windows, plan.output_px)


def iter_spot_patches(
    slide: ad.AnnData,
    spec: PatchSpec | None = None,
    chunk_size: int = 256,
    *,
    block_px: int = DEFAULT_BLOCK_PX,
) -> Iterator[np.ndarray]:
    """Stream the patches of every spot of ``slide``, in spot order, ``chunk_size`` at a time.

    Parameters
    ----------
    slide
        A slide AnnData (``obsm["spatial"]`` and ``uns["stinfer"]`` with an image path).
    spec
        Patch geometry; :class:`PatchSpec` defaults (160 x 160 file pixels, STEvs D.1.2).
    chunk_size
        Spots per yielded chunk; bounds memory to about ``chunk_size`` patches plus the
        reader's tile cache (or, for JPEG/PNG, the decoded image).
    block_px
        Side (in pixels of the level read) of the blocks that group spots into one read.

    Yields
    ------
    numpy.ndarray
        ``(n, 3, H, W)`` uint8 RGB patches, ``n <= chunk_size``; see the module docstring
        for the geometry (centre, rounding, white padding).
    """
    for _, patches in _iter_patch_chunks(
        slide, spec or PatchSpec(), chunk_size, block_px, in_spatial_order=False
    ):
        yield patches


def patch_cache_key(slide: ad.AnnData, spec: PatchSpec) -> str:
    """Hex digest identifying the patches of ``slide`` under ``spec``.

    Hashes the image's resolved path, its file's size and modification time (ns; for an
    image stored in an .h5ad, the .h5ad's), the spot coordinates' bytes, the image scale and
    pixel size, the spec and a format version, so a change of any of them gives a new key.
    """
    meta = slide_meta(slide)
    image_path = _image_path(meta).resolve()
    try:
        stat = image_source_file(image_path).stat()
    except FileNotFoundError as error:
        raise InputError(f"{image_path}: slide image not found.") from error
    digest = hashlib.sha256()
    for part in (
        CACHE_FORMAT_VERSION,
        str(image_path),
        str(stat.st_size),
        str(stat.st_mtime_ns),
        repr(float(meta["image_scale"])),
        repr(meta["pixel_size_um"]),
        repr(dataclasses.astuple(spec)),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(slide.obsm["spatial"], dtype=np.float64).tobytes())
    return digest.hexdigest()


def _write_patch_cache(slide: ad.AnnData, spec: PatchSpec, path: Path) -> None:
    """Write all patches to ``path`` as .npy, extracting them in :func:`spatial_order`.

    ``open_memmap`` writes the header; each chunk is scattered to its rows through a memmap
    that is flushed and unmapped right away, so the process keeps only one chunk's pages
    resident. The file appears under its name only once complete (:func:`atomic_output`).
    """
    chunks = _iter_patch_chunks(slide, spec, 256, DEFAULT_BLOCK_PX, in_spatial_order=True)
    indices, patches = next(chunks)
    shape = (slide.n_obs, *patches.shape[1:])
    with atomic_output(path, overwrite=True) as tmp:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        offset = header.offset
        del header
        while True:
            rows = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=offset, shape=shape)
            rows[indices] = patches
            rows.flush()
            del rows
            try:
                indices, patches = next(chunks)
            except StopIteration:
                break


def spot_patches(
    slide: ad.AnnData,
    spec: PatchSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """All patches of ``slide``, ``(n_spots, 3, H, W)`` uint8, in spot order.

    Patches are extracted in :func:`spatial_order` (so spots listed in random order, as
    Visium barcodes are, decode each tile about once) and stored at their spots' rows.

    Parameters
    ----------
    slide, spec
        As for :func:`iter_spot_patches`.
    cache_dir
        When given, patches are stored there as ``patches-<key>.npy`` (key from
        :func:`patch_cache_key`) and returned as a read-only memmap; a later call with the
        same image file (path, size, mtime), coordinates and spec reuses the file without
        opening the image, and any change gives a new key and a fresh file. Files of old keys
        are left in place.

    Returns
    -------
    numpy.ndarray
        In memory without ``cache_dir`` (``n_spots * 3 * H * W`` bytes), else a memmap.
    """
    spec = spec or PatchSpec()
    if slide.n_obs == 0:
        size = spec.output_size_px or spec.patch_size_px
        return np.empty((0, 3, size, size), dtype=np.uint8)
    if cache_dir is None:
        patches = None
        for indices, chunk in _iter_patch_chunks(
            slide, spec, 256, DEFAULT_BLOCK_PX, in_spatial_order=True
        ):
            if patches is None:
                patches = np.empty((slide.n_obs, *chunk.shape[1:]), dtype=np.uint8)
            patches[indices] = chunk
        return patches
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise InputError(f"{cache_dir}: the patch cache must be a folder, but this is a file.")
    path = Path(cache_dir) / f"patches-{patch_cache_key(slide, spec)[:32]}.npy"
    if path.is_file():
        cached = np.load(path, mmap_mode="r")
        if cached.shape[0] == slide.n_obs and cached.ndim == 4 and cached.dtype == np.uint8:
            logger.info("spot patches: reusing %s", path)
            return cached
        logger.warning("spot patches: %s does not match the slide; rebuilding it.", path)
    logger.info("spot patches: extracting %d patches into %s", slide.n_obs, path)
    _write_patch_cache(slide, spec, path)
    return np.load(path, mmap_mode="r")


def minmax_to_unit_range(patches):
    """Per-patch min-max normalisation to [-1, 1] (STEvs, seed Eq. 39).

    ``I_norm = 2 (I - I_min) / (I_max - I_min) - 1`` with the minimum and maximum taken over
    all channels and pixels of each patch. A constant patch (``I_max == I_min``) maps to
    zeros rather than dividing by zero.

    Parameters
    ----------
    patches
        ``(n, 3, H, W)`` or a single ``(3, H, W)`` patch; uint8 or float, numpy array (or
        memmap) or torch tensor.

    Returns
    -------
    torch.Tensor
        float32, same shape, values in [-1, 1].
    """
    import torch

    if isinstance(patches, torch.Tensor):
        values = patches.to(torch.float32)
    else:
        array = np.asarray(patches, dtype=np.float32)
        if not array.flags.writeable:
            array = array.copy()
        values = torch.from_numpy(array)
    single = values.ndim == 3
    if single:
        values = values.unsqueeze(0)
    flat = values.reshape(values.shape[0], -1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    high = flat.amax(dim=1).view(-1, 1, 1, 1)
    span = high - low
    scaled = 2.0 * (values - low) / torch.where(span > 0, span, torch.ones_like(span)) - 1.0
    normalised = torch.where(span > 0, scaled, torch.zeros_like(scaled))
    return normalised[0] if single else normalised

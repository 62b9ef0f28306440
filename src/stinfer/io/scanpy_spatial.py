"""scanpy/squidpy's ``uns["spatial"]`` for a slide: downsampled images, scale factors, spot size.

scanpy (``sc.pl.spatial``) and squidpy find a slide's image and spot size in
``uns["spatial"][library_id]``, the layout ``sc.read_visium`` builds from Space Ranger's
outputs::

    uns["spatial"][library_id] = {
        "images": {"hires": (h, w, 3) uint8, "lowres": (h, w, 3) uint8},
        "scalefactors": {
            "tissue_hires_scalef": float,   # hires image px per full-resolution px
            "tissue_lowres_scalef": float,  # lowres image px per full-resolution px
            "spot_diameter_fullres": float, # full-resolution px
        },
        "metadata": {...},
    }

:func:`scanpy_spatial_library` builds that entry from a slide's ``uns["stinfer"]`` metadata
and spot centres; :func:`stinfer.io.slide_data.prepare_for_h5ad` adds it (library id = the
slide's sample id) to every slide stinfer writes, so the file opens in ``sc.pl.spatial``
without arguments. The images are read through :func:`image_thumbnail` (a coarse pyramid
level, then striding), never the full-resolution image when a coarser level exists.

A counts-only slide (and one whose image cannot be read) gets a *blank canvas*
(:func:`blank_canvas_images`): white ``hires`` and ``lowres`` images covering the spots,
with ``metadata["blank_canvas"] = True`` and ``metadata["blank_canvas_reason"]``. scanpy
1.11's ``sc.pl.spatial`` looks for a ``hires`` or ``lowres`` image unless told
``img_key=None`` (it raises ``StopIteration`` without one), so the canvas is what lets
``sc.pl.spatial(adata, color=gene)`` work with no extra arguments on every file stinfer
writes. It is not a slide image: :func:`stinfer.io.read_h5ad_slide` never takes a blank
canvas (:func:`is_blank_canvas`) for one, so the slide read back stays counts-only.

This module reads images only; it does not import :mod:`stinfer.io.slide_data` (which calls
it), so the slide layout is passed in as the metadata dict and the spot centres.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping

import numpy as np

from stinfer.errors import InputError
from stinfer.io.slide_image import image_source_file, open_slide, read_jpeg_reduced

logger = logging.getLogger("stinfer")

HIRES_MAX_PX = 2000
"""Long side of the ``hires`` image at most (Space Ranger's ``tissue_hires_image.png``)."""

LOWRES_MAX_PX = 600
"""Long side of the ``lowres`` image at most (Space Ranger's ``tissue_lowres_image.png``)."""

SPOT_DIAMETER_PER_PITCH = 0.55
"""Spot diameter / centre-to-centre distance when a slide does not record its spot size.

Visium's ratio (55-um spots on a 100-um pitch; legacy ST's is 100/200 = 0.5): spots drawn at
this size nearly touch without overlapping on either grid.
"""

BAND_BYTES = 64 * 2**20
"""Decoded pixels held at once while a thumbnail is striding through a large level."""


def image_thumbnail(
    image_path: str | os.PathLike, image_scale: float, max_size_px: int
) -> tuple[np.ndarray, float]:
    """A downsampled copy of an image and its scale (thumbnail px per full-resolution px).

    Reads the coarsest pyramid level whose downsample does not exceed ``long side /
    max_size_px`` (so no level coarser than needed is enlarged), then keeps every
    ``stride``-th pixel, with ``stride`` the smallest integer that brings the long side to
    ``max_size_px`` or less. The level is read in bands of rows, so a large single-level TIFF
    is never held whole in memory. A JPEG is decoded at 1/2, 1/4 or 1/8 of its size when
    that is still at least ``max_size_px`` (:func:`~stinfer.io.slide_image.read_jpeg_reduced`,
    libjpeg's DCT scaling: a pyramid level for free); a PNG is decoded whole (the format
    forces it). The result is cached for the last few images (keyed by file, size and
    modification time), since a benchmark writes many predictions of the same slide.

    Parameters
    ----------
    image_path
        The slide's ``uns["stinfer"]["image_path"]`` (a file or an .h5ad image reference).
    image_scale
        The slide's ``uns["stinfer"]["image_scale"]`` (image-file px per full-resolution px).
    max_size_px
        Upper bound on the thumbnail's long side.

    Returns
    -------
    tuple
        ``(pixels, scale)``: ``(h, w, 3)`` uint8 RGB, read-only; ``scale`` maps
        full-resolution pixels to thumbnail pixels (``obsm["spatial"] * scale``).
    """
    stat = image_source_file(image_path).stat()
    pixels, file_scale = _cached_thumbnail(
        str(image_path), stat.st_size, stat.st_mtime_ns, int(max_size_px)
    )
    return pixels, float(image_scale) * file_scale


@functools.lru_cache(maxsize=4)
def _cached_thumbnail(
    image_path: str, size_bytes: int, mtime_ns: int, max_size_px: int
) -> tuple[np.ndarray, float]:
    """Thumbnail of ``image_path`` and its scale in thumbnail px per image-file px."""
    del size_bytes, mtime_ns  # part of the cache key only
    with open_slide(image_path) as image:
        width, height = image.dimensions
        wanted = max(max(width, height) / max_size_px, 1.0)
        reduced = None
        if image.level_count == 1 and str(image_path).lower().endswith((".jpg", ".jpeg")):
            reduced = read_jpeg_reduced(image_path, wanted)
        if reduced is not None:
            pixels, downsample = reduced
            stride = max(1, int(np.ceil(max(pixels.shape[:2]) / max_size_px)))
            pixels = pixels[::stride, ::stride]
        else:
            level = image.level_for_downsample(wanted)
            downsample = image.level_downsamples[level]
            level_width, level_height = image.level_dimensions[level]
            stride = max(1, int(np.ceil(max(level_width, level_height) / max_size_px)))
            band_rows = stride * max(1, BAND_BYTES // (3 * level_width * stride))
            pixels = np.concatenate(
                [
                    image.read_level_region(
                        0, top, level_width, min(band_rows, level_height - top), level=level
                    )[::stride, ::stride]
                    for top in range(0, level_height, band_rows)
                ],
                axis=0,
            )
    pixels = np.ascontiguousarray(pixels)
    pixels.flags.writeable = False
    return pixels, 1.0 / (downsample * stride)


def spot_diameter_fullres(
    spot_diameter_px: float | None, spatial_xy: np.ndarray
) -> tuple[float, str]:
    """The spot diameter in full-resolution pixels, and where it comes from.

    ``spot_diameter_px`` (``uns["stinfer"]``) when known; else :data:`SPOT_DIAMETER_PER_PITCH`
    times the median distance from each spot centre to its nearest neighbour; else (fewer
    than two distinct spots) 1.0.
    """
    if spot_diameter_px is not None and np.isfinite(spot_diameter_px) and spot_diameter_px > 0:
        return float(spot_diameter_px), "uns['stinfer']['spot_diameter_px']"
    centres = np.unique(np.asarray(spatial_xy, dtype=np.float64), axis=0)
    if len(centres) < 2:
        return 1.0, "assumed 1 px (fewer than two distinct spots)"
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(centres).query(centres, k=2)
    pitch = float(np.median(distances[:, 1]))
    return (
        SPOT_DIAMETER_PER_PITCH * pitch,
        f"{SPOT_DIAMETER_PER_PITCH} x the median nearest-neighbour spot distance ({pitch:.4g} px)",
    )


def is_blank_canvas(library: Mapping) -> bool:
    """True when a ``uns["spatial"]`` library entry holds a blank canvas, not a slide image.

    That is, its ``metadata["blank_canvas"]`` is true (see :func:`blank_canvas_images`).
    """
    metadata = library.get("metadata")
    return isinstance(metadata, Mapping) and bool(np.any(metadata.get("blank_canvas", False)))


def blank_canvas_images(spatial_xy: np.ndarray, diameter_fullres: float) -> tuple[dict, dict]:
    """White ``hires``/``lowres`` images and their scale factors for a slide without an image.

    The canvas spans full-resolution pixels from (0, 0) to the largest spot centre plus one
    spot diameter in x and y, drawn with a long side of at most :data:`LOWRES_MAX_PX` px:
    scanpy places and sizes the spots through the scale factors, so the canvas resolution
    changes nothing in the plot, and a small canvas keeps the written file small.

    Parameters
    ----------
    spatial_xy
        ``(n_spots, 2)`` spot centres in full-resolution pixels.
    diameter_fullres
        Spot diameter in full-resolution pixels (the margin past the last spot).

    Returns
    -------
    tuple
        ``(images, scalefactors)``: ``{"hires", "lowres"}`` white ``(h, w, 3)`` uint8 arrays
        (separate copies), and ``tissue_hires_scalef`` = ``tissue_lowres_scalef`` = canvas px
        per full-resolution px.
    """
    centres = np.asarray(spatial_xy, dtype=np.float64).reshape(-1, 2)
    centres = centres[np.all(np.isfinite(centres), axis=1)]
    far_corner = centres.max(axis=0) if len(centres) else np.zeros(2)
    width, height = np.maximum(far_corner, 0.0) + max(float(diameter_fullres), 1.0)
    scale = LOWRES_MAX_PX / max(width, height)
    canvas_height, canvas_width = (
        min(LOWRES_MAX_PX, max(1, math.ceil(side * scale))) for side in (height, width)
    )
    images = {
        key: np.full((canvas_height, canvas_width, 3), 255, dtype=np.uint8)
        for key in ("hires", "lowres")
    }
    return images, {"tissue_hires_scalef": scale, "tissue_lowres_scalef": scale}


def scanpy_spatial_library(meta: Mapping, spatial_xy: np.ndarray) -> dict:
    """scanpy's ``uns["spatial"][library_id]`` entry for a slide (layout in the module docstring).

    Parameters
    ----------
    meta
        The slide's metadata as :func:`stinfer.io.slide_data.slide_meta` returns it
        (``image_path``, ``image_scale``, ``spot_diameter_px``).
    spatial_xy
        ``(n_spots, 2)`` spot centres in full-resolution pixels (``obsm["spatial"]``).

    Returns
    -------
    dict
        ``images`` (``hires``, long side <= :data:`HIRES_MAX_PX`, and ``lowres``, <=
        :data:`LOWRES_MAX_PX`, uint8 RGB), ``scalefactors`` (``tissue_hires_scalef``,
        ``tissue_lowres_scalef`` in image px per full-resolution px; ``spot_diameter_fullres``,
        see :func:`spot_diameter_fullres`) and ``metadata`` (``source``: ``"stinfer"``,
        ``spot_diameter_source``). Every array is a fresh copy the caller may modify. A
        counts-only slide gets a blank canvas (:func:`blank_canvas_images`,
        ``metadata["blank_canvas"] = True`` and ``metadata["blank_canvas_reason"]``); so does
        a slide whose image cannot be read (moved, unreadable), with a warning logged: the
        file is still written.
    """
    diameter, diameter_source = spot_diameter_fullres(meta.get("spot_diameter_px"), spatial_xy)
    library: dict = {
        "images": {},
        "scalefactors": {"spot_diameter_fullres": diameter},
        "metadata": {"source": "stinfer", "spot_diameter_source": diameter_source},
    }
    image_path = meta.get("image_path")
    if not image_path:
        return _with_blank_canvas(library, spatial_xy, "counts-only slide: no image")
    try:
        hires, hires_scale = image_thumbnail(
            image_path, float(meta.get("image_scale", 1.0)), HIRES_MAX_PX
        )
    except (InputError, OSError) as error:
        # a written prediction is worth more than its background image
        reason = f"the slide image could not be read ({error})"
        logger.warning("blank canvas in uns['spatial']: %s", reason)
        return _with_blank_canvas(library, spatial_xy, reason)
    stride = max(1, int(np.ceil(max(hires.shape[:2]) / LOWRES_MAX_PX)))
    library["images"] = {
        "hires": np.array(hires, dtype=np.uint8),
        "lowres": np.array(hires[::stride, ::stride], dtype=np.uint8),
    }
    library["scalefactors"]["tissue_hires_scalef"] = hires_scale
    library["scalefactors"]["tissue_lowres_scalef"] = hires_scale / stride
    library["metadata"]["image_path"] = str(image_path)
    return library


def _with_blank_canvas(library: dict, spatial_xy: np.ndarray, reason: str) -> dict:
    """``library`` with a blank canvas as its images, marked as such with ``reason``."""
    images, scalefactors = blank_canvas_images(
        spatial_xy, library["scalefactors"]["spot_diameter_fullres"]
    )
    library["images"] = images
    library["scalefactors"].update(scalefactors)
    library["metadata"]["blank_canvas"] = True
    library["metadata"]["blank_canvas_reason"] = reason
    return library

"""Write a tiled pyramidal TIFF tile by tile, so memory stays bounded whatever the slide size.

The file is the layout :class:`stinfer.io.slide_image.TiffSlide` (and OpenSlide, QuPath,
tifffile) reads as one pyramid: level 0 is the first page, with the coarser levels as its
SubIFDs (``subfiletype`` 1, "reduced resolution"); every level is RGB ``uint8`` in square tiles,
JPEG- or deflate-compressed. Level-0 pixel size goes into the TIFF resolution tags
(pixels per centimetre), which :func:`stinfer.io.slide_image.open_slide` reads back.

Pixels come from a ``paint_tile(top, left, height, width, downsample)`` function, called once per
tile of every level in tifffile's tile order (row by row): only one tile is in memory at a time,
so a 50,000 x 50,000 px slide is written in a few MiB.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output

#: ``paint_tile(top, left, height, width, downsample) -> (height, width, 3) uint8``: the pixels
#: of one tile of a pyramid level, ``top``/``left`` in that level's pixels; ``downsample`` is
#: the level's size ratio to level 0 (a level-``k`` pixel ``(i, j)`` covers level-0 pixel
#: ``(i * downsample, j * downsample)``).
TilePainter = Callable[[int, int, int, int, float], np.ndarray]

COMPRESSIONS = ("jpeg", "zlib")


def _level_tiles(
    paint_tile: TilePainter, width: int, height: int, tile_px: int, downsample: float
) -> Iterator[np.ndarray]:
    """Yield the full tiles of one level, row by row (tifffile's tile order)."""
    for top in range(0, height, tile_px):
        for left in range(0, width, tile_px):
            tile = paint_tile(top, left, tile_px, tile_px, downsample)
            if tile.shape != (tile_px, tile_px, 3) or tile.dtype != np.uint8:
                raise ValueError(
                    f"paint_tile returned {tile.shape} {tile.dtype}; expected "
                    f"({tile_px}, {tile_px}, 3) uint8."
                )
            yield tile


def write_pyramidal_tiff(
    path: str | os.PathLike,
    paint_tile: TilePainter,
    width: int,
    height: int,
    *,
    pixel_size_um: float | None = None,
    tile_px: int = 256,
    level_downsamples: Sequence[int] = (1, 4, 16),
    compression: str = "jpeg",
    jpeg_quality: int = 90,
    overwrite: bool = False,
) -> Path:
    """Write a ``width`` x ``height`` px RGB tiled pyramidal TIFF painted tile by tile.

    Parameters
    ----------
    path
        Output ``.tif``; written atomically (:func:`stinfer.io.atomic.atomic_output`).
    paint_tile
        See :data:`TilePainter`. Edge tiles are painted whole (tifffile stores whole tiles);
        the part beyond the level's border is never shown by readers.
    width, height
        Level-0 size in pixels. Level ``k`` is ``width // d_k`` x ``height // d_k``.
    pixel_size_um
        Microns per level-0 pixel, written to the resolution tags; ``None`` writes none.
    tile_px
        Tile side in pixels, a multiple of 16 (TIFF's rule).
    level_downsamples
        Integer downsample of each level, starting with 1.
    compression
        ``"jpeg"`` (lossy, ``jpeg_quality``; what scanners write) or ``"zlib"`` (deflate,
        lossless).

    Returns
    -------
    Path
        ``path``.
    """
    import tifffile

    downsamples = [int(d) for d in level_downsamples]
    if not downsamples or downsamples[0] != 1 or any(d < 1 for d in downsamples):
        raise InputError(f"level_downsamples must start with 1, got {list(level_downsamples)}.")
    if tile_px <= 0 or tile_px % 16:
        raise InputError(f"tile_px must be a positive multiple of 16, got {tile_px}.")
    if compression not in COMPRESSIONS:
        raise InputError(
            f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}."
        )
    if min(width, height) // downsamples[-1] < 1:
        raise InputError(
            f"a {width} x {height} px image has no pixel left at downsample {downsamples[-1]}."
        )
    compression_args = {"level": jpeg_quality} if compression == "jpeg" else {"level": 6}
    with atomic_output(path, overwrite) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as writer:
        for index, downsample in enumerate(downsamples):
            level_width, level_height = width // downsample, height // downsample
            if index == 0:
                options: dict = {"subifds": len(downsamples) - 1}
                if pixel_size_um is not None:
                    options["resolution"] = (1e4 / pixel_size_um, 1e4 / pixel_size_um)
                    options["resolutionunit"] = "CENTIMETER"
            else:
                options = {"subfiletype": 1}
            writer.write(
                _level_tiles(paint_tile, level_width, level_height, tile_px, downsample),
                shape=(level_height, level_width, 3),
                dtype=np.uint8,
                tile=(tile_px, tile_px),
                photometric="rgb",
                compression=compression,
                compressionargs=compression_args,
                **options,
            )
    return Path(path)

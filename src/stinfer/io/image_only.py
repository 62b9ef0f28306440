"""Image-only slides: an H&E whole-slide image -> a slide of virtual spots with no counts.

A user with a plain whole-slide image (SVS, tiled TIFF, JPEG, ...) and no spatial
transcriptomics can still get a prediction: :func:`read_image_slide` finds the tissue, lays a
virtual spot grid over it and returns a slide AnnData (:func:`~stinfer.io.slide_data.make_slide`)
with zero genes, which image-mode and fused predictors read like any other slide (they need
the image and the spot centres only).

Steps:

1. **Tissue detection** (:func:`detect_tissue`) on a thumbnail of about
   :attr:`TissueDetectionConfig.working_pixel_size_um` microns per pixel, read from a coarse
   pyramid level (:func:`stinfer.io.scanpy_spatial.image_thumbnail`), never the full-resolution
   image: HSV saturation (stained tissue is coloured, glass is white or grey), lightly smoothed,
   thresholded by Otsu's method (with a floor, so a blank slide's noise is not split in two);
   pixels darker than a floor (scanner borders, pen) are left out; then a morphological opening
   removes specks and threads, holes up to an area are filled and objects below an area are
   dropped. Every size is in microns (square microns), so the defaults do not depend on the
   scan's resolution.
2. **A spot grid** (:class:`SpotGrid`, :func:`spot_grid`) in microns over the whole image:
   ``"visium"`` (55-um spots on a 100-um hexagonal pitch, Visium's ``array_row``/``array_col``
   convention), ``"st"`` (legacy ST: 100-um spots on a 200-um square pitch) or a number (a
   square grid of that pitch with spots half as wide). A spot is kept when its centre falls in
   tissue (and, with :attr:`TissueDetectionConfig.min_spot_tissue_fraction`, when enough of
   its disc does).
3. **Full-resolution pixels**: spot centres divided by the pixel size (``pixel_size_um=``,
   else the file's OME/SVS/TIFF metadata; without either, an :class:`InputError` naming
   ``--pixel-size-um``).

The slide's ``X`` is an empty ``(n_spots, 0)`` CSR matrix; ``obs`` has ``spot_id``
(``"<array_col>x<array_row>"``, x first as legacy ST's ids), ``array_row``, ``array_col`` and
``in_tissue_fraction`` (the share of the spot's disc on detected tissue); ``uns["stinfer"]``
has ``source_format="image"``, the image path, pixel size and spot diameter, and notes saying
how the tissue was found.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import ndimage

from stinfer.errors import InputError
from stinfer.io.legacy_st import ST_SPOT_DIAMETER_UM, ST_SPOT_PITCH_UM
from stinfer.io.scanpy_spatial import image_thumbnail
from stinfer.io.slide_data import make_slide
from stinfer.io.slide_image import open_slide, round_half_up
from stinfer.io.visium import VISIUM_SPOT_DIAMETER_UM

logger = logging.getLogger("stinfer")

VISIUM_SPOT_PITCH_UM = 100.0  # 10x Visium: centre-to-centre distance of neighbouring spots


@dataclass
class TissueDetectionConfig:
    """How :func:`detect_tissue` finds tissue on a whole-slide image.

    Sizes are in microns so the same values work on a 0.25 um/px scan and on a 10 um/px
    thumbnail. The defaults follow the usual whole-slide practice (Otsu on HSV saturation at a
    coarse level, as in CLAM's tissue segmentation), sized to Visium's 100-um spot pitch.
    """

    working_pixel_size_um: float = 10.0  # detection resolution: ~10 um/px, 10 px per Visium pitch
    max_working_size_px: int = 4096  # long side cap of the thumbnail (coarser beyond 4 cm)
    smoothing_sigma_um: float = 10.0  # Gaussian blur of the saturation before thresholding
    min_saturation: float = 0.05  # floor on the Otsu threshold (HSV saturation, 0-1)
    min_brightness: float = 0.15  # pixels with max(R, G, B) below this (0-1) are not tissue
    opening_radius_um: float = 20.0  # opening removes specks and threads thinner than ~2x this
    max_hole_area_um2: float = 50_000.0  # holes up to 0.05 mm^2 (~6 Visium spots) are filled
    min_object_area_um2: float = 20_000.0  # tissue pieces below 0.02 mm^2 are dropped
    min_spot_tissue_fraction: float = 0.0  # also require this share of the disc on tissue

    def __post_init__(self) -> None:
        for name in ("working_pixel_size_um", "max_working_size_px"):
            if not getattr(self, name) > 0:
                raise InputError(f"TissueDetectionConfig.{name} must be positive.")
        for name in (
            "smoothing_sigma_um",
            "min_saturation",
            "min_brightness",
            "opening_radius_um",
            "max_hole_area_um2",
            "min_object_area_um2",
        ):
            if not getattr(self, name) >= 0:
                raise InputError(f"TissueDetectionConfig.{name} must be zero or positive.")
        if not 0.0 <= self.min_spot_tissue_fraction <= 1.0:
            raise InputError("TissueDetectionConfig.min_spot_tissue_fraction must be in [0, 1].")


@dataclass(frozen=True)
class SpotGrid:
    """A virtual spot grid, in microns.

    Hexagonal grids follow Visium's array convention: rows are ``pitch * sqrt(3) / 2`` apart
    along y, columns ``pitch / 2`` apart along x, and only ``(row, col)`` with ``row + col``
    even hold a spot, so a spot's six neighbours are ``(r, c +- 2)`` and ``(r +- 1, c +- 1)``.
    Square grids have rows and columns ``pitch`` apart and neighbours ``(r +- 1, c)``,
    ``(r, c +- 1)``.
    """

    name: str
    pitch_um: float  # centre-to-centre distance of neighbouring spots
    spot_diameter_um: float
    hexagonal: bool

    @property
    def row_step_um(self) -> float:
        """Distance between neighbouring rows (y)."""
        return self.pitch_um * math.sqrt(3) / 2 if self.hexagonal else self.pitch_um

    @property
    def col_step_um(self) -> float:
        """Distance between neighbouring columns (x)."""
        return self.pitch_um / 2 if self.hexagonal else self.pitch_um

    @property
    def area_per_spot_um2(self) -> float:
        """Tissue area one spot stands for (``pitch^2 * sqrt(3) / 2`` hexagonal, ``pitch^2`` square)."""
        return self.pitch_um * self.row_step_um

    def spots(self, width_um: float, height_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every grid position over a ``width_um`` x ``height_um`` image.

        Returns ``(array_row, array_col, centres_um)``: int64 ``(n,)``, int64 ``(n,)`` and
        float64 ``(n, 2)`` (x, y) microns from the image's top-left corner; spot ``(0, 0)``
        sits half a step in from the corner.
        """
        rows = np.arange(int(np.floor(height_um / self.row_step_um)) + 1)
        cols = np.arange(int(np.floor(width_um / self.col_step_um)) + 1)
        row_grid, col_grid = np.meshgrid(rows, cols, indexing="ij")
        row_grid, col_grid = row_grid.ravel(), col_grid.ravel()
        if self.hexagonal:
            keep = (row_grid + col_grid) % 2 == 0
            row_grid, col_grid = row_grid[keep], col_grid[keep]
        centres = np.column_stack(
            [(col_grid + 0.5) * self.col_step_um, (row_grid + 0.5) * self.row_step_um]
        )
        inside = (centres[:, 0] < width_um) & (centres[:, 1] < height_um)
        return row_grid[inside], col_grid[inside], centres[inside]


def spot_grid(grid: str | float) -> SpotGrid:
    """The :class:`SpotGrid` named by ``grid``.

    ``"visium"``: 55-um spots, 100-um hexagonal pitch; ``"st"`` (or ``"legacy-st"``): 100-um
    spots, 200-um square pitch; a number (or a string holding one): a square grid of that
    pitch in microns with spots half as wide. Raises :class:`InputError` otherwise.
    """
    name = str(grid).strip().lower().replace("_", "-")
    if name == "visium":
        return SpotGrid("visium", VISIUM_SPOT_PITCH_UM, VISIUM_SPOT_DIAMETER_UM, hexagonal=True)
    if name in ("st", "legacy-st"):
        return SpotGrid("st", ST_SPOT_PITCH_UM, ST_SPOT_DIAMETER_UM, hexagonal=False)
    try:
        pitch_um = float(name)
    except ValueError:
        pitch_um = float("nan")
    if not (math.isfinite(pitch_um) and pitch_um > 0):
        raise InputError(
            f"--grid {grid!r}: choose visium (55-um spots, 100-um hexagonal pitch), st (100-um "
            "spots, 200-um square pitch) or a spacing in microns (square grid, e.g. --grid 50)."
        )
    return SpotGrid(f"square {pitch_um:g} um", pitch_um, pitch_um / 2, hexagonal=False)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]: the cut maximising the between-class variance.

    Values above the returned threshold form the upper class; a constant input returns its
    value (nothing lies above it).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.max() - values.min() < 1e-12:
        return float(values.max()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _disc(radius_px: float) -> np.ndarray:
    radius = max(int(np.floor(radius_px)), 0)
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius_px**2 + 1e-9


def _component_area(mask: np.ndarray) -> np.ndarray:
    """Per pixel, the area (pixels) of the connected component of ``mask`` it is in; 0 off it."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=np.int64)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return sizes[labels]


def detect_tissue(
    rgb: np.ndarray, pixel_size_um: float, config: TissueDetectionConfig | None = None
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail (see the module docstring for the steps).

    Parameters
    ----------
    rgb
        ``(h, w, 3)`` uint8 RGB, e.g. a thumbnail of ~10 um/px.
    pixel_size_um
        Microns per pixel of ``rgb``; sizes of ``config`` are converted with it.
    config
        Detection parameters (default :class:`TissueDetectionConfig`).

    Returns
    -------
    tuple
        ``(mask, threshold)``: ``(h, w)`` boolean, True on tissue, and the saturation threshold
        used.
    """
    config = config or TissueDetectionConfig()
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    brightest = pixels.max(axis=2)
    saturation = (brightest - pixels.min(axis=2)) / np.maximum(brightest, 1e-6)
    sigma_px = config.smoothing_sigma_um / pixel_size_um
    if sigma_px >= 0.3:
        saturation = ndimage.gaussian_filter(saturation, sigma_px)
    bright_enough = brightest >= config.min_brightness
    threshold = otsu_threshold(saturation[bright_enough])
    threshold = max(threshold, config.min_saturation)
    mask = (saturation > threshold) & bright_enough
    radius_px = config.opening_radius_um / pixel_size_um
    if radius_px >= 1:
        mask = ndimage.binary_opening(mask, structure=_disc(radius_px))
    pixel_area = pixel_size_um**2
    holes = ndimage.binary_fill_holes(mask) & ~mask
    mask = mask | (holes & (_component_area(holes) <= config.max_hole_area_um2 / pixel_area))
    mask = mask & (_component_area(mask) >= config.min_object_area_um2 / pixel_area)
    return mask, threshold


def _disc_fraction(
    mask: np.ndarray, radius_px: float, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Share of the disc of ``radius_px`` around each ``(rows, cols)`` pixel that is on ``mask``.

    Sums the mask at the disc's offsets for the given pixels only (outside the mask is not
    tissue), so the work is ``spots x disc pixels``, about the thumbnail's size for any pitch.
    """
    disc = _disc(max(radius_px, 0.5))
    radius = disc.shape[0] // 2
    padded = np.pad(mask, radius)
    covered = np.zeros(len(rows), dtype=np.int64)
    for dy, dx in np.argwhere(disc):
        covered += padded[rows + dy, cols + dx]
    return covered / disc.sum()


def read_image_slide(
    image: str | os.PathLike,
    pixel_size_um: float | None = None,
    grid: str | float = "visium",
    sample_id: str | None = None,
    tissue: TissueDetectionConfig | None = None,
) -> ad.AnnData:
    """A slide of virtual spots over the tissue of an H&E image, with no counts.

    Parameters
    ----------
    image
        The whole-slide image at full resolution (SVS, NDPI, TIFF/OME-TIFF, JPEG, PNG; any
        file :func:`~stinfer.io.slide_image.open_slide` reads).
    pixel_size_um
        Microns per pixel of the image; default: from the file's metadata.
    grid
        ``"visium"``, ``"st"`` or a square-grid pitch in microns (:func:`spot_grid`).
    sample_id
        The slide's name; default: the image file's stem.
    tissue
        Tissue-detection parameters (default :class:`TissueDetectionConfig`).

    Returns
    -------
    AnnData
        A slide (:mod:`stinfer.io.slide_data` layout) with ``X`` of shape ``(n_spots, 0)``,
        ``obs`` ``spot_id``, ``array_row``, ``array_col``, ``in_tissue_fraction``,
        ``obsm["spatial"]`` in full-resolution pixels and ``uns["stinfer"]["source_format"]
        == "image"``.

    Raises
    ------
    InputError
        The image is missing or unreadable, its pixel size is unknown, the grid is unknown, or
        no tissue (or no spot on tissue) is found.

    Examples
    --------
    >>> slide = read_image_slide("he.svs", grid="visium")  # doctest: +SKIP
    >>> prediction = model.predict(slide, mode="image")  # doctest: +SKIP
    """
    tissue = tissue or TissueDetectionConfig()
    spots = spot_grid(grid)
    path = Path(image)
    if not path.is_file():
        raise InputError(f"{path}: the H&E image was not found (--image).")
    with open_slide(path, pixel_size_um) as slide_image:
        width_px, height_px = slide_image.dimensions
        file_pixel_size_um = slide_image.pixel_size_um
    if file_pixel_size_um is None:
        raise InputError(
            f"{path}: the pixel size is unknown (no OME PhysicalSizeX, SVS MPP or TIFF "
            "resolution in the file); give the microns per pixel with --pixel-size-um "
            "(pixel_size_um= of read_image_slide), e.g. 0.25 for a 40x scan, 0.5 for 20x."
        )
    width_um, height_um = width_px * file_pixel_size_um, height_px * file_pixel_size_um
    wanted_px = math.ceil(max(width_um, height_um) / tissue.working_pixel_size_um)
    wanted_px = max(1, min(wanted_px, tissue.max_working_size_px, max(width_px, height_px)))
    thumbnail, scale = image_thumbnail(path, 1.0, wanted_px)
    thumbnail_um = file_pixel_size_um / scale
    mask, threshold = detect_tissue(thumbnail, thumbnail_um, tissue)
    tissue_area_mm2 = float(mask.sum()) * thumbnail_um**2 / 1e6
    if not mask.any():
        raise InputError(
            f"{path}: no tissue found (no stained area above saturation {threshold:.3f} and "
            f"larger than {tissue.min_object_area_um2:g} um^2 on a {thumbnail_um:.3g} um/px "
            "thumbnail); check that this is an H&E image of a tissue section."
        )

    array_row, array_col, centres_um = spots.spots(width_um, height_um)
    # a strided thumbnail pixel is a sample at its top-left corner: take the nearest sample
    mask_rows = np.clip(round_half_up(centres_um[:, 1] / thumbnail_um), 0, mask.shape[0] - 1)
    mask_cols = np.clip(round_half_up(centres_um[:, 0] / thumbnail_um), 0, mask.shape[1] - 1)
    fraction = _disc_fraction(mask, spots.spot_diameter_um / 2 / thumbnail_um, mask_rows, mask_cols)
    keep = mask[mask_rows, mask_cols]
    if tissue.min_spot_tissue_fraction > 0:
        keep &= fraction >= tissue.min_spot_tissue_fraction
    if not keep.any():
        raise InputError(
            f"{path}: no tissue found under the {spots.name} grid: the detected tissue "
            f"({tissue_area_mm2:.3g} mm^2) holds no spot centre; use a finer --grid."
        )
    array_row, array_col, centres_um = array_row[keep], array_col[keep], centres_um[keep]
    notes = [
        f"image-only slide: {int(keep.sum())} virtual spots on a {spots.name} grid "
        f"({spots.spot_diameter_um:g}-um spots, {spots.pitch_um:g}-um "
        f"{'hexagonal' if spots.hexagonal else 'square'} pitch) over {tissue_area_mm2:.3g} "
        f"mm^2 of tissue (HSV saturation > {threshold:.3f} on a {thumbnail_um:.3g} um/px "
        "thumbnail); no counts.",
        f"pixel_size_um = {file_pixel_size_um:.4g} "
        f"({'given' if pixel_size_um is not None else 'from the image metadata'}).",
    ]
    sample_id = str(sample_id) if sample_id else path.stem
    logger.debug("%s: %s", path, notes[0])  # `stinfer prepare` prints the notes
    spot_names = [f"{col}x{row}" for row, col in zip(array_row, array_col, strict=True)]
    return make_slide(
        sp.csr_matrix((len(spot_names), 0), dtype=np.float32),
        spot_names,
        [],
        centres_um / file_pixel_size_um,
        sample_id=sample_id,
        source_format="image",
        source=str(path),
        array_row=array_row,
        array_col=array_col,
        image_path=str(path.resolve()),
        image_scale=1.0,
        pixel_size_um=file_pixel_size_um,
        spot_diameter_px=spots.spot_diameter_um / file_pixel_size_um,
        notes=notes,
        obs_columns=pd.DataFrame({"in_tissue_fraction": fraction[keep].astype(np.float32)}),
        require_counts=False,
    )

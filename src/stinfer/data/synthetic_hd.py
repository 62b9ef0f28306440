"""Synthetic Visium HD output folders, from test fixtures to 500,000-bin slides, in bounded memory.

:func:`make_visium_hd_folder` writes what :func:`stinfer.io.read_visium_hd` reads, laid out as
Space Ranger (>= 3.0) lays out a Visium HD run::

    OUT/                                   the "outs" folder
      binned_outputs/square_008um/         the base bins (bin_size_um)
        filtered_feature_bc_matrix.h5      in-tissue bins x genes (10x h5)
        spatial/tissue_positions.parquet   every bin of the grid, in_tissue 0/1
        spatial/scalefactors_json.json     microns_per_pixel, bin_size_um, spot_diameter_fullres,
                                           tissue_hires_scalef, tissue_lowres_scalef, ...
        spatial/tissue_hires_image.png, spatial/tissue_lowres_image.png
      binned_outputs/square_016um/         the same at twice the bin size: each bin's counts are
                                           the sum of its 2 x 2 base bins
      spatial/tissue_hires_image.png, spatial/tissue_lowres_image.png
      fullres_image.tif                    the H&E-like full-resolution image (tiled, pyramidal)

Geometry. The base grid has ``n_bins_side`` x ``n_bins_side`` bins of ``bin_size_um`` on an image
of ``pixel_size_um`` per pixel, with a margin of 4 bins: bin (row, col) is centred at
``x = margin + (col + 0.5) * bin_px``, ``y = margin + (row + 0.5) * bin_px`` full-resolution
pixels (``bin_px = bin_size_um / pixel_size_um``); the doubled bin (R, C) covers base rows
2R, 2R + 1 and columns 2C, 2C + 1. Bins whose centre lies inside a wobbly rounded-square tissue
outline (:class:`TissueOutline`, about 91 % of the grid) are under tissue; a doubled bin is
under tissue when one of its base bins is. The image shows the outline: tissue inside, bare
glass outside.
Barcodes are Space Ranger's: ``s_008um_00001_00002-1`` for row 1, column 2.

Expression. Each in-tissue base bin draws a library size (Poisson around ``mean_umis_per_bin``
times a log-normal size factor) and splits it between components: a *housekeeping* background
over all genes (Zipf-like abundances), the *stroma* program, whose activity is the image's
stroma level at the bin (so the H&E predicts it), and ``n_programs - 1`` *pattern* programs
following smooth random fields (wavelengths 200-800 um) that the image does not show. Each
program owns a set of genes with log-normal loadings; UMIs of a component are drawn from its
gene distribution. Counts are sparse (about ``mean_umis_per_bin`` UMIs per bin over thousands
of genes) and generated in bands of 32 bin rows, each written to both h5 files before the next.

Image. :func:`he_like_tile` paints pink stroma of varying intensity with purple nuclei-like dots
from level-0 pixel coordinates, so every pyramid level and both PNGs show the same tissue
(:func:`paint_tissue_tile` adds the outline);
:func:`stinfer.io.pyramidal_tiff.write_pyramidal_tiff` writes it tile by tile (levels at
downsample 1, 4, 16, JPEG). ``benchmarks/patches.py`` paints its 50,000 px TIFF with the same
function.

Cost: memory holds one band of counts, one image tile and the per-bin tables (positions,
barcodes), never a whole matrix or image, so a 500,000-bin folder generates in well under a GiB
(``benchmarks/scale.py`` measures it).

Example
-------
>>> from stinfer.data.synthetic_hd import make_visium_hd_folder
>>> from stinfer.io import read_visium_hd
>>> folder = make_visium_hd_folder("hd_outs", n_bins_side=40)  # doctest: +SKIP
>>> slide = read_visium_hd(folder.outs_dir, 8, image=folder.image_path)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output, write_text
from stinfer.io.pyramidal_tiff import write_pyramidal_tiff
from stinfer.io.visium import MATRIX_H5, SCALEFACTORS_FILE, matrix_h5_writer
from stinfer.io.visium_hd import BINNED_OUTPUTS, bin_folder_name

IMAGE_FILE = "fullres_image.tif"
POSITIONS_FILE = "spatial/tissue_positions.parquet"
LEVEL_DOWNSAMPLES = (1, 4, 16)
MARGIN_BINS = 4
HIRES_MAX_PX, LOWRES_MAX_PX = 2000, 600  # Visium's hires/lowres PNGs are ~2000 / ~600 px wide
BAND_ROWS = 32  # base-bin rows generated at a time; even, so doubled bins never straddle bands
PROGRAM_WEIGHT = 0.4  # a fully active program's UMIs relative to the housekeeping background
GENE_FRACTION_PER_PROGRAM = 0.05
GLASS_RGB = (242, 240, 244)  # the bare slide around the tissue


@dataclass(frozen=True)
class SyntheticHDFolder:
    """What :func:`make_visium_hd_folder` wrote.

    Attributes
    ----------
    outs_dir
        The "outs" folder (pass it to :func:`stinfer.io.read_visium_hd`).
    image_path
        The full-resolution tiled pyramidal TIFF.
    bin_dirs
        Bin size (um) -> its ``square_XXXum`` folder.
    n_bins_in_tissue
        Bin size (um) -> bins under tissue (rows of its count matrix).
    pixel_size_um
        Microns per full-resolution pixel.
    gene_program
        Per gene: ``"housekeeping"`` (background only), ``"stroma"`` or ``"pattern_<k>"``.
    """

    outs_dir: Path
    image_path: Path
    bin_dirs: dict[int, Path]
    n_bins_in_tissue: dict[int, int]
    pixel_size_um: float
    gene_program: np.ndarray


def stroma_level(x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
    """The image's stroma (eosin) intensity, 0-1, at level-0 pixel positions (broadcast).

    Smooth waves of ~300-700 px: at 0.5 um/px, structure on the scale of a few 8-um bins to
    a few hundred microns.
    """
    return (
        0.5
        + 0.25 * np.sin(x_px / 97.0) * np.cos(y_px / 83.0)
        + 0.25 * np.sin((x_px + y_px) / 211.0)
    )


def he_like_tile(top: int, left: int, height: int, width: int, downsample: float) -> np.ndarray:
    """An H&E-like RGB tile: pink stroma (:func:`stroma_level`) with purple nuclei-like dots.

    ``top``/``left`` are in the pixels of a level ``downsample`` times coarser than level 0;
    the pixels are computed from level-0 coordinates, so every level shows the same tissue
    (nuclei fade as ``1 / sqrt(downsample)``, as averaging small dots does). A
    :data:`stinfer.io.pyramidal_tiff.TilePainter`; returns ``(height, width, 3)`` uint8.
    """
    y = (np.arange(top, top + height, dtype=np.float32) * downsample)[:, None]
    x = (np.arange(left, left + width, dtype=np.float32) * downsample)[None, :]
    stroma = stroma_level(x, y)
    nuclei = np.clip(np.sin(x / 9.0) * np.sin(y / 11.0) * 3.0 - 2.0, 0.0, 1.0)
    nuclei *= 1.0 / downsample**0.5
    red = 235 - 40 * stroma - 110 * nuclei
    green = 190 - 80 * stroma - 120 * nuclei
    blue = 215 - 30 * stroma - 40 * nuclei
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def hd_barcodes(bin_size_um: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Space Ranger HD barcodes (``s_008um_00001_00002-1``) for grid ``rows``, ``cols``.

    Built as one byte array (no Python loop over bins); returns a numpy ``str`` array.
    """
    prefix = np.frombuffer(f"s_{int(bin_size_um):03d}um_".encode(), np.uint8)
    powers = 10 ** np.arange(4, -1, -1)

    def digits(values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, np.int64)[:, None] // powers % 10 + ord("0")).astype(np.uint8)

    chars = np.concatenate(
        [
            np.broadcast_to(prefix, (len(rows), len(prefix))),
            digits(rows),
            np.full((len(rows), 1), ord("_"), np.uint8),
            digits(cols),
            np.broadcast_to(np.frombuffer(b"-1", np.uint8), (len(rows), 2)),
        ],
        axis=1,
    )
    return np.ascontiguousarray(chars).view(f"S{chars.shape[1]}").ravel().astype(str)


@dataclass(frozen=True)
class TissueOutline:
    """A wobbly rounded square of tissue on the slide (about 91 % of its bounding square).

    Attributes
    ----------
    left_px, top_px, side_px
        The bounding square in full-resolution pixels (the bin grid).
    phase
        Phase of the three-lobed wobble of the edge.
    """

    left_px: float
    top_px: float
    side_px: float
    phase: float

    def contains(self, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
        """Whether full-resolution pixel positions (broadcast) lie under tissue."""
        u = (x_px - self.left_px) / self.side_px * 2.0 - 1.0
        v = (y_px - self.top_px) / self.side_px * 2.0 - 1.0
        u2, v2 = u * u, v * v
        radius6 = u2 * u2 * u2 + v2 * v2 * v2  # a superellipse of exponent 6
        edge = 0.97 + 0.03 * np.sin(3 * np.arctan2(v, u) + self.phase)
        return radius6 < edge**6


def paint_tissue_tile(
    outline: TissueOutline, top: int, left: int, height: int, width: int, downsample: float
) -> np.ndarray:
    """:func:`he_like_tile` inside ``outline``, bare glass (:data:`GLASS_RGB`) outside it."""
    tile = he_like_tile(top, left, height, width, downsample)
    y = (np.arange(top, top + height, dtype=np.float32) * downsample)[:, None]
    x = (np.arange(left, left + width, dtype=np.float32) * downsample)[None, :]
    tile[~outline.contains(x, y)] = GLASS_RGB
    return tile


@dataclass(frozen=True)
class ExpressionModel:
    """The planted expression: per-component gene distributions and the pattern fields.

    Attributes
    ----------
    gene_cdfs
        ``(n_programs + 1, n_genes)`` cumulative gene distribution of each component
        (housekeeping first, then stroma, then the patterns); the last column is 1.
    gene_program
        Program name of each gene.
    wavevectors
        ``(n_programs - 1, n_waves, 2)`` radians per micron of the pattern fields' waves.
    phases
        ``(n_programs - 1, n_waves)``.
    """

    gene_cdfs: np.ndarray
    gene_program: np.ndarray
    wavevectors: np.ndarray
    phases: np.ndarray

    def pattern_activity(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """``(n, n_programs - 1)`` pattern activities in [0, 1] at micron positions."""
        angles = (
            x_um[:, None, None] * self.wavevectors[None, :, :, 0]
            + y_um[:, None, None] * self.wavevectors[None, :, :, 1]
            + self.phases[None]
        )
        return 0.5 + 0.5 * np.cos(angles).mean(axis=2)


def draw_expression_model(
    rng: np.random.Generator, n_genes: int, n_programs: int, n_waves: int = 3
) -> ExpressionModel:
    """Draw gene abundances, program membership and loadings, and the pattern fields."""
    rank = rng.permutation(n_genes)
    weights = [1.0 / (rank + 10.0) ** 1.1]  # housekeeping: Zipf-like over all genes
    gene_program = np.full(n_genes, "housekeeping", dtype=object)
    per_program = max(1, round(GENE_FRACTION_PER_PROGRAM * n_genes))
    members = rng.permutation(n_genes)[: per_program * n_programs].reshape(n_programs, -1)
    names = ["stroma"] + [f"pattern_{k}" for k in range(1, n_programs)]
    for name, genes in zip(names, members, strict=True):
        program = np.zeros(n_genes)
        program[genes] = rng.lognormal(0.0, 0.5, len(genes))
        weights.append(program)
        gene_program[genes] = name
    cdfs = np.cumsum(np.stack(weights), axis=1)
    cdfs /= cdfs[:, -1:]
    cdfs[:, -1] = 1.0
    wavelength_um = rng.uniform(200.0, 800.0, (n_programs - 1, n_waves))
    direction = rng.uniform(0, 2 * np.pi, (n_programs - 1, n_waves))
    wavevectors = (2 * np.pi / wavelength_um)[..., None] * np.stack(
        [np.cos(direction), np.sin(direction)], axis=-1
    )
    phases = rng.uniform(0, 2 * np.pi, (n_programs - 1, n_waves))
    return ExpressionModel(cdfs, gene_program, wavevectors, phases)


def draw_counts(
    rng: np.random.Generator,
    component_weights: np.ndarray,
    mean_umis: np.ndarray,
    gene_cdfs: np.ndarray,
) -> sp.csr_matrix:
    """Bins x genes counts: Poisson library sizes split between components, then genes.

    ``component_weights`` is ``(n_bins, n_components)`` (rows need not sum to 1), ``mean_umis``
    ``(n_bins,)``. Vectorised over UMIs: one inverse-CDF ``searchsorted`` per component.
    """
    n_bins = len(mean_umis)
    n_genes = gene_cdfs.shape[1]
    library = rng.poisson(mean_umis)
    probabilities = component_weights / component_weights.sum(axis=1, keepdims=True)
    per_component = rng.multinomial(library, probabilities)
    keys = []
    for component, cdf in enumerate(gene_cdfs):
        n_umis = per_component[:, component]
        bins = np.repeat(np.arange(n_bins, dtype=np.int64), n_umis)
        genes = np.searchsorted(cdf, rng.random(int(n_umis.sum())), side="right")
        keys.append(bins * n_genes + genes)
    entries, values = np.unique(np.concatenate(keys), return_counts=True)
    rows, cols = np.divmod(entries, n_genes)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_bins))])
    return sp.csr_matrix((values.astype(np.int32), cols, indptr), shape=(n_bins, n_genes))


def band_counts(
    model: ExpressionModel,
    in_tissue: np.ndarray,
    bin_px: float,
    margin_px: float,
    pixel_size_um: float,
    mean_umis_per_bin: float,
    seed: int,
) -> Iterator[tuple[sp.csr_matrix, sp.csr_matrix]]:
    """Yield the counts of the in-tissue bins, :data:`BAND_ROWS` grid rows at a time.

    Each band gives ``(base, doubled)``: the base bins of those rows in raster order, and the
    in-tissue doubled bins over them (raster order), each the sum of its base bins. Every band
    has its own random stream (``seed``, band number), so memory is one band's.
    """
    double_in_tissue = double_bins_in_tissue(in_tissue)
    double_index = np.full(double_in_tissue.shape, -1, np.int64)
    double_index[double_in_tissue] = np.arange(int(double_in_tissue.sum()))
    for band, first_row in enumerate(range(0, in_tissue.shape[0], BAND_ROWS)):
        rng = np.random.default_rng([seed, band])
        rows, cols = np.nonzero(in_tissue[first_row : first_row + BAND_ROWS])
        rows += first_row
        x_px = margin_px + (cols + 0.5) * bin_px
        y_px = margin_px + (rows + 0.5) * bin_px
        component_weights = np.column_stack(
            [
                np.ones(len(rows)),  # housekeeping
                PROGRAM_WEIGHT * stroma_level(x_px, y_px),
                PROGRAM_WEIGHT * model.pattern_activity(x_px * pixel_size_um, y_px * pixel_size_um),
            ]
        )
        size_factor = rng.lognormal(-0.045, 0.3, len(rows))  # mean exp(-0.045 + 0.3**2 / 2) = 1
        base = draw_counts(rng, component_weights, mean_umis_per_bin * size_factor, model.gene_cdfs)
        parents = double_index[first_row // 2 : (first_row + BAND_ROWS) // 2]
        parents = parents[parents >= 0]  # this band's doubled bins: consecutive numbers
        parent_of_bin = double_index[rows // 2, cols // 2] - (parents[0] if len(parents) else 0)
        summing = sp.csr_matrix(
            (np.ones(len(rows), np.int32), (parent_of_bin, np.arange(len(rows)))),
            shape=(len(parents), len(rows)),
        )
        yield base, summing @ base


def double_bins_in_tissue(in_tissue: np.ndarray) -> np.ndarray:
    """Doubled-bin grid: under tissue where any of its (up to) 2 x 2 base bins is."""
    n_double_side = (in_tissue.shape[0] + 1) // 2
    padded = np.zeros((2 * n_double_side, 2 * n_double_side), bool)
    padded[: in_tissue.shape[0], : in_tissue.shape[1]] = in_tissue
    return padded.reshape(n_double_side, 2, n_double_side, 2).any(axis=(1, 3))


def make_visium_hd_folder(
    out_dir: str | os.PathLike,
    n_bins_side: int = 40,
    bin_size_um: float = 8.0,
    pixel_size_um: float = 0.5,
    n_genes: int = 200,
    seed: int = 0,
    tile_px: int = 256,
    *,
    mean_umis_per_bin: float = 100.0,
    n_programs: int = 4,
    overwrite: bool = False,
) -> SyntheticHDFolder:
    """Write a Space-Ranger-HD-like output folder with a full-resolution pyramidal TIFF.

    See the module docstring for the layout, geometry and expression model.

    Parameters
    ----------
    out_dir
        The "outs" folder to write (created; files in it are replaced only with
        ``overwrite``).
    n_bins_side
        Base bins per side of the square grid (707 gives 500,000 bins, ~91 % under tissue;
        745 gives 500,000 under tissue).
    bin_size_um
        Base bin side, a whole number of microns; the second folder has bins twice as wide.
    pixel_size_um
        Microns per full-resolution pixel (0.5: a 20x scan; HD's CytAssist-aligned images are
        often ~0.27).
    n_genes
        Genes in the matrices (a human HD probe set has ~18,000).
    seed
        Seeds everything (outline, programs, fields, counts).
    tile_px
        Tile side of the TIFF, a multiple of 16.
    mean_umis_per_bin
        Mean UMIs of a base bin (before the size factor).
    n_programs
        Spatial programs: ``stroma`` plus ``n_programs - 1`` patterns.

    Returns
    -------
    SyntheticHDFolder
        Paths, bins under tissue and the planted program of each gene.
    """
    folder_name = bin_folder_name(bin_size_um)
    double_name = bin_folder_name(2 * bin_size_um)
    bin_size_um = int(bin_size_um)
    if n_bins_side < 2 or n_bins_side > 99_999:
        raise InputError(f"n_bins_side must be between 2 and 99,999, got {n_bins_side}.")
    if n_programs < 1 or n_genes < n_programs:
        raise InputError(
            f"need 1 <= n_programs <= n_genes, got n_programs={n_programs}, n_genes={n_genes}."
        )
    if not pixel_size_um > 0 or not mean_umis_per_bin > 0:
        raise InputError("pixel_size_um and mean_umis_per_bin must be positive.")
    outs = Path(out_dir)
    rng = np.random.default_rng(seed)
    bin_px = bin_size_um / pixel_size_um
    margin_px = MARGIN_BINS * bin_px
    image_px = math.ceil(n_bins_side * bin_px + 2 * margin_px)
    hires_scale = min(0.5, HIRES_MAX_PX / image_px)
    lowres_scale = min(0.125, LOWRES_MAX_PX / image_px)

    outline = TissueOutline(margin_px, margin_px, n_bins_side * bin_px, rng.uniform(0, 2 * np.pi))
    centres_px = margin_px + (np.arange(n_bins_side) + 0.5) * bin_px
    in_tissue = outline.contains(centres_px[None, :], centres_px[:, None])
    double_in_tissue = double_bins_in_tissue(in_tissue)
    model = draw_expression_model(rng, n_genes, n_programs)
    gene_ids = [f"ENSSYN{index:011d}" for index in range(n_genes)]
    gene_names = [
        f"{program.upper()}_{index:05d}" for index, program in enumerate(model.gene_program)
    ]

    bin_dirs = {bin_size_um: outs / BINNED_OUTPUTS / folder_name}
    bin_dirs[2 * bin_size_um] = outs / BINNED_OUTPUTS / double_name
    grids = {bin_size_um: in_tissue, 2 * bin_size_um: double_in_tissue}
    pngs = {
        "tissue_hires_image.png": _png_bytes(outline, image_px, hires_scale),
        "tissue_lowres_image.png": _png_bytes(outline, image_px, lowres_scale),
    }
    for name, data in pngs.items():
        _write_bytes(outs / "spatial" / name, data, overwrite)
    barcodes = {}
    for size, grid in grids.items():
        spatial = bin_dirs[size] / "spatial"
        size_px = size / pixel_size_um
        barcodes[size] = _write_positions(
            spatial.parent / POSITIONS_FILE, grid, size, size_px, margin_px, overwrite
        )
        scalefactors = {
            "spot_diameter_fullres": size_px,
            "bin_size_um": float(size),
            "microns_per_pixel": pixel_size_um,
            "tissue_hires_scalef": hires_scale,
            "tissue_lowres_scalef": lowres_scale,
            "regist_target_img_scalef": hires_scale,
        }
        write_text(
            json.dumps(scalefactors, indent=2), bin_dirs[size] / SCALEFACTORS_FILE, overwrite
        )
        for name, data in pngs.items():
            _write_bytes(spatial / name, data, overwrite)

    with (
        matrix_h5_writer(
            bin_dirs[bin_size_um] / MATRIX_H5,
            barcodes[bin_size_um],
            gene_ids,
            gene_names,
            overwrite=overwrite,
        ) as append_base,
        matrix_h5_writer(
            bin_dirs[2 * bin_size_um] / MATRIX_H5,
            barcodes[2 * bin_size_um],
            gene_ids,
            gene_names,
            overwrite=overwrite,
        ) as append_double,
    ):
        for base_counts, double_counts in band_counts(
            model, in_tissue, bin_px, margin_px, pixel_size_um, mean_umis_per_bin, seed
        ):
            append_base(base_counts)
            append_double(double_counts)

    image_path = write_pyramidal_tiff(
        outs / IMAGE_FILE,
        functools.partial(paint_tissue_tile, outline),
        image_px,
        image_px,
        pixel_size_um=pixel_size_um,
        tile_px=tile_px,
        level_downsamples=[d for d in LEVEL_DOWNSAMPLES if image_px // d >= 1],
        overwrite=overwrite,
    )
    return SyntheticHDFolder(
        outs_dir=outs,
        image_path=image_path,
        bin_dirs=bin_dirs,
        n_bins_in_tissue={size: int(grid.sum()) for size, grid in grids.items()},
        pixel_size_um=float(pixel_size_um),
        gene_program=model.gene_program,
    )


def _write_positions(
    path: Path,
    in_tissue: np.ndarray,
    bin_size_um: int,
    bin_px: float,
    margin_px: float,
    overwrite: bool,
) -> np.ndarray:
    """Write the positions of every bin of the grid; return the in-tissue barcodes (raster)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, cols = np.indices(in_tissue.shape).reshape(2, -1)
    barcodes = hd_barcodes(bin_size_um, rows, cols)
    table = pa.table(
        {
            "barcode": pa.array(barcodes, pa.string()),
            "in_tissue": pa.array(in_tissue.ravel().astype(np.int32)),
            "array_row": pa.array(rows.astype(np.int32)),
            "array_col": pa.array(cols.astype(np.int32)),
            "pxl_row_in_fullres": pa.array(margin_px + (rows + 0.5) * bin_px),
            "pxl_col_in_fullres": pa.array(margin_px + (cols + 0.5) * bin_px),
        }
    )
    with atomic_output(path, overwrite) as tmp:
        pq.write_table(table, tmp)
    return barcodes[in_tissue.ravel()]


def _png_bytes(outline: TissueOutline, image_px: int, scale: float) -> bytes:
    """The slide image at ``scale`` image pixels per full-resolution pixel, as PNG bytes."""
    from PIL import Image

    side = max(1, round(image_px * scale))
    buffer = io.BytesIO()
    Image.fromarray(paint_tissue_tile(outline, 0, 0, side, side, 1.0 / scale)).save(
        buffer, format="PNG", compress_level=1
    )
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes, overwrite: bool) -> None:
    with atomic_output(path, overwrite) as tmp:
        tmp.write_bytes(data)

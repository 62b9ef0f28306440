"""Read 10x Genomics Space Ranger Visium HD binned outputs into a slide AnnData.

Visium HD captures transcripts on a gapless grid of 2 x 2 um barcoded squares; Space Ranger
(>= 3.0) sums them into larger square bins and writes one folder per bin size under
``outs/binned_outputs/``: ``square_002um/``, ``square_008um/``, ``square_016um/`` (and any
custom size). Each bin folder is laid out like a Visium output folder, so the Visium reader's
pieces (:mod:`stinfer.io.visium`) are reused:

- ``filtered_feature_bc_matrix.h5`` (or the Matrix Market folder ``filtered_feature_bc_matrix/``):
  bins under tissue x genes. Barcodes name the bin: ``s_008um_00301_00404-1`` is the 8-um bin
  at grid row 301, column 404;
- ``spatial/tissue_positions.parquet``: one row per bin of the whole capture area, with
  ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``
  (row = y, col = x, in full-resolution image pixels). Only those six columns are read, with
  pyarrow;
- ``spatial/scalefactors_json.json``: HD adds ``microns_per_pixel`` and ``bin_size_um`` to the
  Visium keys (``spot_diameter_fullres`` is the bin side in full-resolution pixels);
- the image: a full-resolution microscope image the user names, else
  ``spatial/tissue_hires_image.png``, else ``tissue_lowres_image.png``, looked for in the bin
  folder and then in ``outs/spatial/``.

Memory: the matrix stays sparse from the file to ``X`` (CSR; no bins x genes dense array is
ever made), so 500,000 8-um bins x 18,000 genes read in about the size of their non-zeros.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import anndata as ad
import numpy as np

from stinfer.errors import InputError
from stinfer.io.slide_data import (
    make_slide,
    missing_file_error,
    name_list,
    require_file,
)
from stinfer.io.visium import (
    POSITION_FILES,
    SCALEFACTORS_FILE,
    checked_image,
    match_barcodes,
    read_feature_matrix,
    read_positions,
    read_scalefactors_json,
)

logger = logging.getLogger("stinfer")

BINNED_OUTPUTS = "binned_outputs"
DEFAULT_BIN_SIZE_UM = 8  # the bin size 10x recommends for most analyses
BIN_FOLDER_PATTERN = re.compile(r"square_(\d{3})um")


def bin_folder_name(bin_size_um: float) -> str:
    """Space Ranger's folder name for square bins of ``bin_size_um`` (8 -> ``square_008um``).

    Raises :class:`InputError` unless the size is a whole number of microns between 1 and 999.
    """
    if not isinstance(bin_size_um, (int, float, np.integer, np.floating)) or not (
        1 <= bin_size_um <= 999 and float(bin_size_um).is_integer()
    ):
        raise InputError(
            f"bin_size_um must be a whole number of microns (2, 8, 16, ...), got {bin_size_um!r}."
        )
    return f"square_{int(bin_size_um):03d}um"


def read_visium_hd(
    path: str | os.PathLike,
    bin_size_um: float | None = None,
    image: str | os.PathLike | None = None,
    sample_id: str | None = None,
) -> ad.AnnData:
    """Read one bin size of a Space Ranger Visium HD output into a validated slide AnnData.

    Parameters
    ----------
    path
        The Space Ranger ``outs/`` folder (holding ``binned_outputs/square_XXXum/``), its
        ``binned_outputs/`` folder, or one ``square_XXXum`` bin folder.
    bin_size_um
        Bin side in microns: 2, 8, 16 (Space Ranger's defaults) or a custom size; picks
        ``square_002um``, ``square_008um``, ``square_016um``, ... Default: the size of the
        bin folder given as ``path``, else 8.
    image
        The full-resolution microscope image the positions refer to (``image_scale`` 1.0).
        When omitted, ``tissue_hires_image.png`` is used with ``image_scale =
        tissue_hires_scalef``, else ``tissue_lowres_image.png`` with ``tissue_lowres_scalef``
        (from the bin folder's ``spatial/``, else ``outs/spatial/``); with neither the slide is
        counts-only.
    sample_id
        The slide's name; defaults to the name of the ``outs`` folder (of the bin folder when
        it is not inside ``binned_outputs/``).

    Returns
    -------
    AnnData
        As :func:`stinfer.io.read_visium` returns, one observation per bin: ``X`` raw counts
        (CSR, bins under tissue and in the matrix, in matrix order, x genes named by symbol,
        made unique); ``obs["spot_id"]`` the bin barcodes, obs names
        ``"<sample_id>_<barcode>"``; ``var["gene_ids"]``; ``obsm["spatial"]`` =
        (``pxl_col_in_fullres``, ``pxl_row_in_fullres``), the bin centres (x, y) in
        full-resolution pixels; ``obs["array_row"]``/``obs["array_col"]`` the bin grid.
        ``uns["stinfer"]["pixel_size_um"]`` is ``microns_per_pixel`` (else ``bin_size_um /
        spot_diameter_fullres``); ``spot_diameter_px`` is the bin side, ``bin_size_um /
        pixel_size_um``; ``source_format`` is ``"visium-hd"``.

    Raises
    ------
    InputError
        The folder, the bin folder or a file is missing (the message lists the bin sizes
        present), a positions column is missing, the scale factors give no pixel size or
        another bin size, no barcode is both in the matrix and under tissue, the counts are
        not raw integers, or the bins fall outside the image.

    Examples
    --------
    >>> slide = read_visium_hd("sample/outs", bin_size_um=8, image="sample/HE.tif")  # doctest: +SKIP
    >>> slide.uns["stinfer"]["notes"]  # bins dropped, image used  # doctest: +SKIP
    """
    bin_folder, outs_folder, bin_size_um = find_bin_folder(path, bin_size_um)
    source = str(bin_folder)
    notes = [f"bins: {bin_folder.name} ({bin_size_um:g} x {bin_size_um:g} um squares)."]

    matrix = read_feature_matrix(bin_folder, notes)
    if not any((bin_folder / name).is_file() for name in POSITION_FILES):
        raise missing_file_error(
            bin_folder / POSITION_FILES[0], "the bin positions file (Space Ranger HD writes it)"
        )
    positions = read_positions(bin_folder)
    scalefactors = read_scalefactors_json(bin_folder / SCALEFACTORS_FILE)
    pixel_size_um = hd_pixel_size_um(scalefactors, bin_size_um, bin_folder / SCALEFACTORS_FILE)
    matrix_rows, bin_positions = match_barcodes(matrix.barcodes, positions, source, notes)

    spatial_xy = bin_positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    png_folders = [bin_folder / "spatial"]
    if outs_folder is not None:
        png_folders.append(outs_folder / "spatial")
    image_path, image_scale = checked_image(
        bin_folder, image, scalefactors, spatial_xy, source, notes, png_folders
    )
    all_rows_kept = len(matrix_rows) == matrix.counts.shape[0]  # then matrix_rows is 0..n-1
    counts = matrix.counts if all_rows_kept else matrix.counts[matrix_rows]
    slide = make_slide(
        counts,
        bin_positions.index,
        matrix.gene_names,
        spatial_xy,
        sample_id=sample_id or (outs_folder or bin_folder).name,
        source_format="visium-hd",
        source=str(matrix.path or bin_folder),
        array_row=bin_positions["array_row"].to_numpy(),
        array_col=bin_positions["array_col"].to_numpy(),
        image_path=None if image_path is None else str(image_path.resolve()),
        image_scale=image_scale,
        pixel_size_um=pixel_size_um,
        spot_diameter_px=bin_size_um / pixel_size_um,
        notes=notes,
    )
    slide.var["gene_ids"] = matrix.gene_ids
    return slide


def find_bin_folder(
    path: str | os.PathLike, bin_size_um: float | None
) -> tuple[Path, Path | None, float]:
    """Resolve ``path`` and ``bin_size_um`` to ``(bin folder, outs folder or None, bin size)``.

    ``path`` may be the ``outs/`` folder, its ``binned_outputs/`` folder or a bin folder
    (``square_XXXum``; its own size is the default and must match ``bin_size_um`` if given).
    """
    folder = require_file(path, "the Space Ranger HD output folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a Space Ranger HD output folder, got a file.")
    own_size = BIN_FOLDER_PATTERN.fullmatch(folder.name)
    if own_size is not None:
        size = int(own_size.group(1))
        if bin_size_um is not None and bin_folder_name(bin_size_um) != folder.name:
            raise InputError(
                f"{folder}: this is the {size}-um bin folder but bin_size_um={bin_size_um:g} was "
                f"asked; pass the outs/ folder as --path to choose a bin size, or --bin-size "
                f"{size} (bin_size_um={size})."
            )
        outs = folder.parent.parent if folder.parent.name == BINNED_OUTPUTS else None
        return folder, outs, float(size)

    if (folder / BINNED_OUTPUTS).is_dir():
        outs, binned = folder, folder / BINNED_OUTPUTS
    elif folder.name == BINNED_OUTPUTS:
        outs, binned = folder.parent, folder
    else:
        raise InputError(
            f"{folder}: not a Space Ranger HD output: it has no {BINNED_OUTPUTS}/ folder and is "
            f"not a square_XXXum bin folder; it holds: "
            f"{name_list(sorted(child.name for child in folder.iterdir())) or 'nothing'}. "
            "Pass the outs/ folder of `spaceranger count` run on a Visium HD slide (a standard "
            "Visium folder reads with format 'visium')."
        )
    size = DEFAULT_BIN_SIZE_UM if bin_size_um is None else bin_size_um
    bin_folder = binned / bin_folder_name(size)
    if not bin_folder.is_dir():
        present = sorted(
            child.name
            for child in binned.iterdir()
            if child.is_dir() and BIN_FOLDER_PATTERN.fullmatch(child.name)
        )
        sizes = ", ".join(str(int(BIN_FOLDER_PATTERN.fullmatch(name)[1])) for name in present)
        raise InputError(
            f"{bin_folder}: no {size:g}-um bins in this Space Ranger HD output; "
            f"{binned} has {name_list(present) or 'no square_XXXum bin folder'}"
            + (f". Choose one of these bin sizes (um): {sizes}." if present else ".")
        )
    return bin_folder, outs, float(size)


def hd_pixel_size_um(scalefactors: dict, bin_size_um: float, path: Path) -> float:
    """Microns per full-resolution pixel from a Visium HD ``scalefactors_json.json``.

    ``microns_per_pixel`` when present (Space Ranger HD writes it), else the bin side over its
    size in pixels (``bin_size_um / spot_diameter_fullres``). A ``bin_size_um`` entry must
    agree with the bin folder, so scale factors copied from another bin size are caught.
    """
    stated_bin_size = scalefactors.get("bin_size_um")
    if isinstance(stated_bin_size, (int, float)) and not np.isclose(stated_bin_size, bin_size_um):
        raise InputError(
            f"{path}: 'bin_size_um' is {stated_bin_size:g} but this is the {bin_size_um:g}-um "
            "bin folder; the scale factors belong to another bin size."
        )
    microns_per_pixel = scalefactors.get("microns_per_pixel")
    if isinstance(microns_per_pixel, (int, float)) and microns_per_pixel > 0:
        return float(microns_per_pixel)
    diameter = scalefactors.get("spot_diameter_fullres")
    if isinstance(diameter, (int, float)) and diameter > 0:
        return bin_size_um / float(diameter)
    raise InputError(
        f"{path}: neither 'microns_per_pixel' ({microns_per_pixel!r}) nor "
        f"'spot_diameter_fullres' ({diameter!r}) is a positive number; one is needed for the "
        "microns per pixel and the bin size in pixels."
    )

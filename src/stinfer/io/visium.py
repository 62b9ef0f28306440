"""Read a 10x Genomics Space Ranger (Visium) output folder into a slide AnnData.

What is read, from the Space Ranger output folder (``outs/``):

- the count matrix: ``filtered_feature_bc_matrix.h5`` (HDF5, Cell Ranger >= 3 layout or the
  older one-group-per-genome layout), or the Matrix Market folder
  ``filtered_feature_bc_matrix/`` (``matrix.mtx``, ``barcodes.tsv``, ``features.tsv`` or
  ``genes.tsv``, each gzipped or not). Only "Gene Expression" features are kept;
- the spot positions: ``spatial/tissue_positions.parquet`` (Space Ranger >= 3),
  ``spatial/tissue_positions.csv`` (>= 2.0, with a header) or
  ``spatial/tissue_positions_list.csv`` (1.x, no header), whichever exists first in that order;
- ``spatial/scalefactors_json.json`` (spot diameter and image scale factors);
- the image: a full-resolution microscope image the user names, else
  ``spatial/tissue_hires_image.png``, else ``spatial/tissue_lowres_image.png``.

The matrix and positions are read with h5py, scipy and pandas directly rather than through
``scanpy.read_10x_*``: it keeps scanpy's slow import off the reading path and lets every
problem surface as an :class:`~stinfer.errors.InputError` naming the file.

The pieces (:func:`read_feature_matrix`, :func:`read_positions`, :func:`match_barcodes`,
:func:`choose_image`, ...) are shared with the Visium HD reader (:mod:`stinfer.io.visium_hd`);
:func:`matrix_h5_writer` writes the h5 layout, for generated test folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output
from stinfer.io.slide_data import (
    check_spots_inside_image,
    make_slide,
    missing_file_error,
    name_list,
    read_text_table,
    require_file,
)

logger = logging.getLogger("stinfer")

VISIUM_SPOT_DIAMETER_UM = 55.0  # 10x Visium (v1, v2, CytAssist) capture spots are 55 um wide
POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
POSITION_FILES = (
    "spatial/tissue_positions.parquet",
    "spatial/tissue_positions.csv",
    "spatial/tissue_positions_list.csv",
)
MATRIX_H5 = "filtered_feature_bc_matrix.h5"
MATRIX_MTX_FOLDER = "filtered_feature_bc_matrix"
SCALEFACTORS_FILE = "spatial/scalefactors_json.json"
GENE_EXPRESSION = "Gene Expression"


@dataclass
class FeatureMatrix:
    """A count matrix as read from Space Ranger: spots x features, with feature annotations."""

    counts: sp.csr_matrix  # (n_barcodes, n_features) raw counts
    barcodes: pd.Index
    gene_names: np.ndarray  # gene symbols
    gene_ids: np.ndarray  # Ensembl ids
    feature_types: np.ndarray  # "Gene Expression", "Antibody Capture", ...
    path: Path | None = None  # the h5 file or Matrix Market folder it was read from


def read_visium(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    sample_id: str | None = None,
) -> ad.AnnData:
    """Read a Space Ranger output folder into a validated slide AnnData.

    Parameters
    ----------
    path
        The Space Ranger ``outs/`` folder (holding the count matrix and ``spatial/``).
    image
        The full-resolution microscope image the positions refer to (``image_scale`` 1.0).
        When omitted, ``spatial/tissue_hires_image.png`` is used with ``image_scale =
        tissue_hires_scalef``, else ``spatial/tissue_lowres_image.png`` with
        ``tissue_lowres_scalef``; with neither the slide is counts-only (``image_path`` None).
    sample_id
        The slide's name; defaults to the folder name.

    Returns
    -------
    AnnData
        See :mod:`stinfer.io.slide_data`: ``X`` raw counts (spots under tissue and in the
        matrix, in matrix order, x genes named by symbol, made unique); ``obs["spot_id"]`` the
        barcodes, obs names ``"<sample_id>_<barcode>"``; ``var["gene_ids"]``
        the Ensembl ids; ``obsm["spatial"]`` = (``pxl_col_in_fullres``,
        ``pxl_row_in_fullres``), i.e. (x, y) in full-resolution pixels; ``obs["array_row"]``,
        ``obs["array_col"]`` the grid coordinates. ``uns["stinfer"]["spot_diameter_px"]`` is
        ``spot_diameter_fullres`` and ``pixel_size_um`` is ``55 / spot_diameter_fullres``:
        Visium spots are 55 um wide, so Space Ranger's spot diameter in full-resolution
        pixels fixes the microns per pixel.

    Raises
    ------
    InputError
        A file is missing or malformed, no barcode is both in the matrix and under tissue,
        the counts are not raw integers, or the spots fall outside the image (the message
        names the scale that was probably mixed up).

    Examples
    --------
    >>> slide = read_visium("sample/outs", image="sample/HE_fullres.tif")  # doctest: +SKIP
    >>> slide.uns["stinfer"]["notes"]  # what was dropped or assumed  # doctest: +SKIP
    """
    folder = require_file(path, "the Space Ranger output folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a Space Ranger output folder, got a file.")
    source = str(folder)
    notes: list[str] = []

    matrix = read_feature_matrix(folder, notes)
    positions = read_positions(folder)
    scalefactors = read_scalefactors(folder / SCALEFACTORS_FILE)
    matrix_rows, spot_positions = match_barcodes(matrix.barcodes, positions, source, notes)

    spatial_xy = spot_positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    image_path, image_scale = checked_image(folder, image, scalefactors, spatial_xy, source, notes)
    spot_diameter_px = float(scalefactors["spot_diameter_fullres"])

    slide = make_slide(
        matrix.counts[matrix_rows],
        spot_positions.index,
        matrix.gene_names,
        spatial_xy,
        sample_id=sample_id or folder.name,
        source_format="visium",
        source=source,
        array_row=spot_positions["array_row"].to_numpy(),
        array_col=spot_positions["array_col"].to_numpy(),
        image_path=None if image_path is None else str(image_path.resolve()),
        image_scale=image_scale,
        pixel_size_um=VISIUM_SPOT_DIAMETER_UM / spot_diameter_px,
        spot_diameter_px=spot_diameter_px,
        notes=notes,
    )
    slide.var["gene_ids"] = matrix.gene_ids
    return slide


def read_feature_matrix(folder: Path, notes: list[str]) -> FeatureMatrix:
    """Read the filtered count matrix (h5 preferred, else the Matrix Market folder).

    Non-"Gene Expression" features (antibody capture, CRISPR guides) are dropped and counted
    in ``notes``.
    """
    h5_candidates = sorted(folder.glob(f"*{MATRIX_H5}"))
    if (folder / MATRIX_H5).is_file():
        matrix = read_matrix_h5(folder / MATRIX_H5)
    elif len(h5_candidates) == 1:
        matrix = read_matrix_h5(h5_candidates[0])
    elif (folder / MATRIX_MTX_FOLDER).is_dir():
        matrix = read_matrix_mtx(folder / MATRIX_MTX_FOLDER)
    else:
        raise missing_file_error(
            folder / MATRIX_H5,
            f"the count matrix ({MATRIX_H5} or the {MATRIX_MTX_FOLDER}/ folder)",
        )
    is_gene = matrix.feature_types == GENE_EXPRESSION
    if not is_gene.all():
        dropped = pd.Series(matrix.feature_types[~is_gene]).value_counts()
        message = (
            f"dropped {int((~is_gene).sum())} features that are not '{GENE_EXPRESSION}' ("
            + ", ".join(f"{count} {kind}" for kind, count in dropped.items())
            + ")."
        )
        notes.append(message)
        logger.info(message)
        matrix = FeatureMatrix(
            counts=matrix.counts[:, np.flatnonzero(is_gene)],
            barcodes=matrix.barcodes,
            gene_names=matrix.gene_names[is_gene],
            gene_ids=matrix.gene_ids[is_gene],
            feature_types=matrix.feature_types[is_gene],
            path=matrix.path,
        )
    return matrix


def read_matrix_h5(path: Path) -> FeatureMatrix:
    """Read a 10x feature-barcode matrix HDF5 file (Cell Ranger/Space Ranger >= 3, or 2.x).

    The file stores the genes x barcodes matrix in CSC form, which is exactly the
    barcodes x genes matrix in CSR form, so no transpose is needed.
    """
    try:
        with h5py.File(path, "r") as handle:
            if "matrix" in handle:
                group = handle["matrix"]
                features = group["features"]
                gene_ids = _strings(features["id"][()])
                gene_names = _strings(features["name"][()])
                if "feature_type" in features:
                    feature_types = _strings(features["feature_type"][()])
                else:
                    feature_types = np.full(len(gene_ids), GENE_EXPRESSION, dtype=object)
            else:
                genomes = list(handle.keys())
                if len(genomes) != 1:
                    raise InputError(
                        f"{path}: expected a 'matrix' group (Space Ranger >= 1.0 layout) or one "
                        f"genome group, found: {', '.join(genomes) or 'nothing'}."
                    )
                group = handle[genomes[0]]
                gene_ids = _strings(group["genes"][()])
                gene_names = _strings(group["gene_names"][()])
                feature_types = np.full(len(gene_ids), GENE_EXPRESSION, dtype=object)
            n_genes, n_barcodes = (int(n) for n in group["shape"][()])
            # int32 indices whenever they fit, as scipy would choose, read as such by HDF5:
            # no int64 copy of ~10^8 Visium HD indices
            fits_int32 = max(group["indices"].shape[0], n_genes, n_barcodes) < 2**31
            index_dtype = np.int32 if fits_int32 else np.int64
            counts = sp.csr_matrix(
                (
                    group["data"][()],
                    group["indices"].astype(index_dtype)[:],
                    group["indptr"].astype(index_dtype)[:],
                ),
                shape=(n_barcodes, n_genes),
            )
            barcodes = pd.Index(_strings(group["barcodes"][()]))
    except OSError as error:
        raise InputError(
            f"{path}: cannot be read as HDF5 ({error}); is it a complete 10x "
            "filtered_feature_bc_matrix.h5 file?"
        ) from error
    except KeyError as error:
        raise InputError(
            f"{path}: not a 10x feature-barcode matrix: the dataset {error} is missing."
        ) from error
    _check_matrix_shape(counts, barcodes, gene_ids, path)
    return FeatureMatrix(counts, barcodes, gene_names, gene_ids, feature_types, path)


@contextlib.contextmanager
def matrix_h5_writer(
    path: str | os.PathLike,
    barcodes: Sequence[str],
    gene_ids: Sequence[str],
    gene_names: Sequence[str],
    *,
    feature_types: Sequence[str] | None = None,
    genome: str = "",
    overwrite: bool = False,
) -> Iterator[Callable[[sp.spmatrix], None]]:
    """Write a 10x feature-barcode matrix h5 (Space Ranger >= 1.0) one block of rows at a time.

    Yields ``append(block)``: call it with consecutive sparse barcodes x genes row blocks of raw
    counts, so a matrix larger than memory is written while it is generated. The file is the
    layout :func:`read_matrix_h5` (and ``scanpy.read_10x_h5``) reads: ``matrix/data`` (int32),
    ``indices`` (int64), ``indptr`` (int64), ``shape`` (genes, barcodes), ``barcodes``, and
    ``features/{id, name, feature_type, genome}``; the genes x barcodes CSC matrix of the file
    is the barcodes x genes CSR matrix given, so nothing is transposed. ``data`` and
    ``indices`` are chunked and gzip-compressed (level 1, with shuffle). The file appears at
    ``path`` only when the block ends without error (:func:`~stinfer.io.atomic.atomic_output`).

    Parameters
    ----------
    barcodes, gene_ids, gene_names
        Row and column labels; the blocks must add up to ``len(barcodes)`` rows.
    feature_types
        Per gene; default ``"Gene Expression"`` for all.
    genome
        Stored in ``features/genome`` for every gene.

    Raises
    ------
    InputError
        A block has the wrong number of genes or holds negative or non-integer values, or
        the blocks do not add up to ``len(barcodes)`` rows.

    Examples
    --------
    >>> with matrix_h5_writer("m.h5", barcodes, ids, names) as append:  # doctest: +SKIP
    ...     for block in row_blocks:
    ...         append(block)
    """
    n_genes = len(gene_ids)
    if len(gene_names) != n_genes:
        raise InputError(f"{path}: {n_genes} gene ids but {len(gene_names)} gene names.")
    feature_types = [GENE_EXPRESSION] * n_genes if feature_types is None else list(feature_types)
    compressed = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    with atomic_output(path, overwrite) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["filetype"] = "matrix"
        handle.attrs["version"] = 2
        group = handle.create_group("matrix")
        group["barcodes"] = _utf8(barcodes)
        features = group.create_group("features")
        features["id"] = _utf8(gene_ids)
        features["name"] = _utf8(gene_names)
        features["feature_type"] = _utf8(feature_types)
        features["genome"] = _utf8([genome] * n_genes)
        features["_all_tag_keys"] = _utf8(["genome"])
        chunk = (1 << 18,)
        data = group.create_dataset(
            "data", (0,), np.int32, maxshape=(None,), chunks=chunk, **compressed
        )
        indices = group.create_dataset(
            "indices", (0,), np.int64, maxshape=(None,), chunks=chunk, **compressed
        )
        row_ends = [np.zeros(1, np.int64)]

        def append(block: sp.spmatrix) -> None:
            block = sp.csr_matrix(block)
            if block.shape[1] != n_genes:
                raise InputError(
                    f"{path}: a count block has {block.shape[1]} genes, expected {n_genes}."
                )
            block.sum_duplicates()
            values = block.data
            if values.size and (values.min() < 0 or np.any(values != np.round(values))):
                raise InputError(f"{path}: counts must be non-negative whole numbers.")
            start = data.shape[0]
            end = start + values.size
            data.resize((end,))
            indices.resize((end,))
            data[start:end] = values.astype(np.int32)
            indices[start:end] = block.indices.astype(np.int64)
            row_ends.append(block.indptr[1:].astype(np.int64) + start)

        yield append
        indptr = np.concatenate(row_ends)
        if len(indptr) - 1 != len(barcodes):
            raise InputError(
                f"{path}: the count blocks have {len(indptr) - 1} rows but {len(barcodes)} "
                "barcodes."
            )
        group["indptr"] = indptr
        group["shape"] = np.array([n_genes, len(barcodes)], dtype=np.int32)


def read_matrix_mtx(folder: Path) -> FeatureMatrix:
    """Read a 10x Matrix Market folder (``matrix.mtx``, ``barcodes.tsv``, ``features.tsv``).

    Each file may be gzipped (``.gz``); Cell Ranger 2.x folders name the features file
    ``genes.tsv`` and have no feature-type column.
    """
    matrix_path = _first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"), "the Matrix Market file")
    barcodes_path = _first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"), "the barcode list")
    features_path = _first_existing(
        folder,
        ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
        "the feature list",
    )
    try:
        genes_by_barcodes = scipy.io.mmread(matrix_path)
    except (ValueError, OSError) as error:
        raise InputError(
            f"{matrix_path}: cannot be read as a Matrix Market file ({error})."
        ) from error
    counts = sp.csr_matrix(genes_by_barcodes).T.tocsr()
    barcodes = pd.Index(
        read_text_table(
            barcodes_path, "the barcode list", sep="\t", header=None, usecols=[0], dtype=str
        )[0]
    )
    features = read_text_table(features_path, "the feature list", sep="\t", header=None, dtype=str)
    if features.shape[1] < 2:
        raise InputError(
            f"{features_path}: expected at least two tab-separated columns (gene id, gene "
            f"name), found {features.shape[1]}."
        )
    gene_ids = features[0].to_numpy(dtype=object)
    gene_names = features[1].to_numpy(dtype=object)
    if features.shape[1] >= 3:
        feature_types = features[2].to_numpy(dtype=object)
    else:
        feature_types = np.full(len(gene_ids), GENE_EXPRESSION, dtype=object)
    _check_matrix_shape(counts, barcodes, gene_ids, matrix_path)
    return FeatureMatrix(counts, barcodes, gene_names, gene_ids, feature_types, folder)


def read_positions(folder: Path) -> pd.DataFrame:
    """Read the spot positions table, indexed by barcode, with :data:`POSITION_COLUMNS`.

    Space Ranger 1.x writes ``tissue_positions_list.csv`` without a header; 2.x writes
    ``tissue_positions.csv`` with one; 3.x writes ``tissue_positions.parquet``. The header
    is detected from the first cell rather than the file name, since users rename files.
    """
    existing = [folder / name for name in POSITION_FILES if (folder / name).is_file()]
    if not existing:
        raise missing_file_error(
            folder / POSITION_FILES[1], "the spot positions file (spatial/tissue_positions*)"
        )
    path = existing[0]
    if path.suffix == ".parquet":
        table = _read_parquet_columns(path, POSITION_COLUMNS)
    else:
        try:
            with open(path) as handle:
                first_cell = handle.readline().split(",")[0].strip().strip('"')
        except UnicodeDecodeError as error:
            raise InputError(
                f"{path}: the spot positions file is not a text (CSV) file ({error})."
            ) from error
        has_header = first_cell == "barcode"
        table = read_text_table(
            path,
            "the spot positions file",
            header=0 if has_header else None,
            dtype={"barcode": str} if has_header else {0: str},
            float_precision="round_trip",
        )
        if not has_header:
            if table.shape[1] != len(POSITION_COLUMNS):
                raise InputError(
                    f"{path}: a header-less positions file must have {len(POSITION_COLUMNS)} "
                    f"columns ({', '.join(POSITION_COLUMNS)}), found {table.shape[1]}."
                )
            table.columns = list(POSITION_COLUMNS)
    _check_position_columns(path, table.columns)
    table = table[list(POSITION_COLUMNS)].copy()
    table["barcode"] = table["barcode"].astype(str)
    numeric = list(POSITION_COLUMNS[1:])
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    bad = table[numeric].isna().any(axis=1)
    if bad.any():
        raise InputError(
            f"{path}: {int(bad.sum())} rows have missing or non-numeric values in "
            f"{', '.join(numeric)} (e.g. barcode {table.loc[bad, 'barcode'].iloc[0]})."
        )
    duplicated = table["barcode"].duplicated()
    if duplicated.any():
        raise InputError(
            f"{path}: {int(duplicated.sum())} barcodes occur more than once (e.g. "
            f"{table.loc[duplicated, 'barcode'].iloc[0]}); each spot must have one position."
        )
    return table.set_index("barcode")


def _check_position_columns(path: Path, found: Sequence[str]) -> None:
    missing = [column for column in POSITION_COLUMNS if column not in found]
    if missing:
        raise InputError(
            f"{path}: missing columns {', '.join(missing)}; found "
            f"{name_list(found)}. Space Ranger positions have the columns "
            f"{', '.join(POSITION_COLUMNS)}."
        )


def _read_parquet_columns(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read only ``columns`` of a Parquet file with pyarrow (a Visium HD table has 10^5-10^7
    rows; Space Ranger may add columns we do not need). Missing columns are reported from the
    file's schema, before any data is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        found = pq.read_schema(path).names
        _check_position_columns(path, found)
        return pq.read_table(path, columns=list(columns)).to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise InputError(
            f"{path}: cannot be read as Parquet ({error}); is it a complete Space Ranger "
            "tissue_positions.parquet file?"
        ) from error


def read_scalefactors_json(path: Path) -> dict:
    """Read a ``scalefactors_json.json`` file as a dict, without checking its fields."""
    require_file(path, "the Space Ranger scale factors file")
    try:
        scalefactors = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(scalefactors, dict):
        raise InputError(
            f"{path}: expected a JSON object of scale factors, found {type(scalefactors).__name__}."
        )
    return scalefactors


def read_scalefactors(path: Path) -> dict[str, float]:
    """Read ``scalefactors_json.json``; ``spot_diameter_fullres`` must be a positive number."""
    scalefactors = read_scalefactors_json(path)
    diameter = scalefactors.get("spot_diameter_fullres")
    if not isinstance(diameter, (int, float)) or not diameter > 0:
        raise InputError(
            f"{path}: 'spot_diameter_fullres' is missing or not a positive number ({diameter!r}); "
            "it is needed for the spot size and the microns per pixel."
        )
    return scalefactors


def match_barcodes(
    barcodes: pd.Index, positions: pd.DataFrame, source: str, notes: list[str]
) -> tuple[np.ndarray, pd.DataFrame]:
    """Keep the barcodes both in the matrix and under tissue; report what was dropped.

    Returns the matrix row numbers kept (in matrix order) and the positions of those spots,
    row-aligned with them.
    """
    under_tissue = positions[positions["in_tissue"] == 1]
    in_tissue = barcodes.isin(under_tissue.index)
    has_position = barcodes.isin(positions.index)
    kept = barcodes[in_tissue]
    if kept.empty:
        raise InputError(
            f"{source}: no barcode is both in the count matrix ({len(barcodes)} barcodes, e.g. "
            f"{barcodes[0] if len(barcodes) else 'none'}) and under tissue in the positions "
            f"file ({len(under_tissue)} in tissue, e.g. "
            f"{under_tissue.index[0] if len(under_tissue) else 'none'}); check that both "
            "come from the same Space Ranger run."
        )
    dropped_positions = len(under_tissue) - len(kept)
    parts = []
    if dropped_positions:
        parts.append(
            f"dropped {dropped_positions} of {len(under_tissue)} in-tissue positions whose "
            "barcode is not in the count matrix"
        )
    if (~has_position).any():
        parts.append(f"dropped {int((~has_position).sum())} matrix barcodes without a position")
    outside = has_position & ~in_tissue
    if outside.any():
        parts.append(f"dropped {int(outside.sum())} matrix barcodes outside the tissue")
    if parts:
        message = f"kept {len(kept)} spots; " + "; ".join(parts) + "."
        notes.append(message)
        logger.warning("%s: %s", source, message)
    return np.flatnonzero(in_tissue), under_tissue.loc[kept]


def checked_image(
    folder: Path,
    image: str | os.PathLike | None,
    scalefactors: dict[str, float],
    spatial_xy: np.ndarray,
    source: str,
    notes: list[str],
    png_folders: Sequence[Path] | None = None,
) -> tuple[Path | None, float]:
    """:func:`choose_image`, then check that the spots ``spatial_xy`` (full-resolution
    pixels) fall inside the chosen image (:class:`InputError` naming the scale that fits)."""
    image_path, image_scale = choose_image(folder, image, scalefactors, notes, png_folders)
    if image_path is not None:
        check_spots_inside_image(
            spatial_xy,
            image_path,
            image_scale,
            source,
            known_scales=image_scale_labels(scalefactors),
            fix=(
                "pass the full-resolution microscope image as --image (image=...), or leave "
                "it out to use spatial/tissue_hires_image.png with its scale factor"
            ),
        )
    return image_path, image_scale


def choose_image(
    folder: Path,
    image: str | os.PathLike | None,
    scalefactors: dict[str, float],
    notes: list[str],
    png_folders: Sequence[Path] | None = None,
) -> tuple[Path | None, float]:
    """Return the image file and its ``image_scale`` (image pixels per full-resolution pixel).

    A user-named image is taken as the full-resolution image (scale 1.0); otherwise the
    hires PNG, then the lowres PNG, each with its Space Ranger scale factor (from
    ``folder/spatial/scalefactors_json.json``), looked for in each of ``png_folders`` in turn
    (default: ``folder/spatial``).
    """
    if image is not None:
        return require_file(image, "the full-resolution image"), 1.0
    for png_folder in png_folders or [folder / "spatial"]:
        for name, key in (
            ("tissue_hires_image.png", "tissue_hires_scalef"),
            ("tissue_lowres_image.png", "tissue_lowres_scalef"),
        ):
            path = png_folder / name
            if path.is_file():
                label = os.path.relpath(path, folder) if path.is_relative_to(folder) else path
                scale = scalefactors.get(key)
                if not isinstance(scale, (int, float)) or not scale > 0:
                    raise InputError(
                        f"{folder / SCALEFACTORS_FILE}: '{key}' is missing or not positive "
                        f"({scale!r}); it is needed to use {label}."
                    )
                notes.append(
                    f"image: {label} (image_scale = {key} = {scale:g}); no full-resolution "
                    "image was given."
                )
                return path, float(scale)
    message = "no image: no full-resolution image given and no hires/lowres PNG in spatial/."
    notes.append(message)
    logger.warning("%s: %s", folder, message)
    return None, 1.0


def image_scale_labels(scalefactors: dict[str, float]) -> dict[str, float]:
    """Label the image scales a Space Ranger folder knows, for the out-of-image message."""
    labels = {"a full-resolution image": 1.0}
    for kind, key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        scale = scalefactors.get(key)
        if isinstance(scale, (int, float)) and scale > 0:
            labels[f"the {kind} PNG ({key}={scale:g})"] = float(scale)
    return labels


def _strings(values: np.ndarray) -> np.ndarray:
    """Decode an HDF5 string array (fixed-length bytes or variable-length) to str objects."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _utf8(values: Sequence[str]) -> np.ndarray:
    """Strings as fixed-length UTF-8 bytes, the string type of 10x h5 files."""
    encoded = np.char.encode(np.asarray(values, dtype=str), "utf-8")
    return encoded if encoded.itemsize else encoded.astype("S1")


def _first_existing(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise missing_file_error(folder / names[0], f"{what} ({' or '.join(names)})")


def _check_matrix_shape(
    counts: sp.csr_matrix, barcodes: pd.Index, gene_ids: np.ndarray, path: Path
) -> None:
    if counts.shape != (len(barcodes), len(gene_ids)):
        raise InputError(
            f"{path}: the matrix is {counts.shape[1]} features x {counts.shape[0]} barcodes but "
            f"{len(gene_ids)} features and {len(barcodes)} barcodes are listed."
        )

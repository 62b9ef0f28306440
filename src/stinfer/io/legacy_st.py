"""Read legacy Spatial Transcriptomics (ST) data, in the HER2ST layout, into a slide AnnData.

Legacy ST arrays (Stahl et al. 2016) print 100 um spots on a square grid with a 200 um
centre-to-centre pitch. A section comes as two tables:

- a count table (``.tsv`` or ``.tsv.gz``): spots x genes raw counts, tab separated, row names
  ``<x>x<y>`` (array coordinates), first header cell empty;
- a spot selection table (``.tsv``): one row per spot under tissue, with the array
  coordinates ``x``, ``y``, sub-spot corrected ``new_x``, ``new_y``, the spot centre in the H&E
  image's pixels ``pixel_x``, ``pixel_y``, and ``selected`` (1 = keep).

The tables are joined on the array coordinates (the count row ``10x21`` is the spot with
``x == 10`` and ``y == 21``); spots in only one table are dropped and counted in the notes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.errors import InputError
from stinfer.io.slide_data import (
    TABLE_READ_ERRORS,
    check_spots_inside_image,
    make_slide,
    name_list,
    read_text_table,
    require_file,
)

logger = logging.getLogger("stinfer")

ST_SPOT_PITCH_UM = 200.0  # legacy ST array: centre-to-centre distance of neighbouring spots
ST_SPOT_DIAMETER_UM = 100.0  # legacy ST array: printed spot diameter
SPOT_NAME_PATTERN = r"^\s*(\d+)x(\d+)\s*$"


def read_legacy_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike | None = None,
    sample_id: str | None = None,
    pixel_size_um: float | None = None,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
) -> ad.AnnData:
    """Read one legacy ST section (count table + spot selection table) into a slide AnnData.

    Parameters
    ----------
    counts
        Spots x genes count table (``.tsv`` or ``.tsv.gz``), row names ``<x>x<y>``.
    spots
        Spot selection table with columns ``x``, ``y``, ``pixel_x``, ``pixel_y`` and
        optionally ``selected`` (rows with ``selected != 1`` are dropped).
    image
        The H&E image whose pixels ``pixel_x``, ``pixel_y`` refer to (``image_scale`` 1.0).
        Without it the slide is counts-only (``image_path`` None); the pixel coordinates are
        still stored.
    sample_id
        The slide's name; defaults to the count file's name without ``.tsv(.gz)``.
    pixel_size_um
        Microns per image pixel. When omitted it is estimated from the spot grid: a least
        squares affine fit of (``pixel_x``, ``pixel_y``) on the array (``x``, ``y``) gives the
        pixels per array step (the square root of the fit's determinant, i.e. the geometric
        mean of the two axes' slopes, robust to a rotated image), and the array pitch is
        200 um, so ``pixel_size_um = 200 / pixels_per_step``.
    spot_diameter_um
        Printed spot diameter (100 um on legacy ST arrays); stored as
        ``spot_diameter_px = spot_diameter_um / pixel_size_um``.

    Returns
    -------
    AnnData
        See :mod:`stinfer.io.slide_data`. Spots are in count-table order; ``obs["spot_id"]``
        is ``"<x>x<y>"`` and ``obs_names`` ``"<sample_id>_<x>x<y>"`` (e.g. ``C2_10x21``);
        ``obsm["spatial"]`` = (``pixel_x``, ``pixel_y``); ``obs["array_row"]`` = ``y`` and
        ``obs["array_col"]`` = ``x`` (rows run along y, columns along x, as on Visium).
        When the spot table has no pixel columns and no image is given, ``obsm["spatial"]`` is
        the array grid in microns (``x * 200``, ``y * 200``) with ``pixel_size_um`` 1.0.

    Raises
    ------
    InputError
        A file is missing or malformed (row names not ``<x>x<y>``, missing columns, duplicated
        spots), no spot is in both tables, the counts are not raw integers, or the spots fall
        outside the image.
    """
    counts_path = require_file(counts, "the legacy ST count table")
    spots_path = require_file(spots, "the legacy ST spot selection table")
    source = str(counts_path)
    notes: list[str] = []

    table = read_count_table(counts_path)
    spot_table = read_spot_table(spots_path, notes)
    count_rows, spot_rows = join_on_array_coordinates(
        spot_names_to_array_xy(table.index, counts_path), spot_table, source, notes
    )
    matched = spot_table.iloc[spot_rows]
    array_xy = matched[["x", "y"]].to_numpy(np.int64)
    has_pixels = {"pixel_x", "pixel_y"} <= set(matched.columns)

    image_path = None if image is None else require_file(image, "the H&E image")
    if has_pixels:
        spatial_xy = matched[["pixel_x", "pixel_y"]].to_numpy(np.float64)
        if pixel_size_um is None:
            pixel_size_um = estimate_pixel_size_um(array_xy, spatial_xy, spots_path)
            notes.append(
                f"pixel_size_um = {pixel_size_um:.4g} estimated from the spot grid "
                f"({ST_SPOT_PITCH_UM:g} um array pitch)."
            )
    elif image_path is None:
        spatial_xy = array_xy * ST_SPOT_PITCH_UM
        pixel_size_um = 1.0
        notes.append(
            "no pixel_x/pixel_y in the spot table: spot centres are the array grid in microns "
            f"(x, y times {ST_SPOT_PITCH_UM:g} um), pixel_size_um = 1."
        )
    else:
        raise InputError(
            f"{spots_path}: columns pixel_x and pixel_y are needed to place spots on the image "
            f"{image_path.name}; found {name_list(spot_table.columns)}."
        )
    if not pixel_size_um > 0:
        raise InputError(
            f"pixel_size_um must be a positive number of microns, got {pixel_size_um}."
        )
    if image_path is not None:
        check_spots_inside_image(spatial_xy, image_path, 1.0, str(spots_path))

    sample = sample_id or _strip_suffixes(counts_path.name, (".gz", ".tsv", ".txt", ".csv"))
    spot_names = pd.Series(array_xy[:, 0]).astype(str) + "x" + pd.Series(array_xy[:, 1]).astype(str)
    return make_slide(
        table.iloc[count_rows].to_numpy(),
        spot_names,
        table.columns,
        spatial_xy,
        sample_id=sample,
        source_format="legacy-st",
        source=source,
        array_row=array_xy[:, 1],
        array_col=array_xy[:, 0],
        image_path=None if image_path is None else str(image_path.resolve()),
        image_scale=1.0,
        pixel_size_um=pixel_size_um,
        spot_diameter_px=spot_diameter_um / pixel_size_um,
        notes=notes,
    )


def read_count_table(path: Path) -> pd.DataFrame:
    """Read a spots x genes count table (tab separated, gzipped or not) with pandas' C parser.

    Gene names are taken verbatim from the header (pandas would rename duplicates to
    ``NAME.1``). Every column must be numeric; the values themselves are checked by
    :func:`stinfer.io.slide_data.check_counts` when the slide is built.
    """
    try:
        header = pd.read_csv(path, sep="\t", header=None, nrows=1, dtype=str, engine="c")
        # low_memory=False parses in one pass: with ~15,000 columns, pandas' chunked default
        # spends more time assembling chunks than parsing
        table = pd.read_csv(path, sep="\t", index_col=0, engine="c", low_memory=False)
    except pd.errors.EmptyDataError as error:
        raise InputError(f"{path}: the count table is empty ({error}).") from error
    except TABLE_READ_ERRORS as error:
        raise InputError(
            f"{path}: cannot be read as a tab-separated count table ({error})."
        ) from error
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise InputError(
            f"{path}: the count table is empty ({table.shape[0]} spots x {table.shape[1]} genes); "
            "expected spots as rows (named <x>x<y>) and genes as tab-separated columns."
        )
    # pandas renames repeated column names (ACTB, ACTB.1); keep the file's own names so
    # make_slide makes them unique in the one project-wide way, and reports it
    table.columns = header.iloc[0, 1:].fillna("").to_numpy()
    non_numeric = [column for column, dtype in table.dtypes.items() if dtype.kind not in "iufb"]
    if non_numeric:
        raise InputError(
            f"{path}: {len(non_numeric)} gene columns hold non-numeric values (e.g. column "
            f"{non_numeric[0]!r}); the table must hold raw counts, spots x genes."
        )
    return table


def spot_names_to_array_xy(names: pd.Index, path: Path) -> np.ndarray:
    """Parse row names ``"<x>x<y>"`` into an ``(n, 2)`` integer array of (x, y)."""
    parts = pd.Series(names.astype(str), dtype=str).str.extract(SPOT_NAME_PATTERN)
    malformed = parts.isna().any(axis=1).to_numpy()
    if malformed.any():
        examples = ", ".join(repr(name) for name in names[malformed][:3])
        raise InputError(
            f"{path}: {int(malformed.sum())} row names are not array coordinates '<x>x<y>' "
            f"(e.g. {examples}); the first column must hold spot names like '10x21'."
        )
    array_xy = parts.astype(np.int64).to_numpy()
    duplicated = pd.DataFrame(array_xy).duplicated().to_numpy()
    if duplicated.any():
        raise InputError(
            f"{path}: {int(duplicated.sum())} spots occur more than once (e.g. "
            f"{names[duplicated][0]}); each row must be a different spot."
        )
    return array_xy


def read_spot_table(path: Path, notes: list[str]) -> pd.DataFrame:
    """Read the spot selection table; keep ``selected == 1`` rows when the column exists.

    ``x`` and ``y`` must be whole numbers (array coordinates); ``pixel_x``, ``pixel_y`` must be
    numeric when present. Duplicated (x, y) pairs are rejected.
    """
    table = read_text_table(path, "the spot table", sep="\t", float_precision="round_trip")
    missing = [column for column in ("x", "y") if column not in table.columns]
    if missing:
        raise InputError(
            f"{path}: missing columns {', '.join(missing)}; found "
            f"{name_list(table.columns)}. The spot table needs the array coordinates "
            "x, y and the image coordinates pixel_x, pixel_y (tab separated, with a header)."
        )
    numeric = [c for c in ("x", "y", "pixel_x", "pixel_y", "selected") if c in table.columns]
    values = table[numeric].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1)
    if bad.any():
        raise InputError(
            f"{path}: {int(bad.sum())} rows have missing or non-numeric values in "
            f"{', '.join(numeric)} (first at line {int(np.flatnonzero(bad)[0]) + 2})."
        )
    table[numeric] = values
    if "selected" in table.columns:
        unselected = table["selected"] != 1
        if unselected.any():
            notes.append(
                f"dropped {int(unselected.sum())} spots with selected != 1 in {path.name}."
            )
            table = table[~unselected]
    fractional = (table[["x", "y"]] != table[["x", "y"]].round()).any(axis=1)
    if fractional.any():
        raise InputError(
            f"{path}: columns x, y must be whole array coordinates; {int(fractional.sum())} rows "
            "are not (use x, y, not the sub-spot corrected new_x, new_y)."
        )
    table = table.astype({"x": np.int64, "y": np.int64}).reset_index(drop=True)
    duplicated = table.duplicated(["x", "y"])
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise InputError(
            f"{path}: {int(duplicated.sum())} spots occur more than once (e.g. x={int(first['x'])}, "
            f"y={int(first['y'])}); each row must be a different spot."
        )
    return table


def join_on_array_coordinates(
    count_xy: np.ndarray, spot_table: pd.DataFrame, source: str, notes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Match count rows to spot-table rows on (x, y); return both row numbers, in count order.

    Spots present in only one table are dropped and counted in ``notes`` (and logged).
    """
    count_keys = pd.MultiIndex.from_arrays([count_xy[:, 0], count_xy[:, 1]])
    spot_keys = pd.MultiIndex.from_frame(spot_table[["x", "y"]])
    spot_rows = spot_keys.get_indexer(count_keys)
    count_rows = np.flatnonzero(spot_rows >= 0)
    if count_rows.size == 0:
        raise InputError(
            f"{source}: no spot is in both the count table ({len(count_keys)} spots, e.g. "
            f"{count_xy[0, 0]}x{count_xy[0, 1]}) and the spot table ({len(spot_keys)} spots"
            + (
                f", e.g. x={spot_table['x'].iloc[0]}, y={spot_table['y'].iloc[0]}"
                if len(spot_table)
                else ""
            )
            + "); check that both files belong to the same section."
        )
    dropped_counts = len(count_keys) - count_rows.size
    dropped_spots = len(spot_keys) - count_rows.size
    if dropped_counts or dropped_spots:
        message = (
            f"kept {count_rows.size} spots present in both tables; dropped {dropped_counts} "
            f"count rows without a spot-table row and {dropped_spots} spot-table rows without "
            "counts."
        )
        notes.append(message)
        logger.warning("%s: %s", source, message)
    return count_rows, spot_rows[count_rows]


def estimate_pixel_size_um(
    array_xy: np.ndarray, pixel_xy: np.ndarray, path: Path, pitch_um: float = ST_SPOT_PITCH_UM
) -> float:
    """Estimate microns per pixel from spots' array and pixel coordinates.

    Fits ``pixel_xy ~ array_xy @ A + b`` by least squares; ``sqrt(|det A|)`` is the number of
    pixels per array step (for an unrotated image, the geometric mean of the x and y slopes),
    and one array step is ``pitch_um`` microns.
    """
    design = np.column_stack([array_xy.astype(np.float64), np.ones(len(array_xy))])
    if len(array_xy) < 3 or np.linalg.matrix_rank(design) < 3:
        raise InputError(
            f"{path}: cannot estimate the pixel size from {len(array_xy)} spots on one line; "
            "pass --pixel-size-um (pixel_size_um=)."
        )
    coefficients, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    pixels_per_step = float(np.sqrt(abs(np.linalg.det(coefficients[:2]))))
    if not pixels_per_step > 0:
        raise InputError(
            f"{path}: pixel_x, pixel_y do not follow the array grid x, y; pass "
            "--pixel-size-um (pixel_size_um=)."
        )
    return pitch_um / pixels_per_step


def _strip_suffixes(name: str, suffixes: tuple[str, ...]) -> str:
    for suffix in suffixes:
        name = name.removesuffix(suffix)
    return name

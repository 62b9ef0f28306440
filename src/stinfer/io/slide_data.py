"""The slide data model: one AnnData per slide, built and checked in one place.

Every reader ends in :func:`make_slide`, so every slide stinfer hands out looks the same:

- ``X``: raw integer UMI counts, ``scipy.sparse.csr_matrix`` (spots x genes), dtype float32
  holding whole numbers (AnnData/scanpy convention);
- ``obs_names``: ``"<sample_id>_<spot id>"``, unique across slides, so ``anndata.concat`` of
  several slides keeps every spot and its slide apart (two legacy ST sections both have a spot
  ``10x21``); a name that already starts with ``"<sample_id>_"`` (a slide stinfer wrote) is kept,
  and a slide stinfer wrote read under another sample id is renamed from its ``obs["spot_id"]``
  (``C2_10x21`` read as ``P7`` becomes ``P7_10x21``, not ``P7_C2_10x21``);
- ``obs["spot_id"]``: the spot's own id in its files (the barcode for Visium and Visium HD,
  ``"<x>x<y>"`` array coordinates for legacy ST); ``obs["sample_id"]``: the slide's name, on
  every spot (categorical);
- ``var_names``: unique gene names (duplicates made unique as ``NAME-1``, ``NAME-2`` and reported);
- ``obsm["spatial"]``: spot centres in *full-resolution image pixels*, float64, columns (x, y);
- ``obs["array_row"]``, ``obs["array_col"]``: grid coordinates where the format has them;
- ``uns["stinfer"]``: a dict with the keys of :data:`SLIDE_META_KEYS`;
- ``uns["spatial"][<sample id>]``, in written files: scanpy/squidpy's images (``hires``,
  ``lowres``), ``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``,
  ``spot_diameter_fullres``) and ``metadata``, added by :func:`prepare_for_h5ad` (see
  :mod:`stinfer.io.scanpy_spatial`) so every written slide opens in ``sc.pl.spatial``.
  ``uns["stinfer"]`` stays the source of truth for stinfer; readers keep a scanpy input's
  entry as it is.

``uns["stinfer"]["image_scale"]`` maps full-resolution pixels to the pixels of the image file
named by ``image_path`` (1.0 for a full-resolution image, ``tissue_hires_scalef`` for a Visium
hires PNG), so regions are always requested in full-resolution coordinates and read in the
right pixel space. ``image_path`` may also reference an image array inside an .h5ad
(``"<file.h5ad>#uns/spatial/<library_id>/images/hires"``, see
:func:`stinfer.io.slide_image.h5ad_image_reference`): how a slide read from a scanpy-written
file keeps its image.

Everything else reads a slide through the accessors here, so the layout is interpreted in one
place: :func:`slide_meta` and :func:`slide_id` (metadata and name), :func:`spot_coordinates_px`
and :func:`spot_coordinates_um` (spot centres), :func:`image_pixel_size_um` (microns per pixel
of the image file), :func:`check_genes`, :func:`panel_counts` and :func:`panel_counts_csr`
(counts of a gene panel), :func:`as_dense` and :func:`as_csr` (dense/sparse conversion),
:func:`slide_spot_names` (the one way spots are named) and :func:`spot_obs` (the spot identity
columns a prediction copies from its slide), and :data:`SPLIT_KEY` (the training/validation
mark on spots) and :func:`validation_spot_mask` (the spots it marks for validation).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

SLIDE_META_KEYS = (
    "sample_id",  # str: the slide's name
    "image_path",  # str | None: H&E image file (absolute path) or None for a counts-only slide
    "image_scale",  # float: image-file pixels per full-resolution pixel
    "pixel_size_um",  # float | None: microns per full-resolution pixel
    "spot_diameter_px",  # float | None: spot diameter in full-resolution pixels
    "source_format",  # str: visium | visium-hd | legacy-st | h5ad | hest | image | synthetic
    "notes",  # list[str]: what the reader dropped, renamed or assumed
)

SPOT_IDENTITY_COLUMNS = ("sample_id", "spot_id", "array_row", "array_col")
"""``obs`` columns that say which spot of which slide a row is; kept by :func:`spot_obs`."""

SPLIT_KEY = "stinfer_split"
"""``obs`` column marking each training spot ``"train"`` or ``"val"``.

Written by the intra-slice protocol (:func:`stinfer.evaluate.protocols.intra_slice_split`) and
read by models that stop early or select a model on validation spots (e.g.
:class:`stinfer.models.baselines.STNet`); models that do not need it ignore the column.
"""


def name_list(names: Sequence[object], limit: int = 12) -> str:
    """``"a, b, c"`` for an error message; long lists are cut to ``limit`` names plus a count.

    A count table's header can hold 30,000 gene names: listing them all would bury the message.
    """
    names = [str(name) for name in names]
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names)} in all)"


def check_counts(counts: sp.spmatrix | np.ndarray, source: str) -> sp.csr_matrix:
    """Return ``counts`` as float32 CSR after checking they are raw counts.

    Raises :class:`InputError` naming ``source`` when any value is negative, non-finite or not
    a whole number: a normalised or log-transformed matrix is not what the models expect.
    """
    matrix = sp.csr_matrix(counts)
    values = matrix.data
    # integer values are whole and finite by type: skipping those checks spares float copies
    # of the values (a Visium HD matrix holds ~10^8 of them)
    check_whole = values.dtype.kind not in "biu"
    if values.size:
        if check_whole and not np.all(np.isfinite(values)):
            raise InputError(f"{source}: the count matrix holds NaN or infinite values.")
        if values.min() < 0:
            raise InputError(
                f"{source}: the count matrix holds negative values (min {values.min():g}); "
                "raw UMI counts are expected, not normalised or scaled data."
            )
        if check_whole:
            fractional = np.abs(values - np.round(values)) > 1e-6
            if fractional.any():
                example = values[fractional][0]
                raise InputError(
                    f"{source}: the count matrix holds non-integer values (e.g. {example:g}); "
                    "raw UMI counts are expected, not normalised or log-transformed data."
                )
    matrix = matrix.astype(np.float32)
    matrix.eliminate_zeros()
    return matrix


def unique_gene_names(names: Sequence[str], source: str, notes: list[str]) -> pd.Index:
    """Make gene names unique (``NAME``, ``NAME-1``, ...) and record how many were duplicated."""
    index = pd.Index([str(name) for name in names])
    if index.is_unique:
        return index
    duplicated = index[index.duplicated(keep=False)].unique()
    counter = pd.Series(index).groupby(index).cumcount().to_numpy()
    renamed = [name if k == 0 else f"{name}-{k}" for name, k in zip(index, counter, strict=True)]
    message = (
        f"{source}: {len(duplicated)} duplicated gene names made unique by suffixing -1, -2, ... "
        f"(e.g. {', '.join(map(str, duplicated[:3]))})."
    )
    notes.append(message)
    logger.warning(message)
    return pd.Index(renamed)


def make_slide(
    counts: sp.spmatrix | np.ndarray,
    spot_names: Sequence[str],
    gene_names: Sequence[str],
    spatial_xy: np.ndarray,
    *,
    sample_id: str,
    source_format: str,
    source: str,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    image_path: str | None = None,
    image_scale: float = 1.0,
    pixel_size_um: float | None = None,
    spot_diameter_px: float | None = None,
    notes: list[str] | None = None,
    obs_columns: pd.DataFrame | None = None,
    require_counts: bool = True,
) -> ad.AnnData:
    """Build a validated slide AnnData (see the module docstring for the layout).

    A slide with no spots, no genes or only zero counts is refused (:class:`InputError`): each
    means the files do not hold what they claim (the wrong file, a filter that removed
    everything, an empty export). Array coordinates that look swapped against the pixel axes
    are only warned about (:func:`check_axes_not_swapped`).

    Parameters
    ----------
    counts
        Spots x genes raw counts; checked by :func:`check_counts`.
    spot_names
        The spots' ids in the source files (barcodes, ``"<x>x<y>"``); stored in
        ``obs["spot_id"]`` and prefixed with ``sample_id`` into ``obs_names`` by
        :func:`slide_spot_names`.
    spatial_xy
        ``(n_spots, 2)`` spot centres in full-resolution image pixels, columns (x, y).
    source
        The file or folder the data came from; named in every error message.
    notes
        Messages the reader already collected (dropped spots, assumptions); stored in
        ``uns["stinfer"]["notes"]``.
    obs_columns
        Extra per-spot columns (e.g. ``in_tissue``, a domain label), aligned with ``spot_names``.
        A ``spot_id`` column (a slide stinfer wrote) is kept as the spots' ids and names
        them (``"<sample_id>_<spot_id>"``, see :func:`stored_spot_ids`) instead of
        ``spot_names``; a ``sample_id`` column is replaced by ``sample_id``.
    require_counts
        Refuse a slide without genes or with only zero counts (the default: a reader's
        files should hold measurements). ``False`` for a slide whose expression is not
        measured: an image-only slide (:mod:`stinfer.io.image_only`, 0 genes) or a test
        slide built by hand whose truth is absent.
    """
    notes = list(notes or [])
    matrix = check_counts(counts, source)
    if matrix.shape[0] == 0:
        raise InputError(
            f"{source}: no spots left after reading and matching the spot files (0 spots); "
            "check that the count and position files belong to the same slide and that the "
            "tissue/selection filter keeps some spots."
        )
    if require_counts:
        if matrix.shape[1] == 0:
            raise InputError(
                f"{source}: no genes in the count matrix (0 gene columns); check that the "
                "file is the count matrix, not a spot or metadata table."
            )
        if matrix.nnz == 0:
            raise InputError(
                f"{source}: every count is zero ({matrix.shape[0]} spots x {matrix.shape[1]} "
                "genes); the count matrix is empty or the wrong file (e.g. an unfiltered "
                "template)."
            )
    sample_id = str(sample_id)
    given_names = pd.Index([str(name) for name in spot_names])
    if matrix.shape != (len(given_names), len(gene_names)):
        raise InputError(
            f"{source}: the count matrix is {matrix.shape[0]} x {matrix.shape[1]} but there are "
            f"{len(given_names)} spot names and {len(gene_names)} gene names."
        )
    if obs_columns is not None and "spot_id" in obs_columns.columns:
        given_names = stored_spot_ids(given_names, obs_columns["spot_id"], sample_id, source, notes)
    spot_index = slide_spot_names(sample_id, given_names)
    if not spot_index.is_unique:
        # name the ids as the file spells them, unless only the prefixing made them collide
        repeated = given_names if not given_names.is_unique else spot_index
        duplicated = repeated[repeated.duplicated()].unique()
        raise InputError(
            f"{source}: {len(duplicated)} spot ids occur more than once (e.g. {duplicated[0]})."
        )
    spatial = np.asarray(spatial_xy, dtype=np.float64)
    if spatial.shape != (len(spot_index), 2):
        raise InputError(f"{source}: spot coordinates have shape {spatial.shape}, expected (n, 2).")
    if not np.all(np.isfinite(spatial)):
        raise InputError(f"{source}: some spot coordinates are missing or not finite.")

    obs = pd.DataFrame(index=spot_index)
    prefix = f"{sample_id}_"
    obs["spot_id"] = [name.removeprefix(prefix) for name in given_names]
    if array_row is not None and array_col is not None:
        check_axes_not_swapped(spatial, array_row, array_col, source, notes)
    if array_row is not None:
        obs["array_row"] = np.asarray(array_row, dtype=np.int64)
    if array_col is not None:
        obs["array_col"] = np.asarray(array_col, dtype=np.int64)
    if obs_columns is not None:
        for column in obs_columns.columns:
            if column != "sample_id":  # the slide's own id wins over a stored one
                obs[column] = np.asarray(obs_columns[column])
    obs["sample_id"] = pd.Categorical.from_codes(np.zeros(len(spot_index), int), [sample_id])
    var = pd.DataFrame(index=unique_gene_names(gene_names, source, notes))

    slide = ad.AnnData(X=matrix, obs=obs, var=var)
    slide.obsm["spatial"] = spatial
    slide.uns["stinfer"] = {
        "sample_id": sample_id,
        "image_path": None if image_path is None else str(image_path),
        "image_scale": float(image_scale),
        "pixel_size_um": None if pixel_size_um is None else float(pixel_size_um),
        "spot_diameter_px": None if spot_diameter_px is None else float(spot_diameter_px),
        "source_format": source_format,
        "notes": notes,
    }
    return slide


def check_axes_not_swapped(
    spatial_xy: np.ndarray,
    array_row: np.ndarray,
    array_col: np.ndarray,
    source: str,
    notes: list[str],
    strong: float = 0.9,
    weak: float = 0.5,
) -> None:
    """Warn (and add a note) when pixel x follows ``array_row`` and pixel y ``array_col``.

    On the usual layout pixel x grows with the array column and pixel y with the array row.
    When instead ``|corr(x, array_row)|`` and ``|corr(y, array_col)|`` exceed ``strong`` while
    the usual pairs stay below ``weak``, the reader probably took the pixel columns in the
    wrong order (``pxl_row_in_fullres`` is y, not x). Only a warning: some scanners or
    pipelines rotate the image by 90 degrees, and then the swap is real.
    """
    if len(spatial_xy) < 3:
        return
    rows = np.asarray(array_row, dtype=np.float64)
    cols = np.asarray(array_col, dtype=np.float64)

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return 0.0
        return abs(float(np.corrcoef(a, b)[0, 1]))

    x, y = spatial_xy[:, 0], spatial_xy[:, 1]
    swapped = correlation(x, rows) > strong and correlation(y, cols) > strong
    usual = max(correlation(x, cols), correlation(y, rows))
    if swapped and usual < weak:
        message = (
            f"{source}: pixel x follows array_row and pixel y follows array_col (|r| > "
            f"{strong:g}), the reverse of the usual layout; the pixel coordinates may be "
            "swapped (check which column is x). Kept as read: some scanners rotate the image "
            "by 90 degrees, and then this is correct."
        )
        notes.append(message)
        logger.warning(message)


def stored_spot_ids(
    spot_names: pd.Index,
    stored_ids: Sequence[object],
    sample_id: str,
    source: str,
    notes: list[str],
) -> pd.Index:
    """The ids to name spots after when the file carries ``obs["spot_id"]`` (a slide stinfer wrote).

    Such a file's obs names already hold its old sample id (``C2_10x21``); naming the spots
    from them under another sample id would nest the prefixes (``P7_C2_10x21``), so the bare
    ``stored_ids`` are used instead (``P7_10x21``). Under the same sample id both give the
    same names. When the stored ids are missing for some spots or would not give unique
    names, ``spot_names`` are kept (the names nest) and a note says so.
    """
    ids = pd.Series(stored_ids, dtype=object)
    if ids.notna().all():
        candidate = pd.Index([str(spot_id) for spot_id in ids])
        if slide_spot_names(sample_id, candidate).is_unique:
            return candidate
    repeated = ids[ids.duplicated() & ids.notna()]
    if ids.isna().any():
        example = f"{int(ids.isna().sum())} spots have none"
    elif len(repeated):
        example = f"e.g. {repeated.iloc[0]!r} repeats"
    else:
        example = f"prefixed with {sample_id!r} some ids collide"
    message = (
        f"obs['spot_id'] cannot name the spots ({example}); spots are named from the file's "
        f"obs names instead (e.g. {slide_spot_names(sample_id, spot_names[:1])[0]})."
    )
    notes.append(message)
    logger.warning("%s: %s", source, message)
    return spot_names


def slide_spot_names(sample_id: str, spot_ids: Sequence[object]) -> pd.Index:
    """Spot names unique across slides: ``"<sample_id>_<spot id>"`` for each of ``spot_ids``.

    The one way stinfer names spots (:func:`make_slide` calls it): two sections of a cohort
    share array coordinates and often barcodes, so the slide's id is part of the name. A
    name that already starts with ``"<sample_id>_"`` is kept as it is, so reading a slide
    stinfer wrote does not prefix it twice.
    """
    prefix = f"{sample_id}_"
    return pd.Index(
        [name if name.startswith(prefix) else prefix + name for name in map(str, spot_ids)]
    )


def spot_obs(slide: ad.AnnData) -> pd.DataFrame:
    """The identity of a slide's spots, for an AnnData derived from it (e.g. a prediction).

    A copy of ``obs_names`` as the index and, where the slide has them, the columns
    ``sample_id``, ``spot_id``, ``array_row`` and ``array_col``, so a prediction can be placed
    on the grid, concatenated with other slides' predictions and matched to its truth without
    the slide. A slide built outside stinfer without ``obs["sample_id"]`` gets
    ``uns["stinfer"]["sample_id"]`` when it has one.
    """
    columns = [c for c in SPOT_IDENTITY_COLUMNS if c in slide.obs.columns]
    obs = slide.obs[columns].copy()
    obs.index = slide.obs_names.copy()
    if "sample_id" not in obs.columns:
        sample_id = slide_id(slide, default="")
        if sample_id:
            codes = np.zeros(slide.n_obs, int)
            obs.insert(0, "sample_id", pd.Categorical.from_codes(codes, [sample_id]))
    return obs


def validation_spot_mask(slides: Sequence[ad.AnnData]) -> np.ndarray | None:
    """Which training spots the slides mark as validation spots (``obs[SPLIT_KEY] == "val"``).

    The spots of ``slides`` are taken in order, slide after slide (the order of a model's
    training dataset); a slide without the column contributes training spots only.

    Returns
    -------
    numpy.ndarray or None
        Boolean ``(total spots,)`` mask, ``True`` for validation spots; ``None`` when no slide
        has ``obs[SPLIT_KEY]`` (the model then draws its own validation spots).

    Raises
    ------
    InputError
        When a mark is neither ``"train"`` nor ``"val"``.
    """
    if not any(SPLIT_KEY in slide.obs for slide in slides):
        return None
    masks = []
    for slide in slides:
        if SPLIT_KEY not in slide.obs:
            masks.append(np.zeros(slide.n_obs, dtype=bool))
            continue
        marks = slide.obs[SPLIT_KEY].astype(str).to_numpy()
        bad = sorted(set(marks) - {"train", "val"})
        if bad:
            raise InputError(
                f"slide {slide_id(slide, '?')!r}: obs[{SPLIT_KEY!r}] holds {bad}; a training "
                'spot is marked "train" or "val" (drop the test spots before training).'
            )
        masks.append(marks == "val")
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def slide_meta(slide: ad.AnnData) -> dict:
    """Return ``uns["stinfer"]`` of a slide, raising :class:`InputError` when it is missing.

    h5ad files round-trip ``None`` poorly, so missing optional values come back as ``None``.
    """
    meta = slide.uns.get("stinfer")
    if meta is None:
        raise InputError(
            "this AnnData has no uns['stinfer'] metadata; read it with a stinfer reader "
            "(stinfer prepare / stinfer.io.read_*)."
        )
    meta = dict(meta)
    for key in ("image_path", "pixel_size_um", "spot_diameter_px"):
        value = meta.get(key)
        if value is None or (isinstance(value, str) and value in ("", "None")):
            meta[key] = None
        elif isinstance(value, float) and np.isnan(value):
            meta[key] = None
    meta.setdefault("image_scale", 1.0)
    meta["notes"] = list(meta.get("notes", []))
    return meta


def prepare_for_h5ad(slide: ad.AnnData) -> ad.AnnData:
    """Return a copy ready to write as ``.h5ad``, for stinfer and for scanpy/squidpy.

    Every slide (and prediction) stinfer writes goes through here:

    - ``uns["stinfer"]`` survives h5ad (no ``None``: stored as ``""``/NaN; :func:`slide_meta`
      reads them back as ``None``);
    - ``uns["spatial"][<sample id>]`` is scanpy's image and scale-factor entry
      (:func:`stinfer.io.scanpy_spatial.scanpy_spatial_library`: ``hires``/``lowres`` images
      downsampled from the slide image, ``tissue_*_scalef``, ``spot_diameter_fullres``), so
      ``sc.pl.spatial(adata, color=gene)`` works without arguments. An ``uns["spatial"]``
      the slide already has (e.g. read from a scanpy-written file) is kept as it is; an
      AnnData without ``obsm["spatial"]`` gets none.

    The input is not modified.
    """
    out = slide.copy()
    if not out.uns.get("spatial") and "spatial" in out.obsm:
        from stinfer.io.scanpy_spatial import scanpy_spatial_library

        library = scanpy_spatial_library(slide_meta(out), spot_coordinates_px(out))
        out.uns["spatial"] = {slide_id(out): library}
    meta = dict(out.uns["stinfer"])
    for key in ("image_path",):
        meta[key] = "" if meta.get(key) is None else str(meta[key])
    for key in ("pixel_size_um", "spot_diameter_px"):
        meta[key] = float("nan") if meta.get(key) is None else float(meta[key])
    meta["notes"] = np.array(list(meta.get("notes", [])), dtype=object).astype(str)
    out.uns["stinfer"] = meta
    return out


# --------------------------------------------------------------------------- reading a slide
def slide_id(slide: ad.AnnData, default: str | None = None) -> str:
    """The slide's name, ``uns["stinfer"]["sample_id"]``.

    ``default`` is returned for an AnnData without that metadata or with an empty id (e.g. a
    slide built elsewhere, named in a message); without a ``default`` such an AnnData raises
    the :class:`InputError` of :func:`slide_meta`.
    """
    meta = getattr(slide, "uns", {}).get("stinfer")
    if default is not None and not (isinstance(meta, Mapping) and meta.get("sample_id")):
        return default
    return str(slide_meta(slide)["sample_id"])


def spot_coordinates_px(slide: ad.AnnData) -> np.ndarray:
    """Spot centres ``(n_spots, 2)`` float64 (x, y) in full-resolution pixels (``obsm["spatial"]``).

    Raises :class:`InputError` when the slide has no coordinates or they are not ``(n, 2)``.
    """
    if "spatial" not in slide.obsm:
        raise InputError("slide has no obsm['spatial'] spot coordinates; read it with stinfer.io.")
    spatial = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    if spatial.ndim != 2 or spatial.shape[1] != 2:
        raise InputError(f"obsm['spatial'] has shape {spatial.shape}; expected (n_spots, 2).")
    return spatial


def spot_coordinates_um(slide: ad.AnnData, centre_px: np.ndarray | None = None) -> np.ndarray:
    """Spot centres ``(n_spots, 2)`` float64 in microns when the pixel size is known.

    ``(obsm["spatial"] - centre_px) * uns["stinfer"]["pixel_size_um"]``; ``centre_px``
    (full-resolution pixels, default none) moves the origin, e.g. to the spot centroid so that
    serial sections placed at different positions on their slides line up. Without a pixel
    size the coordinates stay in pixels, and slides of different resolutions are not
    comparable.
    """
    spatial = spot_coordinates_px(slide)
    if centre_px is not None:
        spatial = spatial - np.asarray(centre_px, dtype=np.float64)
    pixel_size_um = slide_meta(slide)["pixel_size_um"]
    return spatial * (1.0 if pixel_size_um is None else float(pixel_size_um))


def image_pixel_size_um(slide: ad.AnnData) -> float | None:
    """Microns per pixel of the slide's image file (``pixel_size_um / image_scale``), or ``None``.

    ``None`` when the slide's pixel size is unknown (the image file may still know its own).
    """
    meta = slide_meta(slide)
    if meta["pixel_size_um"] is None:
        return None
    return float(meta["pixel_size_um"]) / float(meta["image_scale"])


def check_genes(slide: ad.AnnData, genes: Sequence[str]) -> None:
    """Raise :class:`InputError` naming the slide and the first genes of ``genes`` it lacks."""
    missing = pd.Index([str(gene) for gene in genes]).difference(slide.var_names)
    if len(missing):
        raise InputError(
            f"slide {slide_id(slide, default='slide')!r} lacks {len(missing)} of the "
            f"{len(genes)} genes (e.g. {name_list(missing, limit=3)}); choose genes every slide "
            "measures (align the gene panels first)."
        )


def panel_counts(
    slide: ad.AnnData, genes: Sequence[str], dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Dense ``(n_spots, len(genes))`` counts of ``genes``, in that order, from ``X``.

    ``dtype`` float32 (default: counts are whole numbers, exact up to 2^24) or float64 (for
    arithmetic that needs it). Raises :class:`InputError` (:func:`check_genes`) when the slide
    lacks some of the genes.
    """
    check_genes(slide, genes)
    return as_dense(slide[:, list(genes)].X, dtype)


def panel_counts_csr(slide: ad.AnnData, genes: Sequence[str]) -> sp.csr_matrix:
    """float32 CSR ``(n_spots, len(genes))`` counts of ``genes``: :func:`panel_counts`, kept sparse."""
    check_genes(slide, genes)
    return as_csr(slide[:, list(genes)].X)


def as_dense(matrix: sp.spmatrix | np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """``matrix`` as a numpy array (densified when sparse), in ``dtype`` when one is given.

    No copy when ``matrix`` is already a numpy array of that dtype.
    """
    array = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return array if dtype is None else array.astype(dtype, copy=False)


def as_csr(matrix: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """float32 CSR of ``matrix`` (a dense array is converted once; sparse input is not densified)."""
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix, dtype=np.float32)
    return sp.csr_matrix(np.asarray(matrix, dtype=np.float32))


# --------------------------------------------------------------------------- files
def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise :func:`missing_file_error` when it does not exist."""
    path = Path(path)
    if not path.exists():
        raise missing_file_error(path, what)
    return path


def missing_file_error(path: str | os.PathLike, what: str) -> InputError:
    """Build the :class:`InputError` for a missing file: its name, its role, what is there.

    ``what`` says what the file is for (e.g. ``"the Space Ranger count matrix"``); the message
    lists the files found in the nearest existing parent folder, so a misnamed file is obvious.
    """
    path = Path(path)
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    found = sorted(child.name + ("/" if child.is_dir() else "") for child in folder.iterdir())
    listing = name_list(found, limit=20)
    return InputError(
        f"{path}: {what} not found; {folder} holds: {listing or 'nothing'}. "
        "Check the path and the file name."
    )


TABLE_READ_ERRORS = (
    pd.errors.EmptyDataError,
    pd.errors.ParserError,
    UnicodeDecodeError,
    EOFError,
    OSError,  # includes gzip.BadGzipFile
    zlib.error,
)
"""What pandas raises for an empty, truncated, binary or malformed text table (gzipped or not)."""


def read_text_table(path: str | os.PathLike, what: str, **read_csv_options: object) -> pd.DataFrame:
    """``pandas.read_csv(path, **read_csv_options)``, with unreadable files as one-line errors.

    An empty file, a gzip cut short, binary data or a malformed row raise :class:`InputError`
    naming ``path`` and ``what`` the file is (e.g. ``"the spot table"``) instead of a pandas
    traceback.
    """
    try:
        return pd.read_csv(path, **read_csv_options)
    except pd.errors.EmptyDataError as error:
        raise InputError(f"{path}: {what} is empty ({error}).") from error
    except TABLE_READ_ERRORS as error:
        raise InputError(
            f"{path}: {what} cannot be read; is the file complete and a text table? ({error})"
        ) from error


def check_spots_inside_image(
    spatial_xy: np.ndarray,
    image_path: str | os.PathLike,
    image_scale: float,
    source: str,
    known_scales: dict[str, float] | None = None,
    fix: str = "pass the image the coordinates refer to (--image, image=)",
    tolerance: float = 0.02,
) -> None:
    """Raise :class:`InputError` when spot centres fall outside the image they refer to.

    Spot centres (``(n, 2)`` full-resolution pixels, x then y) are multiplied by
    ``image_scale`` and compared with the image's (width, height), read from the file header
    by :func:`stinfer.io.slide_image.open_slide`. A margin of ``tolerance`` times the image
    size absorbs spots that straddle the border. The usual cause is a scale mix-up (a
    downscaled PNG named as the full-resolution image), so the message names which of
    ``known_scales`` (label -> image pixels per full-resolution pixel, e.g. Visium's
    ``tissue_hires_scalef``) would make the spots fit; ``fix`` is the reader's advice.
    """
    from stinfer.io.slide_image import open_slide

    slide_image = open_slide(image_path)
    try:
        width, height = slide_image.dimensions
    finally:
        slide_image.close()
    scaled = np.asarray(spatial_xy, dtype=np.float64) * image_scale
    if scaled.size == 0:
        return
    low = scaled.min(axis=0)
    high = scaled.max(axis=0)
    margin = tolerance * np.array([width, height])
    if np.all(low >= -margin) and np.all(high <= np.array([width, height]) + margin):
        return
    full_high = high / image_scale
    in_image_pixels = (
        f" (x {image_scale:g} = {high[0]:.0f}, {high[1]:.0f} in image pixels)"
        if image_scale != 1.0
        else ""
    )
    message = (
        f"{source}: spot coordinates reach x={full_high[0]:.0f}, y={full_high[1]:.0f} "
        f"full-resolution pixels{in_image_pixels} but {Path(image_path).name} is "
        f"{width} x {height} px."
    )
    if low.min() < 0:
        message += f" Some coordinates are negative (min {low.min() / image_scale:.0f})."
    fitting = {
        label: scale
        for label, scale in (known_scales or {}).items()
        if scale != image_scale and np.all(full_high * scale <= np.array([width, height]) + margin)
    }
    if fitting:
        label = max(fitting, key=fitting.get)
        message += (
            " The coordinates look like full-resolution pixels but the image looks like "
            f"{label}; {fix}."
        )
    elif np.any(high > np.array([width, height]) + margin):
        ratio = max(high[0] / width, high[1] / height)
        message += (
            f" The spots reach about {ratio:.3g} times the image's size: the image is probably "
            "a downscaled copy, or the coordinates are in another unit or another image's "
            f"pixels; {fix}."
        )
    else:
        message += f" The coordinates are probably in another image's pixels; {fix}."
    raise InputError(message)

"""Read slides stored as AnnData ``.h5ad`` files: plain h5ad + image, and HEST-1k samples.

A plain h5ad slide needs raw counts (``X``, or ``layers["counts"]`` when ``X`` is normalised),
spot centres in full-resolution image pixels in ``obsm["spatial"]`` (x, y), and optionally an
image: named by the caller or recorded in ``uns["stinfer"]`` by an earlier stinfer run.

A HEST-1k sample (Jaume et al. 2024, ``MahmoodLab/hest``) is read from the dataset's folder
layout: ``st/<id>.h5ad`` (counts, ``obsm["spatial"]`` in the whole-slide image's level-0
pixels), ``wsis/<id>.tif`` (pyramidal TIFF) and ``metadata/<id>.json`` (pixel size, spot
size).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from stinfer.errors import InputError
from stinfer.io.scanpy_spatial import is_blank_canvas
from stinfer.io.slide_data import (
    check_spots_inside_image,
    make_slide,
    name_list,
    require_file,
    slide_meta,
)
from stinfer.io.slide_image import h5ad_image_reference, split_h5ad_image_reference
from stinfer.io.visium import VISIUM_SPOT_DIAMETER_UM

logger = logging.getLogger("stinfer")

HEST_PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")


def read_h5ad_slide(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    sample_id: str | None = None,
    pixel_size_um: float | None = None,
) -> ad.AnnData:
    """Read an ``.h5ad`` file holding one slide into a validated slide AnnData.

    Parameters
    ----------
    path
        The ``.h5ad`` file. It must hold raw integer counts in ``X`` (or, when ``X`` is not
        integer, in ``layers["counts"]``, which is then used and noted) and spot centres in
        ``obsm["spatial"]`` as ``(n_spots, 2)`` full-resolution pixels (x, y); the obs columns
        ``pxl_col_in_fullres``, ``pxl_row_in_fullres`` are accepted instead.
    image
        The full-resolution image the coordinates refer to (``image_scale`` 1.0). When
        omitted, ``uns["stinfer"]["image_path"]`` (with its ``image_scale``) is used when the
        file was written by stinfer; a relative path is taken relative to the h5ad's folder.
        Else, for a file written by scanpy (``sc.read_visium(...).write_h5ad``), the
        ``hires`` (else ``lowres``) image of ``uns["spatial"][<library>]["images"]`` inside
        the file, with ``image_scale = tissue_hires_scalef`` (``tissue_lowres_scalef``): the
        slide's ``image_path`` is then the reference ``"<file.h5ad>#uns/spatial/<library>/
        images/hires"`` (:func:`stinfer.io.slide_image.h5ad_image_reference`). A blank
        canvas (``metadata["blank_canvas"]``, what stinfer writes for a slide without an
        image, :mod:`stinfer.io.scanpy_spatial`) is not an image (noted). Without any of
        these the slide is counts-only.
    sample_id
        The slide's name; defaults to ``uns["stinfer"]["sample_id"]``, else the file name.
        When ``uns["spatial"]`` holds several libraries, the one named ``sample_id`` gives
        the image (none without it).
    pixel_size_um
        Microns per full-resolution pixel; defaults to ``uns["stinfer"]["pixel_size_um"]``.
        A file without ``uns["stinfer"]`` whose library looks like Visium (Space Ranger
        ``metadata``, or ``array_row``/``array_col`` on Visium's hexagonal grid) gets
        ``55 / spot_diameter_fullres`` (Visium spots are 55 um wide, as
        :func:`~stinfer.io.visium.read_visium` does); otherwise it stays unknown (noted).

    Returns
    -------
    AnnData
        See :mod:`stinfer.io.slide_data`. obs and var columns are carried over;
        ``uns["stinfer"]["spot_diameter_px"]`` comes from ``uns["stinfer"]`` or scanpy's
        ``uns["spatial"][<library>]["scalefactors"]["spot_diameter_fullres"]``. A scanpy
        file's library entry is kept as ``uns["spatial"]`` (written back unchanged by
        :func:`~stinfer.io.slide_data.prepare_for_h5ad`), unless it is incomplete or a
        blank canvas: :func:`~stinfer.io.slide_data.prepare_for_h5ad` then builds a new one
        from the slide as read (a blank canvas again for a counts-only slide).

    Raises
    ------
    InputError
        The file is missing or not an h5ad, there are no spot coordinates, the counts are not
        raw integers, names repeat, or the spots fall outside the image.
    """
    path = require_file(path, "the h5ad file")
    adata = _read_anndata(path)
    notes: list[str] = []
    meta = slide_meta(adata) if "stinfer" in adata.uns else {}
    if meta:
        notes.extend(str(note) for note in meta["notes"])

    library_id, library = (None, None) if meta else _scanpy_library(adata, sample_id, path, notes)
    image_scale = 1.0
    image_path: Path | str | None
    if image is not None:
        image_path = require_file(image, "the full-resolution image")
    elif meta.get("image_path"):
        image_path = _stored_image_path(meta["image_path"], path)
        image_scale = float(meta["image_scale"])
    elif library is not None and (found := _scanpy_image(library_id, library, path, notes)):
        image_path, image_scale = found
    else:
        image_path = None
        message = (
            "no image: none given, none recorded in uns['stinfer'] and none in "
            "uns['spatial']; counts-only slide."
        )
        notes.append(message)
        logger.info("%s: %s", path, message)
    if pixel_size_um is None:
        pixel_size_um = meta.get("pixel_size_um")
    if pixel_size_um is None and library is not None:
        pixel_size_um = _scanpy_visium_pixel_size(adata, library_id, library, notes)
    spot_diameter_px = meta.get("spot_diameter_px") or _scanpy_spot_diameter(adata)
    slide = slide_from_anndata(
        adata,
        source=str(path),
        source_format="h5ad",
        sample_id=sample_id or meta.get("sample_id") or path.stem,
        image_path=image_path,
        image_scale=image_scale,
        pixel_size_um=pixel_size_um,
        spot_diameter_px=spot_diameter_px,
        notes=notes,
        require_counts=meta.get("source_format") != "image",  # image-only slides have no genes
    )
    if library is not None and _complete_for_scanpy(library):
        slide.uns["spatial"] = {library_id: library}
    return slide


def read_hest(root: str | os.PathLike, sample_id: str) -> ad.AnnData:
    """Read one HEST-1k sample from a (partial) download of the dataset into a slide AnnData.

    Parameters
    ----------
    root
        The HEST-1k folder holding ``st/``, ``wsis/`` and ``metadata/``.
    sample_id
        The sample's id, e.g. ``"TENX95"``: reads ``st/<id>.h5ad``, ``metadata/<id>.json`` and,
        when present, ``wsis/<id>.tif`` (without it the slide is counts-only, with a note).

    Returns
    -------
    AnnData
        See :mod:`stinfer.io.slide_data`; ``obsm["spatial"]`` is HEST's, in the WSI's level-0
        pixels (``image_scale`` 1.0). ``pixel_size_um`` is the metadata's
        ``pixel_size_um_estimated`` (HEST's own estimate from the spot spacing), else
        ``pixel_size_um_embedded`` (from the image file); ``spot_diameter_px`` is the
        metadata's ``spot_diameter`` (microns) divided by the pixel size, else its
        ``spot_diameter_fullres`` (pixels).

    Raises
    ------
    InputError
        A file is missing, the metadata has no usable pixel size, or the h5ad fails the checks
        of :func:`read_h5ad_slide`.
    """
    root = require_file(root, "the HEST-1k folder")
    st_path = require_file(
        root / "st" / f"{sample_id}.h5ad", f"the HEST expression file of {sample_id}"
    )
    metadata_path = require_file(
        root / "metadata" / f"{sample_id}.json", f"the HEST metadata of {sample_id}"
    )
    metadata = _read_json(metadata_path)
    pixel_size_um, pixel_size_key = _hest_pixel_size(metadata, metadata_path)
    notes = [f"pixel_size_um = {pixel_size_um:g} from {metadata_path.name}:{pixel_size_key}."]
    spot_diameter_px = _hest_spot_diameter_px(metadata, pixel_size_um)

    image_path: Path | None = root / "wsis" / f"{sample_id}.tif"
    if not image_path.is_file():
        message = f"no image: {image_path} not found; counts-only slide."
        notes.append(message)
        logger.warning("%s: %s", st_path, message)
        image_path = None
    return slide_from_anndata(
        _read_anndata(st_path),
        source=str(st_path),
        source_format="hest",
        sample_id=sample_id,
        image_path=image_path,
        image_scale=1.0,
        pixel_size_um=pixel_size_um,
        spot_diameter_px=spot_diameter_px,
        notes=notes,
    )


def slide_from_anndata(
    adata: ad.AnnData,
    *,
    source: str,
    source_format: str,
    sample_id: str,
    image_path: Path | str | None,
    image_scale: float,
    pixel_size_um: float | None,
    spot_diameter_px: float | None,
    notes: list[str],
    require_counts: bool = True,
) -> ad.AnnData:
    """Rebuild ``adata`` as a validated slide: raw counts, spot coordinates, metadata.

    The obs columns (``array_row``/``array_col`` as grid coordinates) and var columns of
    ``adata`` are carried over; its other slots (``uns``, ``obsm`` beyond ``spatial``,
    ``layers``) are not, since they describe a different analysis state.
    """
    counts = raw_counts(adata, source, notes)
    spatial_xy = spot_coordinates(adata, source, notes)
    if image_path is not None:
        check_spots_inside_image(spatial_xy, image_path, image_scale, source)
    grid = {
        column: adata.obs[column].to_numpy()
        for column in ("array_row", "array_col")
        if column in adata.obs.columns
    }
    extra_obs = adata.obs.drop(columns=list(grid))
    slide = make_slide(
        counts,
        adata.obs_names,
        adata.var_names,
        spatial_xy,
        sample_id=sample_id,
        source_format=source_format,
        source=source,
        array_row=grid.get("array_row"),
        array_col=grid.get("array_col"),
        image_path=None if image_path is None else _absolute_image_path(image_path),
        image_scale=image_scale,
        pixel_size_um=pixel_size_um,
        spot_diameter_px=spot_diameter_px,
        notes=notes,
        obs_columns=extra_obs if len(extra_obs.columns) else None,
        require_counts=require_counts,
    )
    for column in adata.var.columns:
        slide.var[column] = adata.var[column].to_numpy()
    return slide


def raw_counts(adata: ad.AnnData, source: str, notes: list[str]) -> sp.spmatrix | np.ndarray:
    """Return the raw count matrix: ``X`` when it holds whole numbers, else ``layers["counts"]``.

    A normalised or log-transformed ``X`` is common in shared h5ad files; the raw counts are
    then conventionally kept in ``layers["counts"]``. The returned matrix is checked for
    negative, non-finite or fractional values by :func:`~stinfer.io.slide_data.make_slide`.
    """
    if adata.X is None:
        if "counts" in adata.layers:
            notes.append("X is empty: raw counts taken from layers['counts'].")
            return adata.layers["counts"]
        raise InputError(f"{source}: X is empty and there is no layers['counts'] with raw counts.")
    if _is_whole(adata.X):
        return adata.X
    if "counts" in adata.layers:
        message = "X is not integer (normalised?): raw counts taken from layers['counts']."
        notes.append(message)
        logger.info("%s: %s", source, message)
        return adata.layers["counts"]
    raise InputError(
        f"{source}: X holds non-integer values and there is no layers['counts']; stinfer needs "
        "raw UMI counts: store them in X or in layers['counts']."
    )


def spot_coordinates(adata: ad.AnnData, source: str, notes: list[str]) -> np.ndarray:
    """Return ``(n_spots, 2)`` spot centres (x, y) in full-resolution pixels.

    From ``obsm["spatial"]``, else from the Space Ranger obs columns ``pxl_col_in_fullres``
    (x) and ``pxl_row_in_fullres`` (y), as HEST and some converters store them.
    """
    if "spatial" in adata.obsm:
        spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if spatial.ndim != 2 or spatial.shape[1] != 2:
            raise InputError(
                f"{source}: obsm['spatial'] has shape {spatial.shape}; expected (n_spots, 2) "
                "spot centres (x, y) in full-resolution pixels."
            )
        return spatial
    columns = ["pxl_col_in_fullres", "pxl_row_in_fullres"]
    if set(columns) <= set(adata.obs.columns):
        notes.append(
            "no obsm['spatial']: spot centres from obs pxl_col_in_fullres, pxl_row_in_fullres."
        )
        return adata.obs[columns].to_numpy(np.float64)
    raise InputError(
        f"{source}: no spot coordinates: obsm has no 'spatial' (obsm holds: "
        f"{', '.join(adata.obsm.keys()) or 'nothing'}). Store the spot centres as "
        "obsm['spatial'] = (x, y) in full-resolution image pixels."
    )


def _anndata_read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged .h5ad raises: h5py reports broken HDF5 structures (a file cut
    short, overwritten bytes) as OSError or RuntimeError ("bad symbol table node signature"),
    anndata a corrupted encoding attribute as its IORegistryError (a bare Exception subclass,
    not public API: looked up defensively)."""
    errors: tuple[type[BaseException], ...] = (
        OSError,
        RuntimeError,
        KeyError,
        ValueError,
        TypeError,
        EOFError,
    )
    try:
        from anndata._io.specs.registry import IORegistryError
    except ImportError:
        return errors
    return (*errors, IORegistryError)


def _read_anndata(path: Path) -> ad.AnnData:
    try:
        return ad.read_h5ad(path)
    except _anndata_read_errors() as error:
        raise InputError(
            f"{path}: cannot be read as an AnnData h5ad file; is it complete? ({error})"
        ) from error


def _is_whole(matrix: sp.spmatrix | np.ndarray) -> bool:
    """True when every stored value is a whole number (NaN and negatives are left to make_slide)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.dtype.kind in "iub":
        return True
    finite = values[np.isfinite(values)]
    return bool(np.all(finite == np.round(finite)))


def _stored_image_path(stored: str, h5ad_path: Path) -> Path | str:
    """Resolve ``uns["stinfer"]["image_path"]``; a relative path is relative to the h5ad.

    An image reference (``"<file.h5ad>#uns/..."``) is resolved the same way on its file part
    and returned as a reference.
    """
    reference = split_h5ad_image_reference(stored)
    image_path = Path(stored) if reference is None else reference[0]
    if not image_path.is_absolute() and not image_path.exists():
        image_path = h5ad_path.parent / image_path
    if not image_path.is_file():
        raise InputError(
            f"{h5ad_path}: uns['stinfer']['image_path'] names {stored}, which does not exist; "
            "pass the image again: `stinfer prepare --format h5ad --path THIS.h5ad --image "
            "IMAGE` (image= of read_h5ad_slide)."
        )
    return image_path if reference is None else h5ad_image_reference(image_path, reference[1])


def _absolute_image_path(image_path: Path | str) -> str:
    """The absolute path of an image file, or of the .h5ad of an image reference."""
    reference = split_h5ad_image_reference(image_path)
    if reference is not None:
        return h5ad_image_reference(*reference)
    return str(Path(image_path).resolve())


def _scanpy_library(
    adata: ad.AnnData, sample_id: str | None, path: Path, notes: list[str]
) -> tuple[str | None, dict | None]:
    """``(library_id, entry)`` of scanpy's ``uns["spatial"]``, or ``(None, None)``.

    The only library, or the one named ``sample_id`` when there are several (scanpy's own
    plots need one library too).
    """
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, Mapping) or not libraries:
        return None, None
    if len(libraries) > 1 and sample_id not in libraries:
        message = (
            f"uns['spatial'] holds {len(libraries)} libraries ({name_list(list(libraries))}); "
            "none used: pass sample_id=<library> to take its image and scale factors."
        )
        notes.append(message)
        logger.warning("%s: %s", path, message)
        return None, None
    library_id = sample_id if len(libraries) > 1 else next(iter(libraries))
    library = libraries[library_id]
    if not isinstance(library, Mapping):
        return None, None
    return str(library_id), dict(library)


def _complete_for_scanpy(library: Mapping) -> bool:
    """True when the library entry is worth keeping: a slide image ``sc.pl.spatial`` can draw.

    It needs a ``hires`` or ``lowres`` image with its ``tissue_*_scalef`` and a
    ``spot_diameter_fullres``, and must not be a blank canvas (which would stand in for an
    image given with ``image=``); an entry that fails is not kept, and
    :func:`~stinfer.io.slide_data.prepare_for_h5ad` builds a full one on writing.
    """
    if is_blank_canvas(library):
        return False
    images = library.get("images") or {}
    scalefactors = library.get("scalefactors") or {}
    has_image = any(
        key in images and _positive_number(scalefactors.get(f"tissue_{key}_scalef"))
        for key in ("hires", "lowres")
    )
    return has_image and _positive_number(scalefactors.get("spot_diameter_fullres")) is not None


def _scanpy_image(
    library_id: str, library: Mapping, path: Path, notes: list[str]
) -> tuple[str, float] | None:
    """``(image reference, image_scale)`` of the library's hires (else lowres) image, or None.

    None for a blank canvas (:func:`~stinfer.io.scanpy_spatial.is_blank_canvas`), noted.
    """
    if is_blank_canvas(library):
        notes.append(
            f"uns['spatial'][{library_id!r}] holds a blank canvas (metadata blank_canvas), "
            "not a slide image: not used as one."
        )
        return None
    images = library.get("images") or {}
    scalefactors = library.get("scalefactors") or {}
    for key in ("hires", "lowres"):
        scale = _positive_number(scalefactors.get(f"tissue_{key}_scalef"))
        if key in images and scale is not None:
            notes.append(
                f"image: uns['spatial'][{library_id!r}]['images'][{key!r}] of this file "
                f"(image_scale = tissue_{key}_scalef = {scale:g}); no full-resolution image."
            )
            return h5ad_image_reference(path, f"uns/spatial/{library_id}/images/{key}"), scale
    return None


def _scanpy_visium_pixel_size(
    adata: ad.AnnData, library_id: str, library: Mapping, notes: list[str]
) -> float | None:
    """``55 / spot_diameter_fullres`` when the library looks like Visium, else None (noted).

    Visium is recognised by Space Ranger's ``metadata`` (``chemistry_description``, or a
    ``software_version`` starting with ``spaceranger``; Visium HD, whose "spots" are bins,
    excluded) or by ``array_row``/``array_col`` on Visium's hexagonal grid (every
    ``array_row + array_col`` even, rows of both parities).
    """
    metadata = library.get("metadata") or {}
    chemistry = str(metadata.get("chemistry_description", ""))
    space_ranger = "chemistry_description" in metadata or str(
        metadata.get("software_version", "")
    ).lower().startswith("spaceranger")
    is_hd = re.search(r"\bHD\b", chemistry, flags=re.IGNORECASE) is not None
    is_visium = (space_ranger or _visium_hex_grid(adata)) and not is_hd
    diameter = _positive_number((library.get("scalefactors") or {}).get("spot_diameter_fullres"))
    if is_visium and diameter is not None:
        pixel_size_um = VISIUM_SPOT_DIAMETER_UM / diameter
        notes.append(
            f"pixel_size_um = {pixel_size_um:.4g}: {VISIUM_SPOT_DIAMETER_UM:g} um Visium spots / "
            f"uns['spatial'][{library_id!r}] spot_diameter_fullres {diameter:g} px."
        )
        return pixel_size_um
    notes.append(
        "pixel size unknown: no uns['stinfer']['pixel_size_um'] and uns['spatial'] does not "
        "look like Visium (no Space Ranger metadata, no hexagonal array grid); pass "
        "pixel_size_um."
    )
    return None


def _visium_hex_grid(adata: ad.AnnData) -> bool:
    """True when obs ``array_row``/``array_col`` form Visium's hexagonal grid."""
    if not {"array_row", "array_col"} <= set(adata.obs.columns) or adata.n_obs < 2:
        return False
    try:
        rows = adata.obs["array_row"].to_numpy(np.int64)
        cols = adata.obs["array_col"].to_numpy(np.int64)
    except (TypeError, ValueError):
        return False
    return bool(np.all((rows + cols) % 2 == 0) and np.any(rows % 2 == 1) and np.any(rows % 2 == 0))


def _scanpy_spot_diameter(adata: ad.AnnData) -> float | None:
    """``spot_diameter_fullres`` from scanpy's ``uns["spatial"]``, when exactly one library has it."""
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict):
        return None
    diameters = {
        float(library["scalefactors"]["spot_diameter_fullres"])
        for library in libraries.values()
        if isinstance(library, dict) and "spot_diameter_fullres" in library.get("scalefactors", {})
    }
    return diameters.pop() if len(diameters) == 1 else None


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object of metadata fields.")
    return content


def _positive_number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _hest_pixel_size(metadata: dict, path: Path) -> tuple[float, str]:
    for key in HEST_PIXEL_SIZE_KEYS:
        pixel_size = _positive_number(metadata.get(key))
        if pixel_size is not None:
            return pixel_size, key
    raise InputError(
        f"{path}: no pixel size: {' and '.join(HEST_PIXEL_SIZE_KEYS)} are missing or not "
        f"positive (keys found: {', '.join(sorted(metadata)) or 'none'}). Add the microns per "
        "pixel of the WSI under pixel_size_um_estimated."
    )


def _hest_spot_diameter_px(metadata: dict, pixel_size_um: float) -> float | None:
    diameter_um = _positive_number(metadata.get("spot_diameter"))
    if diameter_um is not None:
        return diameter_um / pixel_size_um
    return _positive_number(metadata.get("spot_diameter_fullres"))

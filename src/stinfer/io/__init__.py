"""Readers: slide files -> validated slide AnnData (see :mod:`stinfer.io.slide_data`).

One reader per format, all ending in :func:`~stinfer.io.slide_data.make_slide`:

- :func:`read_visium`: a 10x Space Ranger output folder;
- :func:`read_visium_hd`: one bin size of a 10x Space Ranger Visium HD output;
- :func:`read_legacy_st`: a legacy ST section (HER2ST layout: count table + spot table);
- :func:`read_h5ad_slide`: a plain ``.h5ad`` with ``obsm["spatial"]`` and an image path;
- :func:`read_hest`: one HEST-1k sample;
- :func:`read_image_slide`: an H&E image alone (no counts): virtual spots over the detected
  tissue (:mod:`stinfer.io.image_only`).

:func:`read_slide` picks the reader by format name, for the CLI and configuration files.

Writing: :func:`~stinfer.io.slide_data.prepare_for_h5ad` readies every slide or prediction
for ``.h5ad``, adding scanpy/squidpy's ``uns["spatial"]`` (downsampled images, scale factors,
spot size; :mod:`stinfer.io.scanpy_spatial`), so written files open in ``sc.pl.spatial``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import anndata as ad

from stinfer.errors import InputError
from stinfer.io.h5ad import read_h5ad_slide, read_hest
from stinfer.io.image_only import read_image_slide
from stinfer.io.legacy_st import read_legacy_st
from stinfer.io.slide_data import make_slide, prepare_for_h5ad, slide_meta
from stinfer.io.visium import read_visium
from stinfer.io.visium_hd import read_visium_hd

READERS: dict[str, Callable[..., ad.AnnData]] = {
    "visium": read_visium,
    "visium-hd": read_visium_hd,
    "legacy-st": read_legacy_st,
    "h5ad": read_h5ad_slide,
    "hest": read_hest,
    "image": read_image_slide,
}


def read_slide(format: str, **kwargs: object) -> ad.AnnData:
    """Read a slide with the reader of ``format`` (one of :data:`READERS`).

    Parameters
    ----------
    format
        ``"visium"``, ``"visium-hd"``, ``"legacy-st"``, ``"h5ad"``, ``"hest"`` or ``"image"``
        (case-insensitive; ``_`` may stand for ``-``).
    **kwargs
        The reader's arguments, e.g. ``read_slide("visium", path="outs", image="he.tif")``.

    Raises
    ------
    InputError
        The format is unknown, or an argument is missing or not accepted by the reader (the
        message lists the reader's arguments).
    """
    name = str(format).strip().lower().replace("_", "-")
    if name not in READERS:
        raise InputError(f"unknown slide format {format!r}; choose one of {', '.join(READERS)}.")
    reader = READERS[name]
    signature = inspect.signature(reader)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise InputError(
            f"format {name!r}: {error}; the reader takes {', '.join(signature.parameters)}."
        ) from error
    return reader(**kwargs)


__all__ = [
    "READERS",
    "make_slide",
    "prepare_for_h5ad",
    "read_h5ad_slide",
    "read_hest",
    "read_image_slide",
    "read_legacy_st",
    "read_slide",
    "read_visium",
    "read_visium_hd",
    "slide_meta",
]

"""Robustness to image quality: the blue shift of STEvs Appendix J.1 and degraded H&E images.

Blue shift. :func:`blue_shift` applies ``P' = clip(P + 255 * [-alpha, -alpha, +alpha], 0, 255)``
to 0-255 RGB patches; :func:`blue_shift_sweep` predicts the test slides of a trained model with
their patches shifted by each ``alpha`` in {0, 0.1, ..., 0.8} (the shift touches test images
only: the model was trained on the originals) and evaluates every prediction. Models receive the
shifted patches through ``predict(slide, patches=...)``
(:class:`stinfer.evaluate.protocols.ExpressionModel`); models that do not look at the image give
the same prediction at every ``alpha``.

Degraded images (issue 14). :class:`ImageDegradation` describes how a cohort's H&E images are
made worse before anything reads them (for training and testing alike): a coarser scan (Space
Ranger's low-resolution image, 10-15 um per pixel), a blurred one, and stain that varies between
sections. :func:`degrade_slide_image` writes the degraded image of one slide next to the
benchmark's data and returns the slide pointing to it; the image keeps the original pixel grid,
so spot coordinates, pixel sizes and patch specs stay valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.errors import InputError
from stinfer.evaluate.protocols import ExpressionModel, strip_counts
from stinfer.io.slide_data import image_pixel_size_um, slide_id, slide_meta
from stinfer.io.slide_image import image_source_file

logger = logging.getLogger("stinfer")

__all__ = [
    "BLUE_SHIFT_ALPHAS",
    "BLUE_SHIFT_DIRECTION",
    "ImageDegradation",
    "blue_shift",
    "blue_shift_sweep",
    "degrade_image",
    "degrade_slide_image",
    "model_patch_spec",
    "stain_lookup_tables",
]

BLUE_SHIFT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * step, 1) for step in range(9))
"""alpha = 0, 0.1, ..., 0.8 (issue 4; the paper sweeps 0.1-1.0, beyond 0.8 little colour is left)."""

BLUE_SHIFT_DIRECTION = np.array([-1.0, -1.0, 1.0])  # STEvs Eq. 40: less red and green, more blue


def blue_shift(patches: np.ndarray, alpha: float, channel_axis: int = -3) -> np.ndarray:
    """Spectral blue shift of RGB images (STEvs Appendix J.1, Eq. 40).

    ``P' = clip(P + 255 * alpha * [-1, -1, +1], 0, 255)``, rounded to the nearest integer.

    Parameters
    ----------
    patches
        uint8 RGB on the 0-255 scale with the channels on ``channel_axis`` (default ``-3``:
        ``(n, 3, H, W)`` patches or one ``(3, H, W)`` patch; use ``-1`` for ``(H, W, 3)``).
    alpha
        Shift intensity, >= 0; 0 returns an unchanged copy.

    Returns
    -------
    numpy.ndarray
        uint8, same shape; the input is not modified.
    """
    patches = np.asarray(patches)
    if patches.dtype != np.uint8:
        raise InputError(f"blue_shift expects uint8 RGB (0-255), got {patches.dtype}.")
    if patches.ndim == 0 or patches.shape[channel_axis] != 3:
        raise InputError(
            f"blue_shift needs 3 colour channels on axis {channel_axis}, got {patches.shape}."
        )
    if not alpha >= 0:
        raise InputError(f"blue shift alpha must be >= 0, got {alpha}.")
    shape = [1] * patches.ndim
    shape[channel_axis] = 3
    offset = (255.0 * alpha * BLUE_SHIFT_DIRECTION).astype(np.float32).reshape(shape)
    shifted = np.clip(patches.astype(np.float32) + offset, 0.0, 255.0)
    return np.rint(shifted).astype(np.uint8)


def model_patch_spec(model: ExpressionModel) -> PatchSpec:
    """The :class:`PatchSpec` in the model's ``config`` (searched through nested dataclasses).

    Baselines keep it in ``config.patch``, STEvs in ``config.training.patch``; a model without
    one gets the default spec.
    """
    pending = [getattr(model, "config", None)]
    while pending:
        config = pending.pop(0)
        if isinstance(config, PatchSpec):
            return config
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            pending.extend(getattr(config, f.name) for f in dataclasses.fields(config))
    return PatchSpec()


def blue_shift_sweep(
    model: ExpressionModel,
    test_slides: Sequence[ad.AnnData] | Mapping[str, ad.AnnData],
    genes: Sequence[str],
    alphas: Sequence[float] = BLUE_SHIFT_ALPHAS,
    *,
    model_name: str | None = None,
    patches: Mapping[str, np.ndarray] | None = None,
    patch_spec: PatchSpec | None = None,
) -> pd.DataFrame:
    """Evaluate a trained model on blue-shifted test images, one row per (test slide, alpha).

    Parameters
    ----------
    model
        A trained model (``train()`` already called).
    test_slides
        Slides with true counts (ids from ``uns["stinfer"]["sample_id"]``) or a dict id ->
        slide; the model sees them only through :func:`~stinfer.evaluate.protocols.strip_counts`.
    genes
        The evaluated genes.
    alphas
        Shift intensities; default :data:`BLUE_SHIFT_ALPHAS`.
    patches
        Optional original patches per slide id (``(n_spots, 3, H, W)`` uint8); default extracted
        once per slide with ``patch_spec`` (default: :func:`model_patch_spec`).

    Returns
    -------
    pandas.DataFrame
        Columns ``model, test_slice, alpha``, every scalar metric of
        :func:`~stinfer.metrics.evaluate_expression` and ``predict_seconds``.
    """
    from stinfer.metrics import evaluate_anndata

    if isinstance(test_slides, Mapping):
        by_id = {str(k): v for k, v in test_slides.items()}
    else:
        by_id = {slide_id(slide): slide for slide in test_slides}
    genes = [str(gene) for gene in genes]
    spec = patch_spec or model_patch_spec(model)
    name = model_name or type(model).__name__
    rows = []
    for test_name, slide in by_id.items():
        original = (patches or {}).get(test_name)
        if original is None:
            original = spot_patches(slide, spec)
        stripped = strip_counts(slide)
        truth = slide[:, genes]
        for alpha in alphas:
            shifted = blue_shift(original, alpha)
            start = time.perf_counter()
            prediction = model.predict(stripped, patches=shifted)
            seconds = time.perf_counter() - start
            metrics = evaluate_anndata(prediction, truth).summary()
            logger.info(
                "blue shift %s alpha %.2f: median PCC %.3f", test_name, alpha, metrics["pcc_median"]
            )
            rows.append(
                {
                    "model": name,
                    "test_slice": test_name,
                    "alpha": float(alpha),
                    **metrics,
                    "predict_seconds": seconds,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- degraded images
DEGRADED_JPEG_QUALITY = 95  # high enough that compression adds ~1 grey level, not texture
JPEG_MAX_SIDE_PX = 65_535  # the JPEG format's limit on width and height


@dataclass
class ImageDegradation:
    """How a cohort's H&E images are degraded before any model reads them (issue 14).

    The steps run in this order; each default means "no change", so an empty mapping only
    re-encodes the image as JPEG.

    1. ``pixel_size_um``: area-average the image down to this many microns per pixel, then
       enlarge it back (bilinear) to the original pixel grid. A Space Ranger
       ``tissue_lowres_image`` has about 10-15 um per pixel (a 55-um spot ~4 px wide); HER2ST's
       legacy ST JPEGs have ~0.69. A target finer than the file changes nothing.
    2. ``blur_sigma_um``: Gaussian blur whose standard deviation is this many microns (Pillow's
       ``GaussianBlur`` with ``radius`` = the sigma in file pixels; Pillow approximates the
       Gaussian by three box blurs).
    3. ``stain_variation``: each RGB channel's optical density ``OD = -log((I + 1) / 256)`` is
       multiplied by ``exp(N(0, stain_variation))``, one gain per channel drawn per section,
       as stain strength and scanner colour vary between sections (white stays white).

    ``seed`` makes the stain draw reproducible: section ``k`` of a cohort (its index in config
    order) uses ``numpy.random.default_rng([seed, k])``, so sections differ from each other
    but the same cohort gives the same images on every run.
    """

    pixel_size_um: float | None = None  # microns per pixel to emulate, e.g. 12.7 (Visium low-res)
    blur_sigma_um: float = 0.0  # Gaussian standard deviation, microns
    stain_variation: float = 0.0  # standard deviation of the log optical-density gain
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pixel_size_um is not None:
            self.pixel_size_um = _checked_number("pixel_size_um", self.pixel_size_um, positive=True)
        self.blur_sigma_um = _checked_number("blur_sigma_um", self.blur_sigma_um)
        self.stain_variation = _checked_number("stain_variation", self.stain_variation)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise InputError(f"image_degradation.seed must be an integer, got {self.seed!r}.")
        if self.seed < 0:
            raise InputError(f"image_degradation.seed must be >= 0, got {self.seed}.")
        self.seed = int(self.seed)

    @property
    def needs_pixel_size(self) -> bool:
        """Whether a step is given in microns (the slide's pixel size must then be known)."""
        return self.pixel_size_um is not None or self.blur_sigma_um > 0


def _checked_number(name: str, value: object, positive: bool = False) -> float:
    """``value`` as a float after checking it is a finite number, > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(f"image_degradation.{name} must be a number, got {value!r}.")
    number = float(value)
    if not np.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise InputError(f"image_degradation.{name} must be a finite number {bound}, got {value}.")
    return number


def degrade_image(
    pixels: np.ndarray,
    degradation: ImageDegradation,
    pixel_size_um: float | None,
    section_index: int,
) -> np.ndarray:
    """Apply :class:`ImageDegradation` to one RGB image: resolution, then blur, then stain.

    Parameters
    ----------
    pixels
        ``(height, width, 3)`` uint8 RGB.
    degradation
        What to do; see :class:`ImageDegradation`.
    pixel_size_um
        Microns per pixel of ``pixels``; needed when the resolution or blur step is used.
    section_index
        The section's index in its cohort, which picks its stain draw.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` uint8 RGB on the same pixel grid; the input is not modified.
    """
    from PIL import Image, ImageFilter

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InputError(
            f"degrade_image expects (height, width, 3) uint8 RGB, got {pixels.dtype} "
            f"{pixels.shape}."
        )
    if degradation.needs_pixel_size and pixel_size_um is None:
        raise InputError(
            "degrade_image: the image's pixel size is unknown, and pixel_size_um / "
            "blur_sigma_um are in microns."
        )
    image = Image.fromarray(pixels)
    if degradation.pixel_size_um is not None:
        image = _coarsen(image, degradation.pixel_size_um / pixel_size_um)
    if degradation.blur_sigma_um > 0:
        image = image.filter(ImageFilter.GaussianBlur(degradation.blur_sigma_um / pixel_size_um))
    if degradation.stain_variation > 0:
        tables = stain_lookup_tables(degradation.stain_variation, degradation.seed, section_index)
        image = image.point(tables.ravel().tolist())  # an RGB image takes 3 x 256 entries
    return np.array(image, dtype=np.uint8)


def _coarsen(image, factor: float):
    """Area-average a PIL image down by ``factor`` (> 1), then enlarge it back (bilinear)."""
    from PIL import Image

    if factor <= 1:
        logger.info("image degradation: target pixel size is finer than the image; unchanged.")
        return image
    width, height = image.size
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    reduced = image.resize(small, Image.Resampling.BOX)
    return reduced.resize((width, height), Image.Resampling.BILINEAR)


def stain_lookup_tables(variation: float, seed: int, section_index: int) -> np.ndarray:
    """Per-channel 0-255 lookup tables that scale each channel's optical density.

    ``OD = -log((I + 1) / 256)`` is multiplied by ``g_c = exp(N(0, variation))`` for channel
    ``c`` (three gains drawn with ``numpy.random.default_rng([seed, section_index])``), and
    ``I' = 256 * exp(-g_c * OD) - 1`` is rounded and clipped to 0-255. A gain above 1 darkens
    the channel (more stain), below 1 lightens it; 255 (no stain) stays 255.

    Returns
    -------
    numpy.ndarray
        ``(3, 256)`` uint8: row ``c`` maps channel ``c``'s old value to its new value.
    """
    gains = np.exp(np.random.default_rng([seed, section_index]).normal(0.0, variation, 3))
    optical_density = -np.log((np.arange(256.0) + 1.0) / 256.0)
    tables = 256.0 * np.exp(-gains[:, None] * optical_density[None, :]) - 1.0
    return np.clip(np.rint(tables), 0, 255).astype(np.uint8)


def degrade_slide_image(
    slide: ad.AnnData,
    degradation: ImageDegradation,
    index: int,
    out_dir: str | Path,
) -> ad.AnnData:
    """A copy of ``slide`` whose H&E image is degraded by ``degradation`` (see its class).

    The slide's whole image is read once, degraded by :func:`degrade_image` on the file's own
    pixel grid and written as a JPEG (quality 95, no chroma subsampling) into ``out_dir`` as
    ``<sample id>-<hash>.jpg``, atomically. The hash covers the degradation, ``index``, the
    pixel size and the source image's path, size and modification time, so a file that already
    exists is the same result and is reused without reading the source again.

    Parameters
    ----------
    slide
        A slide with an image (``uns["stinfer"]["image_path"]``). Its microns per file pixel,
        ``pixel_size_um / image_scale``, must be known when a step is given in microns.
    degradation
        What to do to the image.
    index
        The slide's position in its cohort (0, 1, ...): section ``index`` gets its own stain
        draw.
    out_dir
        Folder for the degraded images (created when missing).

    Returns
    -------
    anndata.AnnData
        A copy whose ``uns["stinfer"]["image_path"]`` is the degraded JPEG; everything else,
        including ``image_scale`` and the coordinates, is unchanged. ``slide`` is not modified.

    Raises
    ------
    InputError
        When the slide has no image, its image is missing, or its pixel size is unknown and
        needed.
    """
    meta = slide_meta(slide)
    name = slide_id(slide)
    if meta["image_path"] is None:
        raise InputError(f"slide {name!r} has no image (uns['stinfer']['image_path']) to degrade.")
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise InputError(f"slide {name!r}: the section index must be an integer >= 0, got {index}.")
    source = Path(meta["image_path"]).resolve()
    try:
        stat = image_source_file(source).stat()
    except FileNotFoundError as error:
        raise InputError(
            f"slide {name!r}: image {source} not found; check uns['stinfer']['image_path']."
        ) from error
    file_pixel_size_um = image_pixel_size_um(slide)
    if degradation.needs_pixel_size and file_pixel_size_um is None:
        raise InputError(
            f"slide {name!r}: its pixel size is unknown (uns['stinfer']['pixel_size_um'] is "
            "missing), but image_degradation.pixel_size_um / blur_sigma_um are in microns; "
            "give the slide's pixel size (`pixel_size_um:` in a legacy-st cohort's slide "
            "entry, or `stinfer prepare --pixel-size-um` for an .h5ad slide) or use only "
            "stain_variation."
        )
    key = json.dumps(
        {
            "degradation": dataclasses.asdict(degradation),
            "section_index": int(index),
            "file_pixel_size_um": file_pixel_size_um,
            "source": [str(source), stat.st_size, stat.st_mtime_ns],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe_name = "".join(c if c.isalnum() or c in "._+-" else "-" for c in name)
    path = Path(out_dir).resolve() / f"{safe_name}-{digest}.jpg"
    if path.is_file():
        logger.info("slide %s: reusing degraded image %s", name, path)
    else:
        _write_degraded_image(source, path, degradation, file_pixel_size_um, int(index), name)
    degraded = slide.copy()
    degraded.uns["stinfer"] = {**degraded.uns["stinfer"], "image_path": str(path)}
    degraded.uns.pop("spatial", None)  # scanpy's images are rebuilt from the degraded image
    return degraded


def _write_degraded_image(
    source: Path,
    path: Path,
    degradation: ImageDegradation,
    pixel_size_um: float | None,
    index: int,
    name: str,
) -> None:
    from PIL import Image

    from stinfer.io.atomic import atomic_output
    from stinfer.io.slide_image import open_slide

    start = time.perf_counter()
    with open_slide(source) as slide_image:
        width, height = slide_image.dimensions
        if max(width, height) > JPEG_MAX_SIDE_PX:
            raise InputError(
                f"slide {name!r}: {source.name} is {width} x {height} px, beyond the "
                f"{JPEG_MAX_SIDE_PX}-px side a JPEG can hold; degrade a downscaled copy instead."
            )
        pixels = slide_image.read_level_region(0, 0, width, height)
    degraded = degrade_image(pixels, degradation, pixel_size_um, index)
    del pixels
    # the content depends only on the key in the name, so a concurrent writer's file is equal
    with atomic_output(path, overwrite=True) as tmp:
        Image.fromarray(degraded).save(
            tmp, format="JPEG", quality=DEGRADED_JPEG_QUALITY, subsampling=0
        )
    logger.info(
        "slide %s: degraded image written to %s in %.1f s", name, path, time.perf_counter() - start
    )

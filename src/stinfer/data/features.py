"""Per-spot image features for the feature-probe baselines (HEST-Benchmark style).

Every extractor takes patches as ``(n_spots, 3, height, width)`` uint8 RGB (what
:func:`stinfer.data.patches.spot_patches` returns), or an iterable of such chunks (what
:func:`stinfer.data.patches.iter_spot_patches` yields), and returns ``(n_spots, n_features)``
float32. Work is vectorised over a chunk of patches and chunks are processed one at a time, so
memory is bounded by ``chunk_size`` patches whatever the slide size.

- :func:`color_statistics`: per-channel mean and standard deviation (6 features), the cheap
  probe whose ridge regression any learned image encoder must beat (issue 3; its scores on
  HER2ST patient C are in ``docs/results.md`` "Colour-statistics probe");
- :func:`handcrafted_features`: colour percentiles, grey-level gradient (texture) statistics and
  hematoxylin/eosin channel statistics by colour deconvolution (:func:`rgb_to_hed`);
- :func:`backbone_features`: pooled features of a frozen timm backbone (``num_classes=0``,
  built by :func:`stinfer.nn.encoders.create_backbone`, the project's one backbone factory),
  inputs scaled as the backbone's timm data config says.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

__all__ = [
    "HANDCRAFTED_FEATURE_NAMES",
    "RGB_FROM_HED",
    "backbone_features",
    "backbone_input",
    "color_statistics",
    "handcrafted_features",
    "rgb_to_hed",
]

Patches = np.ndarray | Iterable[np.ndarray]

# Ruifrok & Johnston (2001), "Quantification of histochemical staining by color deconvolution",
# Anal. Quant. Cytol. Histol. 23(4): optical-density vectors of hematoxylin, eosin and DAB (rows),
# the values scikit-image uses in ``skimage.color.rgb2hed``.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_FLOOR = 1e-6  # smallest intensity (fraction of 255) before the log, as in scikit-image

_PERCENTILES = (10, 25, 50, 75, 90)
_GRADIENT_PERCENTILES = (50, 90)
_TISSUE_GREY_MAX = 220  # grey level below which a pixel counts as tissue (not white glass)


def _feature_names() -> tuple[str, ...]:
    names = [f"{c}_mean" for c in "rgb"] + [f"{c}_sd" for c in "rgb"]
    names += [f"{c}_p{q}" for c in "rgb" for q in _PERCENTILES]
    names += ["gradient_mean", "gradient_sd"] + [f"gradient_p{q}" for q in _GRADIENT_PERCENTILES]
    names += [f"{s}_{stat}" for s in ("hematoxylin", "eosin") for stat in ("mean", "sd")]
    names += [f"{s}_p{q}" for s in ("hematoxylin", "eosin") for q in _PERCENTILES]
    names += ["tissue_fraction"]
    return tuple(names)


HANDCRAFTED_FEATURE_NAMES: tuple[str, ...] = _feature_names()
"""Column names of :func:`handcrafted_features`, in order."""


# --------------------------------------------------------------------------- chunking
def _check_chunk(chunk: np.ndarray) -> np.ndarray:
    chunk = np.asarray(chunk)
    if chunk.ndim != 4 or chunk.shape[1] != 3:
        raise InputError(
            f"patches must be (n_spots, 3, height, width) RGB, got shape {chunk.shape}; "
            "use stinfer.data.patches.spot_patches to extract them."
        )
    return chunk


def iter_chunks(patches: Patches, chunk_size: int) -> Iterator[np.ndarray]:
    """Yield ``(n, 3, H, W)`` chunks of at most ``chunk_size`` patches.

    ``patches`` is one array (sliced without copying) or an iterable of arrays (each re-chunked),
    so extraction can stream from :func:`stinfer.data.patches.iter_spot_patches`.
    """
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}.")
    blocks = [patches] if isinstance(patches, np.ndarray | torch.Tensor) else patches
    for block in blocks:
        block = _check_chunk(block.numpy() if isinstance(block, torch.Tensor) else block)
        for start in range(0, len(block), chunk_size):
            yield block[start : start + chunk_size]


def _stack(parts: list[np.ndarray], n_features: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, n_features), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- colour statistics
def color_statistics(patches: Patches, chunk_size: int = 512) -> np.ndarray:
    """Per-channel mean and standard deviation of each patch, on the 0-255 scale.

    The six-number "colour-statistics" probe of issue 3 (``docs/DESIGN.md`` "Metrics"): a
    ridge regression on these is the floor any learned image encoder must beat.

    Parameters
    ----------
    patches
        ``(n_spots, 3, H, W)`` uint8 RGB, or an iterable of such chunks.
    chunk_size
        Patches converted to float at once (bounds memory).

    Returns
    -------
    numpy.ndarray
        ``(n_spots, 6)`` float32: ``[mean_R, mean_G, mean_B, sd_R, sd_G, sd_B]``; the standard
        deviation is the population one (``ddof=0``) over the patch's pixels.
    """
    parts = [_color_statistics_chunk(chunk) for chunk in iter_chunks(patches, chunk_size)]
    return _stack(parts, 6)


def _color_statistics_chunk(chunk: np.ndarray) -> np.ndarray:
    """Channel means and sds of uint8 patches from exact integer sums (no float copy)."""
    pixels = chunk.reshape(len(chunk), 3, -1)
    if pixels.dtype != np.uint8:
        values = pixels.astype(np.float64)
        return np.concatenate([values.mean(axis=2), values.std(axis=2)], axis=1)
    n_pixels = pixels.shape[2]
    total = pixels.sum(axis=2, dtype=np.int64)
    squares = np.square(pixels, dtype=np.uint32).sum(axis=2, dtype=np.int64)
    variance = (n_pixels * squares - total * total) / float(n_pixels) ** 2
    return np.concatenate([total / n_pixels, np.sqrt(variance)], axis=1)


# --------------------------------------------------------------------------- colour deconvolution
def rgb_to_hed(rgb: np.ndarray, channel_axis: int = -3) -> np.ndarray:
    """Hematoxylin / eosin / DAB stain concentrations by colour deconvolution.

    Ruifrok & Johnston (2001) with their stain matrix :data:`RGB_FROM_HED`, computed as
    ``skimage.color.rgb2hed`` does (scikit-image is not a dependency, so this is its core in
    numpy): optical density ``log(max(rgb / 255, 1e-6)) / log(1e-6)`` projected on the inverse
    stain matrix, clipped at 0. uint8 input goes through a 256-entry optical-density table.

    Parameters
    ----------
    rgb
        uint8 (0-255) or float (0-1) RGB with the colour channels on ``channel_axis``
        (default ``-3``: ``(..., 3, H, W)`` patches).

    Returns
    -------
    numpy.ndarray
        Same shape, float32: channels (hematoxylin, eosin, DAB), non-negative, in units of
        ``log(1e-6)`` optical density (a pure stain at full intensity is about 1).
    """
    rgb = np.moveaxis(np.asarray(rgb), channel_axis, 0)
    if rgb.shape[0] != 3:
        raise InputError(f"rgb_to_hed needs 3 colour channels, got shape {rgb.shape}.")
    if rgb.dtype == np.uint8:
        optical_density = _OPTICAL_DENSITY_TABLE[rgb]
    else:
        intensity = np.maximum(rgb.astype(np.float32), _LOG_FLOOR)
        optical_density = np.log(intensity) / np.float32(np.log(_LOG_FLOOR))
    matrix = HED_FROM_RGB.astype(np.float32)
    stains = np.stack(
        [
            np.maximum(
                optical_density[0] * matrix[0, stain]
                + optical_density[1] * matrix[1, stain]
                + optical_density[2] * matrix[2, stain],
                0.0,
            )
            for stain in range(3)
        ]
    )
    return np.moveaxis(stains, 0, channel_axis)


_OPTICAL_DENSITY_TABLE = (
    np.log(np.maximum(np.arange(256) / 255.0, _LOG_FLOOR)) / np.log(_LOG_FLOOR)
).astype(np.float32)


def _uint8_percentiles(values: np.ndarray, percentiles: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(values, percentiles, axis=1).T`` for ``(m, n)`` uint8, via histograms.

    Exact (numpy's default linear interpolation) and much faster than sorting: one
    ``bincount`` over all rows, then the k-th order statistic is the number of grey levels
    whose cumulative count is at most k.
    """
    n_rows, n_values = values.shape
    offsets = (np.arange(n_rows, dtype=np.int64) * 256)[:, None]
    counts = np.bincount((values + offsets).ravel(), minlength=n_rows * 256).reshape(n_rows, 256)
    cumulative = np.cumsum(counts, axis=1)
    position = np.asarray(percentiles, dtype=np.float64) / 100.0 * (n_values - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n_values - 1)

    def order_statistic(k: np.ndarray) -> np.ndarray:
        return (cumulative[:, None, :] <= k[None, :, None]).sum(axis=2).astype(np.float64)

    low_value, high_value = order_statistic(lower), order_statistic(upper)
    return low_value + (position - lower)[None, :] * (high_value - low_value)


# --------------------------------------------------------------------------- handcrafted features
def _gradient_magnitude(grey: np.ndarray) -> np.ndarray:
    """``(n, H-2, W-2)`` central-difference gradient magnitude of ``(n, H, W)`` grey images."""
    d_x = grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]
    d_y = grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]
    return 0.5 * np.hypot(d_x, d_y)


def _handcrafted_chunk(chunk: np.ndarray) -> np.ndarray:
    n_patches = len(chunk)
    rgb_uint8 = chunk.reshape(n_patches, 3, -1)
    rgb = rgb_uint8.astype(np.float32)
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).reshape(
        n_patches, *chunk.shape[2:]
    )
    gradient = _gradient_magnitude(grey).reshape(n_patches, -1)
    stains = rgb_to_hed(chunk)[:, :2].reshape(n_patches, 2, -1)
    blocks = [
        _color_statistics_chunk(chunk),
        _uint8_percentiles(rgb_uint8.reshape(n_patches * 3, -1), _PERCENTILES).reshape(
            n_patches, -1
        ),
        gradient.mean(axis=1, keepdims=True),
        gradient.std(axis=1, keepdims=True),
        np.percentile(gradient, _GRADIENT_PERCENTILES, axis=1).T,
        np.stack([stains.mean(axis=2), stains.std(axis=2)], axis=2).reshape(n_patches, -1),
        np.moveaxis(np.percentile(stains, _PERCENTILES, axis=2), 0, -1).reshape(n_patches, -1),
        (grey.reshape(n_patches, -1) < _TISSUE_GREY_MAX).mean(axis=1, keepdims=True),
    ]
    return np.concatenate(blocks, axis=1)


def handcrafted_features(patches: Patches, chunk_size: int = 256) -> np.ndarray:
    """Cheap colour, texture and stain statistics of each patch (no learned weights).

    Columns (:data:`HANDCRAFTED_FEATURE_NAMES`): RGB mean and sd, RGB percentiles
    10/25/50/75/90; grey-level (ITU-R 601 luma) central-difference gradient magnitude mean, sd,
    median and 90th percentile (texture: nuclei edges, fibres); hematoxylin and eosin
    concentration (:func:`rgb_to_hed`) mean, sd and percentiles 10/25/50/75/90 (nuclear
    density vs stroma/cytoplasm); fraction of tissue pixels (grey < 220, i.e. not glass).

    Parameters
    ----------
    patches
        ``(n_spots, 3, H, W)`` uint8 RGB, or an iterable of such chunks.

    Returns
    -------
    numpy.ndarray
        ``(n_spots, len(HANDCRAFTED_FEATURE_NAMES))`` float32.
    """
    parts = [_handcrafted_chunk(chunk) for chunk in iter_chunks(patches, chunk_size)]
    return _stack(parts, len(HANDCRAFTED_FEATURE_NAMES))


# --------------------------------------------------------------------------- timm backbones
def backbone_input(
    patches: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """uint8 ``(n, 3, H, W)`` patches as a backbone expects them: float, /255, standardised.

    ``mean``/``std`` come from the backbone's timm data config (ImageNet for most models);
    ``size`` resizes (bilinear, antialiased) only for models with a fixed input size.
    """
    images = patches.float().div_(255.0)
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(
            images, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def backbone_data_config(model: torch.nn.Module) -> dict:
    """The timm data config of ``model`` plus ``fixed_size``: (H, W) when inputs must be resized.

    Models with a fixed input size (ViT, Swin with absolute position tables) say so in
    ``pretrained_cfg["fixed_input_size"]``; convolutional ones take the 160-px patch as it is.
    """
    import timm

    config = dict(timm.data.resolve_model_data_config(model))
    fixed = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    config["fixed_size"] = tuple(config["input_size"][1:]) if fixed else None
    return config


def default_device() -> torch.device:
    """CUDA when available, then Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def backbone_features(
    patches: Patches,
    model_name: str | torch.nn.Module = "resnet18",
    pretrained: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Pooled features of a frozen timm backbone for every patch.

    The backbone runs in ``eval`` mode under ``torch.inference_mode`` one batch at a time; inputs
    are scaled by its timm data config (:func:`backbone_input`) and resized only when the model
    needs a fixed input size.

    Parameters
    ----------
    patches
        ``(n_spots, 3, H, W)`` uint8 RGB, or an iterable of such chunks.
    model_name
        A timm name (built by :func:`stinfer.nn.encoders.create_backbone` with ``pretrained``, at
        the model's own input size) or an existing module whose ``forward`` returns
        ``(n, n_features)`` (e.g. a trained model's encoder).
    pretrained
        ``None`` (random weights, nothing downloaded), ``"hub"`` or a local weights file.
    batch_size
        Patches per forward pass.
    device
        Default: CUDA, then MPS, else CPU.

    Returns
    -------
    numpy.ndarray
        ``(n_spots, n_features)`` float32.
    """
    from stinfer.nn.encoders import create_backbone

    model = create_backbone(model_name, pretrained) if isinstance(model_name, str) else model_name
    device = torch.device(device) if device is not None else default_device()
    config = backbone_data_config(model)
    was_training = model.training
    model = model.to(device).eval()
    parts = []
    with torch.inference_mode():
        for chunk in iter_chunks(patches, batch_size):
            batch = torch.from_numpy(np.array(chunk, copy=True)).to(device)
            images = backbone_input(batch, config["mean"], config["std"], config["fixed_size"])
            parts.append(model(images).float().flatten(1).cpu().numpy())
    model.train(was_training)
    n_features = int(getattr(model, "num_features", 0))
    return _stack(parts, n_features)

"""Robustness to stain/colour shift: the spectral blue shift of STEvs Appendix J.1 (Eq. 40).

:func:`blue_shift` applies ``P' = clip(P + 255 * [-alpha, -alpha, +alpha], 0, 255)`` to 0-255 RGB
patches; :func:`blue_shift_sweep` predicts the test slides of a trained model with their patches
shifted by each ``alpha`` in {0, 0.1, ..., 0.8} (the shift touches test images only: the model
was trained on the originals) and evaluates every prediction. Models receive the shifted patches
through ``predict(slide, patches=...)`` (:class:`stinfer.evaluate.protocols.ExpressionModel`);
models that do not look at the image give the same prediction at every ``alpha``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.errors import InputError
from stinfer.evaluate.protocols import ExpressionModel, slide_id, strip_counts

logger = logging.getLogger("stinfer")

__all__ = [
    "BLUE_SHIFT_ALPHAS",
    "BLUE_SHIFT_DIRECTION",
    "blue_shift",
    "blue_shift_sweep",
    "model_patch_spec",
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
        :func:`~stinfer.evaluate.metrics.evaluate_expression` and ``predict_seconds``.
    """
    from stinfer.evaluate.metrics import evaluate_anndata

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

"""Baseline expression models, on the same data, genes and splits as STEvs.

Each follows the interface of :class:`stinfer.evaluate.protocols.ExpressionModel`::

    model = MeanExpression(train_slides, genes, config=MeanExpressionConfig())
    fit_info = model.train()            # FitResult: train_seconds, history
    pred = model.predict(slide)         # AnnData: slide's obs_names x genes, raw-count scale
    pred = model.predict(slide, patches=shifted)  # image models: use these patches instead

- :class:`MeanExpression`: the mean count profile of the training spots (the floor);
- :class:`CoordinateKNN`: k-nearest-neighbour regression on spot coordinates (spatial only);
- :class:`PatchFeatureRidge`: the HEST-Benchmark linear probe (StandardScaler -> PCA(256) ->
  ridge with cross-validated alpha) on per-spot image features: colour statistics,
  handcrafted colour/texture/stain features, or a frozen timm backbone;
- :class:`STNet`: DenseNet-121 fine-tuned on the patch to log1p expression (He et al. 2020),
  trained through :func:`stinfer.train.fit`.

Predictions are raw-count scale (``expm1`` of a log1p-space regression, clipped at 0) as
float32 dense ``X``; ``obsm["spatial"]`` and ``uns["stinfer"]`` of the slide are copied so the
prediction plots like the slide. Image models read patches with
:func:`stinfer.data.patches.spot_patches` (the one patch extractor).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch

from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.errors import InputError
from stinfer.io.prediction_layout import annotate_counts
from stinfer.io.slide_data import (
    check_genes,
    panel_counts,
    slide_id,
    spot_coordinates_px,
    spot_coordinates_um,
    spot_obs,
    validation_spot_mask,
)
from stinfer.train import FitResult, TrainerConfig, fit

logger = logging.getLogger("stinfer")

__all__ = [
    "STNET_PRESETS",
    "CoordinateKNN",
    "CoordinateKNNConfig",
    "MeanExpression",
    "MeanExpressionConfig",
    "PatchFeatureRidge",
    "PatchFeatureRidgeConfig",
    "STNet",
    "STNetConfig",
    "STNetModuleConfig",
    "STNetTrainingConfig",
    "prediction_anndata",
    "stnet_fast_preset",
    "stnet_paper_preset",
    "upgrade_stnet_config_dict",
]


# --------------------------------------------------------------------------- shared helpers
def _check_slides(train_slides: Sequence[ad.AnnData], genes: Sequence[str]) -> tuple[list, list]:
    slides = list(train_slides) if not isinstance(train_slides, ad.AnnData) else [train_slides]
    genes = [str(gene) for gene in genes]
    if not slides:
        raise InputError("a model needs at least one training slide.")
    if not genes or len(set(genes)) != len(genes):
        raise InputError("genes must be a non-empty list of distinct gene names.")
    for slide in slides:
        check_genes(slide, genes)
    return slides, genes


def _training_log1p(slides: Sequence[ad.AnnData], genes: Sequence[str]) -> np.ndarray:
    """log1p counts of every training spot, slides stacked in order, float32."""
    return np.log1p(np.concatenate([panel_counts(slide, genes) for slide in slides]))


def prediction_anndata(
    slide: ad.AnnData, genes: Sequence[str], expression: np.ndarray
) -> ad.AnnData:
    """Wrap ``(n_spots, n_genes)`` predicted counts as an AnnData aligned with ``slide``.

    ``X`` is dense float32; ``obs`` holds the slide's spot names and identity columns
    (:func:`~stinfer.io.slide_data.spot_obs`: ``sample_id``, ``spot_id``, ``array_row``,
    ``array_col``), ``var_names`` the genes; the slide's ``obsm["spatial"]`` and
    ``uns["stinfer"]`` are copied for plotting; ``obs["library_size"]``,
    ``layers["log1p_cp10k"]`` and ``uns["stinfer"]["expression"]`` follow the one convention
    of every prediction (:mod:`stinfer.io.prediction_layout`).
    """
    expression = np.asarray(expression, dtype=np.float32)
    if expression.shape != (slide.n_obs, len(genes)):
        raise ValueError(f"prediction shape {expression.shape} != ({slide.n_obs}, {len(genes)})")
    prediction = ad.AnnData(
        X=expression,
        obs=spot_obs(slide),
        var=pd.DataFrame(index=pd.Index(list(genes))),
    )
    if "spatial" in slide.obsm:
        prediction.obsm["spatial"] = np.array(slide.obsm["spatial"], copy=True)
    if "stinfer" in slide.uns:
        prediction.uns["stinfer"] = dict(slide.uns["stinfer"])
    return annotate_counts(prediction)


def _counts_from_log1p(log_expression: np.ndarray, log_max: np.ndarray | None = None) -> np.ndarray:
    """``expm1`` of log1p-space predictions, clipped to ``[0, expm1(log_max)]`` per gene.

    The upper clip (the largest log1p count of each gene seen in training) only bites when a
    regressor extrapolates far outside its training range (e.g. a linear probe under a strong
    colour shift), where ``expm1`` would otherwise overflow to inf.
    """
    if log_max is not None:
        log_expression = np.minimum(log_expression, log_max)
    return np.clip(np.expm1(log_expression), 0.0, None).astype(np.float32)


def _slide_patches(
    slide: ad.AnnData, spec: PatchSpec, cache_dir: str | None, patches: np.ndarray | None = None
) -> np.ndarray:
    """The slide's patches: ``patches`` when given (checked against the spot count), else extracted."""
    if patches is None:
        return spot_patches(slide, spec, cache_dir=cache_dir)
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[:2] != (slide.n_obs, 3) or patches.dtype != np.uint8:
        name = slide_id(slide, default="slide")
        raise InputError(
            f"patches for slide {name!r} must be ({slide.n_obs}, 3, H, W) uint8 in spot order, "
            f"got {patches.shape} {patches.dtype}."
        )
    return patches


def _training_patches(
    slides: list[ad.AnnData], spec: PatchSpec, cache_dir: str | None, patches: Sequence | None
) -> list[np.ndarray]:
    if patches is None:
        return [_slide_patches(slide, spec, cache_dir) for slide in slides]
    if len(patches) != len(slides):
        raise InputError(f"{len(patches)} patch arrays given for {len(slides)} training slides.")
    return [
        _slide_patches(slide, spec, cache_dir, p) for slide, p in zip(slides, patches, strict=True)
    ]


def _save_baseline(
    model: Any,
    directory: str | os.PathLike,
    overwrite: bool,
    arrays: Mapping[str, np.ndarray | torch.Tensor],
    state: Mapping[str, Any] | None = None,
    module: torch.nn.Module | None = None,
) -> Path:
    """Save a baseline in the one saved-model format (:mod:`stinfer.models.persistence`):
    its config and genes in ``config.json``, its fitted arrays in ``weights.safetensors``."""
    from stinfer.models.persistence import write_model_folder

    state = {"genes": list(model.genes), **(state or {})}
    config = dataclasses.asdict(model.config)
    return write_model_folder(directory, model.model_type, config, state, module, arrays, overwrite)


def _load_baseline(
    cls: type,
    config_class: type,
    directory: str | os.PathLike,
    upgrade: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> tuple[Any, Any]:
    """``(model without its fitted values, SavedModel)`` of a folder saved by ``cls.save``;
    ``upgrade`` maps an older config layout onto the current one."""
    from stinfer.models.configs import override_config
    from stinfer.models.persistence import read_saved_model

    saved = read_saved_model(directory, cls.model_type)
    model = cls.__new__(cls)
    model.train_slides = []
    model.genes = [str(gene) for gene in saved.state["genes"]]
    values = saved.config if upgrade is None else upgrade(saved.config)
    model.config = override_config(config_class(), values, cls.model_type)
    model._train_patches = None
    return model, saved


# --------------------------------------------------------------------------- mean expression
@dataclass
class MeanExpressionConfig:
    """:class:`MeanExpression` has no hyperparameters; the config exists for a uniform interface."""


class MeanExpression:
    """Predict every spot as the mean count profile of the training spots.

    The floor every model must clear: it has no spatial or image information, so its per-gene
    correlations are 0 (constant predictions) and only its MSE is informative.

    Parameters
    ----------
    train_slides
        Slides with raw counts; all spots of all slides are pooled.
    genes
        The genes to predict, present in every training slide.
    """

    model_type = "mean"  # the registry name (stinfer.models.registry), saved in config.json

    def __init__(
        self,
        train_slides: Sequence[ad.AnnData],
        genes: Sequence[str],
        config: MeanExpressionConfig | None = None,
    ) -> None:
        self.train_slides, self.genes = _check_slides(train_slides, genes)
        self.config = config or MeanExpressionConfig()
        self.mean_counts_: np.ndarray | None = None

    def train(self) -> FitResult:
        """Average the counts over the training spots; returns the wall time."""
        start = time.perf_counter()
        counts = np.concatenate([panel_counts(s, self.genes) for s in self.train_slides])
        self.mean_counts_ = counts.mean(axis=0, dtype=np.float64).astype(np.float32)
        return FitResult(train_seconds=time.perf_counter() - start)

    def predict(self, slide: ad.AnnData, patches: np.ndarray | None = None) -> ad.AnnData:
        """The training mean for every spot of ``slide`` (``patches`` is ignored)."""
        if self.mean_counts_ is None:
            raise RuntimeError("call train() before predict().")
        expression = np.broadcast_to(self.mean_counts_, (slide.n_obs, len(self.genes)))
        return prediction_anndata(slide, self.genes, expression)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``weights.safetensors`` (the mean counts) into ``directory``."""
        if self.mean_counts_ is None:
            raise RuntimeError("call train() before save().")
        return _save_baseline(self, directory, overwrite, {"mean_counts": self.mean_counts_})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MeanExpression:
        """Load a model written by :meth:`save`."""
        model, saved = _load_baseline(cls, MeanExpressionConfig, directory)
        model.mean_counts_ = saved.tensors()["mean_counts"].numpy()
        return model


# --------------------------------------------------------------------------- coordinates k-NN
@dataclass
class CoordinateKNNConfig:
    """Settings of :class:`CoordinateKNN`."""

    n_neighbors: int = 10  # brief of issue 4; capped by the number of training spots
    weights: Literal["uniform", "distance"] = "uniform"  # sklearn KNeighborsRegressor


class CoordinateKNN:
    """k-nearest-neighbour regression from spot coordinates to log1p counts (spatial only).

    Coordinates are normalised per slide by :func:`stinfer.io.slide_data.spot_coordinates_um`
    (centred on the spot centroid, microns when the pixel size is known: centring aligns serial
    sections placed at different positions on their slides, it does not undo rotation); a
    slide whose ``sample_id`` is one of the
    training slides' (intra-slice: its held-out spots) is centred with that training slide's
    centre, so held-out spots land exactly where they were. The prediction averages the
    neighbours' log1p counts and back-transforms with ``expm1``.
    """

    model_type = "coordinate_knn"  # the registry name, saved in config.json

    def __init__(
        self,
        train_slides: Sequence[ad.AnnData],
        genes: Sequence[str],
        config: CoordinateKNNConfig | None = None,
    ) -> None:
        self.train_slides, self.genes = _check_slides(train_slides, genes)
        self.config = config or CoordinateKNNConfig()
        if self.config.n_neighbors < 1:
            raise InputError(
                f"CoordinateKNNConfig.n_neighbors must be >= 1, got {self.config.n_neighbors}."
            )
        self.centres_: dict[str, np.ndarray] = {}
        self.train_coordinates_: np.ndarray | None = None
        self.train_log1p_: np.ndarray | None = None
        self.regressor_ = None

    def train(self) -> FitResult:
        """Fit sklearn's ``KNeighborsRegressor`` on the pooled training spots."""
        start = time.perf_counter()
        coordinates = []
        for slide in self.train_slides:
            centre = spot_coordinates_px(slide).mean(axis=0)
            self.centres_[slide_id(slide, default="slide")] = centre
            coordinates.append(spot_coordinates_um(slide, centre))
        self.train_coordinates_ = np.concatenate(coordinates)
        self.train_log1p_ = _training_log1p(self.train_slides, self.genes)
        self._fit_regressor()
        return FitResult(train_seconds=time.perf_counter() - start)

    def predict(self, slide: ad.AnnData, patches: np.ndarray | None = None) -> ad.AnnData:
        """Average log1p counts of the k nearest training spots (``patches`` is ignored)."""
        if self.regressor_ is None:
            raise RuntimeError("call train() before predict().")
        centre = self.centres_.get(slide_id(slide, default="slide"))
        if centre is None:  # not a training slide: centred on its own spot centroid
            centre = spot_coordinates_px(slide).mean(axis=0)
        xy = spot_coordinates_um(slide, centre)
        log_expression = self.regressor_.predict(xy).reshape(slide.n_obs, len(self.genes))
        return prediction_anndata(slide, self.genes, _counts_from_log1p(log_expression))

    def _fit_regressor(self) -> None:
        """sklearn's regressor on the training coordinates and log1p counts (also on load)."""
        from sklearn.neighbors import KNeighborsRegressor

        n_neighbors = min(self.config.n_neighbors, len(self.train_coordinates_))
        self.regressor_ = KNeighborsRegressor(n_neighbors=n_neighbors, weights=self.config.weights)
        self.regressor_.fit(self.train_coordinates_, self.train_log1p_)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` (genes, slide centres) and ``weights.safetensors`` (the
        training coordinates and their log1p counts; the regressor is refitted on load)."""
        if self.regressor_ is None:
            raise RuntimeError("call train() before save().")
        arrays = {"coordinates": self.train_coordinates_, "log1p_counts": self.train_log1p_}
        centres = {name: [float(v) for v in centre] for name, centre in self.centres_.items()}
        return _save_baseline(self, directory, overwrite, arrays, {"centres": centres})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CoordinateKNN:
        """Load a model written by :meth:`save`."""
        model, saved = _load_baseline(cls, CoordinateKNNConfig, directory)
        tensors = saved.tensors()
        model.train_coordinates_ = tensors["coordinates"].numpy()
        model.train_log1p_ = tensors["log1p_counts"].numpy()
        centres = saved.state.get("centres", {})
        model.centres_ = {name: np.asarray(xy, dtype=np.float64) for name, xy in centres.items()}
        model._fit_regressor()
        return model


# --------------------------------------------------------------------------- feature ridge
@dataclass
class PatchFeatureRidgeConfig:
    """Settings of :class:`PatchFeatureRidge` (the HEST-Benchmark linear probe).

    ``features`` picks the extractor of :mod:`stinfer.data.features`: ``"color"`` (per-channel
    mean and sd, 6 features: the colour-statistics ridge of issue 3), ``"handcrafted"``
    (colour, texture and H/E statistics, 40 features) or ``"backbone"`` (a frozen timm model,
    ``backbone``/``pretrained``).
    """

    features: Literal["color", "handcrafted", "backbone"] = "color"
    backbone: str = "resnet18"  # timm name, used when features == "backbone"
    pretrained: str | None = None  # None (random weights), "hub", or a local weights file
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # timm args (UNI: init_values)
    n_components: int = 256  # HEST-Benchmark: PCA to 256 dims (fewer if data allow fewer)
    alphas: tuple[float, ...] = tuple(np.logspace(-2, 5, 15))  # RidgeCV grid (GCV / LOO)
    alpha_per_gene: bool = False  # one alpha for all genes (True: one per gene)
    patch: PatchSpec = field(default_factory=PatchSpec)  # STEvs D.1.2: 160-px spot patches
    patch_cache_dir: str | None = None  # spot_patches cache (None: extract every time)
    batch_size: int = 64  # backbone forward batch
    device: str | None = None  # backbone device; None: cuda, mps, else cpu
    seed: int = 0  # seeds the random backbone weights when pretrained is None
    feature_store: str | None = None  # zarr feature store (backbone features read/written)


class PatchFeatureRidge:
    """Ridge regression on per-spot patch features to log1p counts (HEST-Benchmark probe).

    features -> ``StandardScaler`` -> ``PCA(min(n_components, n_spots, n_features))`` ->
    ``RidgeCV`` (alpha chosen by efficient leave-one-out cross-validation over
    ``config.alphas``), fitted to log1p counts; predictions are ``expm1``, clipped at 0.
    Jaume et al. (2024), HEST-1k, NeurIPS Datasets & Benchmarks.

    **The HEST-Benchmark probe.** ``feature_ridge`` with ``features="backbone"`` and a
    pathology foundation encoder (``backbone`` its timm ViT, ``pretrained`` its weights file:
    UNI ``vit_large_patch16_224``, Phikon ``vit_base_patch16_224``, ...) is the probe of the
    HEST benchmark: standardise, PCA to 256, ridge. HEST scores it by the Pearson correlation
    over the 50 most variable genes, which :mod:`stinfer.metrics` reports as
    ``hest_pcc_top50`` (:func:`stinfer.metrics.hest_pcc_top50`), so a user's own slides can
    be put beside the HEST leaderboard (``benchmarks/her2st_hest_probe.yaml``).

    With ``config.feature_store`` (a zarr folder, :class:`stinfer.data.feature_store.FeatureStore`)
    and ``features="backbone"``, each slide's backbone features are read from the store, or
    computed and written there once (training and ``predict``), so a second run, another seed
    or another probe on the same encoder does not recompute them; ``stinfer features`` fills
    the same store. Patches passed explicitly (``patches=``: shifted or degraded images) are
    never read from nor written to the store.

    Parameters
    ----------
    train_slides, genes, config
        As for every model; ``config`` is a :class:`PatchFeatureRidgeConfig`.
    patches
        Optional precomputed patches of the training slides (one ``(n_spots, 3, H, W)`` uint8
        array per slide, same order); default: extracted with ``config.patch``.
    """

    model_type = "feature_ridge"  # the registry name, saved in config.json

    def __init__(
        self,
        train_slides: Sequence[ad.AnnData],
        genes: Sequence[str],
        config: PatchFeatureRidgeConfig | None = None,
        patches: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.train_slides, self.genes = _check_slides(train_slides, genes)
        self.config = config or PatchFeatureRidgeConfig()
        if self.config.features not in ("color", "handcrafted", "backbone"):
            raise InputError(
                f"PatchFeatureRidgeConfig.features: {self.config.features!r} is not one of "
                "'color', 'handcrafted', 'backbone'."
            )
        self._train_patches = patches
        self.backbone_ = None
        if self.config.features == "backbone":
            self.backbone_ = self._create_backbone(self.config.pretrained)
        self.probe_: dict[str, np.ndarray] | None = None
        self.log_max_: np.ndarray | None = None
        self.feature_weights_id_: str | None = None

    def _create_backbone(self, pretrained: str | None) -> torch.nn.Module:
        from stinfer.nn.encoders import create_backbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return create_backbone(
                self.config.backbone, pretrained, **dict(self.config.backbone_kwargs)
            )

    def features(self, patches: np.ndarray) -> np.ndarray:
        """``(n_spots, n_features)`` float32 features of uint8 patches (the configured extractor)."""
        from stinfer.data import features

        if self.config.features == "color":
            return features.color_statistics(patches)
        if self.config.features == "handcrafted":
            return features.handcrafted_features(patches)
        return features.backbone_features(
            patches, self.backbone_, batch_size=self.config.batch_size, device=self.config.device
        )

    def _uses_store(self) -> bool:
        return self.config.feature_store is not None and self.config.features == "backbone"

    def _stored_features(self, slide: ad.AnnData) -> np.ndarray:
        """The backbone features of ``slide`` from ``config.feature_store`` (computed once)."""
        from stinfer.data.feature_store import (
            FeatureExtractor,
            FeatureExtractorSpec,
            FeatureStore,
            weights_identity,
        )

        config = self.config
        if self.feature_weights_id_ is None:
            self.feature_weights_id_ = weights_identity(
                config.pretrained, config.backbone, config.seed
            )
        spec = FeatureExtractorSpec(
            encoder=config.backbone,
            encoder_kwargs=dict(config.backbone_kwargs),
            weights=config.pretrained,
            seed=config.seed,
            patch=config.patch,
            batch_size=config.batch_size,
            device=config.device,
        )
        extractor = FeatureExtractor(spec, self.backbone_, self.feature_weights_id_)
        return FeatureStore(config.feature_store).get_or_compute(slide, extractor).features

    def _slide_features(self, slide: ad.AnnData, patches: np.ndarray | None) -> np.ndarray:
        """Features of ``slide``: from the store when configured and no patches are given."""
        if patches is None and self._uses_store():
            return self._stored_features(slide)
        patches = _slide_patches(slide, self.config.patch, self.config.patch_cache_dir, patches)
        return self.features(patches)

    def train(self) -> FitResult:
        """Extract features, fit the scaler, PCA and RidgeCV; ``history`` holds the chosen alpha."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        start = time.perf_counter()
        if self._train_patches is None and self._uses_store():
            parts = [self._stored_features(slide) for slide in self.train_slides]
        else:
            all_patches = _training_patches(
                self.train_slides,
                self.config.patch,
                self.config.patch_cache_dir,
                self._train_patches,
            )
            parts = [self.features(p) for p in all_patches]
        features = np.concatenate(parts).astype(np.float64)
        targets = _training_log1p(self.train_slides, self.genes)
        self.log_max_ = targets.max(axis=0)
        n_components = min(self.config.n_components, features.shape[0], features.shape[1])
        pipeline = make_pipeline(
            StandardScaler(),
            PCA(n_components=n_components, random_state=self.config.seed),
            RidgeCV(alphas=self.config.alphas, alpha_per_target=self.config.alpha_per_gene),
        )
        pipeline.fit(features, targets)
        scaler, pca, ridge = pipeline
        self.probe_ = {
            "scaler_mean": scaler.mean_,
            "scaler_scale": scaler.scale_,
            "pca_mean": pca.mean_,
            "pca_components": pca.components_,
            "ridge_coef": np.atleast_2d(ridge.coef_),
            "ridge_intercept": np.atleast_1d(ridge.intercept_),
        }
        alpha = np.atleast_1d(ridge.alpha_)
        logger.info(
            "PatchFeatureRidge(%s): %d spots, %d features -> %d PCs, alpha %s",
            self.config.features,
            features.shape[0],
            features.shape[1],
            n_components,
            f"{float(alpha[0]):g}" if alpha.size == 1 else f"median {float(np.median(alpha)):g}",
        )
        history = [{"alpha": float(np.median(alpha)), "n_components": float(n_components)}]
        return FitResult(history=history, train_seconds=time.perf_counter() - start)

    def predict(self, slide: ad.AnnData, patches: np.ndarray | None = None) -> ad.AnnData:
        """Predicted counts of every spot; ``patches`` replace the slide's own when given."""
        if self.probe_ is None:
            raise RuntimeError("call train() before predict().")
        log_expression = self._probe(self._slide_features(slide, patches).astype(np.float64))
        log_expression = log_expression.reshape(slide.n_obs, len(self.genes))
        return prediction_anndata(
            slide, self.genes, _counts_from_log1p(log_expression, self.log_max_)
        )

    def _probe(self, features: np.ndarray) -> np.ndarray:
        """log1p predictions of the fitted scaler -> PCA -> ridge, from their arrays (the steps
        of sklearn's ``transform``/``predict``, so a loaded model needs no pickled estimator)."""
        probe = self.probe_
        standardised = (features - probe["scaler_mean"]) / probe["scaler_scale"]
        components = (standardised - probe["pca_mean"]) @ probe["pca_components"].T
        return components @ probe["ridge_coef"].T + probe["ridge_intercept"]

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``weights.safetensors`` (the scaler, PCA and ridge arrays,
        the log1p clip and, for ``features="backbone"``, the backbone's weights)."""
        if self.probe_ is None:
            raise RuntimeError("call train() before save().")
        arrays = {**self.probe_, "log_max": self.log_max_}
        state = {}
        if self.backbone_ is not None:
            backbone_state = self.backbone_.state_dict()
            arrays.update({f"backbone.{key}": value for key, value in backbone_state.items()})
            if self.feature_weights_id_ is not None:  # the feature store's name of the weights
                state["feature_weights_id"] = self.feature_weights_id_
        return _save_baseline(self, directory, overwrite, arrays, state)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PatchFeatureRidge:
        """Load a model written by :meth:`save` (the backbone from its saved weights)."""
        model, saved = _load_baseline(cls, PatchFeatureRidgeConfig, directory)
        tensors = saved.tensors()
        model.log_max_ = tensors.pop("log_max").numpy()
        prefix = "backbone."
        backbone = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        model.probe_ = {k: v.numpy() for k, v in tensors.items() if not k.startswith(prefix)}
        model.backbone_ = None
        model.feature_weights_id_ = saved.state.get("feature_weights_id")
        if model.config.features == "backbone":
            model.config.pretrained = None  # the saved weights replace any initial weights
            model.backbone_ = model._create_backbone(None)
            model.backbone_.load_state_dict(backbone)
            model.backbone_.eval()
            if model.feature_weights_id_ is None:  # saved before the feature store existed
                from stinfer.data.feature_store import module_weights_identity

                model.feature_weights_id_ = module_weights_identity(model.backbone_)
        return model


# --------------------------------------------------------------------------- ST-Net
@dataclass
class STNetModuleConfig:
    """The ST-Net network: a timm backbone and a linear head (He et al. 2020)."""

    backbone: str = "densenet121"  # He et al. 2020
    pretrained: str | None = None  # None (random init: no weights here), "hub", or a local file


@dataclass
class STNetTrainingConfig:
    """How ST-Net sees the data and learns (He et al. 2020; STEvs Table 21 for lr and L2)."""

    batch_size: int = 32  # He et al. 2020
    lr: float = 5e-4  # STEvs Table 21, modal ST-Net choice
    weight_decay: float = 5e-3  # STEvs Table 21, modal ST-Net l2_reg
    augment: bool = True  # random flips and 90-degree rotations (He et al. 2020)
    val_fraction: float = 0.1  # held-out spots when no obs[SPLIT_KEY] marks validation spots
    patch: PatchSpec = field(default_factory=PatchSpec)  # STEvs D.1.2: 160-px spot patches
    patch_cache_dir: str | None = None
    predict_batch_size: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise InputError(
                f"STNetConfig.training.val_fraction must be in [0, 1), got {self.val_fraction}."
            )


@dataclass
class STNetConfig:
    """Settings of :class:`STNet`; defaults are the ``paper`` preset (:func:`stnet_paper_preset`).

    He et al. (2020), Nat. Biomed. Eng. 4: DenseNet-121 (ImageNet-pretrained) on the spot patch,
    50 epochs, random flips and 90-degree rotations. The learning rate and L2 weight follow the
    most frequent choices of the STEvs baseline search (seed Table 21: lr 5e-4, l2 0.005) with
    AdamW; the target is log1p of raw counts (the count scale every stinfer model predicts in),
    not ST-Net's log of depth-normalised counts. Patches are the STEvs 160-px spot patches,
    standardised with the backbone's timm data config (ImageNet mean/std). The network is
    ``module``, the data and optimiser ``training``; the number of epochs, the seed, devices,
    precision and early stopping are the ``trainer``'s, as for every model.
    """

    module: STNetModuleConfig = field(default_factory=STNetModuleConfig)
    training: STNetTrainingConfig = field(default_factory=STNetTrainingConfig)
    trainer: TrainerConfig = field(  # He et al. 2020: 50 epochs
        default_factory=lambda: TrainerConfig(max_epochs=50, progress_bar=False)
    )


# Field names of older STNet configs -> their path now (stinfer.models.configs.move_fields),
# newest layout first: flat fields beside a nested trainer; before that, the trainer's fields
# flat too, with `learning_rate` and `epochs`.
STNET_MOVED_FIELDS = {
    "backbone": "module.backbone",
    "pretrained": "module.pretrained",
    **{
        name: f"training.{name}"
        for name in (
            "batch_size",
            "lr",
            "weight_decay",
            "augment",
            "val_fraction",
            "patch",
            "patch_cache_dir",
            "predict_batch_size",
        )
    },
    "learning_rate": "training.lr",
    "epochs": "trainer.max_epochs",
    "seed": "trainer.seed",
    "accelerator": "trainer.accelerator",
    "devices": "trainer.devices",
    "precision": "trainer.precision",
    "progress_bar": "trainer.progress_bar",
    "early_stopping_patience": "trainer.early_stopping_patience",
}


def upgrade_stnet_config_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a saved ``config`` or overrides) with the old flat names of
    :data:`STNET_MOVED_FIELDS` moved to their place now; a value given under the new name
    wins over the old one (:func:`~stinfer.models.configs.move_fields`)."""
    from stinfer.models.configs import move_fields

    return move_fields(values, STNET_MOVED_FIELDS)


def stnet_paper_preset() -> STNetConfig:
    """ST-Net as published (He et al. 2020, see :class:`STNetConfig`)."""
    return STNetConfig()


def stnet_fast_preset() -> STNetConfig:
    """For a 2-core CPU; every difference from ``paper``:

    - ResNet-18 instead of DenseNet-121 (11.7 M parameters, ~1.8 GFLOPs at 224 px vs
      DenseNet-121's 8.0 M / 2.9 GFLOPs but far fewer memory-bound concatenations);
    - 10 epochs instead of 50, lr 1e-3 instead of 5e-4 (the top of the Table 21 range, for
      the shorter schedule).
    """
    return STNetConfig(
        module=STNetModuleConfig(backbone="resnet18"),
        training=STNetTrainingConfig(lr=1e-3),
        trainer=TrainerConfig(max_epochs=10, progress_bar=False),
    )


STNET_PRESETS = {"paper": stnet_paper_preset, "fast": stnet_fast_preset}


def random_dihedral(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply an independent random element of the square's symmetry group to each image.

    Random transpose, horizontal and vertical flips per sample compose to the 8 flips and
    90-degree rotations, vectorised over the batch. ``images``: ``(n, c, s, s)``.
    """
    n = images.shape[0]
    draws = torch.rand(3, n, device=images.device, generator=generator) < 0.5
    mask = draws.view(3, n, 1, 1, 1)
    images = torch.where(mask[0], images.transpose(-1, -2), images)
    images = torch.where(mask[1], images.flip(-1), images)
    return torch.where(mask[2], images.flip(-2), images)


class STNetModule(L.LightningModule):
    """The ST-Net network: timm backbone (pooled features) -> linear head to log1p expression.

    Takes uint8 ``(n, 3, H, W)`` patches (scaled by :func:`stinfer.data.features.backbone_input`
    inside ``forward``, so the data loaders move bytes) and returns ``(n, n_genes)`` log1p
    counts; trained with the mean squared error (He et al. 2020).
    """

    def __init__(
        self,
        backbone: str,
        n_genes: int,
        pretrained: str | None = None,
        lr: float = 5e-4,
        weight_decay: float = 5e-3,
        augment: bool = True,
    ) -> None:
        super().__init__()
        from stinfer.data.features import backbone_data_config
        from stinfer.nn.encoders import create_backbone

        self.backbone = create_backbone(backbone, pretrained)
        self.head = torch.nn.Linear(int(self.backbone.num_features), n_genes)
        data_config = backbone_data_config(self.backbone)
        self.input_mean = tuple(data_config["mean"])
        self.input_std = tuple(data_config["std"])
        self.input_size = data_config["fixed_size"]
        self.lr = lr
        self.weight_decay = weight_decay
        self.augment = augment

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        from stinfer.data.features import backbone_input

        images = backbone_input(patches, self.input_mean, self.input_std, self.input_size)
        return self.head(self.backbone(images))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        patches, targets = batch
        if self.augment:
            patches = random_dihedral(patches)
        loss = torch.nn.functional.mse_loss(self(patches).float(), targets)
        self.log(
            "train/mse", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(targets)
        )
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        patches, targets = batch
        loss = torch.nn.functional.mse_loss(self(patches).float(), targets)
        self.log(
            "val/mse", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(targets)
        )

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class STNet:
    """ST-Net (He et al. 2020): a CNN fine-tuned on the spot patch to predict log1p expression.

    Trained through :func:`stinfer.train.fit` (Lightning: device auto, autocast on GPU, seeds);
    validation spots are those with ``obs[SPLIT_KEY] == "val"`` when the training slides mark
    them (intra-slice protocol), else a seeded ``val_fraction`` of the training spots; the
    weights of the epoch with the lowest validation MSE are kept.

    Parameters
    ----------
    train_slides, genes, config
        As for every model; ``config`` a :class:`STNetConfig` (:data:`STNET_PRESETS`:
        :func:`stnet_paper_preset`, :func:`stnet_fast_preset`).
    patches
        Optional precomputed patches of the training slides (one array per slide).

    Example
    -------
    >>> model = STNet(slides, genes, stnet_fast_preset())  # doctest: +SKIP
    >>> model.train(); prediction = model.predict(test_slide)  # doctest: +SKIP
    """

    model_type = "stnet"  # the registry name (stinfer.models.registry), saved in config.json

    def __init__(
        self,
        train_slides: Sequence[ad.AnnData],
        genes: Sequence[str],
        config: STNetConfig | None = None,
        patches: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.train_slides, self.genes = _check_slides(train_slides, genes)
        self.config = config or STNetConfig()
        self._train_patches = patches
        self.log_max_: np.ndarray | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.trainer.seed)
            self.module = self._create_module(self.config.module.pretrained)

    def _create_module(self, pretrained: str | None) -> STNetModule:
        module, training = self.config.module, self.config.training
        return STNetModule(
            module.backbone,
            len(self.genes),
            pretrained,
            training.lr,
            training.weight_decay,
            training.augment,
        )

    def _validation_mask(self) -> np.ndarray:
        marked = validation_spot_mask(self.train_slides)
        if marked is not None:
            return marked
        mask = np.zeros(sum(slide.n_obs for slide in self.train_slides), dtype=bool)
        if self.config.training.val_fraction == 0:
            return mask
        n_val = round(self.config.training.val_fraction * len(mask))
        if n_val == 0:
            return mask
        chosen = np.random.default_rng(self.config.trainer.seed).choice(
            len(mask), n_val, replace=False
        )
        mask[chosen] = True
        return mask

    def train(self) -> FitResult:
        """Fine-tune the backbone and head; returns :class:`~stinfer.train.FitResult`."""
        from torch.utils.data import DataLoader, TensorDataset

        start = time.perf_counter()
        training = self.config.training
        all_patches = _training_patches(
            self.train_slides, training.patch, training.patch_cache_dir, self._train_patches
        )
        patches = torch.from_numpy(np.ascontiguousarray(np.concatenate(all_patches)))
        log_targets = _training_log1p(self.train_slides, self.genes)
        self.log_max_ = log_targets.max(axis=0)
        targets = torch.from_numpy(log_targets)
        val = torch.from_numpy(self._validation_mask())
        generator = torch.Generator().manual_seed(self.config.trainer.seed)
        train_loader = DataLoader(
            TensorDataset(patches[~val], targets[~val]),
            batch_size=training.batch_size,
            shuffle=True,
            generator=generator,
        )
        val_loader = None
        if val.any():
            val_loader = DataLoader(
                TensorDataset(patches[val], targets[val]), batch_size=training.predict_batch_size
            )
        trainer_config = dataclasses.replace(
            self.config.trainer,
            monitor="val/mse" if val_loader is not None else None,
            monitor_mode="min",
        )
        result = fit(self.module, train_loader, val_loader, trainer_config)
        logger.info(
            "STNet(%s): %d train / %d val spots, trained in %.1f s (%s)",
            self.config.module.backbone,
            int((~val).sum()),
            int(val.sum()),
            result.train_seconds,
            result.describe_best("val/mse", "val MSE", mode="min"),
        )
        result.train_seconds = time.perf_counter() - start
        return result

    def predict(self, slide: ad.AnnData, patches: np.ndarray | None = None) -> ad.AnnData:
        """Predicted counts of every spot (``expm1`` of the network output, clipped at 0).

        ``patches`` replace the slide's own when given. Runs on CUDA/MPS when available.
        """
        from stinfer.data.features import default_device, iter_chunks

        training = self.config.training
        patches = _slide_patches(slide, training.patch, training.patch_cache_dir, patches)
        device = default_device()
        module = self.module.to(device).eval()
        outputs = []
        with torch.inference_mode():
            for chunk in iter_chunks(patches, training.predict_batch_size):
                batch = torch.from_numpy(np.array(chunk, copy=True)).to(device)
                outputs.append(module(batch).float().cpu().numpy())
        log_expression = (
            np.concatenate(outputs) if outputs else np.zeros((0, len(self.genes)), np.float32)
        )
        return prediction_anndata(
            slide, self.genes, _counts_from_log1p(log_expression, self.log_max_)
        )

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``weights.safetensors`` (the network's weights and the
        training maximum of each gene's log1p count that clips predictions) into ``directory``."""
        arrays = {} if self.log_max_ is None else {"log_max": self.log_max_}
        return _save_baseline(self, directory, overwrite, arrays, module=self.module)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> STNet:
        """Load a model written by :meth:`save` (safetensors: no pickle is executed)."""
        model, saved = _load_baseline(cls, STNetConfig, directory, upgrade_stnet_config_dict)
        model.config.module.pretrained = None  # the saved weights replace any initial weights
        tensors = saved.tensors()
        log_max = tensors.pop("log_max", None)
        model.log_max_ = None if log_max is None else log_max.numpy()
        model.module = model._create_module(None)
        model.module.load_state_dict(tensors)
        model.module.eval()
        return model

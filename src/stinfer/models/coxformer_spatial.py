"""CoxFormer spatial generative model over AnnData: impute any gene with an embedding.

``CoxFormerSpatial(slide, gene_embeddings, train_genes, modality)`` learns, from the genes
measured on one slide, how a gene's embedding maps to its spatial expression, then predicts
genes that were never measured (CoxFormer Suppl. Section 3; the module is
:class:`stinfer.nn.coxformer.CoxFormerSpatialModule`, see its docstring for how the gene token
conditions the prediction and why it departs from the paper's single additive token).

What the model sees
-------------------
- **Targets**: log1p-CP10k of the training genes, the spot totals taken over the genes of the
  slide it is given (pass a slide without the held-out genes and nothing of them leaks in).
- **Genes**: each embedding dimension is standardised over every gene of the table (mean 0,
  sd 1: no label is used, so unseen genes are standardised alike), then scaled by
  ``1/sqrt(dim)`` so a gene vector has norm about 1 whatever the table's width.
- **Spots** (the modality, :mod:`stinfer.modalities`; the older names ``location`` and
  ``both`` are accepted): ``spatial``: centres scaled to ``[-1, 1]`` over the slide's extent (a
  new slide by its own extent); ``image``: per-spot image features computed once per slide
  (``image_features="vit"``: a timm ViT whose patch tokens are averaged over the spot's patch,
  ``"handcrafted"``: :func:`stinfer.data.features.handcrafted_features`, the choice without
  pretrained weights), or an array the caller passes; ``fused``: the two.
- **Memory**: the training genes' log1p CP10k on the slide being predicted, which the gene
  token attends over (:meth:`CoxFormerSpatial.memory_targets`): on the training slide its
  targets, on a new slide that measures every training gene their measurements there, on
  a slide without them their prediction by the model's spot decoder. Training masks each
  gene's own slot (leave-one-gene-out); at inference a gene in the memory (a measured
  training gene) takes its memory profile as its spot values, and its sub-spots
  (super-resolution) add the decoder's detail to them.
- **Super-resolution** (``sub_spot_grid = r > 1``): each spot is an ``r x r`` grid of sub-spots
  (sub-patches of the spot's patch, sub-spot centres for the coordinates); the module predicts
  every sub-spot and the spot's prediction is ``log1p(mean(expm1(sub-spot predictions)))``
  (CP10k adds up over the spot's area), so training on spot measurements teaches the sub-spot
  predictions to aggregate to them. :meth:`CoxFormerSpatial.super_resolve` returns them.

Training (CoxFormer S3): mini-batches of 64 *genes* over every spot (at most
``max_spots_per_step`` random spots per step on large slides), weighted Huber + L1
(:func:`~stinfer.nn.coxformer.weighted_huber_loss`; ``attention_loss="mse"`` in ``fast``) of
the prediction plus ``base_loss_weight`` x the weighted Huber of the decoder's own readout,
AdamW lr 1e-4, weight decay 1e-4, cosine to 1e-6, up to 200 epochs, EMA early stopping on
the training objective with the best weights restored
(:class:`stinfer.train.EMAEarlyStopping`), through :func:`stinfer.train.fit`. A seeded
``validation_fraction`` (10%) of the training genes is left out of the prediction loss (the
decoder still learns them; their profiles stay in the memory); the attention's gene-level
parameters are kept at the epoch that predicted them best (:class:`stinfer.train.BestWeights`).

Examples
--------
>>> model = CoxFormerSpatial(slide, "genes.h5ad", modality="spatial", config="fast")  # doctest: +SKIP
>>> model.train()                                                                    # doctest: +SKIP
>>> imputed = model.impute(["ERBB2", "GRB7"])  # X counts, layers["log1p_cp10k"]     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from stinfer.errors import InputError
from stinfer.io.prediction_layout import LOG1P_LAYER, annotate_log1p_cp10k
from stinfer.io.slide_data import (
    as_dense,
    panel_counts,
    slide_meta,
    spot_coordinates_px,
    spot_obs,
)
from stinfer.metrics import cluster_ari, cluster_domains
from stinfer.modalities import canonical_modality
from stinfer.models.configs import move_fields, override_config, resolve_preset
from stinfer.models.gene_baselines import choose_knn_k
from stinfer.models.persistence import LEGACY_LAYOUTS, read_saved_model, write_model_folder
from stinfer.nn.coxformer import (
    CoxFormerSpatialModule,
    GeneAttentionReadout,
    aggregate_sub_spots,
    weighted_huber_loss,
)
from stinfer.preprocess import normalise_log1p_cp10k
from stinfer.train import (
    BestWeights,
    EMAEarlyStopping,
    FitResult,
    TrainerConfig,
    fit,
    with_cosine_schedule,
)

logger = logging.getLogger("stinfer")

__all__ = [
    "PRESETS",
    "CoxFormerSpatial",
    "CoxFormerSpatialConfig",
    "CoxFormerSpatialModuleConfig",
    "CoxFormerSpatialTrainingConfig",
    "aggregate_sub_spots",
    "coxformer_spatial_config",
    "embedding_table",
    "fast_preset",
    "measured_genes",
    "paper_preset",
    "slide_library_sizes",
    "slide_log1p_cp10k",
    "standardise_embeddings",
    "sub_spot_offsets",
    "upgrade_coxformer_spatial_config_dict",
]

IMAGE_FEATURES = ("vit", "handcrafted")
LOSSES = ("weighted_huber", "mse")


# --------------------------------------------------------------------------- configuration
@dataclass
class CoxFormerSpatialModuleConfig:
    """The network and its loss (CoxFormer Suppl. S3;
    :class:`~stinfer.nn.coxformer.CoxFormerSpatialModule`)."""

    d_model: int = 512  # S3
    n_heads: int = 8  # S3
    feedforward_dim: int = 1024  # S3
    dropout: float = 0.1  # S3
    attention_dropout: float | None = None  # S3 (None: `dropout`); on the spot attention weights
    n_spot_layers: int = 2  # stinfer: S3 does not give the number of attention layers
    n_frequencies: int = 32  # S3: F = 32, omega_f = 2^(f-1) pi
    location_dim: int = 512  # S3: d_loc
    image_dim: int = 512  # S3: d_img
    head_width: int = 256  # S3
    head_depth: int = 4  # S3
    gene_conditioning: str = "attention"  # stinfer: see stinfer.nn.coxformer ("additive": public)
    attention_temperature: float = 0.1  # stinfer: start of the learned cosine-softmax temperature
    coexpression_neighbours: int = 10  # stinfer: slide co-expression graph (0: none)
    attention_top_k: int | str = "auto"  # stinfer: top-k attention ("auto": CV; 0: softmax)
    base_loss_weight: float = 1.0  # stinfer: loss on the readout without the memory
    rank: int = 32  # stinfer: spatial pattern factors of the bilinear readout
    gene_hidden_dim: int = 512  # stinfer: width of the gene MLP after W_g
    gene_hidden_layers: int = 2  # stinfer: ReLU layers after W_g (0: linear in the embedding)
    embedding_noise: float = 0.0  # stinfer: sd of Gaussian noise on gene vectors in training
    group_size: int = 4096  # stinfer: spots attending to each other (SpotContext)
    # loss (S3)
    attention_loss: str = "weighted_huber"  # S3; "mse": of the attention readout (see fast())
    nonzero_weight: float = 0.5  # S3: lambda_nz
    zero_weight: float = 0.5  # S3: lambda_z
    l1_weight: float = 1e-3  # S3: lambda_l1

    def __post_init__(self) -> None:
        if self.gene_conditioning not in ("attention", "bilinear", "additive"):
            raise InputError(
                "gene_conditioning must be 'attention', 'bilinear' or 'additive', got "
                f"{self.gene_conditioning!r}"
            )
        if self.attention_top_k != "auto" and not (
            isinstance(self.attention_top_k, int) and self.attention_top_k >= 0
        ):
            raise InputError(
                f"attention_top_k must be 'auto' or an integer >= 0, got {self.attention_top_k!r}"
            )
        if self.attention_loss not in LOSSES:
            raise InputError(f"attention_loss must be one of {LOSSES}, got {self.attention_loss!r}")


@dataclass
class CoxFormerSpatialTrainingConfig:
    """How the model sees the slide and learns: the optimiser and EMA early stopping
    (CoxFormer Suppl. S3), the genes and spots of a step, the training genes and the spot
    inputs (image features, patches, sub-spots)."""

    # optimisation (S3)
    lr: float = 1e-4  # S3: AdamW
    weight_decay: float = 1e-4  # S3
    min_lr: float = 1e-6  # S3: cosine eta_min
    batch_genes: int = 64  # S3: batch size 64 (genes)
    min_steps_per_epoch: int = 1  # stinfer: gene batches drawn per epoch at least (small panels)
    ema_beta: float = 0.2  # S3: EMA of the training loss
    min_relative_improvement: float = 0.002  # S3: 0.2%
    patience: int = 10  # stinfer: S3 does not give the window
    validation_fraction: float = (
        0.1  # stinfer: training genes out of the attention loss (its epoch)
    )
    max_spots_per_step: int = 20000  # stinfer: random spots per step on larger slides
    # data (stinfer)
    min_spot_fraction: float = 0.1  # training genes: detected in at least this fraction of spots
    image_features: str = "vit"  # S3: ViT patch tokens averaged in the spot ("handcrafted")
    image_backbone: str = "vit_small_patch16_224"  # S3 [4]: a ViT-S/16 (HIPT)
    image_pretrained: str | None = None  # None (random), "hub", or a local weights file
    patch_size_px: int = 160  # patch side around the spot (STEvs D.1.2 patches)
    sub_spot_grid: int = 1  # r: r x r sub-spots per spot (1: spot level; 4: super-resolution)
    predict_batch_genes: int = 1024

    def __post_init__(self) -> None:
        if self.image_features not in IMAGE_FEATURES:
            raise InputError(
                f"image_features must be one of {IMAGE_FEATURES}, got {self.image_features!r}"
            )
        if int(self.sub_spot_grid) < 1:
            raise InputError(f"sub_spot_grid must be at least 1, got {self.sub_spot_grid}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InputError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if not 0.0 <= self.min_spot_fraction < 1.0:
            raise InputError(f"min_spot_fraction must be in [0, 1), got {self.min_spot_fraction}")


@dataclass
class CoxFormerSpatialConfig:
    """Every setting of a CoxFormer spatial run; the defaults are the ``paper`` preset.

    ``module``: the network and its loss; ``training``: the optimiser, early stopping and
    the data the model sees; ``trainer``: epochs (S3: up to 200), seed, devices, precision,
    gradient clipping (S3 clips nothing), as for every model; ``preset``: the name it was
    built from, recorded with the predictions.
    """

    module: CoxFormerSpatialModuleConfig = field(default_factory=CoxFormerSpatialModuleConfig)
    training: CoxFormerSpatialTrainingConfig = field(default_factory=CoxFormerSpatialTrainingConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=200))  # S3
    preset: str = "paper"

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (stored with a saved model)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CoxFormerSpatialConfig:
        """Build from :meth:`to_dict`'s layout; an older (flat) layout is upgraded first
        (:func:`upgrade_coxformer_spatial_config_dict`), and fields this stinfer does not
        have are dropped."""
        values = upgrade_coxformer_spatial_config_dict(values)
        sections = {}
        for name, section in (
            ("module", CoxFormerSpatialModuleConfig),
            ("training", CoxFormerSpatialTrainingConfig),
            ("trainer", TrainerConfig),
        ):
            known = {item.name for item in dataclasses.fields(section)}
            given = values.get(name) or {}
            sections[name] = section(**{key: value for key, value in given.items() if key in known})
        return cls(**sections, preset=values.get("preset", "paper"))


# Fields of the older flat config -> their place now (stinfer.models.configs.move_fields).
COXFORMER_SPATIAL_MOVED_FIELDS = {
    **{
        item.name: f"module.{item.name}"
        for item in dataclasses.fields(CoxFormerSpatialModuleConfig)
    },
    **{
        item.name: f"training.{item.name}"
        for item in dataclasses.fields(CoxFormerSpatialTrainingConfig)
    },
    **{
        name: f"trainer.{name}"
        for name in (
            "max_epochs",
            "seed",
            "accelerator",
            "devices",
            "precision",
            "progress_bar",
            "gradient_clip_val",
        )
    },
}


def upgrade_coxformer_spatial_config_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a saved ``config`` or overrides) with the fields of the older flat layout
    (:data:`COXFORMER_SPATIAL_MOVED_FIELDS`: ``lr`` -> ``training.lr``, ``max_epochs`` ->
    ``trainer.max_epochs``, ``d_model`` -> ``module.d_model``, ...) moved to their place now;
    a value given under the new name wins over the old one
    (:func:`~stinfer.models.configs.move_fields`)."""
    return move_fields(values, COXFORMER_SPATIAL_MOVED_FIELDS)


def paper_preset() -> CoxFormerSpatialConfig:
    """The paper's hyperparameters (CoxFormer Suppl. S3)."""
    return CoxFormerSpatialConfig(preset="paper")


def fast_preset() -> CoxFormerSpatialConfig:
    """For a 2-core CPU; every difference from ``paper``:

    - ``d_model`` 128 (512), ``feedforward_dim`` 256 (1024), ``location_dim`` and
      ``image_dim`` 128 (512), gene MLP width 128 (512), 1 spot attention layer (2),
      attention groups of 1,024 spots (4,096), at most 2,048 random spots per step
      (20,000): about 16x fewer multiply-adds per step, bounded on large slides;
    - lr 1e-3 (1e-4) with gradients clipped at norm 1 (none), 256 genes per batch (64;
      the spot pipeline, the cost of a step, is shared by the batch), at least 20 batches
      per epoch (1), at most 60 epochs (200) with patience 5 (10): the smaller model
      converges in fewer, larger steps;
    - ``attention_loss="mse"`` (the weighted Huber of S3): the attention readout is fit
      to the squared error of log1p CP10k, the quantity the held-out-gene protocol
      scores. S3's loss gives the zero entries half the weight whatever their share; on
      a synthetic slide, fitting the attention to it lowered the held-out genes' loss
      while their MSE and median PCC got worse; on the squared error both improved
      (``docs/results.md`` "CoxFormer spatial readout"). The spot decoder keeps S3's
      loss (on the squared error its sub-spot detail fell apart in the tests);
    - ``attention_dropout`` 0 (S3's dropout, 0.1) on the spot attention's probabilities
      only: it draws ``heads x group_size^2`` random numbers per layer and step, which
      costs more on a CPU than the rest of the spot attention (see
      :class:`~stinfer.nn.coxformer.SpotContext`); the residual and feed-forward dropout
      stay at 0.1;
    - ``image_features="handcrafted"`` (a ViT): without pretrained weights a random ViT's
      features carry less than colour and texture statistics, and they are slow to
      compute on a CPU.
    """
    module = CoxFormerSpatialModuleConfig(
        d_model=128,
        feedforward_dim=256,
        location_dim=128,
        image_dim=128,
        gene_hidden_dim=128,
        n_spot_layers=1,
        group_size=1024,
        attention_loss="mse",
        attention_dropout=0.0,
    )
    training = CoxFormerSpatialTrainingConfig(
        max_spots_per_step=2048,
        lr=1e-3,
        batch_genes=256,
        min_steps_per_epoch=20,
        patience=5,
        image_features="handcrafted",
    )
    trainer = TrainerConfig(max_epochs=60, gradient_clip_val=1.0)
    return CoxFormerSpatialConfig(module, training, trainer, preset="fast")


PRESETS = {"paper": paper_preset, "fast": fast_preset}


def coxformer_spatial_config(
    config: CoxFormerSpatialConfig | str | None = None, **overrides: Any
) -> CoxFormerSpatialConfig:
    """A config from a preset name (``paper``, ``fast``), a config, or ``None`` (``paper``),
    with ``overrides`` replacing fields, nested as the config is
    (``trainer={"max_epochs": 5}``; the older flat names are moved to their place,
    :func:`upgrade_coxformer_spatial_config_dict`)."""
    config = resolve_preset(PRESETS, config, CoxFormerSpatialConfig, "CoxFormer spatial")
    if not overrides:
        return config
    overrides = upgrade_coxformer_spatial_config_dict(overrides)
    return override_config(config, overrides, "coxformer_spatial")


# --------------------------------------------------------------------------- data: genes
def embedding_table(
    gene_embeddings: ad.AnnData | pd.DataFrame | str | os.PathLike, allow_pickle: bool = False
) -> pd.DataFrame:
    """Gene embeddings as a genes x dims float64 DataFrame (AnnData, DataFrame or a file;
    a pickle file only with ``allow_pickle``, see :func:`~stinfer.io.read_gene_embeddings`)."""
    if isinstance(gene_embeddings, (str, os.PathLike)):
        from stinfer.io.gene_embeddings import read_gene_embeddings

        gene_embeddings = read_gene_embeddings(gene_embeddings, allow_pickle=allow_pickle)
    if isinstance(gene_embeddings, ad.AnnData):
        matrix = as_dense(gene_embeddings.X)
        table = pd.DataFrame(matrix, index=gene_embeddings.obs_names.astype(str))
    elif isinstance(gene_embeddings, pd.DataFrame):
        table = gene_embeddings.copy()
        table.index = table.index.astype(str)
    else:
        raise InputError(
            "gene_embeddings must be an AnnData (obs = genes), a DataFrame or a file path, "
            f"got {type(gene_embeddings).__name__}."
        )
    table = table.astype(np.float64)
    if table.shape[0] < 2 or table.shape[1] < 1:
        raise InputError(f"gene embeddings: need at least 2 genes and 1 dim, got {table.shape}.")
    if not np.all(np.isfinite(table.to_numpy())):
        raise InputError("gene embeddings hold NaN or infinite values.")
    if not table.index.is_unique:
        table = table[~table.index.duplicated()]
    return table


def standardise_embeddings(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-dimension z-scores over every gene of ``table``, scaled by ``1/sqrt(dim)``.

    Returns ``(standardised (G, D) float32, mean (D,), scale (D,))`` with
    ``standardised = (table - mean) / scale``. Unsupervised (no expression is used), so genes
    never measured anywhere are transformed exactly like the training genes.
    """
    values = table.to_numpy(dtype=np.float64)
    mean = values.mean(axis=0)
    sd = values.std(axis=0)
    scale = np.where(sd > 0, sd, 1.0) * math.sqrt(values.shape[1])
    return ((values - mean) / scale).astype(np.float32), mean, scale


# --------------------------------------------------------------------------- data: spots
def slide_library_sizes(slide: ad.AnnData) -> np.ndarray:
    """``(n_spots,)`` float64 total counts over all the slide's genes (the CP10k totals)."""
    return np.asarray(slide.X.sum(axis=1), dtype=np.float64).ravel()


def slide_log1p_cp10k(slide: ad.AnnData, genes: Sequence[str]) -> np.ndarray:
    """``(n_spots, len(genes))`` float32 log1p-CP10k of ``genes``, totals over all slide genes.

    Raises :class:`InputError` naming the genes the slide does not measure.
    """
    totals = slide_library_sizes(slide)
    block = panel_counts(slide, genes, dtype=np.float64)
    return normalise_log1p_cp10k(block, spot_totals=totals).astype(np.float32)


def measured_genes(
    slide: ad.AnnData, embedded: pd.Index, min_spot_fraction: float = 0.1
) -> list[str]:
    """Genes of ``slide`` that have an embedding and are detected in enough spots (slide order)."""
    detected = np.asarray((slide.X > 0).sum(axis=0)).ravel() / max(slide.n_obs, 1)
    keep = (detected >= min_spot_fraction) & (detected > 0) & slide.var_names.isin(embedded)
    return [str(g) for g in slide.var_names[keep]]


def sub_spot_offsets(grid: int) -> np.ndarray:
    """``(grid * grid, 2)`` sub-spot centres in units of the patch side, row-major, in (-1/2, 1/2).

    Row-major over ``(row, column)`` = ``(y, x)``, returned as ``(dx, dy)`` pairs, matching
    the tile order of :func:`tile_patches`.
    """
    centres = (np.arange(grid) + 0.5) / grid - 0.5
    dy, dx = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([dx.ravel(), dy.ravel()], axis=1)


def tile_patches(patches: np.ndarray, grid: int) -> np.ndarray:
    """``(n, 3, H, W)`` patches -> ``(n * grid * grid, 3, H // grid, W // grid)`` tiles, row-major."""
    n, channels, height, width = patches.shape
    th, tw = height // grid, width // grid
    cropped = np.asarray(patches[:, :, : th * grid, : tw * grid])
    tiles = cropped.reshape(n, channels, grid, th, grid, tw).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(tiles.reshape(n * grid * grid, channels, th, tw))


def patch_spec_for(patch_size_px: int):
    """The :class:`~stinfer.data.patches.PatchSpec` of spot patches (``patch_size_px`` file px)."""
    from stinfer.data.patches import PatchSpec

    return PatchSpec(patch_size_px=int(patch_size_px))


def vit_token_mean_backbone(name: str, pretrained: str | os.PathLike | None) -> torch.nn.Module:
    """A timm ViT returning the mean of its patch tokens (``global_pool="avg"``, no classifier).

    Built by :func:`stinfer.nn.encoders.create_backbone` (``pretrained``: ``None``, ``"hub"``
    or a local weights file), at the model's own input size.
    """
    from stinfer.nn.encoders import create_backbone

    return create_backbone(name, pretrained, global_pool="avg")


def slide_image_features(
    slide: ad.AnnData, config: CoxFormerSpatialConfig, grid: int = 1
) -> np.ndarray:
    """``(n_spots * grid * grid, n_features)`` image features of every spot (or sub-spot).

    Spot patches come from the project's one extractor
    (:func:`stinfer.data.patches.spot_patches`); with ``grid > 1`` each patch is cut into
    ``grid x grid`` tiles (sub-spots, row-major). Features: ``config.training.image_features``.
    """
    from stinfer.data.features import backbone_features, handcrafted_features
    from stinfer.data.patches import spot_patches

    meta = slide_meta(slide) if "stinfer" in slide.uns else {"image_path": None}
    if meta["image_path"] is None:
        raise InputError(
            f"slide {meta.get('sample_id', '')} has no image; modality 'image'/'fused' needs an "
            "H&E image (prepare the slide with --image; or pass image_features= in Python), "
            "'spatial' does not."
        )
    patches = spot_patches(slide, patch_spec_for(config.training.patch_size_px))
    if grid > 1:
        patches = tile_patches(patches, grid)
    if config.training.image_features == "handcrafted":
        return handcrafted_features(patches)
    backbone = vit_token_mean_backbone(
        config.training.image_backbone, config.training.image_pretrained
    )
    return backbone_features(patches, backbone)


def validation_split(n_genes: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n_genes`` training-gene rows into (fitted, validation) int64 arrays.

    ``round(fraction * n_genes)`` validation genes, none when that leaves fewer than 2 to fit.
    Held-out genes are the unit the model generalises over, so it stops on genes it never
    took a gradient step on (their profiles stay in the memory: they are measured inputs).
    """
    n_validation = round(fraction * n_genes)
    if n_validation < 1 or n_genes - n_validation < 2:
        return np.arange(n_genes), np.arange(0)
    order = np.random.default_rng([seed, 13]).permutation(n_genes)
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


def coordinate_frame(coords: np.ndarray) -> tuple[np.ndarray, float]:
    """``(centre (2,), half-extent)`` that maps the spot centres to about ``[-1, 1]``."""
    low, high = coords.min(axis=0), coords.max(axis=0)
    half = float(np.max(high - low)) / 2.0
    return (low + high) / 2.0, half if half > 0 else 1.0


def spot_step_px(coords: np.ndarray) -> float:
    """Median nearest-neighbour distance between spot centres (pixels): the grid pitch."""
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 1.0
    distances, _ = cKDTree(coords).query(coords, k=2)
    step = float(np.median(distances[:, 1]))
    return step if step > 0 else 1.0


# --------------------------------------------------------------------------- Lightning task
class CoxFormerSpatialTask(L.LightningModule):
    """One training step = one mini-batch of genes over every spot (or a random subset)."""

    def __init__(
        self,
        module: CoxFormerSpatialModule,
        config: CoxFormerSpatialConfig,
        coords: torch.Tensor | None,
        image_features: torch.Tensor | None,
        targets: torch.Tensor,
        embeddings: torch.Tensor,
        n_sub: int,
        validation_genes: torch.Tensor | None = None,
        spot_decoder: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self.spot_decoder = spot_decoder  # False: only the attention readout (see train())
        # DDP (stinfer.train.lightning_strategy): the readout-only stage and the gene-level
        # parameters outside a batch's losses leave parameters without a gradient
        self.find_unused_parameters = True
        self.validation_genes = validation_genes  # (N,) bool: out of the attention's loss
        self.config = config
        self.n_sub = n_sub
        self.register_buffer("coords", coords, persistent=False)
        self.register_buffer("image_features", image_features, persistent=False)
        self.register_buffer("targets", targets, persistent=False)
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.generator = torch.Generator().manual_seed(config.trainer.seed)
        self.coexpression = module.readout.coexpression(targets) if module.uses_memory else None
        # validation: a fixed sample of spots on large slides, the same every epoch
        n_spots = targets.shape[0]
        self.validation_spots = None
        if n_spots > config.training.max_spots_per_step:
            draw = torch.Generator().manual_seed(config.trainer.seed + 1)
            order = torch.randperm(n_spots, generator=draw)
            self.validation_spots = order[: config.training.max_spots_per_step].sort().values

    def spot_rows(self) -> torch.Tensor | None:
        """Random spots of this step (``None``: all of them), as sub-spot rows when ``R > 1``."""
        n_spots = self.targets.shape[0]
        if n_spots <= self.config.training.max_spots_per_step:
            return None
        spots = torch.randperm(n_spots, generator=self.generator)[
            : self.config.training.max_spots_per_step
        ]
        return spots.sort().values

    def predict_spots(
        self, genes: torch.Tensor, spots: torch.Tensor | None, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, full)`` spot-level predictions ``(n_spots, len(genes))`` (sub-spots aggregated).

        The memory genes are the training genes: their measured profiles at the step's spots
        feed the attention readout, each gene's own slot masked (leave-one-gene-out). Without
        the spot decoder ``base`` is ``None`` and no spot token is computed.
        """
        if not self.spot_decoder:
            rows = self.targets if spots is None else self.targets[spots.to(self.device)]
            graph = None if self.coexpression is None else self.coexpression.to(self.device)
            full = self.module.memory_readout(self.embeddings[genes], rows, genes, graph)
            return None, full.float()
        coords, features, targets = self.coords, self.image_features, self.targets
        if spots is not None:
            rows = (
                spots.to(self.device)[:, None] * self.n_sub
                + torch.arange(self.n_sub, device=self.device)
            ).reshape(-1)
            coords = None if coords is None else coords[rows]
            features = None if features is None else features[rows]
            targets = targets[spots.to(self.device)]
        vectors = self.embeddings[genes]
        if self.training and self.config.module.embedding_noise > 0:
            noise = torch.randn(vectors.shape, generator=self.generator).to(vectors)
            vectors = vectors + noise * (
                self.config.module.embedding_noise / vectors.shape[1] ** 0.5
            )
        module = self.module
        tokens = module.spot_tokens(coords, features, self.config.module.group_size, generator)
        memory = targets if module.uses_memory else None
        graph = None if self.coexpression is None else self.coexpression.to(self.device)
        base, full = module.readout_pair(tokens, vectors, memory, genes, self.n_sub, graph)
        return (
            aggregate_sub_spots(base.float(), self.n_sub),
            aggregate_sub_spots(full.float(), self.n_sub),
        )

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted Huber + L1 (CoxFormer S3) of ``(S, G)`` predictions."""
        c = self.config.module
        return weighted_huber_loss(pred, target, c.nonzero_weight, c.zero_weight, c.l1_weight)

    def prediction_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of the model's prediction: ``config.module.attention_loss`` for the attention readout."""
        if self.module.uses_memory and self.config.module.attention_loss == "mse":
            return torch.nn.functional.mse_loss(pred, target)
        return self.loss(pred, target)

    def losses(
        self, genes: torch.Tensor, spots: torch.Tensor | None, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objective, prediction loss)`` of ``genes`` at ``spots`` (``None``: every spot).

        The objective adds ``base_loss_weight`` x the loss of the decoder's own readout.
        """
        base, full = self.predict_spots(genes, spots, generator)
        rows = self.targets if spots is None else self.targets[spots.to(self.device)]
        target = rows[:, genes]
        fitted, fitted_target = full, target
        if self.training and self.validation_genes is not None:
            keep = ~self.validation_genes.to(self.device)[genes]  # their own loss is val/loss
            fitted, fitted_target = full[:, keep], target[:, keep]
        if fitted.shape[1]:
            loss = self.prediction_loss(fitted, fitted_target)
        else:
            loss = full.sum() * 0.0  # a batch of validation genes only
        objective = loss
        if base is not None and self.module.uses_memory and self.config.module.base_loss_weight > 0:
            objective = loss + self.config.module.base_loss_weight * self.loss(base, target)
        return objective, loss

    def training_step(self, batch, batch_idx):
        (genes,) = batch
        objective, loss = self.losses(genes, self.spot_rows(), self.generator)
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(genes)
        )
        self.log(
            "train/objective",
            objective,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(genes),
        )
        return objective

    def validation_step(self, batch, batch_idx):
        """Losses of the validation genes (never in a gradient step; own memory slot masked)."""
        (genes,) = batch
        generator = torch.Generator().manual_seed(self.config.trainer.seed)
        objective, loss = self.losses(genes, self.validation_spots, generator)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(genes))
        self.log("val/objective", objective, on_epoch=True, sync_dist=True, batch_size=len(genes))

    def configure_optimizers(self):
        optimiser = torch.optim.AdamW(
            self.module.parameters(),
            lr=self.config.training.lr,
            weight_decay=self.config.training.weight_decay,
        )
        return with_cosine_schedule(
            optimiser, self.config.trainer.max_epochs, self.config.training.min_lr
        )


# --------------------------------------------------------------------------- the model
class CoxFormerSpatial:
    """CoxFormer spatial model: predicts any gene with an embedding at every spot of a slide.

    Parameters
    ----------
    slide
        One slide (raw counts in ``X``, ``obsm["spatial"]``; an image for ``image``/``fused``).
    gene_embeddings
        Gene embeddings: AnnData (obs = genes, e.g. from ``stinfer embed-genes``), a DataFrame
        (genes x dims) or a file readable by :func:`stinfer.io.gene_embeddings.read_gene_embeddings`.
    train_genes
        Genes to learn from; default every gene of the slide with an embedding detected in at
        least ``config.training.min_spot_fraction`` of the spots.
    modality
        ``"spatial"`` (spot coordinates), ``"image"`` or ``"fused"`` (both); the older
        ``"location"`` and ``"both"`` mean ``"spatial"`` and ``"fused"``.
    config
        A :class:`CoxFormerSpatialConfig` or a preset name (``"paper"``, ``"fast"``).
    image_features
        Optional precomputed ``(n_spots, F)`` spot features, or ``(n_spots, r*r, F)`` sub-spot
        features when ``config.training.sub_spot_grid = r > 1``; default computed from the slide's image.

    Attributes
    ----------
    module : CoxFormerSpatialModule
    fit_result : FitResult | None
    early_stopping : EMAEarlyStopping | None
        Best epoch and stopping epoch of the last :meth:`train`.
    gene_level_best : BestWeights | None
        Epoch whose attention gene-level parameters were kept (best loss of the validation
        genes, ``config.training.validation_fraction`` of the training genes), when there were any.
    """

    model_type = "coxformer_spatial"  # the registry name, saved in config.json

    def __init__(
        self,
        slide: ad.AnnData,
        gene_embeddings: ad.AnnData | pd.DataFrame | str | os.PathLike,
        train_genes: Sequence[str] | None = None,
        modality: str = "spatial",
        config: CoxFormerSpatialConfig | str | None = None,
        image_features: np.ndarray | None = None,
    ) -> None:
        modality = canonical_modality(modality)
        self.config = coxformer_spatial_config(config)
        self.modality = modality
        self.slide = slide
        table = embedding_table(gene_embeddings)
        standardised, self.embedding_mean, self.embedding_scale = standardise_embeddings(table)
        self.embedding_genes = pd.Index(table.index)
        self.embeddings = standardised
        if train_genes is None:
            train_genes = measured_genes(
                slide, self.embedding_genes, self.config.training.min_spot_fraction
            )
        self.train_genes = [str(g) for g in train_genes]
        self._check_train_genes()
        self.targets = slide_log1p_cp10k(slide, self.train_genes)
        self.attention_top_k = self._attention_top_k()
        self.n_sub = int(self.config.training.sub_spot_grid) ** 2
        coords = spot_coordinates_px(slide)
        self.coordinate_centre, self.coordinate_half_extent = coordinate_frame(coords)
        self.image_in_dim: int | None = None
        self._slide_features = None
        if modality != "spatial":
            features = self._image_features(slide, image_features)
            self.image_in_dim = int(features.shape[1])
            self._slide_features = features
            self.feature_mean = features.mean(axis=0)
            sd = features.std(axis=0)
            self.feature_scale = np.where(sd > 0, sd, 1.0)
        self.module = self._build_module()
        self.fit_result: FitResult | None = None
        self.early_stopping: EMAEarlyStopping | None = None
        self.gene_level_best: BestWeights | None = None
        self.spot_decoder_trained = True
        self._training_coexpression: torch.Tensor | None = None

    # ----------------------------------------------------------------- checks and tensors
    def _check_train_genes(self) -> None:
        if len(self.train_genes) < 2 or len(set(self.train_genes)) != len(self.train_genes):
            raise InputError(
                f"CoxFormerSpatial needs at least 2 unique training genes, got "
                f"{len(self.train_genes)}; lower --min-spot-fraction (min_spot_fraction=) or check the "
                "gene names."
            )
        missing = pd.Index(self.train_genes).difference(self.embedding_genes)
        if len(missing):
            raise InputError(
                f"{len(missing)} training genes have no embedding (e.g. {', '.join(missing[:5])})."
            )

    def _attention_top_k(self) -> int:
        """``config.module.attention_top_k``, ``"auto"`` resolved by cross-validation over genes.

        The k of :func:`stinfer.models.gene_baselines.choose_knn_k`: 5-fold CV over the
        training genes only (median PCC of each fold's genes predicted from the others).
        """
        self.knn_cv_scores: dict[int, float] | None = None
        k = self.config.module.attention_top_k
        if k != "auto" or self.config.module.gene_conditioning != "attention":
            return 0 if k == "auto" else int(k)
        vectors = self.gene_vectors(self.train_genes)
        logger.info(
            "top-k attention: choosing k by 5-fold k-NN cross-validation over %d training genes",
            len(self.train_genes),
        )
        best, scores = choose_knn_k(self.targets, vectors, seed=self.config.trainer.seed)
        self.knn_cv_scores = scores  # the k-NN baseline of the same genes reuses them
        logger.info("top-k attention: k = %d (CV median PCC %.3f)", best, scores[best])
        return int(best)

    def _build_module(self) -> CoxFormerSpatialModule:
        c = self.config.module
        module = CoxFormerSpatialModule(
            self.modality,
            embedding_dim=self.embeddings.shape[1],
            image_in_dim=self.image_in_dim,
            d_model=c.d_model,
            n_heads=c.n_heads,
            feedforward_dim=c.feedforward_dim,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            n_spot_layers=c.n_spot_layers,
            n_frequencies=c.n_frequencies,
            location_dim=c.location_dim,
            image_dim=c.image_dim,
            head_width=c.head_width,
            head_depth=c.head_depth,
            gene_conditioning=c.gene_conditioning,
            rank=c.rank,
            gene_hidden_dim=c.gene_hidden_dim,
            gene_hidden_layers=c.gene_hidden_layers,
            initial_level=float(self.targets.mean()) if hasattr(self, "targets") else 0.0,
            n_memory=len(self.train_genes),
            temperature=c.attention_temperature,
            coexpression_neighbours=c.coexpression_neighbours,
            attention_top_k=self.attention_top_k,
        )
        if c.gene_conditioning == "attention":
            module.readout.set_memory(torch.from_numpy(self.gene_vectors(self.train_genes)))
        return module

    def _image_features(self, slide: ad.AnnData, given: np.ndarray | None) -> np.ndarray:
        """``(n_spots * R, F)`` float32 image features (sub-spots flattened row-major)."""
        if given is None:
            features = slide_image_features(
                slide, self.config, int(self.config.training.sub_spot_grid)
            )
        else:
            features = np.asarray(given, dtype=np.float32)
            expected = (slide.n_obs, self.n_sub) if self.n_sub > 1 else (slide.n_obs,)
            if features.shape[: len(expected)] != expected or features.ndim != len(expected) + 1:
                raise InputError(
                    f"image_features has shape {features.shape}; expected {expected} + (F,) "
                    f"for {slide.n_obs} spots and sub_spot_grid {self.config.training.sub_spot_grid}."
                )
            features = features.reshape(slide.n_obs * self.n_sub, -1)
        if not np.all(np.isfinite(features)):
            raise InputError("image features hold NaN or infinite values.")
        return np.asarray(features, dtype=np.float32)

    def _spot_inputs(
        self, slide: ad.AnnData, image_features: np.ndarray | None, same_slide: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, np.ndarray]:
        """Module inputs for every (sub-)spot of ``slide`` and their pixel coordinates."""
        coords = spot_coordinates_px(slide)
        if self.n_sub > 1:
            pitch = spot_step_px(coords) if slide.n_obs > 1 else self.config.training.patch_size_px
            side = min(float(self.config.training.patch_size_px), pitch)
            offsets = sub_spot_offsets(int(self.config.training.sub_spot_grid)) * side
            coords = (coords[:, None, :] + offsets[None]).reshape(-1, 2)
        if same_slide:
            centre, half = self.coordinate_centre, self.coordinate_half_extent
        else:
            centre, half = coordinate_frame(spot_coordinates_px(slide))
        location = None
        if self.modality != "image":
            location = torch.from_numpy(((coords - centre) / half).astype(np.float32))
        features = None
        if self.modality != "spatial":
            if same_slide and image_features is None and self._slide_features is not None:
                raw = self._slide_features
            else:
                raw = self._image_features(slide, image_features)
            features = torch.from_numpy(
                ((raw - self.feature_mean) / self.feature_scale).astype(np.float32)
            )
        return location, features, coords

    def gene_vectors(self, genes: Sequence[str]) -> np.ndarray:
        """Standardised embeddings of ``genes``; :class:`InputError` naming genes without one."""
        rows = self.embedding_genes.get_indexer(list(genes))
        if (rows < 0).any():
            missing = [g for g, r in zip(genes, rows, strict=True) if r < 0]
            raise InputError(
                f"{len(missing)} genes have no embedding (e.g. {', '.join(missing[:5])}); only "
                "genes in the embedding table can be imputed."
            )
        return self.embeddings[rows]

    # ----------------------------------------------------------------- training
    def train(self, spot_decoder: bool = True) -> FitResult:
        """Train on the training genes of the slide (CoxFormer S3); returns the fit history.

        Parameters
        ----------
        spot_decoder
            ``False`` trains the attention readout alone (its gene-level parameters), without
            the spot encoder, spot attention, head and base readout. With the attention
            readout at spot level (``sub_spot_grid`` 1) a gene's prediction on a slide that
            measures every training gene reads their measured profiles and the gene-level
            parameters only, and the two parts get gradients from separate loss terms, so
            for that use (e.g. the shuffled-embedding control of the held-out-genes
            protocol) the decoder is a cost without an effect; what still couples them, the
            gradient-norm clipping and the EMA stopping on the summed objective, is then
            computed on the attention's loss alone. Such a model cannot predict on a slide
            that lacks training genes (it refuses).
        """
        c, training = self.config, self.config.training
        if not spot_decoder and (not self.module.uses_memory or self.n_sub > 1):
            raise InputError(
                "train(spot_decoder=False) needs the attention readout at spot level "
                "(gene_conditioning='attention', sub_spot_grid=1): other readouts and "
                "sub-spots predict through the spot decoder."
            )
        location, features, _ = self._spot_inputs(self.slide, None, same_slide=True)
        embeddings = torch.from_numpy(self.gene_vectors(self.train_genes))
        fraction = training.validation_fraction if self.module.uses_memory else 0.0
        n_genes = len(self.train_genes)
        validation = validation_split(n_genes, fraction, c.trainer.seed)[1]
        is_validation = None
        if len(validation):
            is_validation = torch.zeros(n_genes, dtype=torch.bool)
            is_validation[torch.from_numpy(validation)] = True
        task = CoxFormerSpatialTask(
            self.module,
            c,
            location,
            features,
            torch.from_numpy(self.targets),
            embeddings,
            self.n_sub,
            is_validation,
            spot_decoder,
        )
        generator = torch.Generator().manual_seed(c.trainer.seed)
        batch = min(training.batch_genes, n_genes)
        n_draws = max(n_genes, training.min_steps_per_epoch * batch)
        loader = DataLoader(
            TensorDataset(torch.arange(n_genes)),
            batch_size=batch,
            sampler=torch.utils.data.RandomSampler(
                range(n_genes), num_samples=n_draws, generator=generator
            ),
            drop_last=n_draws > batch,
        )
        # S3's rule for the whole model: EMA of the training objective, best weights restored
        self.early_stopping = EMAEarlyStopping(
            "train/objective",
            training.ema_beta,
            training.min_relative_improvement,
            training.patience,
        )
        callbacks: list[L.Callback] = [self.early_stopping]
        val_loader = None
        if len(validation):
            # then the attention's gene-level parameters get the epoch where genes that never
            # took a gradient step were predicted best: on small panels they overfit the
            # training genes long before the spot decoder has converged
            val_loader = DataLoader(
                TensorDataset(torch.from_numpy(validation)), batch_size=training.predict_batch_genes
            )
            prefixes = tuple(f"module.readout.{n}" for n in GeneAttentionReadout.GENE_LEVEL)
            self.gene_level_best = BestWeights("val/loss", "min", prefixes)
            callbacks.append(self.gene_level_best)
        logger.info(
            "CoxFormer spatial (%s): training on %d genes x %d spots (at most %d epochs, "
            "EMA early stopping)%s",
            self.modality,
            n_genes,
            self.slide.n_obs,
            c.trainer.max_epochs,
            "" if spot_decoder else ", attention readout only",
        )
        self.fit_result = fit(task, loader, val_loader, c.trainer, callbacks=callbacks)
        self.spot_decoder_trained = spot_decoder
        self._training_coexpression = task.coexpression
        self.fit_result.best_epoch = self.early_stopping.best_epoch
        self.fit_result.best_score = self.early_stopping.best_ema
        self.module.eval()
        best_epoch = self.early_stopping.best_epoch
        logger.info(
            "CoxFormer spatial (%s) trained on %d genes x %d spots in %.1f s (%s)",
            self.modality,
            n_genes,
            self.slide.n_obs,
            self.fit_result.train_seconds,
            f"{len(self.fit_result.history)} epochs, no finite training objective"
            if best_epoch is None
            else f"best smoothed training objective {self.early_stopping.best_ema:.4g} at "
            f"epoch {best_epoch + 1} of {len(self.fit_result.history)}, its weights restored",
        )
        return self.fit_result

    # ----------------------------------------------------------------- inference
    def memory_targets(self, slide: ad.AnnData) -> np.ndarray | None:
        """``(n_spots, n_train)`` measured log1p CP10k of the training genes on ``slide``.

        The attention readout's memory (see :class:`~stinfer.nn.coxformer.GeneAttentionReadout`):
        on the training slide its targets; on another slide the training genes' measurements
        there when it has every one of them (totals over the slide's genes); otherwise
        ``None``: the module predicts them with its base readout.
        """
        if not self.module.uses_memory:
            return None
        if slide is self.slide and getattr(self, "targets", None) is not None:
            return self.targets
        if not pd.Index(self.train_genes).isin(slide.var_names).all():
            logger.info(
                "slide does not measure every training gene: their profiles there are "
                "predicted (base readout)"
            )
            return None
        return slide_log1p_cp10k(slide, self.train_genes)

    @torch.no_grad()
    def _predict_log1p(
        self,
        genes: Sequence[str],
        location: torch.Tensor | None,
        features: torch.Tensor | None,
        memory_targets: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(n_rows, len(genes))`` float32 log1p-CP10k at every input row (spot or sub-spot)."""
        if memory_targets is None and not getattr(self, "spot_decoder_trained", True):
            raise InputError(
                "this model was trained without its spot decoder (train(spot_decoder=False)): "
                "it predicts only on slides that measure every training gene."
            )
        self.module.eval()
        device = next(self.module.parameters()).device
        vectors = torch.from_numpy(self.gene_vectors(genes)).to(device)
        generator = torch.Generator().manual_seed(self.config.trainer.seed)
        tokens = self.module.spot_tokens(
            None if location is None else location.to(device),
            None if features is None else features.to(device),
            self.config.module.group_size,
            generator,
        )
        if memory_targets is not None:
            memory = torch.from_numpy(np.asarray(memory_targets, dtype=np.float32)).to(device)
        elif self.module.uses_memory:
            memory = self.module.memory_estimate(
                tokens, self.n_sub, self.config.training.predict_batch_genes
            )
        else:
            memory = None
        graph, own = None, None
        if memory is not None:
            cached = getattr(self, "_training_coexpression", None)
            if cached is not None and memory_targets is getattr(self, "targets", None):
                graph = cached.to(device)  # the training slide's graph, computed in train()
            else:
                graph = self.module.readout.coexpression(memory)
            own = torch.from_numpy(pd.Index(self.train_genes).get_indexer(list(genes)))
            own = own.to(device)
        size = self.config.training.predict_batch_genes
        parts = [
            self.module.readout_pair(
                tokens,
                vectors[start : start + size],
                memory,
                rows_per_spot=self.n_sub,
                coexpression=graph,
                own=None if own is None else own[start : start + size],
            )[1]
            .float()
            .cpu()
            for start in range(0, len(genes), size)
        ]
        return torch.cat(parts, dim=1).numpy()

    def _result(
        self,
        values: np.ndarray,
        genes: Sequence[str],
        obs: pd.DataFrame,
        coords: np.ndarray,
        slide: ad.AnnData,
        kind: str,
    ) -> ad.AnnData:
        result = ad.AnnData(
            X=values.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes)))
        )
        result.var["measured_on_slide"] = result.var_names.isin(slide.var_names)
        result.var["training_gene"] = result.var_names.isin(self.train_genes)
        result.obsm["spatial"] = np.asarray(coords, dtype=np.float64)
        if "stinfer" in slide.uns:
            result.uns["stinfer"] = dict(slide.uns["stinfer"])
        result.uns["coxformer_spatial"] = {
            "kind": kind,
            "modality": self.modality,
            "preset": self.config.preset,
            "n_train_genes": len(self.train_genes),
        }
        library = slide_library_sizes(slide)
        if result.n_obs != slide.n_obs:  # sub-spots: each an equal share of its spot's library
            library = np.repeat(library / self.n_sub, self.n_sub)
        return annotate_log1p_cp10k(result, library, slide.n_vars)

    def impute(
        self,
        genes: Sequence[str] | None = None,
        slide: ad.AnnData | None = None,
        image_features: np.ndarray | None = None,
    ) -> ad.AnnData:
        """Predicted expression of ``genes`` at every spot of ``slide`` (default: the training slide).

        Any gene with an embedding works, measured on the slide or not. On a new slide the
        ``spatial`` modality reads the new slide's coordinates in its own frame (scaled to
        its extent) and ``image``/``fused`` its image (or ``image_features``). With
        ``sub_spot_grid > 1`` the spot values are the aggregates of the sub-spot predictions.

        Returns
        -------
        AnnData
            Spots x genes: ``layers["log1p_cp10k"]`` = the predicted log1p CP10k (float32,
            totals over the slide's measured genes), ``X`` = the expected counts they give with
            each spot's library (``obs["library_size"]``; 1e4 for a spot without counts), the
            record in ``uns["stinfer"]["expression"]``
            (:mod:`stinfer.io.prediction_layout`); the slide's spot names and
            identity columns (:func:`~stinfer.io.slide_data.spot_obs`), ``obsm["spatial"]``
            and ``uns["stinfer"]``; ``var["measured_on_slide"]``,
            ``var["training_gene"]``, ``uns["coxformer_spatial"]``.
        """
        slide = self.slide if slide is None else slide
        genes = list(self.train_genes if genes is None else genes)
        if not genes:
            raise InputError("impute: give at least one gene.")
        same = slide is self.slide
        location, features, _ = self._spot_inputs(slide, image_features, same_slide=same)
        values = self._predict_log1p(genes, location, features, self.memory_targets(slide))
        values = aggregate_sub_spots(torch.from_numpy(values), self.n_sub).numpy()
        return self._result(values, genes, spot_obs(slide), slide.obsm["spatial"], slide, "spots")

    def predict(
        self, slide: ad.AnnData, genes: Sequence[str] | None = None, image_features=None
    ) -> ad.AnnData:
        """:meth:`impute` on a new slide (same as ``impute(genes, slide=slide)``)."""
        return self.impute(genes, slide=slide, image_features=image_features)

    def super_resolve(
        self,
        genes: Sequence[str] | None = None,
        slide: ad.AnnData | None = None,
        image_features: np.ndarray | None = None,
    ) -> ad.AnnData:
        """Sub-spot predictions (``sub_spot_grid x sub_spot_grid`` per spot) of ``genes``.

        Returns an AnnData of ``n_spots * r * r`` sub-spots: ``obs["spot"]`` (the parent spot),
        ``obs["sub_row"]``, ``obs["sub_col"]``, the parent's identity columns
        (:func:`~stinfer.io.slide_data.spot_obs`: ``sample_id``, ``array_row``, ...), ``obsm["spatial"]`` = sub-spot centres in the
        slide's full-resolution pixels (``r x r`` tiles of a square of side ``min(patch,
        spot pitch)`` centred on the spot), ``layers["log1p_cp10k"]`` and ``X`` as
        :meth:`impute` (a sub-spot's library: its spot's over ``r * r``); ``uns["stinfer"]`` is the
        slide's with ``spot_diameter_px`` None (a sub-spot has no capture-spot size).
        """
        grid = int(self.config.training.sub_spot_grid)
        if grid < 2:
            raise InputError(
                "super_resolve needs a model trained with sub_spot_grid >= 2 (e.g. 4); this "
                "one predicts whole spots."
            )
        slide = self.slide if slide is None else slide
        genes = list(self.train_genes if genes is None else genes)
        location, features, coords = self._spot_inputs(
            slide, image_features, same_slide=slide is self.slide
        )
        values = self._predict_log1p(genes, location, features, self.memory_targets(slide))
        spots = np.repeat(np.asarray(slide.obs_names), self.n_sub)
        index = np.tile(np.arange(self.n_sub), slide.n_obs)
        obs = pd.DataFrame(
            {"spot": spots, "sub_row": index // grid, "sub_col": index % grid},
            index=[f"{s}_{i}" for s, i in zip(spots, index, strict=True)],
        )
        parents = spot_obs(slide)
        for column in parents.columns:  # each sub-spot carries its parent spot's identity
            obs[column] = np.repeat(parents[column].to_numpy(), self.n_sub)
        result = self._result(values, genes, obs, coords, slide, f"sub_spots_{grid}x{grid}")
        if "stinfer" in result.uns:
            # a sub-spot is not a capture spot: its drawn size (scanpy's spot_diameter_fullres,
            # written by prepare_for_h5ad) then comes from the sub-spot spacing
            result.uns["stinfer"]["spot_diameter_px"] = None
        return result

    def detect_regions(
        self,
        n_regions: int,
        genes: Sequence[str] | None = None,
        labels: Sequence | np.ndarray | pd.Series | None = None,
        imputed: ad.AnnData | None = None,
        seed: int = 0,
    ) -> tuple[np.ndarray, float | None]:
        """Cluster imputed expression into ``n_regions`` domains; ARI against ``labels`` if given.

        Uses the project's domain clustering (:func:`stinfer.metrics.cluster_domains`:
        depth normalisation, PCA, k-means) on the CP10k of the imputed genes (default: the
        training genes). Returns ``(region per spot, ARI or None)``.
        """
        imputed = self.impute(genes) if imputed is None else imputed
        cp10k = np.expm1(np.asarray(imputed.layers[LOG1P_LAYER], dtype=np.float64)).clip(min=0)
        regions = cluster_domains(cp10k, n_regions, seed=seed)
        ari = None
        if labels is not None:
            ari = cluster_ari(cp10k, np.asarray(labels, dtype=object), n_regions, seed=seed)
        return regions, ari

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` (config, genes, frames) and ``weights.safetensors`` (the
        module's weights and the standardised embedding table, ``embeddings``)."""
        record = {
            "modality": self.modality,
            "train_genes": self.train_genes,
            "embedding_genes": [str(g) for g in self.embedding_genes],
            "image_in_dim": self.image_in_dim,
            "attention_top_k": self.attention_top_k,
            "coordinate_centre": [float(v) for v in self.coordinate_centre],
            "coordinate_half_extent": float(self.coordinate_half_extent),
            "embedding_mean": [float(v) for v in self.embedding_mean],
            "embedding_scale": [float(v) for v in self.embedding_scale],
            "spot_decoder_trained": bool(getattr(self, "spot_decoder_trained", True)),
        }
        if self.image_in_dim:
            record["feature_mean"] = [float(v) for v in self.feature_mean]
            record["feature_scale"] = [float(v) for v in self.feature_scale]
        return write_model_folder(
            directory,
            self.model_type,
            self.config.to_dict(),
            record,
            self.module,
            {"embeddings": self.embeddings},
            overwrite,
        )

    @classmethod
    def load(
        cls, directory: str | os.PathLike, slide: ad.AnnData | None = None
    ) -> CoxFormerSpatial:
        """Load a model written by :meth:`save` (safetensors and JSON: nothing is unpickled).

        ``slide`` (optional) becomes the default slide of :meth:`impute`; without it pass
        ``slide=`` to every call. Folders saved before the format had ``model_type``
        (``state.json`` and ``embeddings.npy``) load too; a folder of another model type is
        an :class:`InputError`.
        """
        saved = read_saved_model(directory, cls.model_type, LEGACY_LAYOUTS["coxformer_spatial"])
        config = CoxFormerSpatialConfig.from_dict(saved.config)
        weights = saved.tensors()
        if saved.format_version == 0:
            record = json.loads((saved.directory / "state.json").read_text())
            embeddings = np.load(saved.directory / "embeddings.npy", allow_pickle=False)
        else:
            record = saved.state
            embeddings = weights.pop("embeddings").numpy()
        model = cls.__new__(cls)
        model.config = config
        model.modality = canonical_modality(record["modality"])  # older saves: location/both
        model.slide = slide
        model.train_genes = list(record["train_genes"])
        model.embedding_genes = pd.Index(record["embedding_genes"])
        model.embeddings = embeddings
        model.embedding_mean = np.asarray(record["embedding_mean"])
        model.embedding_scale = np.asarray(record["embedding_scale"])
        model.image_in_dim = record["image_in_dim"]
        model.attention_top_k = int(record.get("attention_top_k", 0))
        model.coordinate_centre = np.asarray(record["coordinate_centre"])
        model.coordinate_half_extent = float(record["coordinate_half_extent"])
        model.n_sub = int(config.training.sub_spot_grid) ** 2
        model.spot_decoder_trained = bool(record.get("spot_decoder_trained", True))
        model._slide_features = None
        if model.image_in_dim:
            model.feature_mean = np.asarray(record["feature_mean"], dtype=np.float32)
            model.feature_scale = np.asarray(record["feature_scale"], dtype=np.float32)
        model.module = model._build_module()
        model.module.load_state_dict(weights)
        model.module.eval()
        model.fit_result = None
        model.early_stopping = None
        model.gene_level_best = None
        return model

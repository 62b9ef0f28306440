"""STEvs over AnnData: the histology-to-expression model a user holds.

``STEvs(train_slides, genes, config)`` builds the tensors of the training slides (spot patches,
coordinates in microns, counts of the chosen genes), trains the
:class:`~stinfer.nn.stevs.STEvsModule` through the project's one training path
(:func:`stinfer.train.fit`), and predicts NB means for new slides from their H&E image and
coordinates (``mode="fused"``), the image alone (``"image"``) or the coordinates alone
(``"spatial"``; STEvs Table 5).

Presets (:data:`PRESETS`): ``paper`` is exactly the seed's setting; ``fast`` is for a 2-core CPU
without pretrained weights (see :func:`fast_preset` for every difference and why).

Examples
--------
>>> model = STEvs([section1], genes=genes, config="fast")  # doctest: +SKIP
>>> model.train()                                         # doctest: +SKIP
>>> prediction = model.predict(section2)                  # AnnData, X = predicted counts
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from stinfer.data.feature_store import (
    FeatureExtractor,
    FeatureExtractorSpec,
    FeatureStore,
    module_weights_identity,
)
from stinfer.data.patches import PatchSpec, iter_spot_patches, spot_patches
from stinfer.data.spot_dataset import PatchSource, SlideSpots, SpotDataset, stacked_batch
from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output
from stinfer.io.prediction_layout import (
    LIBRARY_COLUMN,
    LOG1P_LAYER,
    annotate_counts,
    expression_record,
    log1p_cp10k_of,
)
from stinfer.io.slide_data import (
    check_genes,
    panel_counts_csr,
    prepare_for_h5ad,
    slide_id,
    slide_meta,
    spot_coordinates_um,
    spot_obs,
    validation_spot_mask,
)
from stinfer.metrics import per_gene_pearson
from stinfer.modalities import canonical_modality
from stinfer.models.configs import move_fields, resolve_preset
from stinfer.models.persistence import LEGACY_LAYOUTS, read_saved_model, write_model_folder
from stinfer.models.uncertainty import (
    MixtureMoments,
    UncertaintyConfig,
    apply_calibration,
    central_intervals,
    fit_calibration,
    interval_layer_names,
)
from stinfer.nn.encoders import SlideColourNormaliser, colour_moments
from stinfer.nn.fusion import PoEFusion, calibration_offsets
from stinfer.nn.stevs import STEvsConfig, STEvsModule
from stinfer.train import FitResult, TrainerConfig, fit, gather_rows

logger = logging.getLogger("stinfer")

PATCH_NORMALIZATIONS = ("minmax", "fixed")
COLOUR_NORMALIZATIONS = ("none", "slide")
# Prediction holds a slide's patches in memory up to this size (a 4,000-spot Visium slide at
# 160 px is ~0.3 GB); larger slides (Visium HD) are streamed from the image chunk by chunk.
IN_MEMORY_PATCH_BYTES = 1 << 30
# Candidate PoE shifts of the fusion calibration (log-precision units, see calibration_offsets):
# from "coordinates only" to "image only" in steps of a factor e^0.5 in the precision ratio.
FUSION_CALIBRATION_SHIFTS = tuple(float(v) for v in np.arange(-16.0, 16.25, 0.5))
FUSION_CALIBRATIONS = ("none", "validation", "distance")
# The distance-aware fusion fits each expert's latent distribution on at most this many seeded
# training spots: a Gaussian in the latent dimension needs thousands at most, not a cohort.
DISTANCE_FIT_SPOTS = 20_000
# A streamed slide's colour moments are estimated from this many seeded random spots.
COLOUR_SAMPLE_SPOTS = 4096
# Posterior samples per validation spot when the uncertainty calibration is fitted.
CALIBRATION_SAMPLES = 30
# Version of what STEvs._encoder_input does to a patch, in the feature store's key: change it
# when that step changes, so features stored by an older STEvs are not read as current ones.
FEATURE_PIPELINE_VERSION = 1


# --------------------------------------------------------------------------- configuration
@dataclass
class STEvsTrainingConfig:
    """How STEvs sees the data and trains, beside the module's hyperparameters.

    ``patch_normalization``: ``"minmax"`` is STEvs Eq. 39 (each patch stretched to [-1, 1]);
    ``"fixed"`` maps 0..255 to [-1, 1] for every patch alike, which keeps absolute stain
    intensity and cellularity (what a colour-statistics regression uses) visible to the encoder.

    ``colour_normalization="slide"`` standardises each slide's patches, channel by channel,
    to the training slides' colour moments before anything else
    (:class:`~stinfer.nn.encoders.SlideColourNormaliser`): the stain of a new section or lab
    differs as a whole, and the encoder should read differences between spots, not the
    section's overall colour.

    ``fusion_calibration`` corrects what the Product of Experts believes of each expert after
    training. ``"distance"`` (the ``fast`` preset) makes each expert's variance grow with how far
    a spot's posterior mean (for the image also its backbone features) lies from the training
    spots', and never lets it fall below the expert's variance on its most certain training
    spots (:class:`~stinfer.nn.fusion.PoEFusion`), per spot and at prediction time: an image
    expert reading a section unlike the training ones or a patch that is not tissue, or a
    coordinate expert outside the training tissue, then weighs less. The experts' own
    variances are learned on the training spots, where a flexible encoder is confident, and
    carry nothing about transfer to another section (``benchmarks/synthetic_fusion.yaml``).
    ``"validation"`` instead shifts the experts' relative precision to what predicts the
    validation spots best (:meth:`STEvs._calibrate_fusion`); it is off in both presets: random
    validation spots of the training section reward the coordinate expert for interpolating
    between neighbours, which it cannot do on another section
    (``benchmarks/her2st_fusion_calibration.yaml``).

    ``observed_library`` (``expression_scale="profile"`` only): the NB term of a training spot
    uses its observed total over the panel as library size (scVI), so the composition head
    never has to explain depth; the library head is then trained by its own term
    (``STEvsConfig.library_weight``) and predicts depth at test time. ``initialise_decoder``
    starts the gene decoder's output biases at the training data's means
    (:meth:`~stinfer.nn.decoders.GeneDecoder.initialise_from_counts`).

    ``feature_store`` (a zarr folder, :class:`~stinfer.data.feature_store.FeatureStore`;
    needs ``module.freeze_encoder`` and ``cache_features``): each slide's frozen backbone
    features, for training, :meth:`STEvs.adapt` and prediction, are read from the store, or
    computed once and written there, instead of being recomputed by every model and run. They
    are exactly the features STEvs computes itself: its own input pipeline (the colour step,
    then ``patch_normalization``) runs on the store's patches, and the feature key records
    that pipeline, the slide's colour transform (``colour_normalization="slide"``: the gain
    and shift fitted on the training slides, so models fitted on other slides get their own
    key) and the digest of the backbone's weights, so STEvs's features never mix with the
    feature probe's (timm-scaled) ones on the same encoder. Patches passed in (``patches=``)
    never touch the store; with cached features no test-time augmentation is applied.
    """

    patch: PatchSpec = field(default_factory=PatchSpec)  # STEvs D.1.2: 160-px patches
    patch_normalization: str = "minmax"  # STEvs Eq. 39
    colour_normalization: str = "none"  # "slide": per-slide colour standardisation (stinfer)
    patch_cache_dir: str | None = None  # on-disk patch cache, reused across runs
    val_fraction: float = 0.1  # validation spots drawn when no obs[SPLIT_KEY] marks them
    batch_size: int = 128  # public STEvs code
    augment: bool = False  # random flips / 90-degree rotations of training patches
    colour_jitter: float = 0.0  # sd of per-patch, per-channel gain and offset (with augment)
    test_time_augmentation: bool = False  # average predictions over the 8 flips/rotations
    modality_dropout: float = 0.0  # probability a batch trains one expert alone (MVAE subsets)
    observed_library: bool = False  # profile scale: NB term uses the observed library (scVI)
    subset_elbo: bool = False  # each expert alone also explains the counts (MVAE subsets)
    fusion_calibration: str = "none"  # "distance" / "validation": see the class docstring
    initialise_decoder: bool = True  # gene decoder output biases start at the training means
    cache_features: bool = True  # frozen encoder: compute backbone features once per slide
    feature_store: str | None = None  # zarr store of those features, shared across runs
    predict_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.patch_normalization not in PATCH_NORMALIZATIONS:
            raise InputError(
                f"patch_normalization must be one of {PATCH_NORMALIZATIONS}; "
                f"got {self.patch_normalization!r}"
            )
        if self.colour_normalization not in COLOUR_NORMALIZATIONS:
            raise InputError(
                f"colour_normalization must be one of {COLOUR_NORMALIZATIONS}; "
                f"got {self.colour_normalization!r}"
            )
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        if not 0 <= self.modality_dropout <= 1:
            raise InputError(f"modality_dropout must be in [0, 1]; got {self.modality_dropout}")
        if self.fusion_calibration not in FUSION_CALIBRATIONS:
            raise InputError(
                f"fusion_calibration must be one of {FUSION_CALIBRATIONS}; "
                f"got {self.fusion_calibration!r}"
            )


@dataclass
class STEvsModelConfig:
    """Everything that defines a STEvs run: the module's hyperparameters (``module``), how it
    sees the data and learns (``training``: patches, batch size, augmentation, ...) and how the
    run goes (``trainer``: epochs, seed, devices, precision, model selection)."""

    module: STEvsConfig = field(default_factory=STEvsConfig)
    training: STEvsTrainingConfig = field(default_factory=STEvsTrainingConfig)
    trainer: TrainerConfig = field(  # STEvs Sec. 4.2: 100 epochs
        default_factory=lambda: TrainerConfig(max_epochs=100, monitor="val/pcc_median")
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (stored with a saved model)."""
        return {
            "module": self.module.to_dict(),
            "training": dataclasses.asdict(self.training),
            "trainer": dataclasses.asdict(self.trainer),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> STEvsModelConfig:
        """Build from :meth:`to_dict`'s layout; older layouts are upgraded first
        (:func:`upgrade_config_dict`)."""
        values = upgrade_config_dict(values)
        training = dict(values.get("training", {}))
        if "patch" in training:
            training["patch"] = PatchSpec(**training["patch"])
        config = cls(
            module=STEvsConfig.from_dict(values.get("module", {})),
            training=STEvsTrainingConfig(**training),
        )
        if "trainer" in values:
            config.trainer = TrainerConfig(**values["trainer"])
        return config


# Fields of older configs -> their one place now (stinfer.models.configs.move_fields), newest
# layout first: the trainer sat under `training`; before that `module.epochs` and
# `module.batch_size` duplicated the training's values.
STEVS_MOVED_FIELDS = {
    "training.trainer": "trainer",
    "module.epochs": "trainer.max_epochs",
    "module.batch_size": "training.batch_size",
}


def upgrade_config_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a saved ``config`` or nested overrides) with moved fields in their one place.

    The trainer was ``training.trainer`` and is ``trainer`` now. Before that,
    ``module.epochs`` and ``module.batch_size`` duplicated ``training.trainer.max_epochs`` and
    ``training.batch_size``, and only the training values were ever used: an old saved config
    has both, so its module copies are dropped; an override that sets only the module field
    (an old YAML) sets the trainer's or training's field instead. When a value is given under
    an old and a new name, the new one wins (:data:`STEVS_MOVED_FIELDS`,
    :func:`~stinfer.models.configs.move_fields`).
    """
    return move_fields(values, STEVS_MOVED_FIELDS)


def paper_preset() -> STEvsModelConfig:
    """Exactly the seed's setting (STEvs Sec. 4.2, Table 6, Appendix C-D).

    Swin-T on 160-px min-max normalised patches, MLP coordinate encoder, PoE, image decoder,
    alignment, NB decoder of absolute counts; lambda_img 1, lambda_rna 10, beta 0.5, gamma 0.5;
    AdamW lr 1e-4; 100 epochs. One stinfer addition: the gene decoder's output biases start
    at the training data's means (``initialise_decoder``; an initialisation, no hyperparameter
    changes). The paper used ImageNet weights (pass
    ``module.pretrained="hub"`` when online, or a local file); without them the encoder starts
    from random initialisation.

    Numerics: on a CPU with bf16 in hardware (AVX512-BF16 / AMX) training runs under bf16
    autocast (``TrainerConfig.cpu_bf16``; weights and optimiser stay fp32, prediction is
    fp32): the Swin-T and the 160-px image decoder are several times faster per epoch, and
    the cross-slice accuracy of bf16 and fp32 runs agreed within the spread between training
    seeds (``benchmarks/scale.py`` measures both; ``stinfer train --precision 32-true``
    forces fp32). GPUs train in bf16 autocast as every stinfer model does.
    """
    config = STEvsModelConfig()
    config.trainer.cpu_bf16 = True
    return config


def fast_preset() -> STEvsModelConfig:
    """For a 2-core CPU with no pretrained weights; every difference from ``paper``:

    - backbone ``stinfer_histology_cnn`` (a 4-stage CNN on the 2x-downsampled patch plus the
      patch's colour statistics, :mod:`stinfer.nn.backbones`), trained from scratch
      (``freeze_encoder=False``): a random frozen Swin-T is worse than six colour statistics,
      and a Swin-T cannot be trained from ~200 spots;
    - ``patch_normalization="fixed"`` instead of per-patch min-max (Eq. 39): min-max erases
      the stain intensity that carries cellularity;
    - ``expression_scale="profile"``: NB mean = composition x predicted library size, so the
      depth of a spot is one number to learn rather than part of every gene's output; trained
      scVI-style (``observed_library=True``: the NB term sees the observed panel total, so the
      composition learns composition only) with the log-library head fitted by its own squared
      error, weighted ``library_weight=30`` (depth dominates raw-count correlations: the
      observed depth times the mean profile alone already scores high, ``docs/results.md``
      "STEvs ``fast`` preset");
    - ``image_weight=0.1`` instead of 1: with the reconstruction summed over a patch's pixels
      it otherwise outweighs the expression term on a few hundred genes and the latent
      spends its capacity on the image;
    - latent 32 instead of 128, gene decoder dropout 0.1, image decoder channels
      (64, 32, 16, 8) instead of (256, 128, 64, 32), reconstructing the patch average-pooled
      to 40 px (``image_recon_size=40``) instead of the full 160 px: sized for ~200-4,000
      training spots and CPU time (the full-size decoder dominates a CPU training step);
    - lr 1e-3 instead of 1e-4 (training from scratch), batch 32, KL annealed over 20 epochs;
    - augmentation (flips, 90-degree rotations), test-time augmentation, and modality dropout
      0.3 so the image expert alone must explain expression (the coordinates of a new section
      are not registered to the training section's);
    - ``colour_normalization="slide"``: each slide's patches are standardised to the training
      slides' colour moments (Reinhard-style, per RGB channel), so a section stained or
      scanned differently as a whole is read like the training one;
    - 30 epochs instead of 100, with stochastic weight averaging as the final model (the mean
      of the weights at the end of epochs 14-29, ``swa_epoch_start=0.5``; BatchNorm
      statistics recomputed) instead of the best epoch (validation median PCC is still logged
      every epoch, ``monitor=None``). With ~200 training spots, longer training keeps raising
      the within-section validation PCC while the prediction of other sections gets worse
      (it learns the section's own appearance), and picking the best epoch on a validation
      split of ~20 spots of the same section chases noise (it lost cross-slice accuracy
      against the last epoch); the average of the last epochs varies less between training
      seeds than the last epoch alone (figures: ``docs/results.md`` "STEvs ``fast``
      preset"). 30 epochs fit the 5-minute CPU budget with room to spare
      (``docs/results/scale.md``);
    - ``coord_encoder="fourier"`` (random Gaussian Fourier features, ``fourier_scale=1`` in units
      of the tissue radius that :class:`~stinfer.nn.encoders.CoordinateNormaliser` divides by,
      as the public STEvs code) instead of the plain MLP of Sec. 3.1: an MLP on two raw
      numbers learns only smooth, nearly linear maps of position from a few hundred spots, so
      the coordinate expert was weaker than a k-nearest-neighbour regression on coordinates
      and the fusion had little to add to the image. Larger scales (more, finer frequencies)
      memorise the training section's layout and transfer worse to a serial section;
    - ``subset_elbo=True``: besides the fused ELBO, each expert alone also decodes the counts
      (MVAE sub-sampled ELBOs, Wu & Goodman 2018), so each expert's Gaussian is a calibrated
      estimate on its own, which is what the product of experts assumes when it weighs them;
    - ``fusion_calibration="distance"``: each expert's variance grows with the distance of a
      spot's latent (and, for the image, its backbone features) from the training spots', and
      is floored at its training range, so an expert that extrapolates (an image unlike the
      training section's, a patch that is not tissue) is trusted less, spot by spot
      (:class:`~stinfer.nn.fusion.PoEFusion`).
    """
    module = STEvsConfig(
        backbone="stinfer_histology_cnn",
        freeze_encoder=False,
        latent_dim=32,
        expression_scale="profile",
        library_weight=30.0,
        image_weight=0.1,
        dropout=0.1,
        decoder_channels=(64, 32, 16, 8),
        image_recon_size=40,
        lr=1e-3,
        kl_anneal_epochs=20,
        coord_encoder="fourier",
        fourier_scale=1.0,
    )
    training = STEvsTrainingConfig(
        patch_normalization="fixed",
        colour_normalization="slide",
        batch_size=32,
        augment=True,
        test_time_augmentation=True,
        modality_dropout=0.3,
        observed_library=True,
        subset_elbo=True,
        fusion_calibration="distance",
    )
    trainer = TrainerConfig(max_epochs=30, monitor=None, swa_epoch_start=0.5)
    return STEvsModelConfig(module=module, training=training, trainer=trainer)


PRESETS = {"paper": paper_preset, "fast": fast_preset}


def resolve_config(config: STEvsModelConfig | str | None) -> STEvsModelConfig:
    """A config object from a preset name, a config, or ``None`` (the ``paper`` preset)."""
    return resolve_preset(PRESETS, config, STEvsModelConfig, "STEvs")


# --------------------------------------------------------------------------- slide tensors
def normalise_patches(patches: torch.Tensor, method: str) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` patches to float32 in [-1, 1] by ``method`` (see the config).

    Float input (0..255, e.g. colour-standardised) is accepted too and never modified."""
    values = patches.float()
    if method == "fixed":  # one new tensor, updated in place: the step is memory-bound
        scaled = values * (1 / 127.5) if values is patches else values.mul_(1 / 127.5)
        return scaled.sub_(1.0)
    flat = values.flatten(1)
    low = flat.min(1).values[:, None, None, None]
    high = flat.max(1).values[:, None, None, None]
    span = (high - low).clamp_min(1e-6)
    return torch.where(high > low, 2.0 * (values - low) / span - 1.0, torch.zeros_like(values))


def colour_jitter(patches: torch.Tensor, strength: float) -> torch.Tensor:
    """Random stain variation of ``(N, C, H, W)`` patches in [-1, 1]: per patch and channel,
    ``x * (1 + strength * a) + strength * b`` with ``a, b ~ N(0, 1)``, clipped to [-1, 1].

    Serial sections differ mostly in stain intensity and hue; training the encoder on jittered
    stains (the encoder input only, never the reconstruction target) makes it rely less on
    the training section's exact colours.
    """
    shape = (patches.shape[0], patches.shape[1], 1, 1)
    gain = 1.0 + strength * torch.randn(shape, device=patches.device, dtype=patches.dtype)
    offset = strength * torch.randn(shape, device=patches.device, dtype=patches.dtype)
    return (patches * gain + offset).clamp(-1.0, 1.0)


def dihedral(patches: torch.Tensor, index: int) -> torch.Tensor:
    """One of the 8 flips/rotations of ``(N, C, H, W)`` patches (index 0 is the identity)."""
    flipped = patches.flip(-1) if index >= 4 else patches
    return torch.rot90(flipped, index % 4, dims=(-2, -1))


def _numbered_chunks(chunks: Iterator[np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows, chunk)`` for consecutive chunks of spots, ``rows`` the chunk's slice."""
    start = 0
    for chunk in chunks:
        yield slice(start, start + len(chunk)), chunk
        start += len(chunk)


# --------------------------------------------------------------------------- Lightning task
EXPERT_WEIGHT_KEYS = ("image_expert_weight", "spatial_expert_weight")


def validation_split(
    slides: Sequence[ad.AnnData], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation spots of ``slides`` (indices into their spots, slide after slide).

    When the slides carry the protocol's split (``obs[SPLIT_KEY]``, e.g. the intra-slice
    protocol's 7:1:2 split, ``docs/DESIGN.md`` "Protocols"), its ``"val"`` spots are the
    validation spots, as for every other model. Otherwise a seeded ``val_fraction`` of the
    spots is drawn (none below 20 spots).

    Returns
    -------
    train_idx, val_idx : numpy.ndarray
        int64 indices; ``val_idx`` sorted (``train_idx`` in the drawn order when drawn).
    """
    marked = validation_spot_mask(slides)
    if marked is not None:
        return np.flatnonzero(~marked), np.flatnonzero(marked)
    n_spots = sum(slide.n_obs for slide in slides)
    order = np.random.default_rng(seed).permutation(n_spots)
    n_val = round(val_fraction * n_spots) if n_spots >= 20 else 0
    return order[n_val:].astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


class STEvsTask(L.LightningModule):
    """The STEvs training step (Eq. 3) and validation metric, for :func:`stinfer.train.fit`.

    Batches come from :class:`~stinfer.data.spot_dataset.SpotDataset`:
    ``(inputs, coords, counts, targets, slides)``; ``inputs`` are uint8 patches or cached
    backbone features; ``targets`` are uint8 patches for the image decoder (or empty);
    ``slides`` index ``colour_transforms`` ``(S, 2, C)``, each slide's colour gain and shift
    (:class:`~stinfer.nn.encoders.SlideColourNormaliser`), applied here to the batch's
    patches (cached features were computed from colour-standardised patches already). With
    ``adapt=True`` the RNA term is dropped (test-time adaptation on unlabelled slides: image,
    KL and alignment terms only).
    """

    def __init__(
        self,
        module: STEvsModule,
        training: STEvsTrainingConfig,
        adapt: bool = False,
        colour_transforms: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.training_config = training
        self.adapt = adapt
        self.colour_transforms = colour_transforms
        self._val_predictions: list[torch.Tensor] = []
        self._val_counts: list[torch.Tensor] = []
        self._val_expert_weights: list[torch.Tensor] = []
        # DDP (stinfer.train.lightning_strategy): a step that trains one expert alone, or
        # adapts without the RNA term, leaves parameters without a gradient
        self.find_unused_parameters = adapt or training.modality_dropout > 0

    def _prepare(self, inputs, targets, slides, augment: bool):
        """Patches as the encoder reads them and the reconstruction target (or ``None``):
        flipped/rotated together (uint8, the cheapest copy), colour-standardised per slide,
        normalised to [-1, 1]."""
        shared = targets is inputs  # the batch's patches are also the target
        if augment and inputs.dim() == 4:
            index = int(torch.randint(8, ()))
            inputs = dihedral(inputs, index)
            targets = inputs if shared else dihedral(targets, index)
        method = self.training_config.patch_normalization
        transforms = None
        if self.colour_transforms is not None:
            transforms = self.colour_transforms.to(inputs.device)[slides]

        def standardised(patches: torch.Tensor) -> torch.Tensor:
            if transforms is not None:
                patches = SlideColourNormaliser.apply(patches, transforms)
            return normalise_patches(patches, method)

        target = None
        if targets.dim() == 4:
            target = standardised(targets)
        if inputs.dim() == 4:
            inputs = target if shared else standardised(inputs)
            if augment and self.training_config.colour_jitter > 0:
                inputs = colour_jitter(inputs, self.training_config.colour_jitter)
        return inputs, target

    def _training_mode(self) -> str:
        dropout = self.training_config.modality_dropout
        if dropout == 0 or self.module.coord_encoder is None:
            return "fused"
        draw = float(torch.rand(()))
        if draw < dropout / 2:
            return "image"
        if draw < dropout:
            return "spatial"
        return "fused"

    def on_train_epoch_start(self) -> None:
        if self.adapt:  # the gene decoder is untouched: no gradients and no BatchNorm updates
            self.module.gene_decoder.eval()

    def training_step(self, batch, batch_idx):
        inputs, coords, counts, targets, slides = batch
        inputs, target = self._prepare(inputs, targets, slides, self.training_config.augment)
        mode = "fused" if self.adapt else self._training_mode()
        library = None
        if self.training_config.observed_library and not self.adapt:
            library = counts.sum(1).clamp_min(1.0)
        outputs = self.module(
            inputs,
            coords,
            mode=mode,
            sample=True,
            decode_image=target is not None,
            library_size=library,
        )
        epoch = self.current_epoch + 1
        if self.adapt:
            losses = self.module.adaptation_loss(outputs, target, epoch=epoch)
        else:
            losses = self.module.loss(outputs, counts, target, epoch=epoch)
            if self.training_config.subset_elbo and mode == "fused":
                subsets = self.module.subset_loss(outputs, counts, epoch, library)
                losses["subsets"] = subsets
                losses["loss"] = losses["loss"] + subsets
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=len(coords),
            )
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        inputs, coords, counts, targets, slides = batch
        inputs, _ = self._prepare(inputs, targets, slides, augment=False)
        outputs = self.module(inputs, coords, mode="fused", sample=False, decode_image=False)
        self._val_predictions.append(outputs["nb_mean"].float().cpu())
        self._val_counts.append(counts.float().cpu())
        weights = self.module.image_expert_weight(outputs)
        if weights is not None:
            self._val_expert_weights.append(weights.float().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_predictions:
            return
        # under DDP each rank validated its shard: the median PCC is of all validation spots
        n_val = len(self.trainer.val_dataloaders.dataset)
        predicted = self._gathered(self._val_predictions, n_val)
        observed = self._gathered(self._val_counts, n_val)
        correlations, _ = per_gene_pearson(predicted.numpy(), observed.numpy())
        # the same on every rank (gathered); sync_dist only says so to Lightning
        self.log("val/pcc_median", float(np.median(correlations)), sync_dist=True)
        if self._val_expert_weights:
            weights = self._gathered(self._val_expert_weights, n_val)
            self.log("val/image_expert_weight", float(weights.mean()), sync_dist=True)

    def _gathered(self, rows: list[torch.Tensor], n_total: int) -> torch.Tensor:
        """This epoch's validation rows of every rank (:func:`stinfer.train.gather_rows`),
        on the CPU; ``rows`` is emptied for the next epoch."""
        local = torch.cat(rows)
        rows.clear()
        return gather_rows(self, local.to(self.device), n_total).cpu()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the module's trainable parameters, lr and weight decay of its config (C.4.2).

        The fused implementation (one kernel for all parameters; the same update up to float
        rounding) where the parameters' device has one: on a CPU the optimiser step is a
        sizeable share of a ``fast`` step (``docs/results.md``). The optimiser belongs to the
        training task, not to :class:`~stinfer.nn.stevs.STEvsModule` (tensors in, losses out).
        """
        parameters = [p for p in self.module.parameters() if p.requires_grad]
        device = parameters[0].device.type if parameters else "cpu"
        return torch.optim.AdamW(
            parameters,
            lr=self.module.config.lr,
            weight_decay=self.module.config.weight_decay,
            fused=device in ("cpu", "cuda") or None,
        )


# --------------------------------------------------------------------------- the model
class STEvs:
    """STEvs (multimodal VAE: histology + coordinates -> NB expression) over AnnData slides.

    Parameters
    ----------
    train_slides
        Slides with raw counts, ``obsm["spatial"]`` and an image (see :mod:`stinfer.io`).
    genes
        Gene panel to predict (e.g. from :func:`stinfer.preprocess.select_genes`); every
        training slide must have them.
    config
        A :class:`STEvsModelConfig`, or a preset name (``"paper"``, ``"fast"``).

    Attributes
    ----------
    module : STEvsModule
        The torch module (tensors only).
    fit_result : FitResult | None
        Per-epoch metrics, best epoch and training seconds after :meth:`train`.
    """

    model_type = "stevs"  # the registry name (stinfer.models.registry), saved in config.json

    def __init__(
        self,
        train_slides: Sequence[ad.AnnData] | ad.AnnData,
        genes: Sequence[str],
        config: STEvsModelConfig | str | None = None,
    ) -> None:
        if isinstance(train_slides, ad.AnnData):
            train_slides = [train_slides]
        if not train_slides:
            raise InputError("STEvs needs at least one training slide.")
        self.config = resolve_config(config)
        self.genes = [str(gene) for gene in genes]
        if len(set(self.genes)) != len(self.genes) or not self.genes:
            raise InputError("genes must be a non-empty list of unique gene names.")
        self.train_slides = list(train_slides)
        for slide in self.train_slides:
            check_genes(slide, self.genes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.trainer.seed)  # same seed, same initial weights
            self.module = STEvsModule(num_genes=len(self.genes), config=self.config.module)
        self.module.coord_normalizer.fit(
            [torch.from_numpy(spot_coordinates_um(slide)) for slide in self.train_slides]
        )
        self.fit_result: FitResult | None = None
        self.validation_image_expert_weight: float | None = None
        self.fusion_calibration: dict[str, Any] | None = None
        self.uncertainty_calibration: dict[str, Any] | None = None
        self.feature_weights_id: str | None = None
        if self.config.training.feature_store is not None and not self._uses_cached_features():
            raise InputError(
                f"training.feature_store={self.config.training.feature_store!r} needs a frozen "
                "encoder with cached features (module.freeze_encoder=True and "
                "training.cache_features=True): a trained encoder's features change every "
                "step. Freeze the encoder or unset training.feature_store."
            )

    # ----------------------------------------------------------------- data
    def _require_image(self, slide: ad.AnnData) -> None:
        if slide_meta(slide)["image_path"] is None:
            raise InputError(
                f"slide {slide_id(slide)} has no image; STEvs needs H&E patches "
                "(`stinfer predict --mode spatial`, mode='spatial' in Python, works without one)."
            )

    @contextlib.contextmanager
    def _training_sources(
        self, slides: Sequence[ad.AnnData], patches: Sequence[np.ndarray] | None
    ) -> Iterator[list[PatchSource]]:
        """The patch source of every training slide, for the duration of a training run.

        Given ``patches`` are used as they are (in memory). Otherwise each slide's patches are
        extracted once into the patch cache (``patch_cache_dir``, or a temporary folder removed
        when training ends) and read from it per batch (:class:`PatchSource`).
        """
        if patches is not None:
            if len(patches) != len(slides):
                raise InputError(f"patches: {len(patches)} arrays for {len(slides)} slides")
            sources = [PatchSource(np.asarray(array)) for array in patches]
            for slide, source in zip(slides, sources, strict=True):
                if len(source) != slide.n_obs:
                    raise InputError(
                        f"patches has {len(source)} rows but the slide {slide.n_obs} spots"
                    )
            yield sources
            return
        for slide in slides:
            self._require_image(slide)
        spec = self.config.training.patch
        with contextlib.ExitStack() as stack:
            cache_dir = self.config.training.patch_cache_dir
            if cache_dir is None:
                cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="stinfer-"))
            yield [PatchSource(spot_patches(slide, spec, cache_dir=cache_dir)) for slide in slides]

    def _colour_transform(self, moments: torch.Tensor | None) -> torch.Tensor | None:
        """``(2, C)`` gain/shift of a slide with colour ``moments`` (``None``: no colour step)."""
        if self.config.training.colour_normalization == "none" or moments is None:
            return None
        if not bool(self.module.colour_normalizer.fitted):
            raise InputError("this STEvs model is not trained yet; call train() first")
        return self.module.colour_normalizer.transform(moments)

    def _encoder_input(
        self, patches: np.ndarray | torch.Tensor, transform: torch.Tensor | None
    ) -> torch.Tensor:
        """uint8 patches as the encoder reads them: colour-standardised, then normalised."""
        patches = torch.as_tensor(patches)
        if transform is not None:
            patches = SlideColourNormaliser.apply(patches, transform.expand(len(patches), -1, -1))
        return normalise_patches(patches, self.config.training.patch_normalization)

    def _coords(self, slide: ad.AnnData) -> torch.Tensor:
        coordinates = torch.from_numpy(spot_coordinates_um(slide))
        return self.module.coord_normalizer(coordinates).float()

    def _uses_cached_features(self) -> bool:
        return self.module.image_encoder.frozen and self.config.training.cache_features

    def _uses_feature_store(self) -> bool:
        return self.config.training.feature_store is not None and self._uses_cached_features()

    def _encode_patches(
        self, patches: np.ndarray | torch.Tensor, transform: torch.Tensor | None
    ) -> torch.Tensor:
        """Frozen backbone features ``(n, F)`` of one batch of a slide's uint8 patches, on the
        CPU (computed where the image encoder is: see :meth:`_encoder_on_feature_device`)."""
        device = next(self.module.image_encoder.parameters()).device
        inputs = self._encoder_input(patches, transform).to(device)
        return self.module.encode_image_features(inputs).cpu()

    def feature_device(self) -> torch.device:
        """Where frozen backbone features are computed: the run's GPU when the trainer may use
        one and CUDA sees one (``cuda:<LOCAL_RANK>`` in a DDP process), else where the module
        is. The features of every slide are computed before Lightning's fit moves the module
        to its device, so without this a GPU run would encode every patch on the CPU."""
        if self.config.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        return next(self.module.parameters()).device

    @contextlib.contextmanager
    def _encoder_on_feature_device(self) -> Iterator[None]:
        """The image encoder on :meth:`feature_device` within the block, back home after it."""
        encoder = self.module.image_encoder
        home = next(encoder.parameters()).device
        target = self.feature_device()
        if target == home:
            yield
            return
        encoder.to(target)
        try:
            yield
        finally:
            encoder.to(home)

    @torch.no_grad()
    def _features(self, source: PatchSource, transform: torch.Tensor | None) -> torch.Tensor:
        """Frozen backbone features ``(N, F)`` of a slide's patches, computed once, in chunks."""
        self.module.eval()
        size = self.config.training.predict_batch_size
        with self._encoder_on_feature_device():
            return torch.cat(
                [self._encode_patches(chunk, transform) for _, chunk in source.iter_chunks(size)]
            )

    def _feature_extractor(self, transform: torch.Tensor | None) -> FeatureExtractor:
        """What the feature store computes for a slide with colour ``transform``: the frozen
        backbone on STEvs's own encoder input, in batches of ``predict_batch_size`` (the
        batches of :meth:`_features`), keyed by the backbone's weights digest
        (:func:`~stinfer.data.feature_store.module_weights_identity`, kept in
        :attr:`feature_weights_id` and saved with the model) and by the input pipeline."""
        module, training = self.config.module, self.config.training
        backbone = self.module.image_encoder.backbone
        if self.feature_weights_id is None:
            self.feature_weights_id = module_weights_identity(backbone)
        input_scaling = {
            "pipeline": "stevs",
            "version": FEATURE_PIPELINE_VERSION,
            "patch_normalization": training.patch_normalization,
            "colour_transform": None if transform is None else transform.tolist(),
        }
        spec = FeatureExtractorSpec(
            encoder=module.backbone,
            encoder_kwargs={
                "img_size": module.patch_size,
                "in_chans": module.in_chans,
                **module.backbone_kwargs,
            },
            weights=module.pretrained,
            seed=self.config.trainer.seed,
            patch=training.patch,
            batch_size=training.predict_batch_size,
            chunk_size=training.predict_batch_size,
            input_scaling=input_scaling,
        )
        return FeatureExtractor(
            spec,
            backbone,
            self.feature_weights_id,
            encode=lambda patches: self._encode_patches(patches, transform),
        )

    @torch.no_grad()
    def _stored_features(self, slide: ad.AnnData, transform: torch.Tensor | None) -> torch.Tensor:
        """The frozen backbone features ``(N, F)`` of ``slide`` from ``training.feature_store``:
        read when stored under this model's key, else computed (from the slide's image) and
        written there; equal to :meth:`_features` of its patches."""
        self.module.eval()
        store = self.config.training.feature_store
        with self._encoder_on_feature_device():
            result = FeatureStore(store).get_or_compute(slide, self._feature_extractor(transform))
        logger.info(
            "STEvs features of slide %s: %s %s (key %s)",
            slide_id(slide),
            "computed into" if result.computed else "read from",
            store,
            result.key,
        )
        return torch.from_numpy(result.features)

    def _dataset(
        self,
        slides: Sequence[ad.AnnData],
        sources: Sequence[PatchSource],
        with_counts: bool,
        use_store: bool = False,
    ) -> tuple[SpotDataset, torch.Tensor | None]:
        """The training spots of ``slides`` and their slides' ``(S, 2, C)`` colour transforms.

        Fits the colour normaliser on these slides first when it is not fitted yet. Cached
        features come from the feature store when ``use_store`` (the sources are the slides'
        own patches) and one is configured.
        """
        moments = None
        if self.config.training.colour_normalization != "none":
            moments = [colour_moments(chunk for _, chunk in s.iter_chunks(256)) for s in sources]
            if not bool(self.module.colour_normalizer.fitted):
                self.module.colour_normalizer.fit(moments)
        transforms = [self._colour_transform(m) for m in (moments or [None] * len(sources))]
        keep_patches = not self._uses_cached_features() or self.module.image_decoder is not None
        spots = []
        for slide, source, transform in zip(slides, sources, transforms, strict=True):
            features = None
            if use_store and self._uses_feature_store():
                features = self._stored_features(slide, transform)
            elif self._uses_cached_features():
                features = self._features(source, transform)
            spots.append(
                SlideSpots(
                    coords=self._coords(slide),
                    counts=panel_counts_csr(slide, self.genes) if with_counts else None,
                    patches=source if keep_patches else None,
                    features=features,
                )
            )
        dataset = SpotDataset(spots, with_targets=self.module.image_decoder is not None)
        stacked = None if moments is None else torch.stack(transforms)
        return dataset, stacked

    def _loaders(self, dataset: SpotDataset, seed: int) -> tuple[DataLoader, DataLoader | None]:
        training = self.config.training
        train_idx, val_idx = validation_split(self.train_slides, training.val_fraction, seed)
        n_val = len(val_idx)
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(
            torch.utils.data.Subset(dataset, train_idx.tolist()),
            batch_size=training.batch_size,
            shuffle=True,
            drop_last=len(train_idx) > training.batch_size,
            generator=generator,
            collate_fn=stacked_batch,
        )
        val_loader = self._spot_loader(dataset, val_idx) if n_val else None
        return train_loader, val_loader

    def _spot_loader(
        self, dataset: SpotDataset, indices: np.ndarray, batch_size: int | None = None
    ) -> DataLoader:
        """The spots ``indices`` of ``dataset`` in order, in batches of ``batch_size``
        (default: the prediction batch size)."""
        return DataLoader(
            torch.utils.data.Subset(dataset, indices.tolist()),
            batch_size=batch_size or self.config.training.predict_batch_size,
            collate_fn=stacked_batch,
        )

    # ----------------------------------------------------------------- training
    def train(self, patches: Sequence[np.ndarray] | None = None) -> FitResult:
        """Train on the training slides (fitting the colour normaliser on them first).

        Patches are streamed from the patch cache per batch (see :meth:`_training_sources`),
        so memory does not grow with the number of training slides. ``patches`` (one uint8
        ``(N_s, 3, H, W)`` array per training slide) replaces the extraction, e.g. for
        perturbed images. With ``trainer.monitor`` set, the best epoch by validation median
        PCC is restored; with ``trainer.swa_epoch_start``, the averaged weights are kept; else
        the last epoch.
        """
        trainer_config = self.config.trainer
        with self._training_sources(self.train_slides, patches) as sources:
            self.module.colour_normalizer.fitted.fill_(False)
            dataset, transforms = self._dataset(
                self.train_slides, sources, with_counts=True, use_store=patches is None
            )
            train_loader, val_loader = self._loaders(dataset, trainer_config.seed)
            if self.config.training.initialise_decoder:
                self.module.gene_decoder.initialise_from_totals(*dataset.count_totals())
            if isinstance(self.module.fusion, PoEFusion):
                self.module.fusion.log_precision_offset.zero_()
                self.module.fusion.reset_distance()
            task = STEvsTask(self.module, self.config.training, colour_transforms=transforms)
            self.fit_result = fit(task, train_loader, val_loader, trainer_config)
            self.module.eval()
            experts = self._expert_posteriors(task, val_loader)
            if experts is not None and self.config.training.fusion_calibration == "validation":
                self._calibrate_fusion(*experts)
            calibration = self.config.training.fusion_calibration
            if experts is not None and calibration == "distance":
                self._fit_distance_fusion(task, dataset, experts[0])
            elif experts is None and calibration != "none":
                logger.warning(
                    "STEvs fusion_calibration=%r needs validation spots (none here: fewer than "
                    "20 spots or val_fraction=0) and the Product of Experts; the experts are "
                    "fused as trained",
                    calibration,
                )
            if experts is not None:
                self.validation_image_expert_weight = float(
                    self.module.image_expert_weight(experts[0]).mean()
                )
            self.uncertainty_calibration = self._fit_uncertainty_calibration(task, val_loader)
        logger.info(
            "STEvs trained in %.1f s (%s)",
            self.fit_result.train_seconds,
            self.fit_result.describe_best("val/pcc_median", "val median PCC"),
        )
        if self.validation_image_expert_weight is not None:
            weight = self.validation_image_expert_weight
            logger.info(
                "STEvs fusion on the validation spots: image expert weight %.2f, coordinate "
                "expert weight %.2f (mean share of the fused posterior mean)",
                weight,
                1.0 - weight,
            )
        return self.fit_result

    @torch.no_grad()
    def _fit_uncertainty_calibration(
        self, task: STEvsTask, loader: DataLoader | None
    ) -> dict[str, dict[str, Any]] | None:
        """The predictive-uncertainty calibration of each inference mode, fitted on the
        validation spots (None without any): ``{mode: fit_calibration(...)}``
        (:func:`stinfer.models.uncertainty.fit_calibration` of their counts under that mode's
        predictive, :data:`CALIBRATION_SAMPLES` posterior samples seeded by the trainer's
        seed), for ``fused`` and, with both experts, ``image`` and ``spatial`` (each expert
        alone is less sure than the product, and differently over-confident). The test
        slides are never seen here."""
        if loader is None:
            return None
        modes = ["fused"]
        if self.module.image_encoder is not None and self.module.coord_encoder is not None:
            modes += ["image", "spatial"]
        device = next(self.module.parameters()).device
        seed = self.config.trainer.seed
        moments: dict[str, list] = {mode: [] for mode in modes}
        counts, start = [], 0
        for inputs, coords, batch_counts, targets, slides in loader:
            inputs, _ = task._prepare(inputs.to(device), targets.to(device), slides, augment=False)
            rows = slice(start, start + len(coords))
            for mode in modes:
                outputs = self.module(
                    inputs, coords.to(device), mode=mode, sample=False, decode_image=False
                )
                posterior = [(outputs["mu"], outputs["logvar"])]
                moments[mode].append(
                    self._mixture_moments(posterior, CALIBRATION_SAMPLES, seed, rows)
                )
            counts.append(batch_counts.float().cpu().numpy())
            start = rows.stop
        if not counts:
            return None
        observed = np.concatenate(counts)
        calibrations = {}
        for mode in modes:
            mean = np.concatenate([m for m, _ in moments[mode]])
            variance = np.concatenate([v for _, v in moments[mode]])
            calibrations[mode] = fit_calibration(observed, mean, variance, seed)
            before = calibrations[mode]["pit_coverage_before"]
            logger.info(
                "STEvs uncertainty (%s) calibrated on %d validation spots: dispersion scale "
                "%g; before, the 50%% and 90%% intervals held %.0f%% and %.0f%% of the "
                "validation counts' PITs",
                mode,
                len(observed),
                calibrations[mode]["dispersion_scale"],
                100 * before["0.5"],
                100 * before["0.9"],
            )
        return calibrations

    def _mixture_moments(
        self,
        posteriors: Sequence[tuple[torch.Tensor, torch.Tensor]],
        samples: int,
        seed: int,
        rows: slice,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predictive mean and variance ``(n, M)`` of a chunk of spots (float64).

        ``samples`` latents are drawn from the chunk's posteriors (one ``(mu, logvar)`` pair
        per test-time-augmentation view, used in turn, so the spread across views counts as
        uncertainty too) and decoded; :class:`~stinfer.models.uncertainty.MixtureMoments`
        integrates the NB likelihood over them. The noise is seeded by ``seed`` and the
        chunk's first row, so a prediction is reproducible for a given chunk size.
        """
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rows.start or 0))
        moments = MixtureMoments()
        for index in range(samples):
            mu, logvar = posteriors[index % len(posteriors)]
            noise = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
            decoded = self.module.gene_decoder(mu + noise * torch.exp(0.5 * logvar))
            moments.add(
                decoded["nb_mean"].double().cpu().numpy(),
                decoded["nb_theta"].double().cpu().numpy(),
            )
        return moments.result()

    def _uncertainty_outputs(
        self,
        posteriors: Sequence[tuple[torch.Tensor, torch.Tensor]],
        uncertainty: UncertaintyConfig,
        rows: slice,
        mode: str,
    ) -> dict[str, np.ndarray]:
        """``predictive_mean``, ``predictive_sd`` and the interval bounds of a chunk."""
        mean, variance = self._mixture_moments(
            posteriors, uncertainty.samples, uncertainty.seed, rows
        )
        calibration = self._calibration_of(mode) if uncertainty.calibrated else None
        theta, pit_quantiles = apply_calibration(mean, variance, calibration)
        outputs = {
            "predictive_mean": mean.astype(np.float32),
            "predictive_sd": np.sqrt(mean + mean * mean / theta).astype(np.float32),
        }
        intervals = central_intervals(mean, theta, uncertainty.levels, pit_quantiles)
        for level, (lower, upper) in intervals.items():
            lower_name, upper_name = interval_layer_names(level)
            outputs[lower_name], outputs[upper_name] = lower, upper
        return outputs

    def _uncertainty_layers(self, uncertainty: UncertaintyConfig) -> dict[str, str]:
        """Names and descriptions of the layers :meth:`_uncertainty_outputs` fills."""
        layers = {
            "predictive_mean": "mean of the predictive distribution (the NB likelihood "
            "integrated over posterior samples of the latent), expected counts",
            "predictive_sd": "its standard deviation, counts",
        }
        for level in uncertainty.levels:
            lower, upper = interval_layer_names(level)
            layers[lower] = f"lower end of the central {100 * level:g}% predictive interval, counts"
            layers[upper] = f"upper end of the central {100 * level:g}% predictive interval, counts"
        return layers

    def _calibration_of(self, mode: str) -> dict[str, Any] | None:
        """The uncertainty calibration of inference ``mode`` (None when there is none)."""
        return (self.uncertainty_calibration or {}).get(mode)

    def _uncertainty_record(self, uncertainty: UncertaintyConfig, mode: str) -> dict[str, Any]:
        """``uns["stinfer"]["uncertainty"]``: how the uncertainty layers were computed."""
        calibration = self._calibration_of(mode) if uncertainty.calibrated else None
        record: dict[str, Any] = {
            "samples": uncertainty.samples,
            "seed": uncertainty.seed,
            "levels": list(uncertainty.levels),
            "calibrated": calibration is not None,
        }
        if calibration is not None:
            record["dispersion_scale"] = float(calibration["dispersion_scale"])
            record["pit_quantiles"] = [float(q) for q in calibration["pit_quantiles"]]
            record["calibration_validation_spots"] = int(calibration["validation_spots"])
        elif uncertainty.calibrated:
            record["note"] = "the model has no calibration (trained without validation spots)"
        return record

    @torch.no_grad()
    def _expert_posteriors(
        self, task: STEvsTask, loader: DataLoader | None, keep_counts: bool = True
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | None:
        """Both experts' posteriors (``mu_img``, ``logvar_img``, ``mu_xy``, ``logvar_xy``), the
        image backbone features (``features_img``) and the counts of the spots of ``loader``
        (unaugmented; ``None`` unless ``keep_counts``: a dense spots x genes matrix), with the
        trained weights; ``None`` without spots or without the Product of Experts."""
        if loader is None or not isinstance(self.module.fusion, PoEFusion):
            return None
        device = next(self.module.parameters()).device
        keys = ("mu_img", "logvar_img", "mu_xy", "logvar_xy", "features_img")
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        counts = []
        n_spots = 0
        for inputs, coords, batch_counts, targets, slides in loader:
            inputs, _ = task._prepare(inputs.to(device), targets.to(device), slides, augment=False)
            outputs = self.module(
                inputs, coords.to(device), mode="fused", sample=False, decode_image=False
            )
            for key in keys:
                parts[key].append(outputs[key].float())
            n_spots += len(coords)
            if keep_counts:
                counts.append(batch_counts.to(device).float())
        if not n_spots:
            return None
        posteriors = {key: torch.cat(values) for key, values in parts.items()}
        return posteriors, torch.cat(counts) if keep_counts else None

    def _fit_distance_fusion(
        self, task: STEvsTask, dataset: SpotDataset, held_out: dict[str, torch.Tensor]
    ) -> None:
        """Fit the distance-aware fusion (:meth:`~stinfer.nn.fusion.PoEFusion.fit_distance`):
        each expert's log-variance floor and latent distribution (and the image backbone
        features') from the training spots (up to :data:`DISTANCE_FIT_SPOTS`, seeded), the
        reference distances from the validation spots' posteriors ``held_out``."""
        seed = self.config.trainer.seed
        train_idx, _ = validation_split(self.train_slides, self.config.training.val_fraction, seed)
        if len(train_idx) > DISTANCE_FIT_SPOTS:
            rng = np.random.default_rng(seed)
            train_idx = np.sort(rng.choice(train_idx, DISTANCE_FIT_SPOTS, replace=False))
        # in training-sized batches: the encoder's activations bound this pass's peak memory
        loader = self._spot_loader(dataset, train_idx, self.config.training.batch_size)
        training = self._expert_posteriors(task, loader, keep_counts=False)
        assert training is not None  # PoE and at least one spot, as for held_out
        summary = self.module.fusion.fit_distance(training[0], held_out)
        self.fusion_calibration = {
            "method": "distance",
            "training_spots": len(train_idx),
            "validation_spots": len(held_out["mu_img"]),
            **summary,
        }
        logger.info(
            "STEvs distance-aware fusion fitted on %d training spots; reference squared "
            "distance of %d validation spots: image %.1f, coordinates %.1f",
            len(train_idx),
            len(held_out["mu_img"]),
            summary["image_reference"],
            summary["spatial_reference"],
        )

    def _calibrate_fusion(self, experts: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Set the PoE log-precision offset that predicts the validation spots best.

        The experts' variances are learned on the training spots, where a flexible image
        encoder can memorise each spot: there its posterior is precise even when the image says
        little about expression elsewhere, and the product then trusts it beyond what it knows.
        On the held-out validation spots each expert shows what it knows; the shift of the
        experts' relative precision (:data:`FUSION_CALIBRATION_SHIFTS`) with the lowest NB
        negative log-likelihood of the fused prediction is kept (only ever making the
        over-trusted expert less precise, :func:`~stinfer.nn.fusion.calibration_offsets`).
        """
        scores = self.module.fusion_shift_nll(experts, counts, FUSION_CALIBRATION_SHIFTS)
        best = int(torch.argmin(scores))
        shift = FUSION_CALIBRATION_SHIFTS[best]
        offsets = torch.tensor(calibration_offsets(shift))
        self.module.fusion.log_precision_offset.copy_(offsets)
        self.fusion_calibration = {
            "method": "validation",
            "shift": shift,
            "validation_nll": float(scores[best]),
            "validation_nll_uncalibrated": float(scores[FUSION_CALIBRATION_SHIFTS.index(0.0)]),
            "validation_spots": len(counts),
        }
        logger.info(
            "STEvs fusion calibrated on %d validation spots: image log-precision shift %+.1f "
            "(validation NB NLL %.1f, %.1f without)",
            len(counts),
            shift,
            self.fusion_calibration["validation_nll"],
            self.fusion_calibration["validation_nll_uncalibrated"],
        )

    def adapt(self, target_slides: Sequence[ad.AnnData], epochs: int = 10) -> FitResult:
        """Test-time adaptation: keep training on unlabelled target slides without the RNA term.

        As in the public STEvs code: image reconstruction, KL and alignment only, so the
        encoders adapt to the new slides' appearance while the gene decoder is untouched.
        """
        trainer_config = dataclasses.replace(
            self.config.trainer, max_epochs=epochs, monitor=None, swa_epoch_start=None
        )
        for parameter in self.module.gene_decoder.parameters():
            parameter.requires_grad_(False)
        try:
            with self._training_sources(list(target_slides), None) as sources:
                dataset, transforms = self._dataset(
                    target_slides, sources, with_counts=False, use_store=True
                )
                loader = DataLoader(
                    dataset,
                    batch_size=self.config.training.batch_size,
                    shuffle=True,
                    collate_fn=stacked_batch,
                )
                task = STEvsTask(
                    self.module, self.config.training, adapt=True, colour_transforms=transforms
                )
                result = fit(task, loader, None, trainer_config)
        finally:
            for parameter in self.module.gene_decoder.parameters():
                parameter.requires_grad_(True)
        self.module.eval()
        return result

    # ----------------------------------------------------------------- inference
    def _prediction_chunks(
        self, slide: ad.AnnData, patches: np.ndarray | None
    ) -> tuple[Iterator[tuple[slice, np.ndarray]], torch.Tensor | None]:
        """The slide's patches in consecutive spot chunks, and its colour transform.

        Patches come from ``patches`` when given, else from the patch cache when one is
        configured, else from the image: all at once when they fit in
        :data:`IN_MEMORY_PATCH_BYTES`, else streamed chunk by chunk (a Visium HD slide), the
        colour moments then taken from :data:`COLOUR_SAMPLE_SPOTS` seeded random spots.
        """
        training = self.config.training
        size = training.predict_batch_size
        source = None
        if patches is not None:
            if patches.shape[0] != slide.n_obs:
                raise InputError(
                    f"patches has {patches.shape[0]} rows but the slide {slide.n_obs} spots"
                )
            source = PatchSource(np.asarray(patches))
        else:
            self._require_image(slide)
            side = training.patch.output_size_px or training.patch.patch_size_px
            in_memory = slide.n_obs * 3 * side * side <= IN_MEMORY_PATCH_BYTES
            if training.patch_cache_dir is not None or in_memory:
                source = PatchSource(
                    spot_patches(slide, training.patch, cache_dir=training.patch_cache_dir)
                )
        if source is not None:
            moments = None
            if training.colour_normalization != "none":
                moments = colour_moments(chunk for _, chunk in source.iter_chunks(256))
            return source.iter_chunks(size), self._colour_transform(moments)
        moments = None
        if training.colour_normalization != "none":
            sample = slide
            if slide.n_obs > COLOUR_SAMPLE_SPOTS:
                rows = np.random.default_rng(0).choice(slide.n_obs, COLOUR_SAMPLE_SPOTS, False)
                sample = slide[np.sort(rows)]
            moments = colour_moments(iter_spot_patches(sample, training.patch, 256))
        return _numbered_chunks(iter_spot_patches(slide, training.patch, size)), (
            self._colour_transform(moments)
        )

    @torch.no_grad()
    def iter_predictions(
        self,
        slide: ad.AnnData,
        mode: str = "fused",
        patches: np.ndarray | None = None,
        uncertainty: UncertaintyConfig | None = None,
    ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Predictions of consecutive spot chunks: ``(rows, outputs)`` with ``nb_mean`` and
        ``nb_theta`` ``(n, M)``, ``mu`` and ``logvar`` ``(n, D)`` float32 for the spots at
        ``rows`` (a slice), and with ``uncertainty`` the layers of
        :meth:`_uncertainty_outputs`. Memory is bounded by one chunk (``predict_batch_size``
        spots); :meth:`predict` and :meth:`write_prediction` are built on it. With a feature
        store and no ``patches``, the slide's features come from the store (held whole: ``F``
        floats per spot)."""
        mode = canonical_modality(mode, "mode")
        self.module.eval()
        training = self.config.training
        coords = self._coords(slide)
        size = training.predict_batch_size
        spot_slices = (
            (slice(i, min(i + size, slide.n_obs)), None) for i in range(0, slide.n_obs, size)
        )
        stored = None
        if mode == "spatial":
            chunks, transform = spot_slices, None
        elif patches is None and self._uses_feature_store():
            self._require_image(slide)
            transform = None
            if training.colour_normalization != "none":  # the colour moments read the patches
                _, transform = self._prediction_chunks(slide, None)
            stored = self._stored_features(slide, transform)
            chunks = spot_slices
        else:
            chunks, transform = self._prediction_chunks(slide, patches)
        views = [0]
        if (
            training.test_time_augmentation
            and mode != "spatial"
            and not self._uses_cached_features()
        ):
            views = list(range(8))
        for rows, chunk in chunks:
            means, thetas, first, posteriors = [], [], None, []
            for view in views:
                inputs = None
                if stored is not None:
                    inputs = stored[rows]
                elif chunk is not None:
                    inputs = self._encoder_input(dihedral(torch.from_numpy(chunk), view), transform)
                    if self._uses_cached_features():
                        inputs = self.module.encode_image_features(inputs)
                outputs = self.module(
                    inputs, coords[rows], mode=mode, sample=False, decode_image=False
                )
                means.append(outputs["nb_mean"].float())
                thetas.append(outputs["nb_theta"].float())
                posteriors.append((outputs["mu"], outputs["logvar"]))
                if view == 0:
                    first = outputs
            extra = {}
            if uncertainty is not None:
                extra = self._uncertainty_outputs(posteriors, uncertainty, rows, mode)
            yield (
                rows,
                {
                    "nb_mean": torch.stack(means).mean(0).numpy(),
                    "nb_theta": torch.stack(thetas).mean(0).numpy(),
                    "mu": first["mu"].float().numpy(),
                    "logvar": first["logvar"].float().numpy(),
                    **self._expert_weight_columns(first, mode, rows, slide.n_obs),
                    **extra,
                },
            )

    def _expert_weight_columns(
        self, outputs: dict[str, torch.Tensor] | None, mode: str, rows: slice, n_spots: int
    ) -> dict[str, np.ndarray]:
        """``image_expert_weight`` and ``spatial_expert_weight`` ``(n,)`` of a chunk: the PoE
        share of each spot's fused mean (fused mode), 1 and 0 (image mode), 0 and 1 (spatial
        mode); nothing for a fusion other than PoE. Without ``outputs``, zeros of the slide's
        length (the skeleton :meth:`write_prediction` fills)."""
        n = len(range(*rows.indices(n_spots)))
        if mode == "fused":
            if not isinstance(self.module.fusion, PoEFusion):
                return {}
            if outputs is None:
                image = np.zeros(n, dtype=np.float32)
            else:
                image = self.module.image_expert_weight(outputs).float().numpy()
        else:
            image = np.full(n, 1.0 if mode == "image" else 0.0, dtype=np.float32)
        return {"image_expert_weight": image, "spatial_expert_weight": 1.0 - image}

    def _posterior_outputs(
        self,
        slide: ad.AnnData,
        mode: str,
        patches: np.ndarray | None = None,
        uncertainty: UncertaintyConfig | None = None,
    ) -> dict[str, np.ndarray]:
        collected: dict[str, list[np.ndarray]] = {}
        for _, outputs in self.iter_predictions(slide, mode, patches, uncertainty):
            for key, value in outputs.items():
                collected.setdefault(key, []).append(value)
        return {key: np.concatenate(values) for key, values in collected.items()}

    def predict(
        self,
        slide: ad.AnnData,
        mode: str = "fused",
        patches: np.ndarray | None = None,
        uncertainty: UncertaintyConfig | bool | None = None,
    ) -> ad.AnnData:
        """Predicted expression of the model's genes at every spot of ``slide``.

        Deterministic: ``X`` is decoded at the posterior mean (no sampling); the uncertainty
        layers are Monte Carlo estimates with a seeded sampler.

        Parameters
        ----------
        slide
            A slide with ``obsm["spatial"]`` and (unless ``mode="spatial"``) an image; its
            counts, if any, are never read.
        mode
            ``"fused"``, ``"image"`` or ``"spatial"`` (single-modality inference, Table 5;
            :func:`stinfer.modalities.canonical_modality` also takes ``"both"``/``"location"``).
        patches
            Optional ``(N, 3, H, W)`` uint8 patches used instead of extracting them from the
            image (e.g. colour-shifted patches for the robustness sweep).
        uncertainty
            ``True`` or an :class:`~stinfer.models.uncertainty.UncertaintyConfig` (posterior
            samples, interval levels, seed, whether to apply the calibration fitted on the
            training slides' validation spots): also return the predictive distribution, the
            NB likelihood integrated over posterior samples of the latent
            (:mod:`stinfer.models.uncertainty`), as layers ``predictive_mean``,
            ``predictive_sd`` and ``lower_<pct>``/``upper_<pct>`` per interval level (counts;
            ``lower_50``, ``upper_50``, ``lower_90``, ``upper_90`` by default), recorded in
            ``uns["stinfer"]["uncertainty"]``.

        Returns
        -------
        AnnData
            ``X``: predicted NB means (expected counts on the training data's count scale),
            float32; ``layers["log1p_cp10k"]``: their log1p CP10k over the predicted genes,
            ``obs["library_size"]`` the predicted totals and ``uns["stinfer"]["expression"]``
            the record (:mod:`stinfer.io.prediction_layout`); ``layers["nb_theta"]``: NB
            inverse dispersion; ``obsm["X_stevs"]``: posterior mean of ``mode``;
            ``obsm["stevs_posterior_var"]``: its variance; ``obs["stevs_image_expert_weight"]``
            and ``obs["stevs_spatial_expert_weight"]``: how much each spot's prediction trusted
            each expert (the PoE precision share, :meth:`STEvsModule.image_expert_weight`; 1/0
            in a single-modality mode; absent for a fusion other than PoE); the slide's spot
            names and identity columns (``sample_id``, ``spot_id``, ``array_row``,
            ``array_col``: :func:`~stinfer.io.slide_data.spot_obs`), ``obsm["spatial"]`` and
            ``uns["stinfer"]`` copied from the slide;
            ``uns["stevs_prediction"]`` says the mode.
        """
        start = time.perf_counter()
        mode = canonical_modality(mode, "mode")
        uncertainty = _uncertainty_config(uncertainty)
        outputs = self._posterior_outputs(slide, mode, patches, uncertainty)
        prediction = self._prediction_anndata(slide, mode, outputs, uncertainty)
        prediction.uns["stevs_prediction"]["seconds"] = time.perf_counter() - start
        return prediction

    def write_prediction(
        self,
        slide: ad.AnnData,
        path: str | os.PathLike,
        mode: str = "fused",
        overwrite: bool = False,
        uncertainty: UncertaintyConfig | bool | None = None,
    ) -> Path:
        """:meth:`predict` written straight to an ``.h5ad`` file, chunk by chunk.

        The file has the layout :meth:`predict` returns (``X``, ``layers["log1p_cp10k"]``,
        ``obs["library_size"]``, ``layers["nb_theta"]``,
        ``obsm["X_stevs"]``, ``obsm["stevs_posterior_var"]``, ``obsm["spatial"]``,
        ``uns``), but the spots x genes arrays are filled one chunk of
        ``predict_batch_size`` spots at a time, so memory stays bounded by a chunk however
        many spots the slide has (a Visium HD slide of 500,000 bins); open it with
        ``anndata.read_h5ad(path, backed="r")`` to read it the same way. The file appears
        under its name only once complete.
        """
        import h5py

        start = time.perf_counter()
        mode = canonical_modality(mode, "mode")
        uncertainty = _uncertainty_config(uncertainty)
        skeleton = prepare_for_h5ad(self._prediction_anndata(slide, mode, None, uncertainty))
        n_spots, n_genes = slide.n_obs, len(self.genes)
        latent_dim = self.config.module.latent_dim
        rows_per_chunk = max(1, min(self.config.training.predict_batch_size, n_spots))
        with atomic_output(path, overwrite) as tmp:
            skeleton.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as file:
                arrays = {
                    "nb_mean": ("X", n_genes),
                    "nb_theta": ("layers/nb_theta", n_genes),
                    "mu": ("obsm/X_stevs", latent_dim),
                    "logvar": ("obsm/stevs_posterior_var", latent_dim),
                }
                datasets = {}
                for key, (name, width) in arrays.items():
                    datasets[key] = file.create_dataset(
                        name, shape=(n_spots, width), dtype="f4", chunks=(rows_per_chunk, width)
                    )
                    datasets[key].attrs.update(
                        {"encoding-type": "array", "encoding-version": "0.2.0"}
                    )
                layer_names = [LOG1P_LAYER]
                if uncertainty is not None:
                    layer_names += list(self._uncertainty_layers(uncertainty))
                for name in layer_names:
                    datasets[name] = file.create_dataset(
                        f"layers/{name}",
                        shape=(n_spots, n_genes),
                        dtype="f4",
                        chunks=(rows_per_chunk, n_genes),
                    )
                    datasets[name].attrs.update(
                        {"encoding-type": "array", "encoding-version": "0.2.0"}
                    )
                for rows, outputs in self.iter_predictions(slide, mode, None, uncertainty):
                    outputs["logvar"] = np.exp(outputs["logvar"])
                    library = np.clip(outputs["nb_mean"].astype(np.float64), 0, None).sum(axis=1)
                    outputs[LOG1P_LAYER] = log1p_cp10k_of(outputs["nb_mean"], library)
                    file[f"obs/{LIBRARY_COLUMN}"][rows] = library.astype(np.float32)
                    for key, dataset in datasets.items():
                        dataset[rows] = outputs[key]
                    for key in EXPERT_WEIGHT_KEYS:
                        if key in outputs:
                            file[f"obs/stevs_{key}"][rows] = outputs[key]
                file["uns/stevs_prediction/seconds"][()] = time.perf_counter() - start
        return Path(path)

    def _prediction_anndata(
        self,
        slide: ad.AnnData,
        mode: str,
        outputs: dict[str, np.ndarray] | None = None,
        uncertainty: UncertaintyConfig | None = None,
    ) -> ad.AnnData:
        """The prediction AnnData of :meth:`predict`; without ``outputs``, its skeleton (obs,
        var, ``obsm["spatial"]``, uns) for :meth:`write_prediction` to fill."""
        prediction = ad.AnnData(
            X=None if outputs is None else outputs["nb_mean"].astype(np.float32),
            obs=spot_obs(slide),
            var=pd.DataFrame(index=pd.Index(self.genes)),
        )
        if outputs is not None:
            prediction.layers["nb_theta"] = outputs["nb_theta"].astype(np.float32)
            prediction.obsm["X_stevs"] = outputs["mu"].astype(np.float32)
            prediction.obsm["stevs_posterior_var"] = np.exp(outputs["logvar"]).astype(np.float32)
            weights = {key: outputs[key] for key in EXPERT_WEIGHT_KEYS if key in outputs}
        else:
            weights = self._expert_weight_columns(None, mode, slice(0, slide.n_obs), slide.n_obs)
        for key, values in weights.items():
            prediction.obs[f"stevs_{key}"] = np.asarray(values, dtype=np.float32)
        prediction.obsm["spatial"] = np.asarray(slide.obsm["spatial"]).copy()
        prediction.uns["stinfer"] = dict(slide.uns.get("stinfer", {}))
        prediction.uns["stevs_prediction"] = {"mode": mode, "seconds": 0.0}
        theta = {"nb_theta": "negative binomial inverse dispersion of X"}
        if uncertainty is not None:
            uncertainty_layers = self._uncertainty_layers(uncertainty)
            theta.update(uncertainty_layers)
            prediction.uns["stinfer"]["uncertainty"] = self._uncertainty_record(uncertainty, mode)
            if outputs is not None:
                for name in uncertainty_layers:
                    prediction.layers[name] = np.asarray(outputs[name], dtype=np.float32)
        if outputs is not None:
            return annotate_counts(prediction, layers=theta)
        prediction.obs[LIBRARY_COLUMN] = np.zeros(slide.n_obs, dtype=np.float32)
        panel = f"the {len(self.genes)} predicted genes"
        prediction.uns["stinfer"]["expression"] = expression_record(panel, len(self.genes), theta)
        return prediction

    def get_latent(self, slide: ad.AnnData, which: str = "fused") -> np.ndarray:
        """Posterior means ``(N, latent_dim)`` of ``which`` (``fused``, ``image``, ``spatial``)."""
        return self._posterior_outputs(slide, which)["mu"]

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` (config, genes, fusion summary) and ``weights.safetensors``.

        The one saved-model format (:mod:`stinfer.models.persistence`); the weights include
        the coordinate normaliser fitted on the training cohort.
        """
        state = {
            "genes": self.genes,
            "validation_image_expert_weight": self.validation_image_expert_weight,
            "fusion_calibration": self.fusion_calibration,
            "uncertainty_calibration": self.uncertainty_calibration,
        }
        if self.feature_weights_id is not None:  # the feature store's name of the backbone
            state["feature_weights_id"] = self.feature_weights_id
        return write_model_folder(
            directory, self.model_type, self.config.to_dict(), state, self.module, None, overwrite
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> STEvs:
        """Load a model written by :meth:`save` (safetensors: no pickle is executed).

        Folders saved before the format had ``model_type`` (``genes.json`` beside the config)
        load too; a folder of another model type is an :class:`InputError`.
        """
        saved = read_saved_model(directory, cls.model_type, LEGACY_LAYOUTS["stevs"])
        config = STEvsModelConfig.from_dict(saved.config)
        if saved.format_version == 0:
            genes = json.loads((saved.directory / "genes.json").read_text())
        else:
            genes = saved.state["genes"]
        model = cls.__new__(cls)
        model.config = config
        model.genes = [str(gene) for gene in genes]
        model.train_slides = []
        model.fit_result = None
        config.module.pretrained = None  # the saved weights replace any initial weights
        model.validation_image_expert_weight = saved.state.get("validation_image_expert_weight")
        model.fusion_calibration = saved.state.get("fusion_calibration")
        model.uncertainty_calibration = saved.state.get("uncertainty_calibration")
        model.feature_weights_id = saved.state.get("feature_weights_id")
        model.module = STEvsModule(num_genes=len(genes), config=config.module)
        weights = saved.tensors()
        if isinstance(model.module.fusion, PoEFusion):  # saved before the fusion calibrations
            for name, neutral in model.module.fusion.state_dict().items():
                weights.setdefault(f"fusion.{name}", neutral)
        model.module.load_state_dict(weights)
        model.module.eval()
        return model


def _uncertainty_config(value: UncertaintyConfig | bool | None) -> UncertaintyConfig | None:
    """``predict(uncertainty=...)``: True -> the defaults, False/None -> no uncertainty."""
    if value is None or value is False:
        return None
    if value is True:
        return UncertaintyConfig()
    if not isinstance(value, UncertaintyConfig):
        raise InputError(f"uncertainty must be True, False or an UncertaintyConfig, got {value!r}")
    return value

"""Encoders of the STEvs module: image patches and spot coordinates to Gaussian posteriors.

- :class:`ImageEncoder`: any timm backbone (default Swin-T adapted to 160-px patches, STEvs
  Table 6) followed by two linear heads for ``mu_img`` and ``logvar_img`` (Eq. 21-23).
- :class:`CoordinateEncoder`: MLP 2 -> 64 -> 128 with ReLU (Table 6, Eq. 24-26), optionally after
  :class:`FourierFeatures` (the "MLP w/ Fourier" ablation).
- :class:`CoordinateNormaliser`: per-slide centring and a cohort-level scale, stored as buffers so
  it is saved with the module.

Every encoder returns a :class:`ModalityPosterior` ``(features, mu, logvar)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import timm
import torch
from torch import nn
from torch.nn import functional as F

from stinfer.errors import InputError
from stinfer.nn.pretrained import LoadReport, load_matching_weights, timm_checkpoint_filter

__all__ = [
    "COORDINATE_ENCODERS",
    "CoordinateEncoder",
    "CoordinateNormaliser",
    "CoordinateNormalizer",
    "FourierFeatures",
    "GaussianHeads",
    "ImageEncoder",
    "ModalityPosterior",
    "build_coordinate_encoder",
    "create_backbone",
    "swin_window_size",
]

logger = logging.getLogger(__name__)

COORDINATE_ENCODERS: tuple[str, ...] = ("mlp", "fourier", "none")
HUB = "hub"


class ModalityPosterior(NamedTuple):
    """What an encoder returns for a batch of ``N`` spots.

    Attributes
    ----------
    features
        ``(N, F)`` features before the latent heads (backbone features or coordinate MLP output).
    mu, logvar
        ``(N, D)`` mean and log-variance of the modality's Gaussian posterior (expert).
    """

    features: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class GaussianHeads(nn.Module):
    """Two independent linear heads giving ``(mu, logvar)`` from features (STEvs Eq. 22-23, 25-26).

    Parameters
    ----------
    in_features
        Feature size ``F``.
    latent_dim
        Latent size ``D``.
    """

    def __init__(self, in_features: int, latent_dim: int = 128) -> None:
        super().__init__()
        self.mu = nn.Linear(in_features, latent_dim)
        self.logvar = nn.Linear(in_features, latent_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(features), self.logvar(features)


def swin_window_size(img_size: int, patch_size: int = 4) -> int:
    """Window that tiles every Swin stage: the side of the last feature map, ``img / (patch * 8)``.

    160-px patches give 40/20/10/5 maps and window 5 (STEvs Table 6); 224 gives timm's 7.
    """
    return max(1, img_size // (patch_size * 8))


def create_backbone(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    *,
    img_size: int | None = None,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Create a headless timm backbone that maps ``(N, C, H, W)`` patches to ``(N, F)`` features.

    The project's one way to build an image backbone (the STEvs image encoder, the feature
    probes of :mod:`stinfer.data.features`, ST-Net, CoxFormer's ViT features).
    ``num_classes=0`` removes the classifier so the output is the globally pooled feature
    (``backbone.num_features`` wide). ``img_size`` is passed to models that take it (ViT, Swin) and
    dropped for those that accept any size (CNNs); ``None`` keeps the model's own input size
    (what its timm data config describes). For Swin models without an explicit ``window_size``
    the window is :func:`swin_window_size` (5 for 160 px, STEvs Table 6). The backbones of
    :mod:`stinfer.nn.backbones` (``stinfer_histology_cnn``) are registered with timm when
    :mod:`stinfer.nn` is imported, so they are built here by name like any other.

    Parameters
    ----------
    name
        Any ``timm.list_models()`` name, optionally with a pretrained tag (``"resnet18.a1_in1k"``).
    pretrained
        ``None``/``False`` for random initialisation (nothing is downloaded); ``True`` or
        ``"hub"`` for timm's hub weights of ``name`` (downloads; only when the user asks for
        it); or a local weights file (``.safetensors``, ``.pth``, ...) whose tensors are copied
        where name and shape match (:func:`~stinfer.nn.pretrained.load_matching_weights`, the
        project's one loader; mismatches are logged).
    img_size, in_chans
        Input patch side in pixels (``None``: the model's default) and number of channels.
    **kwargs
        Passed to ``timm.create_model`` (e.g. ``embed_dim``, ``depths``, ``window_size``,
        ``global_pool="avg"``).

    Raises
    ------
    InputError
        If timm does not know ``name`` or cannot build it with these arguments.
    """
    from_hub = pretrained is True or pretrained == HUB
    kwargs = {"num_classes": 0, "in_chans": in_chans, **kwargs}
    if name.startswith("swin") and "window_size" not in kwargs and img_size is not None:
        kwargs["window_size"] = swin_window_size(img_size)
    try:
        model = _timm_model(name, from_hub, img_size, kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise InputError(
                f"image backbone {name!r} is not a timm model; pick one of timm.list_models() "
                "(e.g. 'swin_tiny_patch4_window7_224', 'resnet18', 'vit_tiny_patch16_224')"
            ) from error
        raise InputError(f"timm cannot create backbone {name!r}: {error}") from error
    except TypeError as error:
        raise InputError(f"timm cannot create backbone {name!r}: {error}") from error
    if pretrained not in (None, False, True, HUB):
        load_matching_weights(model, pretrained, transform=timm_checkpoint_filter(model))
    return model


def _timm_model(
    name: str, from_hub: bool, img_size: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    """``timm.create_model`` with ``img_size`` for the models that take one, without for CNNs."""
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=from_hub, img_size=img_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
    return timm.create_model(name, pretrained=from_hub, **kwargs)


class ImageEncoder(nn.Module):
    """timm backbone + Gaussian heads for image patches (STEvs Eq. 21-23, Table 6).

    Parameters
    ----------
    backbone
        timm model name. The default is Swin-T (patch 4, depths 2-2-6-2, dims 96-768); on 160-px
        patches with window 5 its stages give 40/20/10/5 maps and 768-d pooled features.
    latent_dim
        Latent size of ``mu_img`` / ``logvar_img`` (128, Table 6).
    img_size, in_chans
        Patch side in pixels (160, STEvs D.1.2) and channels (3).
    pretrained
        ``None`` for random initialisation; ``"hub"`` for timm's hub weights of ``backbone``
        (downloads; only on request); or the path of a local weights file (``.safetensors``,
        ``.pth``, ``.pt``, ``.bin``, ``.ckpt``) loaded by name and shape with
        :func:`~stinfer.nn.pretrained.load_matching_weights`; the result is kept in
        ``load_report``.
    freeze
        Keep the backbone frozen: no gradients, always in eval mode (no drop-path), features
        computed under ``no_grad``. Frozen features are deterministic, so a caller can cache
        :meth:`encode_features` per slide and pass the features instead of patches. The public
        STEvs code also detaches the Swin features.
    backbone_kwargs
        Extra ``timm.create_model`` arguments (e.g. ``{"embed_dim": 24, "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 1, 1)}`` for a tiny Swin).

    Examples
    --------
    >>> encoder = ImageEncoder("resnet10t", latent_dim=8, img_size=32)
    >>> encoder(torch.randn(2, 3, 32, 32)).mu.shape
    torch.Size([2, 8])
    """

    def __init__(
        self,
        backbone: str = "swin_tiny_patch4_window7_224",
        latent_dim: int = 128,
        img_size: int = 160,
        in_chans: int = 3,
        pretrained: str | Path | None = None,
        freeze: bool = True,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.in_chans = in_chans
        if pretrained == HUB:
            logger.info("loading timm hub weights for %s (downloads if not cached)", backbone)
        self.backbone = create_backbone(
            backbone,
            HUB if pretrained == HUB else None,
            img_size=img_size,
            in_chans=in_chans,
            **(backbone_kwargs or {}),
        )
        self.num_features: int = int(self.backbone.num_features)
        self.heads = GaussianHeads(self.num_features, latent_dim)
        self.load_report: LoadReport | None = None
        if pretrained is not None and pretrained != HUB:
            self.load_report = load_matching_weights(
                self.backbone, pretrained, transform=timm_checkpoint_filter(self.backbone)
            )
        self.frozen = freeze
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        """Set training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``(N, C, H, W)`` patches in ``[-1, 1]``: ``(N, F)``.

        Patches of another side than ``img_size`` (a patch spec in microns on a slide of
        another resolution, a smaller ``patch_size_px``) are resized to it first (bilinear,
        antialiased), as timm's data pipelines resize to a model's input size: fixed-size
        backbones (Swin, ViT) accept nothing else, and a CNN keeps the scale it was built for.
        """
        if patches.dim() != 4 or patches.shape[1] != self.in_chans:
            raise InputError(
                f"image patches must be (N, {self.in_chans}, H, W); got {tuple(patches.shape)}"
            )
        if patches.shape[-2:] != (self.img_size, self.img_size):
            patches = F.interpolate(
                patches.float(),
                size=(self.img_size, self.img_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        if self.frozen:
            with torch.no_grad():
                return self.backbone(patches)
        return self.backbone(patches)

    def forward(self, patches_or_features: torch.Tensor) -> ModalityPosterior:
        """Image posterior from ``(N, C, H, W)`` patches or ``(N, F)`` precomputed features."""
        if patches_or_features.dim() == 2:
            features = patches_or_features
            if features.shape[1] != self.num_features:
                raise InputError(
                    f"precomputed image features must be (N, {self.num_features}) for this "
                    f"backbone; got {tuple(features.shape)}"
                )
        else:
            features = self.encode_features(patches_or_features)
        mu, logvar = self.heads(features)
        return ModalityPosterior(features, mu, logvar)


class FourierFeatures(nn.Module):
    r"""Fourier features :math:`[\sin(2\pi x B), \cos(2\pi x B)]` of normalised coordinates.

    Parameters
    ----------
    in_features
        Coordinate dimension (2).
    num_frequencies
        Columns of ``B``; the output has ``2 * num_frequencies`` features (64 -> 128 in the public
        STEvs code).
    sampling
        ``"random"``: ``B ~ N(0, scale^2)`` (Tancik et al. 2020, as the public STEvs code);
        ``"log"``: axis-aligned frequencies log-spaced from 1 to ``scale`` cycles per unit
        (NeRF-style), ``num_frequencies // in_features`` per axis.
    scale
        Standard deviation of the random frequencies, or the highest log-spaced frequency.
    learnable
        Train ``B`` (the public STEvs code does); otherwise it is a fixed buffer.
    """

    def __init__(
        self,
        in_features: int = 2,
        num_frequencies: int = 64,
        sampling: Literal["random", "log"] = "random",
        scale: float = 1.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if sampling == "random":
            frequencies = torch.randn(in_features, num_frequencies) * scale
        elif sampling == "log":
            per_axis = max(1, num_frequencies // in_features)
            octaves = torch.logspace(0.0, math.log2(max(scale, 1.0)), per_axis, base=2.0)
            frequencies = torch.kron(torch.eye(in_features), octaves[None, :])
        else:
            raise InputError(f"fourier sampling must be 'random' or 'log'; got {sampling!r}")
        if learnable:
            self.frequencies = nn.Parameter(frequencies)
        else:
            self.register_buffer("frequencies", frequencies)
        self.out_features = 2 * frequencies.shape[1]

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        projected = 2.0 * math.pi * coords @ self.frequencies
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)


class CoordinateEncoder(nn.Module):
    """MLP over (optionally Fourier-embedded) coordinates + Gaussian heads (STEvs Eq. 24-26).

    Table 6: ``Linear(2, 64) -> ReLU -> Linear(64, 128) -> ReLU``, then two linear heads.

    Parameters
    ----------
    in_features
        Coordinate dimension (2).
    hidden_dims
        MLP widths, each followed by ReLU; the last is the feature size (``(64, 128)``).
    latent_dim
        Latent size of ``mu_xy`` / ``logvar_xy``.
    embedding
        Optional module applied to the coordinates first (e.g. :class:`FourierFeatures`); it must
        expose ``out_features``.
    """

    def __init__(
        self,
        in_features: int = 2,
        hidden_dims: Sequence[int] = (64, 128),
        latent_dim: int = 128,
        embedding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.embedding = embedding if embedding is not None else nn.Identity()
        width = int(embedding.out_features) if embedding is not None else in_features
        layers: list[nn.Module] = []
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.num_features = width
        self.heads = GaussianHeads(width, latent_dim)

    def forward(self, coords: torch.Tensor) -> ModalityPosterior:
        """Coordinate posterior from ``(N, 2)`` normalised coordinates."""
        if coords.dim() != 2 or coords.shape[1] != self.in_features:
            raise InputError(
                f"coordinates must be (N, {self.in_features}); got {tuple(coords.shape)}"
            )
        features = self.mlp(self.embedding(coords))
        mu, logvar = self.heads(features)
        return ModalityPosterior(features, mu, logvar)


def build_coordinate_encoder(
    kind: str,
    hidden_dims: Sequence[int] = (64, 128),
    latent_dim: int = 128,
    num_frequencies: int = 64,
    fourier_sampling: Literal["random", "log"] = "random",
    fourier_scale: float = 1.0,
    fourier_learnable: bool = True,
) -> CoordinateEncoder | None:
    """Create the coordinate encoder called ``kind`` (``"mlp"``, ``"fourier"`` or ``"none"``).

    ``"none"`` returns ``None``: the image-only ablation ("w/o Spatial Encoder", Tables 3-4).
    """
    if kind == "none":
        return None
    if kind == "mlp":
        return CoordinateEncoder(2, hidden_dims, latent_dim)
    if kind == "fourier":
        embedding = FourierFeatures(
            2, num_frequencies, fourier_sampling, fourier_scale, fourier_learnable
        )
        return CoordinateEncoder(2, hidden_dims, latent_dim, embedding=embedding)
    raise InputError(f"unknown coordinate encoder {kind!r}; choose one of {COORDINATE_ENCODERS}")


class CoordinateNormaliser(nn.Module):
    """Per-slide centring and one cohort-level scale for spot coordinates.

    ``normalised = (coords - centre_of_slide) / scale``. Serial sections are shifted (and scanned
    with different margins) relative to each other, so absolute positions do not transfer across
    slides; centring each slide on its own mean removes the shift. One isotropic scale, fitted on
    the training cohort, keeps distances comparable across slides (a per-slide min-max would
    stretch smaller sections) and puts training coordinates in ``[-1, 1]``. Pass coordinates in
    one unit for the whole cohort (microns preferably, or pixels at one resolution). Rotations are
    not corrected; align such slides first (STEvs D.1.3).

    ``scale`` and ``fitted`` are buffers, so the normaliser is saved in the owning module's
    ``state_dict``.

    Examples
    --------
    >>> slides = [torch.rand(50, 2) * 1000, torch.rand(40, 2) * 800 + 300]
    >>> normaliser = CoordinateNormaliser().fit(slides)
    >>> normalised = [normaliser(coords) for coords in slides]
    """

    scale: torch.Tensor
    fitted: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("fitted", torch.tensor(False))

    def fit(self, slides: Sequence[torch.Tensor]) -> CoordinateNormaliser:
        """Fit the scale: the largest ``|coordinate - slide mean|`` over the training slides.

        Parameters
        ----------
        slides
            One ``(N_s, 2)`` tensor of spot coordinates per training slide (all its spots).
        """
        if len(slides) == 0 or any(s.dim() != 2 or s.shape[0] == 0 for s in slides):
            raise InputError("CoordinateNormaliser.fit needs one non-empty (N, 2) tensor per slide")
        radius = max(float((s.double() - s.double().mean(0)).abs().max()) for s in slides)
        self.scale.fill_(radius if radius > 0 else 1.0)
        self.fitted.fill_(True)
        return self

    def forward(self, coords: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise the ``(N, 2)`` coordinates of one slide.

        Parameters
        ----------
        coords
            Spot coordinates of one slide.
        centre
            ``(2,)`` slide centre; defaults to ``coords.mean(0)``, so pass every spot of the slide,
            or the centre of the whole slide when normalising a subset (e.g. a test split).
        """
        if not bool(self.fitted):
            raise RuntimeError("CoordinateNormaliser is not fitted; call fit(training_slides)")
        centre = coords.mean(0) if centre is None else centre
        return (coords - centre) / self.scale.to(coords.dtype)


def colour_moments(
    patches: torch.Tensor | Iterable[torch.Tensor], chunk: int = 256
) -> torch.Tensor:
    """Per-channel mean and sd ``(2, C)`` over every pixel of ``(N, C, H, W)`` patches.

    ``patches`` is one tensor (read ``chunk`` patches at a time) or an iterable of such chunks
    (e.g. read from a patch cache one block at a time); sums are accumulated in float64, so
    thousands of 160-px uint8 patches never become one float copy.
    """
    chunks = patches.split(chunk) if isinstance(patches, torch.Tensor) else patches
    total = squares = None
    count = 0
    for block in chunks:
        block = torch.as_tensor(block)
        if block.dim() != 4:
            raise InputError("colour_moments needs (N, C, H, W) patches")
        values = block.double().transpose(0, 1).flatten(1)
        total = values.sum(1) if total is None else total + values.sum(1)
        squares = values.square().sum(1) if squares is None else squares + values.square().sum(1)
        count += values.shape[1]
    if total is None or count == 0:
        raise InputError("colour_moments needs at least one patch")
    mean = total / count
    sd = (squares / count - mean.square()).clamp_min(0).sqrt()
    return torch.stack([mean, sd]).float()


class SlideColourNormaliser(nn.Module):
    """Per-slide colour standardisation of uint8 spot patches to the training cohort.

    Each slide's patches are mapped channel by channel so that their mean and sd over the
    slide's pixels equal the reference (the training slides' average moments):
    ``x' = (x - mean_slide) / sd_slide * sd_ref + mean_ref`` (Reinhard et al. 2001, in RGB),
    rounded and clipped to 0..255 as the uint8 image it stands for.
    Serial sections and other labs differ in stain intensity and hue as a whole; relative
    differences between spots of one slide (cellularity, stroma) are what transfer. The
    moments are those of the whole slide (:func:`colour_moments`, streamed over its patches);
    :meth:`transform` turns them into a per-channel gain and shift that :meth:`apply` uses on
    any batch of that slide's patches. ``reference`` and ``fitted`` are buffers, saved in the
    owning module's ``state_dict``.
    """

    reference: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.register_buffer("reference", torch.zeros(2, channels))
        self.register_buffer("fitted", torch.tensor(False))

    def fit(self, slide_moments: Sequence[torch.Tensor]) -> SlideColourNormaliser:
        """Fit the reference: the mean of the training slides' ``(2, C)`` colour moments."""
        if len(slide_moments) == 0:
            raise InputError("SlideColourNormaliser.fit needs the moments of at least one slide")
        self.reference.copy_(torch.stack(list(slide_moments)).mean(0))
        self.fitted.fill_(True)
        return self

    def transform(self, moments: torch.Tensor) -> torch.Tensor:
        """``(2, C)`` gain and shift mapping a slide with colour ``moments`` to the reference."""
        if not bool(self.fitted):
            raise RuntimeError("SlideColourNormaliser is not fitted; call fit(training_slides)")
        gain = self.reference[1] / moments[1].clamp_min(1e-3)
        return torch.stack([gain, self.reference[0] - moments[0] * gain])

    @staticmethod
    def apply(patches: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` patches (0..255) with per-spot ``(N, 2, C)`` gain/shift, as float32
        0..255 (rounded and clipped: the values of the colour-standardised uint8 image)."""
        gain = transforms[:, 0, :, None, None]
        shift = transforms[:, 1, :, None, None]
        return patches.float().mul(gain).add_(shift).round_().clamp_(0, 255)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """The ``(N, C, H, W)`` uint8 patches of one whole slide, colour-standardised (uint8)."""
        transform = self.transform(colour_moments(patches))
        return torch.cat(
            [
                self.apply(block, transform.expand(len(block), -1, -1)).to(torch.uint8)
                for block in patches.split(256)
            ]
        )


# The earlier, American spellings of the two normalisers, kept for existing code. (Their
# attributes on STEvsModule keep those spellings too: ``coord_normalizer`` and
# ``colour_normalizer`` are state-dict keys of every saved model.)
CoordinateNormalizer = CoordinateNormaliser
SlideColourNormalizer = SlideColourNormaliser

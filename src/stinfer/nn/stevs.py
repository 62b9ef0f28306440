"""The STEvs module: a multimodal VAE from H&E patches and spot coordinates to NB gene counts.

STEvs (Sec. 3, Appendices B-C) encodes a spot's 160-px patch with a Swin Transformer and its
coordinates with an MLP into two Gaussian posteriors, fuses them by a Product of Experts, samples
``z`` and decodes it into the patch and into negative binomial parameters of ``M`` genes. The loss
(Eq. 3 / 34) is

``lambda_img * L_img + lambda_rna * L_rna + beta_e * L_KL + gamma * L_align``

with linear KL annealing ``beta_e`` (Eq. 38). This module knows tensors only; the user-facing
model (AnnData in and out, training, presets) lives in :mod:`stinfer.models`.

Reductions (chosen to match the public STEvs code, whose losses the default weights were tuned
with; each term is per spot, averaged over the batch):

- ``L_img``: squared error summed over the pixels of a patch (Eq. 35), mean over spots;
- ``L_rna``: NB negative log-likelihood summed over the genes, mean over spots, so ``lambda_rna``
  weighs a whole expression profile against a whole patch;
- ``L_KL``: Eq. 37 summed over latent dimensions, mean over spots;
- ``L_align``: mean squared difference of reparameterised ``z_img`` and ``z_xy`` samples over all
  entries (``torch.nn.functional.mse_loss``); Eq. 2 sums over latent dimensions instead, i.e. it
  is ``latent_dim`` times larger. The public code's reduction is kept so ``gamma = 0.5`` keeps the
  meaning it had in the paper's experiments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stinfer.errors import InputError
from stinfer.modalities import Modality, canonical_modality
from stinfer.nn.decoders import GeneDecoder, ImageDecoder
from stinfer.nn.encoders import (
    COORDINATE_ENCODERS,
    CoordinateNormaliser,
    ImageEncoder,
    ModalityPosterior,
    SlideColourNormaliser,
    build_coordinate_encoder,
)
from stinfer.nn.fusion import (
    FUSIONS,
    PoEFusion,
    build_fusion,
    calibration_offsets,
    fuse_poe,
    image_expert_weight,
    reparameterize,
)
from stinfer.nn.likelihoods import NegativeBinomial, kl_standard_normal

__all__ = ["STEvsConfig", "STEvsModule", "image_reconstruction_error", "kl_weight"]


@dataclass
class STEvsConfig:
    """Hyperparameters of the STEvs module, with the paper's defaults.

    Sources: "Table 6" etc. refer to the STEvs paper; "public code" to the authors' repository
    (``iclr2026stevs/stevs.v1.0``) where the paper is silent. Variants of the ablations (Tables
    3-4) are values of ``fusion``, ``coord_encoder``, ``backbone``, ``image_decoder``,
    ``alignment`` and ``pretrained``.
    """

    # image encoder
    backbone: str = "swin_tiny_patch4_window7_224"  # STEvs Table 6 (Swin-T, patch 4, 2-2-6-2)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args
    patch_size: int = 160  # STEvs D.1.2: 5x5 grid of 32-px base patches
    in_chans: int = 3  # STEvs Table 6: RGB
    pretrained: str | None = None  # STEvs C.2.1 uses ImageNet weights: "hub" or a local file path
    freeze_encoder: bool = True  # public code detaches the Swin features
    latent_dim: int = 128  # STEvs Table 6
    # coordinate encoder
    coord_encoder: str = "mlp"  # STEvs Sec. 3.1; "fourier" / "none" are ablations (Tables 3-4)
    coord_hidden_dims: tuple[int, ...] = (64, 128)  # STEvs Table 6
    fourier_num_frequencies: int = 64  # public code: 128 Fourier features
    fourier_sampling: str = "random"  # public code: Gaussian frequencies (Tancik et al.)
    fourier_scale: float = 1.0  # public code
    fourier_learnable: bool = True  # public code: learnable frequency matrix
    # fusion
    fusion: str = "poe"  # STEvs Eq. 1; "concat" / "mean" / "cross_attention" are ablations
    attention_heads: int = 4  # public code (cross-attention ablation)
    attention_dropout: float = 0.1  # public code (cross-attention ablation)
    # decoders
    image_decoder: bool = True  # STEvs Sec. 3.3; False is "w/o Image Decoder" (Tables 3-4)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32)  # STEvs Table 6
    image_recon_size: int | None = None  # None: the full patch (Table 6); else a smaller side
    gene_hidden_dims: tuple[int, ...] = (256, 512)  # STEvs Table 6
    dropout: float = 0.2  # public code (gene decoder)
    expression_scale: str = "absolute"  # STEvs Eq. 32; "profile" = composition x library size
    # loss
    image_weight: float = 1.0  # lambda_img, STEvs Eq. 3
    rna_weight: float = 10.0  # lambda_rna, STEvs Eq. 3
    kl_weight: float = 0.5  # beta (beta_max of Eq. 38), STEvs Eq. 3
    alignment_weight: float = 0.5  # gamma, STEvs Eq. 3
    alignment: bool = True  # STEvs Eq. 2; False is "w/o Alignment Loss" (Tables 3-4)
    library_weight: float = 1.0  # stinfer: log-library MSE (profile scale only; not in STEvs)
    kl_anneal_epochs: int = 50  # E_anneal of STEvs Eq. 38; 50 in the public code
    # optimisation (the batch size and the number of epochs are the model's config's:
    # stinfer.models.stevs.STEvsModelConfig.training.batch_size and .trainer.max_epochs)
    lr: float = 1e-4  # STEvs Sec. 4.2 (AdamW, C.4.2)
    weight_decay: float = 0.01  # AdamW default, as in the public code

    def __post_init__(self) -> None:
        for name in ("coord_hidden_dims", "decoder_channels", "gene_hidden_dims"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        self.backbone_kwargs = dict(self.backbone_kwargs)
        choices = {
            "fusion": FUSIONS,
            "coord_encoder": COORDINATE_ENCODERS,
            "fourier_sampling": ("random", "log"),
            "expression_scale": ("absolute", "profile"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"STEvsConfig.{name} = {getattr(self, name)!r} is not one of {allowed}"
                )
        for name in ("latent_dim", "patch_size", "in_chans"):
            if getattr(self, name) <= 0:
                raise InputError(f"STEvsConfig.{name} must be positive; got {getattr(self, name)}")
        if self.image_recon_size is not None and (
            self.image_recon_size <= 0 or self.patch_size % self.image_recon_size
        ):
            raise InputError(
                f"STEvsConfig.image_recon_size = {self.image_recon_size} must divide "
                f"patch_size {self.patch_size} (or be None for the full patch)"
            )
        for name in (
            "image_weight",
            "rna_weight",
            "kl_weight",
            "alignment_weight",
            "library_weight",
        ):
            if getattr(self, name) < 0:
                raise InputError(f"STEvsConfig.{name} must be >= 0; got {getattr(self, name)}")
        if self.kl_anneal_epochs < 0:
            raise InputError("STEvsConfig.kl_anneal_epochs must be >= 0 (0 disables annealing)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and YAML)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> STEvsConfig:
        """Build from a dict; unknown keys are an :class:`InputError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown STEvsConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**values)


def kl_weight(epoch: float, beta_max: float, anneal_epochs: int) -> float:
    """KL weight of epoch ``epoch``: ``beta_max * min(1, epoch / anneal_epochs)`` (STEvs Eq. 38).

    ``epoch`` counts from 1 for the first epoch, as in the public code (so the first epoch already
    has ``beta_max / anneal_epochs``); ``anneal_epochs = 0`` disables annealing.
    """
    if anneal_epochs <= 0:
        return float(beta_max)
    return float(beta_max) * min(1.0, max(0.0, float(epoch)) / anneal_epochs)


def image_reconstruction_error(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over a patch's pixels, mean over spots (STEvs Eq. 35).

    ``recon`` ``(N, C, r, r)`` may be smaller than ``target`` ``(N, C, P, P)``
    (``image_recon_size``, or patches of another side than the module's ``patch_size``): the
    target is then area-averaged to ``r`` (exactly ``avg_pool2d`` when ``r`` divides ``P``) and
    the per-pixel error is scaled by ``(P / r)^2``, so the term keeps the size of a full-patch
    sum and ``lambda_img`` its meaning (it measures the low-pass part of the patch).
    """
    side, recon_side = target.shape[-1], recon.shape[-1]
    if side != recon_side:
        target = F.adaptive_avg_pool2d(target, recon.shape[-2:])
    return (recon - target).pow(2).flatten(1).sum(1).mean() * (side / recon_side) ** 2


class STEvsModule(nn.Module):
    """STEvs multimodal VAE over tensors (STEvs Sec. 3, Table 6, Appendix C).

    Parameters
    ----------
    num_genes
        Number of genes ``M`` of the NB decoder.
    config
        :class:`STEvsConfig`; defaults to the paper's.

    Notes
    -----
    Inputs: patches ``(N, C, P, P)`` min-max normalised to ``[-1, 1]`` (STEvs Eq. 39) or
    precomputed backbone features ``(N, F)`` from :meth:`encode_image_features`; coordinates
    ``(N, 2)`` already normalised by ``self.coord_normalizer`` (fit it on the training slides, then
    normalise each slide with it; it is saved in the ``state_dict``). ``self.colour_normalizer``
    (per-slide colour standardisation of uint8 patches, used by the model when its training
    config asks for it) is fitted and saved the same way.

    Without a coordinate encoder (``coord_encoder="none"``) every fusion reduces to the image
    posterior and the alignment term is zero. Single-modality modes use the modality's own
    expert (see :mod:`stinfer.nn.fusion`).

    Examples
    --------
    >>> config = STEvsConfig(backbone="resnet10t", patch_size=32, image_decoder=False)
    >>> module = STEvsModule(num_genes=5, config=config)
    >>> out = module(torch.randn(4, 3, 32, 32), torch.randn(4, 2))
    >>> module.loss(out, counts=torch.ones(4, 5), epoch=1)["loss"].shape
    torch.Size([])
    """

    def __init__(self, num_genes: int, config: STEvsConfig | None = None) -> None:
        super().__init__()
        config = config or STEvsConfig()
        if num_genes <= 0:
            raise InputError(f"num_genes must be positive; got {num_genes}")
        self.config = config
        self.num_genes = num_genes
        self.image_encoder = ImageEncoder(
            config.backbone,
            latent_dim=config.latent_dim,
            img_size=config.patch_size,
            in_chans=config.in_chans,
            pretrained=config.pretrained,
            freeze=config.freeze_encoder,
            backbone_kwargs=config.backbone_kwargs,
        )
        self.coord_encoder = build_coordinate_encoder(
            config.coord_encoder,
            hidden_dims=config.coord_hidden_dims,
            latent_dim=config.latent_dim,
            num_frequencies=config.fourier_num_frequencies,
            fourier_sampling=config.fourier_sampling,  # type: ignore[arg-type]
            fourier_scale=config.fourier_scale,
            fourier_learnable=config.fourier_learnable,
        )
        self.coord_normalizer = CoordinateNormaliser()
        self.colour_normalizer = SlideColourNormaliser()
        self.fusion = (
            build_fusion(
                config.fusion,
                image_feature_dim=self.image_encoder.num_features,
                coord_feature_dim=self.coord_encoder.num_features,
                latent_dim=config.latent_dim,
                num_heads=config.attention_heads,
                dropout=config.attention_dropout,
            )
            if self.coord_encoder is not None
            else None
        )
        self.image_decoder = (
            ImageDecoder(
                config.latent_dim,
                config.in_chans,
                config.image_recon_size or config.patch_size,
                config.decoder_channels,
            )
            if config.image_decoder
            else None
        )
        self.gene_decoder = GeneDecoder(
            config.latent_dim,
            num_genes,
            hidden_dims=config.gene_hidden_dims,
            dropout=config.dropout,
            expression_scale=config.expression_scale,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ encoding
    def encode_image_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(N, F)`` of ``(N, C, P, P)`` patches, to cache per slide.

        With ``freeze_encoder=True`` the features are deterministic and computed without
        gradients; passing them to :meth:`forward` instead of the patches gives the same outputs
        and losses, so a frozen-encoder epoch costs only the heads and decoders.
        """
        return self.image_encoder.encode_features(patches)

    def _posteriors(
        self,
        patches_or_features: torch.Tensor | None,
        coords: torch.Tensor | None,
        mode: str,
    ) -> tuple[ModalityPosterior | None, ModalityPosterior | None]:
        mode = canonical_modality(mode, "mode")
        if mode == "spatial" and self.coord_encoder is None:
            raise InputError(
                "mode 'spatial' (--mode spatial) needs a coordinate encoder; this model was "
                "built without one (coord_encoder='none')"
            )
        image = None
        if mode != "spatial":
            if patches_or_features is None:
                raise InputError(f"mode={mode!r} needs image patches or features")
            image = self.image_encoder(patches_or_features)
        spatial = None
        if mode != "image" and self.coord_encoder is not None:
            if coords is None:
                raise InputError(f"mode={mode!r} needs coordinates (N, 2)")
            spatial = self.coord_encoder(coords)
        return image, spatial

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        patches_or_features: torch.Tensor | None,
        coords: torch.Tensor | None = None,
        mode: Modality = "fused",
        sample: bool = True,
        decode_image: bool = True,
        library_size: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode, fuse, sample and decode a batch of ``N`` spots.

        Parameters
        ----------
        patches_or_features
            ``(N, C, P, P)`` patches in ``[-1, 1]`` or ``(N, F)`` cached backbone features
            (these skip the backbone, so use them with ``freeze_encoder=True``); may be ``None``
            in ``"spatial"`` mode.
        coords
            ``(N, 2)`` normalised coordinates; may be ``None`` in ``"image"`` mode.
        mode
            ``"fused"`` (PoE of both experts, or the configured fusion), ``"image"`` or
            ``"spatial"`` (that expert alone; STEvs Table 5).
        sample
            Draw ``z`` by reparameterisation (Eq. 31); ``False`` uses the posterior mean.
        decode_image
            Run the image decoder (if the module has one).
        library_size
            ``(N,)`` observed total counts; used only with ``expression_scale="profile"``.

        Returns
        -------
        dict of torch.Tensor
            ``mu``, ``logvar`` (posterior of ``mode``), ``z``, ``nb_mean``, ``nb_theta``
            (``(N, M)``); present when computed: ``features_img``, ``mu_img``, ``logvar_img``,
            ``mu_xy``, ``logvar_xy``, ``z_img`` and ``z_xy`` (samples of each expert, for the
            alignment loss), ``image_recon`` ``(N, C, P, P)``, ``nb_profile``, ``log_library``,
            ``library_size``.
        """
        image, spatial = self._posteriors(patches_or_features, coords, mode)
        outputs: dict[str, torch.Tensor] = {}
        if image is not None:
            outputs.update(features_img=image.features, mu_img=image.mu, logvar_img=image.logvar)
        if spatial is not None:
            outputs.update(mu_xy=spatial.mu, logvar_xy=spatial.logvar)

        if image is not None and spatial is not None:
            mu, logvar = self.fusion(image, spatial)
        elif image is not None:
            mu, logvar = image.mu, self._single_expert_logvar(image, 0)
        else:
            mu, logvar = spatial.mu, self._single_expert_logvar(spatial, 1)
        z = reparameterize(mu, logvar) if sample else mu
        outputs.update(mu=mu, logvar=logvar, z=z)
        if sample and image is not None and spatial is not None:
            outputs["z_img"] = reparameterize(image.mu, image.logvar)
            outputs["z_xy"] = reparameterize(spatial.mu, spatial.logvar)

        outputs.update(self.gene_decoder(z, library_size=library_size))
        if library_size is not None:
            outputs["library_size"] = library_size.reshape(-1)
        if decode_image and self.image_decoder is not None:
            outputs["image_recon"] = self.image_decoder(z)
        return outputs

    def _single_expert_logvar(self, posterior: ModalityPosterior, expert: int) -> torch.Tensor:
        """An expert's log-variance when it is the only posterior: with the Product of Experts,
        after the distance-aware floor and inflation
        (:meth:`~stinfer.nn.fusion.PoEFusion.single_expert_logvar`; eval mode only)."""
        if not isinstance(self.fusion, PoEFusion):
            return posterior.logvar
        features = posterior.features if expert == 0 else None
        return self.fusion.single_expert_logvar(posterior.mu, posterior.logvar, expert, features)

    # ------------------------------------------------------------------ losses
    def loss(
        self,
        outputs: dict[str, torch.Tensor],
        counts: torch.Tensor,
        patches_target: torch.Tensor | None = None,
        epoch: float = 1,
    ) -> dict[str, torch.Tensor]:
        """Training loss of STEvs (Eq. 3 / 34) for the outputs of :meth:`forward`.

        Parameters
        ----------
        outputs
            What :meth:`forward` returned (``sample=True``).
        counts
            ``(N, M)`` observed counts.
        patches_target
            ``(N, C, P, P)`` patches in ``[-1, 1]``, the reconstruction target; required when
            the module has an image decoder and ``image_weight > 0``.
        epoch
            Current epoch counted from 1, for the KL annealing of Eq. 38.

        Returns
        -------
        dict of torch.Tensor
            ``loss`` (the weighted total) and the unweighted terms ``image``, ``rna``, ``kl``,
            ``alignment`` (zero when disabled), ``library`` (squared error of the predicted log
            library size, weight ``library_weight``; profile scale with an observed library
            only) and
            ``kl_weight`` (``beta_e``). See the module docstring for the
            reductions.
        """
        return self._loss(outputs, counts, patches_target, epoch)

    def adaptation_loss(
        self,
        outputs: dict[str, torch.Tensor],
        patches_target: torch.Tensor | None = None,
        epoch: float = 1,
    ) -> dict[str, torch.Tensor]:
        """Loss for test-time adaptation on an unlabelled slide: image, KL and alignment only.

        The same terms and weights as :meth:`loss` without ``L_rna`` (``rna`` is reported as 0).
        """
        return self._loss(outputs, None, patches_target, epoch)

    def _loss(
        self,
        outputs: dict[str, torch.Tensor],
        counts: torch.Tensor | None,
        patches_target: torch.Tensor | None,
        epoch: float,
    ) -> dict[str, torch.Tensor]:
        config = self.config
        zero = outputs["mu"].new_zeros(())
        terms = {"image": zero, "rna": zero, "kl": zero, "alignment": zero, "library": zero}

        if self.image_decoder is not None and config.image_weight > 0:
            if patches_target is None or "image_recon" not in outputs:
                raise InputError(
                    "the image decoder is on: pass patches_target (N, C, P, P) to the loss and "
                    "forward(..., decode_image=True), or set image_decoder=False"
                )
            terms["image"] = image_reconstruction_error(outputs["image_recon"], patches_target)

        terms.update(self._expression_terms(outputs, counts))
        if config.alignment and "z_img" in outputs and "z_xy" in outputs:
            terms["alignment"] = F.mse_loss(outputs["z_img"], outputs["z_xy"])

        beta = kl_weight(epoch, config.kl_weight, config.kl_anneal_epochs)
        total = (
            config.image_weight * terms["image"]
            + config.rna_weight * terms["rna"]
            + beta * terms["kl"]
            + config.alignment_weight * terms["alignment"]
            + config.library_weight * terms["library"]
        )
        return {"loss": total, **terms, "kl_weight": zero + beta}

    def _expression_terms(
        self, outputs: dict[str, torch.Tensor], counts: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``rna`` (NB NLL), ``library`` (log-library squared error) and ``kl`` of one posterior."""
        terms = {"kl": kl_standard_normal(outputs["mu"], outputs["logvar"]).mean()}
        if counts is not None:
            likelihood = NegativeBinomial(outputs["nb_mean"], outputs["nb_theta"])
            terms["rna"] = -likelihood.log_prob(counts).sum(-1).mean()
            if "log_library" in outputs and "library_size" in outputs:
                observed = outputs["library_size"].to(outputs["log_library"].dtype)
                terms["library"] = F.mse_loss(outputs["log_library"], observed.clamp_min(1).log())
        return terms

    def image_expert_weight(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(N,)`` share of each spot's fused mean taken from the image expert
        (:func:`~stinfer.nn.fusion.image_expert_weight`), from :meth:`forward`'s fused outputs;
        ``None`` when the fusion is not the Product of Experts (its experts' variances then
        weigh nothing) or an expert was not run."""
        if not isinstance(self.fusion, PoEFusion):
            return None
        if "logvar_img" not in outputs or "logvar_xy" not in outputs:
            return None
        return image_expert_weight(
            *self.fusion.expert_logvars(
                outputs["mu_img"],
                outputs["logvar_img"],
                outputs["mu_xy"],
                outputs["logvar_xy"],
                outputs.get("features_img"),
            )
        )

    @torch.no_grad()
    def fusion_shift_nll(
        self, outputs: dict[str, torch.Tensor], counts: torch.Tensor, shifts: Sequence[float]
    ) -> torch.Tensor:
        """NB negative log-likelihood of ``counts`` under the fused prediction, per PoE shift.

        For each ``shift`` (:func:`~stinfer.nn.fusion.calibration_offsets`: added to the image
        expert's log-precision relative to the coordinate expert's) the experts of ``outputs``
        (``mu_img``, ``logvar_img``, ``mu_xy``, ``logvar_xy`` as :meth:`forward` returns them,
        ``(N, D)``) are fused again, the fused mean is decoded as prediction decodes it (no
        sampling, predicted library size) and scored on ``counts`` ``(N, M)``: the NLL summed
        over genes, mean over spots (``L_rna`` of Eq. 3). Returns ``(len(shifts),)``. Call it
        in eval mode, on spots the model was not trained on.
        """
        if not isinstance(self.fusion, PoEFusion):
            raise InputError("fusion calibration needs the Product-of-Experts fusion")
        scores = []
        for shift in shifts:  # a handful of candidate values, each one batched decoder pass
            offset_img, offset_xy = calibration_offsets(float(shift))
            mu, _ = fuse_poe(
                outputs["mu_img"],
                outputs["logvar_img"] - offset_img,
                outputs["mu_xy"],
                outputs["logvar_xy"] - offset_xy,
            )
            decoded = self.gene_decoder(mu)
            likelihood = NegativeBinomial(decoded["nb_mean"], decoded["nb_theta"])
            scores.append(-likelihood.log_prob(counts).sum(-1).mean())
        return torch.stack(scores)

    def expert_outputs(
        self,
        outputs: dict[str, torch.Tensor],
        expert: str,
        sample: bool = True,
        library_size: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode one expert's own posterior (``"image"`` or ``"spatial"``) from :meth:`forward`'s
        outputs without running the encoders again: ``mu``, ``logvar``, ``z`` and the gene
        decoder's outputs, as :meth:`forward` gives them in that single-modality mode."""
        key = {"image": "img", "spatial": "xy"}[expert]
        mu, logvar = outputs[f"mu_{key}"], outputs[f"logvar_{key}"]
        z = reparameterize(mu, logvar) if sample else mu
        result = {"mu": mu, "logvar": logvar, "z": z}
        result.update(self.gene_decoder(z, library_size=library_size))
        if library_size is not None:
            result["library_size"] = library_size.reshape(-1)
        return result

    def subset_loss(
        self,
        outputs: dict[str, torch.Tensor],
        counts: torch.Tensor,
        epoch: float = 1,
        library_size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expression ELBO terms of each single expert, to add to :meth:`loss` of the fused pass.

        MVAE subset training (Wu & Goodman 2018): besides the joint posterior, each modality's
        own expert must explain the counts (``rna_weight * rna + beta_e * kl +
        library_weight * library`` per expert; no image or alignment term, those come from the
        fused pass). This is what makes single-modality prediction (STEvs Table 5) as good as
        the expert allows, e.g. on a section whose coordinates are not registered to the
        training one. Zero when ``outputs`` has fewer than two experts.
        """
        config = self.config
        beta = kl_weight(epoch, config.kl_weight, config.kl_anneal_epochs)
        total = outputs["mu"].new_zeros(())
        if "mu_img" not in outputs or "mu_xy" not in outputs:
            return total
        for expert in ("image", "spatial"):
            terms = self._expression_terms(
                self.expert_outputs(outputs, expert, True, library_size), counts
            )
            total = (
                total
                + config.rna_weight * terms["rna"]
                + beta * terms["kl"]
                + config.library_weight * terms.get("library", total.new_zeros(()))
            )
        return total

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_mean(
        self,
        patches_or_features: torch.Tensor | None,
        coords: torch.Tensor | None = None,
        mode: Modality = "fused",
        library_size: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Deterministic prediction from the posterior mean (no sampling, eval mode).

        The NB parameters are decoded at ``z = mu`` (a plug-in estimate; the public STEvs code
        decodes one random sample instead). The module is put in eval mode for the call and
        restored afterwards.

        Returns
        -------
        dict of torch.Tensor
            ``nb_mean`` and ``nb_theta`` ``(N, M)``, ``mu`` and ``variance`` (``exp(logvar)``) of
            the posterior of ``mode`` ``(N, D)``, the per-modality ``mu_img``/``mu_xy`` when
            computed, and ``nb_profile``/``log_library`` with the profile scale.
        """
        was_training = self.training
        self.eval()
        try:
            outputs = self.forward(
                patches_or_features,
                coords,
                mode=mode,
                sample=False,
                decode_image=False,
                library_size=library_size,
            )
        finally:
            self.train(was_training)
        outputs.pop("features_img", None)
        outputs.pop("z", None)
        outputs["variance"] = outputs["logvar"].exp()
        return outputs

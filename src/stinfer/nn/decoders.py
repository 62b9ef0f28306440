"""Decoders of the STEvs module: latent ``z`` to an image patch and to NB gene parameters.

- :class:`ImageDecoder`: transposed-convolution decoder reconstructing the ``[-1, 1]`` patch
  (STEvs Table 6, C.3.1).
- :class:`GeneDecoder`: MLP with BatchNorm/ReLU/Dropout and Softplus heads for the negative
  binomial mean and inverse dispersion of ``M`` genes (Table 6, Eq. 32-33).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from stinfer.errors import InputError

__all__ = ["ConvBlock", "GeneDecoder", "ImageDecoder", "UpsampleStage"]

ExpressionScale = Literal["absolute", "profile"]


class ConvBlock(nn.Sequential):
    """``Conv3x3 -> BatchNorm2d -> LeakyReLU``, keeping the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
        )


class UpsampleStage(nn.Sequential):
    """``ConvTranspose2d(k=2, s=2) -> BatchNorm2d -> LeakyReLU -> ConvBlock``: doubles the side."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
            ConvBlock(out_channels, out_channels),
        )


class ImageDecoder(nn.Module):
    """Reconstruct the input patch from ``z`` (STEvs Table 6, C.3.1).

    ``Linear(z) -> (256, S, S)`` with ``S = patch_size / 8``, three :class:`UpsampleStage`
    (256 -> 128 -> 64 -> 32 channels, each doubling the side), then ``Conv3x3 -> Tanh`` to
    ``out_chans`` channels in ``[-1, 1]``. For 160-px patches: 20 -> 40 -> 80 -> 160. The public
    STEvs code uses a heavier depthwise "ConvBlock" after each transposed convolution; here each
    stage ends with a plain Conv3x3/BatchNorm/LeakyReLU block.

    Parameters
    ----------
    latent_dim
        Size of ``z``.
    out_chans
        Image channels (3).
    patch_size
        Patch side in pixels; must be divisible by ``2 ** (len(channels) - 1)``.
    channels
        Channel widths from the start map to the last stage (``(256, 128, 64, 32)``).

    Raises
    ------
    InputError
        If ``patch_size`` is not divisible by the total upsampling factor.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        out_chans: int = 3,
        patch_size: int = 160,
        channels: Sequence[int] = (256, 128, 64, 32),
    ) -> None:
        super().__init__()
        factor = 2 ** (len(channels) - 1)
        if patch_size % factor:
            raise InputError(
                f"image decoder: patch_size {patch_size} must be divisible by {factor}; "
                "choose a patch size like 160 or disable the image decoder"
            )
        self.start_channels = channels[0]
        self.start_size = patch_size // factor
        self.project = nn.Linear(latent_dim, channels[0] * self.start_size**2)
        self.stages = nn.Sequential(
            *(UpsampleStage(c_in, c_out) for c_in, c_out in itertools.pairwise(channels))
        )
        self.head = nn.Sequential(
            nn.Conv2d(channels[-1], out_chans, kernel_size=3, padding=1), nn.Tanh()
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` latents to ``(N, out_chans, patch_size, patch_size)`` patches in [-1, 1]."""
        start = self.project(z).view(-1, self.start_channels, self.start_size, self.start_size)
        return self.head(self.stages(start))


class GeneDecoder(nn.Module):
    """Negative binomial parameters of ``M`` genes from ``z`` (STEvs Table 6, Eq. 32-33).

    ``Linear(D, 256) -> BN -> ReLU -> Dropout -> Linear(256, 512) -> BN -> ReLU -> Dropout``, then
    ``theta = Softplus(Linear(512, M))`` and, by ``expression_scale``:

    - ``"absolute"`` (STEvs): ``mean = Softplus(Linear(512, M))``, the expected raw counts.
    - ``"profile"``: ``mean = softmax(Linear(512, M)) * exp(log_library)``, a composition over the
      gene panel times a library size. ``log_library`` comes from a one-unit head, or from the
      observed library size when the caller passes it (scVI-style); the composition then does
      not have to explain sequencing depth, which varies between slides for technical reasons.

    A training batch of one spot cannot be batch-normalised; such a batch uses the running
    statistics (as the public STEvs code does) instead of failing.

    Parameters
    ----------
    latent_dim
        Size of ``z``.
    num_genes
        ``M``.
    hidden_dims
        MLP widths (``(256, 512)``).
    dropout
        Dropout after each hidden layer (0.2 in the public STEvs code).
    expression_scale
        ``"absolute"`` or ``"profile"`` (see above).
    """

    def __init__(
        self,
        latent_dim: int = 128,
        num_genes: int = 2000,
        hidden_dims: Sequence[int] = (256, 512),
        dropout: float = 0.2,
        expression_scale: ExpressionScale = "absolute",
    ) -> None:
        super().__init__()
        if expression_scale not in ("absolute", "profile"):
            raise InputError(
                f"expression_scale must be 'absolute' or 'profile'; got {expression_scale!r}"
            )
        self.expression_scale = expression_scale
        layers: list[nn.Module] = []
        width = latent_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            layers.append(nn.Dropout(dropout))
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.mean = nn.Linear(width, num_genes)
        self.theta = nn.Sequential(nn.Linear(width, num_genes), nn.Softplus())
        self.log_library = nn.Linear(width, 1) if expression_scale == "profile" else None

    @torch.no_grad()
    def initialise_from_counts(self, counts: torch.Tensor) -> None:
        """Set the output biases so an untrained decoder predicts the training data's means.

        ``counts`` ``(N, M)`` are training counts. With ``"absolute"`` the mean head's bias is
        the inverse Softplus of each gene's mean count; with ``"profile"`` the composition
        logits' bias is the log of the mean composition and the library head's bias the mean
        log library size. Without this a decoder starts near one count per spot and spends
        its first epochs climbing to the data's scale (e.g. log(3000) ~ 8 at lr 1e-3); the
        weights are untouched, so this is an initialisation, not a fit.
        """
        counts = counts.double()
        self.initialise_from_totals(counts.sum(0), counts.sum(1))

    @torch.no_grad()
    def initialise_from_totals(self, gene_totals: torch.Tensor, spot_totals: torch.Tensor) -> None:
        """:meth:`initialise_from_counts` from the count matrix's per-gene totals ``(M,)`` and
        per-spot totals ``(N,)`` alone (all it needs; a sparse or streamed matrix gives them
        without a dense copy)."""
        gene_totals, spot_totals = gene_totals.double(), spot_totals.double()
        if self.log_library is None:
            mean = (gene_totals / len(spot_totals)).clamp_min(1e-4)
            self.mean.bias.copy_(mean + torch.log(-torch.expm1(-mean)))  # inverse softplus
            return
        composition = gene_totals / spot_totals.sum().clamp_min(1.0)
        self.mean.bias.copy_(torch.log(composition + 1e-6))
        self.log_library.bias.fill_(float(spot_totals.clamp_min(1.0).log().mean()))

    def _hidden(self, z: torch.Tensor) -> torch.Tensor:
        if self.training and z.shape[0] == 1:
            self.mlp.eval()
            try:
                return self.mlp(z)
            finally:
                self.mlp.train()
        return self.mlp(z)

    def forward(
        self, z: torch.Tensor, library_size: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Decode ``(N, D)`` latents.

        Parameters
        ----------
        z
            Latent samples or posterior means.
        library_size
            ``(N,)`` or ``(N, 1)`` observed total counts per spot; only used with
            ``expression_scale="profile"``, in place of the predicted library.

        Returns
        -------
        dict
            ``nb_mean`` and ``nb_theta`` ``(N, M)``; with ``"profile"`` also ``nb_profile``
            ``(N, M)`` (rows sum to 1) and ``log_library`` ``(N,)`` (predicted).
        """
        hidden = self._hidden(z)
        outputs = {"nb_theta": self.theta(hidden)}
        if self.log_library is None:
            outputs["nb_mean"] = nn.functional.softplus(self.mean(hidden))
            return outputs
        profile = torch.softmax(self.mean(hidden), dim=-1)
        log_library = self.log_library(hidden).squeeze(-1)
        library = (
            log_library.exp() if library_size is None else library_size.reshape(-1).to(z.dtype)
        )
        outputs.update(
            nb_mean=profile * library[:, None], nb_profile=profile, log_library=log_library
        )
        return outputs

"""The CoxFormer spatial generative module (CoxFormer Suppl. Section 3): tensors only.

One spot representation per spot (or sub-spot), computed once per step and shared by every
gene of the mini-batch, and one set of gene parameters per gene, computed from its embedding;
a gene's prediction at a spot is a readout of the two::

    spot features  --SpotEncoder-->  tokens (S, d_model)  --SpotContext-->  tokens
    tokens  --SpotHead (LayerNorm, 4 x Linear 256 + LeakyReLU 0.1, Linear)-->  factors (S, 1 + K)
    e_g  --W_g (gene token)--> MLP -->  level_g, scale_g, loadings_g (K)
    pred(s, g) = ELU(level_g + (1 + scale_g) * shared(s) + <patterns(s), loadings_g>, 0.01) + 0.01

Why the gene enters as the *weights of the head's last layer* (a bilinear readout) and not as
one token the spots attend to: with a single gene token, cross-attention over one key returns
the same vector at every spot, so the gene only shifts every spot token by a constant and the
output is, in practice, one shared slide profile rescaled per gene (the public CoxFormer code
matched the mean-profile baseline on HER2ST and did the same with shuffled embeddings). Here
``shared(s)`` is that shared profile, which all genes fit together (the model starts at the
mean-profile baseline: the gene layer is zero-initialised), and ``<patterns(s), loadings_g>``
is a rank-``K`` factorisation in which the gene's embedding chooses a *spatial pattern*: a
held-out gene gets the patterns of the training genes whose embeddings resemble its own.
:class:`AdditiveGeneReadout` keeps the public code's conditioning for the ablation.

Scaling the attention over spots (:class:`SpotContext`): spots attend to each other within
random groups of at most ``group_size`` spots (a fresh random partition every training step;
a fixed seeded partition at inference), so cost and memory are ``O(n_spots x group_size)``:
20,000 spots are 5 groups of 4,096 on one GPU (flash / memory-efficient SDPA kernels), and
4,000 spots on a CPU are 4 groups of 1,024 with the ``fast`` preset. Because every spot sees a
random sample of the slide both when training and when predicting, the partition is the same
kind of context in both. The spot pipeline does not depend on the gene, so it runs once per
mini-batch of 64 genes rather than once per gene.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdditiveGeneReadout",
    "BilinearGeneReadout",
    "CoxFormerSpatialModule",
    "GeneParameters",
    "ImageFeatureEncoder",
    "LocationEncoder",
    "SpotContext",
    "SpotEncoder",
    "SpotHead",
    "fourier_location_features",
    "positive_output",
    "weighted_huber_loss",
]

Modality = Literal["location", "image", "both"]
MODALITIES: tuple[str, ...] = ("location", "image", "both")


# --------------------------------------------------------------------------- spot features
def fourier_location_features(coords: torch.Tensor, n_frequencies: int = 32) -> torch.Tensor:
    r"""Fourier features of spot coordinates with exponentially spaced frequencies.

    :math:`\omega_f = 2^{f-1}\pi`, :math:`f = 1, \dots, F` (Section 3, after Tancik et al.);
    for each coordinate :math:`\sin(\omega_f x)` and :math:`\cos(\omega_f x)`, so 2-D
    coordinates give ``4 F`` features. The angles are computed in float64 (float32 where the
    device has no float64, e.g. Apple MPS): with ``F = 32`` the top frequency is
    :math:`2^{31}\pi`, where float32 angles would be rounding noise.

    Parameters
    ----------
    coords
        ``(n, 2)`` coordinates scaled to about ``[-1, 1]`` (the slide's extent).
    n_frequencies
        ``F``.

    Returns
    -------
    torch.Tensor
        ``(n, 4 F)`` float32, ordered ``[sin x, sin y, cos x, cos y]`` per frequency block.
    """
    dtype = torch.float32 if coords.device.type == "mps" else torch.float64
    omega = math.pi * 2.0 ** torch.arange(n_frequencies, device=coords.device, dtype=dtype)
    angles = coords.to(dtype)[:, :, None] * omega  # (n, 2, F)
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (n, 4, F)
    return features.flatten(1).float()


def two_layer_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """``Linear -> ReLU -> Linear``: the projection of each spot modality (Section 3)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class LocationEncoder(nn.Module):
    """Fourier location features (``4 F``) -> 2-layer ReLU MLP -> ``out_dim`` (Section 3)."""

    def __init__(self, out_dim: int, n_frequencies: int = 32, hidden_dim: int = 512) -> None:
        super().__init__()
        self.n_frequencies = n_frequencies
        self.mlp = two_layer_mlp(4 * n_frequencies, hidden_dim, out_dim)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``(n, 2)`` scaled coordinates -> ``(n, out_dim)``."""
        return self.mlp(fourier_location_features(coords, self.n_frequencies))


class ImageFeatureEncoder(nn.Module):
    """Spot image features (ViT patch tokens averaged in the spot) -> 2-layer ReLU MLP (Section 3).

    The backbone runs once per slide outside the module (frozen, see
    :func:`stinfer.data.features.backbone_features`); this is the trainable projection.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.mlp = two_layer_mlp(in_dim, hidden_dim, out_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` -> ``(n, out_dim)``."""
        return self.mlp(image_features)


class SpotEncoder(nn.Module):
    """Spot tokens of dimension ``d_model`` from the chosen modality (Section 3).

    ``location`` and ``image`` are projected straight to ``d_model``; ``both`` projects each
    to its own width (``location_dim``, ``image_dim``), concatenates and maps linearly to
    ``d_model``.
    """

    def __init__(
        self,
        modality: Modality,
        d_model: int = 512,
        n_frequencies: int = 32,
        location_dim: int = 512,
        image_in_dim: int | None = None,
        image_dim: int = 512,
    ) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if modality != "location" and not image_in_dim:
            raise ValueError(f"modality {modality!r} needs image_in_dim (the feature size)")
        self.modality = modality
        both = modality == "both"
        self.location = (
            LocationEncoder(location_dim if both else d_model, n_frequencies, location_dim)
            if modality != "image"
            else None
        )
        self.image = (
            ImageFeatureEncoder(image_in_dim, image_dim if both else d_model, image_dim)
            if modality != "location"
            else None
        )
        self.fuse = nn.Linear(location_dim + image_dim, d_model) if both else None

    def forward(
        self, coords: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(n, 2)`` coordinates and/or ``(n, image_in_dim)`` features -> ``(n, d_model)``."""
        parts = []
        if self.location is not None:
            if coords is None:
                raise ValueError(f"modality {self.modality!r} needs coordinates")
            parts.append(self.location(coords))
        if self.image is not None:
            if image_features is None:
                raise ValueError(f"modality {self.modality!r} needs image features")
            parts.append(self.image(image_features))
        if self.fuse is None:
            return parts[0]
        return self.fuse(torch.cat(parts, dim=-1))


class SpotContext(nn.Module):
    """Self-attention over spots within random groups (see the module docstring for scaling).

    ``n_layers`` Transformer layers, ``n_heads`` heads with ``d_k = d_v = d_model / h``,
    feed-forward ``feedforward_dim``, dropout, ReLU (Section 3). ``n_layers = 0`` is the
    identity.
    """

    def __init__(
        self,
        d_model: int = 512,
        n_heads: int = 8,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        n_layers: int = 2,
    ) -> None:
        super().__init__()
        self.layers = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    d_model,
                    n_heads,
                    feedforward_dim,
                    dropout,
                    activation="relu",
                    batch_first=True,
                ),
                n_layers,
                enable_nested_tensor=False,
            )
            if n_layers > 0
            else None
        )

    def forward(
        self, tokens: torch.Tensor, group_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(n, d_model)`` spot tokens -> the same after attention within random groups.

        Spots are split into ``ceil(n / group_size)`` groups of nearly equal size by a random
        permutation drawn from ``generator`` (CPU generator; default: torch's global RNG).
        """
        if self.layers is None:
            return tokens
        n_spots = tokens.shape[0]
        if n_spots <= group_size:
            return self.layers(tokens[None])[0]
        order = torch.randperm(n_spots, generator=generator).to(tokens.device)
        n_groups = math.ceil(n_spots / group_size)
        size = math.ceil(n_spots / n_groups)
        padded = tokens.new_zeros(n_groups * size, tokens.shape[1])
        padded[:n_spots] = tokens[order]
        padding_mask = torch.arange(n_groups * size, device=tokens.device) >= n_spots
        out = self.layers(
            padded.view(n_groups, size, -1), src_key_padding_mask=padding_mask.view(n_groups, size)
        ).reshape(n_groups * size, -1)[:n_spots]
        return torch.empty_like(out).index_copy_(0, order, out)


class SpotHead(nn.Module):
    """The prediction head up to its last layer: LayerNorm -> ``depth`` x (Linear + LeakyReLU).

    Section 3: four layers of width 256, LeakyReLU slope 0.1. The last linear layer, the one
    that maps width 256 to expression, belongs to the gene readout (its weights depend on the
    gene), so it is not here.
    """

    def __init__(
        self, d_model: int = 512, width: int = 256, depth: int = 4, negative_slope: float = 0.1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(d_model)]
        for index in range(depth):
            layers += [
                nn.Linear(d_model if index == 0 else width, width),
                nn.LeakyReLU(negative_slope),
            ]
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., d_model)`` -> ``(..., width)``."""
        return self.layers(tokens)


def positive_output(pre: torch.Tensor, alpha: float = 0.01, offset: float = 0.01) -> torch.Tensor:
    """``ELU(pre, alpha) + offset``: the head's output non-linearity (Section 3), > 0 everywhere."""
    return F.elu(pre, alpha=alpha) + offset


class GeneParameters(NamedTuple):
    """What the gene readout derives from each gene's embedding (``G`` genes)."""

    level: torch.Tensor  # (G,) additive level in log1p-CP10k units
    scale: torch.Tensor  # (G,) relative gain on the shared profile (0: the shared profile)
    loadings: torch.Tensor  # (G, K) weights on the spot pattern factors


def gene_mlp(embedding_dim: int, d_model: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """Gene token ``W_g e_g`` (Section 3, ``W_g``: embedding dim -> ``d_model``) and a 2-layer MLP."""
    return nn.Sequential(
        nn.Linear(embedding_dim, d_model),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(d_model, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
    )


class BilinearGeneReadout(nn.Module):
    """Gene-conditioned last layer of the head: a shared profile plus a rank-``K`` pattern.

    Per spot, two linear maps of the head features ``h(s)`` (width ``in_dim``): ``shared(s)``
    (1 value) and ``patterns(s)`` (``K`` values). Per gene, the embedding gives ``level``,
    ``scale`` and ``loadings`` (:class:`GeneParameters`); the pre-activation is
    ``level_g + (1 + scale_g) * shared(s) + patterns(s) @ loadings_g``. Equivalently the gene
    generates the weights ``(1 + scale_g) w_shared + W_patterns^T loadings_g`` of the head's
    last ``Linear`` (a hypernetwork), so a gene's spatial pattern, not only its scale, is a
    function of its embedding. The gene layer is zero-initialised, so training starts from one
    shared profile at level ``initial_level`` (the mean-profile baseline) and departs from it
    only where the embeddings predict the departures.
    """

    def __init__(
        self,
        in_dim: int,
        embedding_dim: int,
        d_model: int = 512,
        rank: int = 32,
        hidden_dim: int = 512,
        dropout: float = 0.1,
        initial_level: float = 0.0,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.spot_out = nn.Linear(in_dim, 1 + rank)
        self.gene = gene_mlp(embedding_dim, d_model, hidden_dim, dropout)
        self.gene_out = nn.Linear(hidden_dim, 2 + rank)
        nn.init.zeros_(self.gene_out.weight)
        nn.init.zeros_(self.gene_out.bias)
        self.register_buffer("initial_level", torch.tensor(float(initial_level)))

    def gene_parameters(self, embeddings: torch.Tensor) -> GeneParameters:
        """``(G, embedding_dim)`` standardised embeddings -> :class:`GeneParameters`."""
        out = self.gene_out(self.gene(embeddings))
        return GeneParameters(out[:, 0] + self.initial_level, out[:, 1], out[:, 2:])

    def spot_factors(self, head_features: torch.Tensor) -> torch.Tensor:
        """``(S, in_dim)`` -> ``(S, 1 + K)``: the shared profile, then the ``K`` patterns."""
        return self.spot_out(head_features)

    def forward(self, head_features: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Pre-activation ``(S, G)`` for ``(S, in_dim)`` spots and ``(G, E)`` gene embeddings."""
        return combine(self.spot_factors(head_features), self.gene_parameters(embeddings))


def combine(factors: torch.Tensor, genes: GeneParameters) -> torch.Tensor:
    """``(S, 1 + K)`` spot factors and ``G`` genes' parameters -> ``(S, G)`` pre-activation."""
    shared, patterns = factors[:, :1], factors[:, 1:]
    return genes.level + (1.0 + genes.scale) * shared + patterns @ genes.loadings.T


class AdditiveGeneReadout(nn.Module):
    """The public code's conditioning, kept as an ablation: one gene token added to every spot.

    Cross-attention from spot queries to a single gene token returns ``W_o W_v t_g`` at every
    spot (softmax over one key is 1), so the decoder amounts to adding a per-gene constant
    vector to each spot token; the head then runs on every (spot, gene) pair. Costs ``S x G``
    head evaluations instead of ``S + G`` and, as the issue found, tends to a shared profile
    rescaled per gene.
    """

    def __init__(
        self,
        head: SpotHead,
        embedding_dim: int,
        d_model: int = 512,
        dropout: float = 0.1,
        initial_level: float = 0.0,
    ) -> None:
        super().__init__()
        self.head = head
        self.gene_token = nn.Sequential(nn.Linear(embedding_dim, d_model), nn.Dropout(dropout))
        self.value = nn.Linear(d_model, d_model)  # W_o W_v of attention over one key
        self.out = nn.Linear(head.out_dim, 1)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("initial_level", torch.tensor(float(initial_level)))

    def forward(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Pre-activation ``(S, G)`` for ``(S, d_model)`` spot tokens and ``(G, E)`` embeddings."""
        shifted = tokens[:, None, :] + self.value(self.gene_token(embeddings))[None]
        return self.out(self.head(shifted))[..., 0] + self.initial_level


class CoxFormerSpatialModule(nn.Module):
    """The whole module: spot encoder, spot context, head and gene readout (Section 3).

    Parameters
    ----------
    modality
        ``"location"``, ``"image"`` or ``"both"``.
    embedding_dim
        Size of the gene embeddings (512 for CoxFormer embeddings).
    image_in_dim
        Size of the per-spot image features (``image`` and ``both``).
    d_model, n_heads, feedforward_dim, dropout
        Section 3: 512, 8, 1024, 0.1.
    n_spot_layers
        Transformer layers of :class:`SpotContext` (the paper does not give the number).
    n_frequencies, location_dim, image_dim
        Fourier frequencies ``F`` (32) and the widths of the modality projections (512).
    head_width, head_depth, negative_slope, elu_alpha, output_offset
        Head of Section 3: 4 x (Linear 256 + LeakyReLU 0.1), ELU(alpha 0.01) + 0.01.
    gene_conditioning
        ``"bilinear"`` (:class:`BilinearGeneReadout`, default) or ``"additive"``
        (:class:`AdditiveGeneReadout`, the public code's single-token conditioning).
    rank, gene_hidden_dim
        Pattern factors ``K`` and the width of the gene MLP (bilinear readout).
    initial_level
        Starting level of every gene (the mean training target).
    """

    def __init__(
        self,
        modality: Modality,
        embedding_dim: int,
        image_in_dim: int | None = None,
        d_model: int = 512,
        n_heads: int = 8,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        n_spot_layers: int = 2,
        n_frequencies: int = 32,
        location_dim: int = 512,
        image_dim: int = 512,
        head_width: int = 256,
        head_depth: int = 4,
        negative_slope: float = 0.1,
        elu_alpha: float = 0.01,
        output_offset: float = 0.01,
        gene_conditioning: Literal["bilinear", "additive"] = "bilinear",
        rank: int = 32,
        gene_hidden_dim: int = 512,
        initial_level: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = SpotEncoder(
            modality, d_model, n_frequencies, location_dim, image_in_dim, image_dim
        )
        self.context = SpotContext(d_model, n_heads, feedforward_dim, dropout, n_spot_layers)
        head = SpotHead(d_model, head_width, head_depth, negative_slope)
        if gene_conditioning == "bilinear":
            self.head = head
            self.readout = BilinearGeneReadout(
                head_width, embedding_dim, d_model, rank, gene_hidden_dim, dropout, initial_level
            )
        elif gene_conditioning == "additive":
            self.head = None
            self.readout = AdditiveGeneReadout(head, embedding_dim, d_model, dropout, initial_level)
        else:
            raise ValueError(
                f"gene_conditioning must be 'bilinear' or 'additive', got {gene_conditioning!r}"
            )
        self.gene_conditioning = gene_conditioning
        self.elu_alpha = elu_alpha
        self.output_offset = output_offset

    def spot_tokens(
        self,
        coords: torch.Tensor | None,
        image_features: torch.Tensor | None,
        group_size: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Spot features -> ``(S, d_model)`` tokens after attention among spots."""
        return self.context(self.encoder(coords, image_features), group_size, generator)

    def forward(
        self,
        coords: torch.Tensor | None,
        image_features: torch.Tensor | None,
        gene_embeddings: torch.Tensor,
        group_size: int = 4096,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predicted log1p-CP10k expression ``(S, G)`` (positive, see :func:`positive_output`).

        Parameters
        ----------
        coords
            ``(S, 2)`` scaled spot coordinates (``location``/``both``), else ``None``.
        image_features
            ``(S, image_in_dim)`` spot image features (``image``/``both``), else ``None``.
        gene_embeddings
            ``(G, embedding_dim)`` standardised gene embeddings.
        group_size
            Largest group of spots attending to each other (:class:`SpotContext`).
        """
        tokens = self.spot_tokens(coords, image_features, group_size, generator)
        return self.readout_tokens(tokens, gene_embeddings)

    def readout_tokens(self, tokens: torch.Tensor, gene_embeddings: torch.Tensor) -> torch.Tensor:
        """``(S, d_model)`` spot tokens and ``(G, E)`` embeddings -> ``(S, G)`` predictions."""
        if self.head is None:
            pre = self.readout(tokens, gene_embeddings)
        else:
            pre = self.readout(self.head(tokens), gene_embeddings)
        return positive_output(pre, self.elu_alpha, self.output_offset)


# --------------------------------------------------------------------------- loss
def weighted_huber_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    nonzero_weight: float = 0.5,
    zero_weight: float = 0.5,
    l1_weight: float = 1e-3,
    min_delta: float = 1e-3,
) -> torch.Tensor:
    r"""Weighted Huber loss with a per-gene, per-batch threshold, plus an L1 penalty (Section 3).

    .. math::

        \mathcal{L} = \lambda_{nz}\,\overline{H_\delta}_{\,y>0} + \lambda_z\,\overline{H_\delta}_{\,y=0}
        + \lambda_{\ell_1}\,\overline{|\hat y|}

    where :math:`H_\delta(r) = r^2/2` for :math:`|r| \le \delta` and
    :math:`\delta(|r| - \delta/2)` otherwise, :math:`r = \hat y - y`, and :math:`\delta` is the
    standard deviation of the residuals of each gene (column) in the mini-batch (detached;
    at least ``min_delta``). The Huber terms are means over the non-zero and over the zero
    targets, so the two classes weigh ``nonzero_weight`` and ``zero_weight`` whatever their
    counts (a class absent from the batch contributes 0).

    Parameters
    ----------
    pred, target
        ``(S, G)`` predictions and targets (log1p CP10k).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    residual = pred - target
    delta = residual.detach().std(dim=0, unbiased=False).clamp_min(min_delta)
    absolute = residual.abs()
    huber = torch.where(
        absolute <= delta, 0.5 * residual.square(), delta * (absolute - 0.5 * delta)
    )
    nonzero = target > 0
    loss = pred.abs().mean() * l1_weight
    n_nonzero = nonzero.sum()
    n_zero = nonzero.numel() - n_nonzero
    if n_nonzero > 0:
        loss = loss + nonzero_weight * huber[nonzero].sum() / n_nonzero
    if n_zero > 0:
        loss = loss + zero_weight * huber[~nonzero].sum() / n_zero
    return loss

"""The CoxFormer spatial generative module (CoxFormer Suppl. Section 3): tensors only.

Spot tokens come from a modality (``spatial``, ``image``, ``fused``; :mod:`stinfer.modalities`,
which also accepts the older ``location``/``both``) through a Transformer
over spots, computed once per step and shared by every gene of the mini-batch; each gene's
standardised embedding ``e_g`` becomes a gene token ``W_g e_g``. Two readouts share them::

    spot features  --SpotEncoder-->  tokens (S, d_model)  --SpotContext-->  tokens
    tokens  --SpotHead (LayerNorm, 4 x Linear 256 + LeakyReLU 0.1, Linear)-->  factors (S, 1 + K)
    base(s, g) = level_g + (1 + scale_g) * shared(s) + <patterns(s), loadings_g>   (decoder)
    full(s, g) = ell_g + (1 + gamma_g) * sum_{j != g} a_gj m_j(s)                  (memory)
    a_g = (1 - mu) b_g + mu b_g C      b_g: top-k (default) or softmax attention over the m_j
    b_gj = relu(cos(W_g e_g, W_g e_j)) on the k most similar j, normalised (top-k)
    m_j(s): training gene j at spot s;  C: the slide's co-expression graph of the m_j
    pred(s, g) = ELU(full(s, g), 0.01) + 0.01

Departures from Section 3, and why (held-out genes, median PCC of log1p CP10k, against the
tuned k-NN and mean-profile baselines; the figures behind each point are in
``docs/results.md`` "CoxFormer spatial readout"):

1. **The gene token queries the training genes** (:class:`GeneAttentionReadout`, the
   default): a held-out gene's prediction is the attention-weighted profile of the training
   genes whose tokens match its own, with a learned metric (a diagonal ``W_g``) and per-gene
   calibration, trained leave-one-gene-out (each gene's own slot is masked, so training
   asks exactly what imputation asks). With a softmax it starts as a cosine-softmax k-NN
   and learns from there; with top-k attention (the default, k chosen by the k-NN
   baseline's own cross-validation over the training genes) it starts *at* the tuned k-NN:
   on HER2ST that k is in the hundreds, a flat average no softmax temperature reproduces.
   A learned share ``mu`` (1/2 to start) of each gene's attention then takes one step
   along the slide's co-expression graph (each training gene's 10 most correlated training
   genes on this slide, :func:`coexpression_graph`): the embedding says which genes go
   together in the corpus, the slide which of them go together here. With CoxFormer
   embeddings it edges past the tuned k-NN on HER2ST sections and on the synthetic slide.
2. **No gene-specific decoder term in the prediction on a measured slide.** A decoder term
   chosen by the gene (``base``: the gene's embedding sets the weights of the head's last
   layer, a bilinear readout) is a model whose samples are the genes: it fits the training
   genes' own profiles and does not carry over to new genes (alone, or added to the
   attention as a learned residual, it scored below the attention alone; a full ``W_g``
   instead of a diagonal one got worse as it trained). ``base`` is kept and trained
   beside ``full`` (its own loss term) for what only the decoder can do:
   predict the training genes' profiles where they are not measured (a new slide: the
   memory ``m_j`` is then ``base``'s prediction) and give sub-spots their detail
   (super-resolution). Consequence: on the training slide, at spot level, the held-out-gene
   predictions do not depend on the modality; the modality matters on new slides and for
   sub-spots.
3. **Why not one gene token that the spots attend to** (the public code): cross-attention
   over one key returns the same vector at every spot, so the gene only shifts every spot
   token by a constant and the output is, in practice, one shared slide profile rescaled
   per gene (the public CoxFormer code matched the mean-profile baseline on HER2ST and did
   the same with shuffled embeddings). :class:`AdditiveGeneReadout` keeps that
   conditioning for the ablation; :class:`BilinearGeneReadout` alone is
   ``gene_conditioning="bilinear"``.

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

from stinfer.modalities import Modality, canonical_modality

__all__ = [
    "AdditiveGeneReadout",
    "BilinearGeneReadout",
    "CoxFormerSpatialModule",
    "GeneAttentionReadout",
    "GeneParameters",
    "ImageFeatureEncoder",
    "LocationEncoder",
    "SpotContext",
    "SpotEncoder",
    "SpotHead",
    "aggregate_sub_spots",
    "coexpression_graph",
    "fourier_location_features",
    "positive_output",
    "weighted_huber_loss",
]


# --------------------------------------------------------------------------- spot features
def fourier_location_features(coords: torch.Tensor, n_frequencies: int = 32) -> torch.Tensor:
    r"""Fourier features of spot coordinates with exponentially spaced frequencies.

    :math:`\omega_f = 2^{f-1}\pi`, :math:`f = 1, \dots, F` (Section 3, after Tancik et al.);
    for each coordinate :math:`\sin(\omega_f x)` and :math:`\cos(\omega_f x)`, so 2-D
    coordinates give ``4 F`` features. The angles are computed in float64 (float32 where the
    device has no float64, e.g. Apple MPS): with ``F = 32`` the top frequency is
    :math:`2^{31}\pi`, where float32 angles would be rounding noise. The angle is reduced to
    :math:`[-\pi, \pi)` before the sine (``x 2^{f-1}`` is exact in float64, so the reduction
    is too), which keeps the sine on its fast, accurate path.

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
    scaled = coords.to(dtype)[:, :, None] * 2.0 ** torch.arange(
        n_frequencies, device=coords.device, dtype=dtype
    )  # (n, 2, F): omega_f x / pi, exact (a power-of-two scaling)
    angles = math.pi * torch.remainder(scaled + 1.0, 2.0) - math.pi  # same angle mod 2 pi
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (n, 4, F)
    return features.flatten(1).float()


def he_linear(in_dim: int, out_dim: int, negative_slope: float = 0.0) -> nn.Linear:
    """``nn.Linear`` with He (Kaiming) normal weights for the (leaky) ReLU after it, zero bias.

    PyTorch's default ``Linear`` init keeps a third of the variance per layer, so after the
    head's four layers the spatial signal (and its gradient) is about 1% of its input's and
    training barely moves off the per-gene means; He init keeps the variance.
    """
    layer = nn.Linear(in_dim, out_dim)
    nn.init.kaiming_normal_(layer.weight, a=negative_slope, nonlinearity="leaky_relu")
    nn.init.zeros_(layer.bias)
    return layer


def two_layer_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """``Linear -> ReLU -> Linear``: the projection of each spot modality (Section 3)."""
    return nn.Sequential(he_linear(in_dim, hidden_dim), nn.ReLU(), he_linear(hidden_dim, out_dim))


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

    ``spatial`` (coordinates) and ``image`` are projected straight to ``d_model``; ``fused``
    projects each to its own width (``location_dim``, ``image_dim``), concatenates and maps
    linearly to ``d_model``. ``modality`` may be an older name (``location``, ``both``).
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
        modality = canonical_modality(modality)
        if modality != "spatial" and not image_in_dim:
            raise ValueError(f"modality {modality!r} needs image_in_dim (the feature size)")
        self.modality = modality
        fused = modality == "fused"
        self.location = (
            LocationEncoder(location_dim if fused else d_model, n_frequencies, location_dim)
            if modality != "image"
            else None
        )
        self.image = (
            ImageFeatureEncoder(image_in_dim, image_dim if fused else d_model, image_dim)
            if modality != "spatial"
            else None
        )
        self.fuse = nn.Linear(location_dim + image_dim, d_model) if fused else None

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
    identity. ``attention_dropout`` (default: ``dropout``) is the dropout on the attention
    probabilities alone; it draws ``heads x group_size^2`` random numbers per layer and step
    and keeps PyTorch's CPU attention on its unfused path, which costs more than the rest
    of a layer at ``group_size`` 1,024 on a CPU (``docs/results.md``), so CPU presets may
    turn it off while keeping the dropout of the residual and feed-forward branches.
    """

    def __init__(
        self,
        d_model: int = 512,
        n_heads: int = 8,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        n_layers: int = 2,
        attention_dropout: float | None = None,
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
        if self.layers is not None and attention_dropout is not None:
            for layer in self.layers.layers:
                layer.self_attn.dropout = float(attention_dropout)

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
                he_linear(d_model if index == 0 else width, width, negative_slope),
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


def gene_mlp(
    embedding_dim: int, d_model: int, hidden_dim: int, dropout: float, n_hidden: int = 2
) -> nn.Sequential:
    """Gene token ``W_g e_g`` (Section 3: embedding dim -> ``d_model``), then ``n_hidden``
    ReLU layers of width ``hidden_dim`` (``n_hidden = 0``: the gene parameters are a linear
    function of the embedding, the smoothest map for a few hundred training genes)."""
    layers: list[nn.Module] = [nn.Linear(embedding_dim, d_model), nn.Dropout(dropout)]
    width = d_model
    for _ in range(n_hidden):
        layers += [he_linear(width, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden_dim
    return nn.Sequential(*layers)


class BilinearGeneReadout(nn.Module):
    """Gene-conditioned last layer of the head: a shared profile plus a rank-``K`` pattern.

    Per spot, two linear maps of the head features ``h(s)`` (width ``in_dim``): ``shared(s)``
    (1 value) and ``patterns(s)`` (``K`` values). Per gene, the embedding gives ``level``,
    ``scale`` and ``loadings`` (:class:`GeneParameters`); the pre-activation is
    ``level_g + (1 + scale_g) * shared(s) + patterns(s) @ loadings_g``. Equivalently the gene
    generates the weights ``(1 + scale_g) w_shared + W_patterns^T loadings_g`` of the head's
    last ``Linear`` (a hypernetwork), so a gene's spatial pattern, not only its scale, is a
    function of its embedding. The gene layer starts small (normal, sd 0.02; bias 0), so
    training starts near one shared profile at level ``initial_level`` (the mean-profile
    baseline); exactly zero would put the loadings and the patterns at a saddle point, where
    neither gets a gradient from the other and the fit stalls on the per-gene levels.
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
        n_hidden: int = 2,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.spot_out = nn.Linear(in_dim, 1 + rank)
        self.gene = gene_mlp(embedding_dim, d_model, hidden_dim, dropout, n_hidden)
        self.gene_out = nn.Linear(hidden_dim if n_hidden else d_model, 2 + rank)
        nn.init.normal_(self.gene_out.weight, std=0.02)
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


def coexpression_graph(profiles: torch.Tensor, k: int = 10, chunk: int = 1024) -> torch.Tensor:
    """``(N, N)`` sparse row-stochastic graph: each gene's ``k`` most co-expressed others.

    ``profiles``: ``(S, N)`` log1p CP10k of ``N`` genes at ``S`` spots of one slide. Row ``j``
    holds the ``k`` genes with the highest Pearson correlation to gene ``j`` over the spots
    (itself excluded), weighted by the correlation clipped at 0 and normalised to sum 1 (the
    k-NN weighting of :func:`stinfer.models.gene_baselines.knn_profiles`, over genes).
    ``chunk`` rows of the ``N x N`` correlation are held at a time.
    """
    centred = profiles - profiles.mean(dim=0)
    unit = centred / centred.norm(dim=0).clamp_min(1e-12)
    n = unit.shape[1]
    k = min(int(k), n - 1)
    rows, columns, values = [], [], []
    for start in range(0, n, chunk):
        genes = torch.arange(start, min(start + chunk, n), device=profiles.device)
        correlation = unit[:, genes].T @ unit
        correlation[torch.arange(len(genes)), genes] = -math.inf
        top, index = correlation.topk(k, dim=1)
        weights = top.clamp_min(0.0) + 1e-12
        rows.append(genes.repeat_interleave(k))
        columns.append(index.reshape(-1))
        values.append((weights / weights.sum(dim=1, keepdim=True)).reshape(-1))
    indices = torch.stack([torch.cat(rows), torch.cat(columns)])
    graph = torch.sparse_coo_tensor(indices, torch.cat(values), (n, n), check_invariants=False)
    return graph.coalesce()


class GeneAttentionReadout(nn.Module):
    r"""The gene token attends over the training genes' profiles at every spot.

    A gene's pre-activation at spot ``s`` is

    .. math::

        \mathrm{full}(s, g) = \ell_g + (1 + \gamma_g) \sum_{j \ne g} a_{gj}\, m_j(s),
        \qquad a_{gj} = \operatorname{softmax}_j
        \big(\cos(W_g e_g, W_g e_j) / \tau\big)

    - ``m_j(s)``: the *memory*, the log1p CP10k of the ``N`` training genes at the spot
      (measured on the training slide; where they are not measured, their prediction by the
      spot decoder, ``base`` below);
    - ``a_gj``: the gene token ``W_g e_g`` (Section 3) as the query, the training genes'
      tokens as keys, one head, learned temperature ``tau``; during training each gene's own
      slot is masked (``exclude``), so the loss is a leave-one-gene-out loss, the task the
      model is used for;
    - ``W_g`` is *diagonal* here, a learned relevance of each embedding dimension;
      ``ell_g`` and ``gamma_g`` (level and gain) are linear in the embedding.

    It starts *at* a cosine-softmax k-NN over embeddings (``W_g = I``, ``tau = 0.1``,
    ``ell = gamma = 0``) and learns its metric and calibration end to end. Every gene-specific
    quantity is low-capacity on purpose: the genes are the samples here, and anything that
    can fit a training gene's own profile (a full ``W_g``, a decoder term chosen by the gene)
    fits it in training and does not carry over to held-out genes (see the module
    docstring). With shuffled embeddings the neighbours are random genes and the attended
    profile falls to the mean profile.

    The co-expression step (``coexpression``, a sparse row-stochastic ``(N, N)`` graph, see
    :func:`coexpression_graph`) moves a learned share ``sigmoid(coexpression_logit)`` of the
    attention from each memory gene to the genes co-expressed with it on the slide; with
    ``exclude`` the step may not lead back to the gene itself.

    The gene-level parameters (:attr:`GENE_LEVEL`: ``W_g``, ``tau``, ``ell``, ``gamma``,
    the co-expression share; ``3 D + 4`` numbers) are fitted over the training genes, so a
    small panel can overfit them: trained to the end they lowered the held-out median PCC
    on a synthetic slide of 160 training genes, while on HER2ST (about 8,000 genes) they
    raised it (``docs/results.md`` "CoxFormer spatial readout"). The model therefore keeps
    them at the epoch where validation genes (kept out of their loss) were predicted best
    (:class:`stinfer.models.coxformer_spatial.CoxFormerSpatial`).

    At inference a query that is itself a memory gene (``own``) takes its memory profile as
    its spot value: the calibration is fitted for genes the slide does not hold.

    ``base(s, g)``, a :class:`BilinearGeneReadout` of the spot decoder's features, is the model
    without the memory, trained beside ``full`` (its own loss term): it predicts the memory
    genes where they are not measured (a new slide), so ``full`` is defined on any slide, and
    it gives sub-spots their detail: with ``rows_per_spot = R > 1`` sub-spot rows, a
    sub-spot's ``full`` adds ``base``'s deviation from its spot's mean to the spot's value.
    Cost per batch of ``G`` genes: ``O(G x N x (embedding_dim + S))``.
    """

    GENE_LEVEL = ("relevance", "log_temperature", "calibration", "coexpression_logit")

    def __init__(
        self,
        in_dim: int,
        embedding_dim: int,
        n_memory: int,
        d_model: int = 512,
        rank: int = 32,
        hidden_dim: int = 512,
        dropout: float = 0.1,
        initial_level: float = 0.0,
        n_hidden: int = 2,
        temperature: float = 0.1,
        coexpression_neighbours: int = 10,
        top_k: int = 0,
    ) -> None:
        super().__init__()
        self.coexpression_neighbours = int(coexpression_neighbours)
        self.top_k = int(top_k)
        self.base = BilinearGeneReadout(
            in_dim, embedding_dim, d_model, rank, hidden_dim, dropout, initial_level, n_hidden
        )
        self.relevance = nn.Parameter(torch.ones(embedding_dim))  # diagonal W_g (Section 3)
        if self.top_k == 0:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.calibration = nn.Linear(embedding_dim, 2)  # level, gain
        nn.init.zeros_(self.calibration.weight)
        nn.init.zeros_(self.calibration.bias)
        self.register_buffer("memory", torch.zeros(n_memory, embedding_dim))
        if self.coexpression_neighbours > 0:
            self.coexpression_logit = nn.Parameter(torch.zeros(()))  # mix 1/2 to start

    def coexpression(self, memory_profiles: torch.Tensor) -> torch.Tensor | None:
        """The slide's co-expression graph of the memory genes (:func:`coexpression_graph`)."""
        if self.coexpression_neighbours == 0:
            return None
        return coexpression_graph(memory_profiles, self.coexpression_neighbours)

    def set_memory(self, embeddings: torch.Tensor) -> None:
        """Store the ``(N, embedding_dim)`` standardised embeddings of the memory genes."""
        if embeddings.shape != self.memory.shape:
            raise ValueError(f"memory is {tuple(self.memory.shape)}, got {tuple(embeddings.shape)}")
        self.memory.copy_(embeddings)

    def gene_token(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``W_g e_g`` with a diagonal ``W_g``: ``(G, embedding_dim)``."""
        return embeddings * self.relevance

    def attention(
        self,
        embeddings: torch.Tensor,
        exclude: torch.Tensor | None = None,
        coexpression: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(G, N)`` attention of each gene over the memory genes (rows sum to 1).

        ``exclude``: ``(G,)`` memory row of each gene to mask (its own slot), or -1.
        ``coexpression``: the slide's ``(N, N)`` co-expression graph; a learned share
        ``sigmoid(coexpression_logit)`` of each gene's attention moves one step along it.
        """
        weights = self.embedding_attention(embeddings, exclude)
        if coexpression is None or self.coexpression_neighbours == 0:
            return weights
        mix = torch.sigmoid(self.coexpression_logit)
        propagated = torch.sparse.mm(coexpression.t(), weights.T).T
        weights = (1.0 - mix) * weights + mix * propagated
        if exclude is not None:
            rows = torch.arange(len(embeddings), device=weights.device)[exclude >= 0]
            weights = weights.index_put((rows, exclude[exclude >= 0]), weights.new_tensor(0.0))
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return weights

    def embedding_attention(
        self, embeddings: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention from the gene tokens alone: ``(G, N)``, rows sum to 1, own slots masked.

        ``top_k = 0``: ``softmax_j(cos(W_g e_g, W_g e_j) / tau)``. ``top_k = k > 0``: top-k
        attention, the ``k`` highest cosines weighted by the cosine clipped at 0 (the k-NN
        weighting of :func:`stinfer.models.gene_baselines.knn_profiles`), 0 elsewhere.
        """
        queries = F.normalize(self.gene_token(embeddings), dim=-1)
        keys = F.normalize(self.gene_token(self.memory), dim=-1)
        cosine = queries @ keys.T
        if exclude is not None:
            rows = torch.arange(len(embeddings), device=cosine.device)[exclude >= 0]
            cosine = cosine.index_put((rows, exclude[exclude >= 0]), cosine.new_tensor(-math.inf))
        if self.top_k == 0:
            return torch.softmax(cosine / self.log_temperature.exp(), dim=-1)
        top, index = cosine.topk(min(self.top_k, cosine.shape[1] - 1), dim=1)
        weights = top.clamp_min(0.0) + 1e-12
        weights = weights / weights.sum(dim=1, keepdim=True)
        return torch.zeros_like(cosine).scatter(1, index, weights)

    def memory_parameters(self) -> GeneParameters:
        """The base readout's parameters of the memory genes (to predict their profiles)."""
        return self.base.gene_parameters(self.memory)

    def context(
        self,
        embeddings: torch.Tensor,
        memory_profiles: torch.Tensor,
        exclude: torch.Tensor | None = None,
        coexpression: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ell_g + (1 + gamma_g) sum_j a_gj m_j(s)``: ``(S, G)`` from ``(S, N)`` profiles."""
        weights = self.attention(embeddings, exclude, coexpression)
        level, gain = self.calibration(embeddings).unbind(dim=1)
        return level + (memory_profiles @ weights.T) * (1.0 + gain)

    def forward(
        self,
        head_features: torch.Tensor,
        embeddings: torch.Tensor,
        memory_profiles: torch.Tensor,
        exclude: torch.Tensor | None = None,
        rows_per_spot: int = 1,
        coexpression: torch.Tensor | None = None,
        own: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, full)`` pre-activations ``(S * R, G)`` of ``G`` genes at every row.

        ``memory_profiles``: ``(S, N)`` log1p CP10k of the memory genes, one row per spot
        (a spot's ``R = rows_per_spot`` sub-spots are consecutive rows of ``head_features``).
        ``coexpression``: their graph on the slide (default: computed from these profiles).
        ``own``: ``(G,)`` memory row of each gene that is a memory gene, else -1 (inference):
        such a gene's spot value is its memory profile, not the calibrated attention fitted
        for genes the slide does not hold.
        """
        if coexpression is None:
            coexpression = self.coexpression(memory_profiles)
        base = self.base(head_features, embeddings)
        full = self.context(embeddings, memory_profiles, exclude, coexpression)
        if own is not None and bool((own >= 0).any()):
            held = (own >= 0).nonzero().ravel()
            full = full.index_copy(1, held, memory_profiles[:, own[held]].to(full.dtype))
        if rows_per_spot > 1:
            # the detail is the decoder's, fitted by the decoder's own loss only
            by_spot = base.detach().view(-1, rows_per_spot, base.shape[1])
            detail = (by_spot - by_spot.mean(dim=1, keepdim=True)).reshape(base.shape)
            full = full.repeat_interleave(rows_per_spot, dim=0) + detail
        return base, full


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
        ``"spatial"``, ``"image"`` or ``"fused"`` (:data:`stinfer.modalities.MODALITIES`; the
        older ``"location"`` and ``"both"`` are accepted).
    embedding_dim
        Size of the gene embeddings (512 for CoxFormer embeddings).
    image_in_dim
        Size of the per-spot image features (``image`` and ``fused``).
    d_model, n_heads, feedforward_dim, dropout
        Section 3: 512, 8, 1024, 0.1.
    attention_dropout
        Dropout on the spot attention's probabilities (default ``dropout``; see
        :class:`SpotContext`).
    n_spot_layers
        Transformer layers of :class:`SpotContext` (the paper does not give the number).
    n_frequencies, location_dim, image_dim
        Fourier frequencies ``F`` (32) and the widths of the modality projections (512).
    head_width, head_depth, negative_slope, elu_alpha, output_offset
        Head of Section 3: 4 x (Linear 256 + LeakyReLU 0.1), ELU(alpha 0.01) + 0.01.
    gene_conditioning
        ``"attention"`` (:class:`GeneAttentionReadout`, default), ``"bilinear"``
        (:class:`BilinearGeneReadout` alone) or ``"additive"`` (:class:`AdditiveGeneReadout`,
        the public code's single-token conditioning).
    rank, gene_hidden_dim, gene_hidden_layers
        Pattern factors ``K``, width and depth of the gene MLP after ``W_g`` (bilinear readout).
    initial_level
        Starting level of every gene (the mean training target).
    n_memory
        Memory genes of the attention readout (the training genes; set their embeddings with
        ``module.readout.set_memory``).
    temperature
        Starting softmax temperature of the attention readout (cosine scores).
    coexpression_neighbours
        Neighbours per memory gene in the slide's co-expression graph the attention moves
        along (:func:`coexpression_graph`; 0: no propagation).
    attention_top_k
        0: softmax attention over the memory genes (``temperature``); ``k > 0``: top-k
        attention (:meth:`GeneAttentionReadout.embedding_attention`).
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
        gene_conditioning: Literal["attention", "bilinear", "additive"] = "attention",
        rank: int = 32,
        gene_hidden_dim: int = 512,
        initial_level: float = 0.0,
        gene_hidden_layers: int = 2,
        n_memory: int = 0,
        temperature: float = 0.1,
        coexpression_neighbours: int = 10,
        attention_top_k: int = 0,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.encoder = SpotEncoder(
            modality, d_model, n_frequencies, location_dim, image_in_dim, image_dim
        )
        self.context = SpotContext(
            d_model, n_heads, feedforward_dim, dropout, n_spot_layers, attention_dropout
        )
        head = SpotHead(d_model, head_width, head_depth, negative_slope)
        gene_readout = (
            embedding_dim,
            d_model,
            rank,
            gene_hidden_dim,
            dropout,
            initial_level,
            gene_hidden_layers,
        )
        if gene_conditioning == "attention":
            if n_memory < 2:
                raise ValueError("gene_conditioning 'attention' needs n_memory >= 2 genes")
            self.head = head
            embedding, width, *rest = gene_readout
            self.readout = GeneAttentionReadout(
                head_width,
                embedding,
                n_memory,
                width,
                *rest,
                temperature=temperature,
                coexpression_neighbours=coexpression_neighbours,
                top_k=attention_top_k,
            )
        elif gene_conditioning == "bilinear":
            self.head = head
            self.readout = BilinearGeneReadout(head_width, *gene_readout)
        elif gene_conditioning == "additive":
            self.head = None
            self.readout = AdditiveGeneReadout(head, embedding_dim, d_model, dropout, initial_level)
        else:
            raise ValueError(
                "gene_conditioning must be 'attention', 'bilinear' or 'additive', got "
                f"{gene_conditioning!r}"
            )
        self.gene_conditioning = gene_conditioning
        self.elu_alpha = elu_alpha
        self.output_offset = output_offset

    @property
    def uses_memory(self) -> bool:
        """Whether the readout attends over the memory genes' residuals."""
        return self.gene_conditioning == "attention"

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
        memory_profiles: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted log1p-CP10k expression ``(S, G)`` (positive, see :func:`positive_output`).

        Parameters
        ----------
        coords
            ``(S, 2)`` scaled spot coordinates (``spatial``/``fused``), else ``None``.
        image_features
            ``(S, image_in_dim)`` spot image features (``image``/``fused``), else ``None``.
        gene_embeddings
            ``(G, embedding_dim)`` standardised gene embeddings.
        group_size
            Largest group of spots attending to each other (:class:`SpotContext`).
        memory_profiles
            ``(S, N)`` measured log1p CP10k of the memory genes at these spots (attention
            readout); ``None``: predicted by the base readout (:meth:`memory_estimate`).
        exclude
            ``(G,)`` memory row of each gene to mask (attention readout, training), or -1.
        """
        tokens = self.spot_tokens(coords, image_features, group_size, generator)
        return self.readout_pair(tokens, gene_embeddings, memory_profiles, exclude)[1]

    @torch.no_grad()
    def memory_estimate(
        self, tokens: torch.Tensor, rows_per_spot: int = 1, chunk_genes: int = 1024
    ) -> torch.Tensor:
        """``(S, N)`` base-readout log1p CP10k of the memory genes, where they are not measured.

        ``tokens`` are ``(S * rows_per_spot, d_model)`` (a spot's sub-spots are consecutive
        rows; their predictions are aggregated to the spot, :func:`aggregate_sub_spots`),
        ``chunk_genes`` memory genes at a time.
        """
        factors = self.readout.base.spot_factors(self.head(tokens))
        parameters = self.readout.memory_parameters()
        parts = []
        for start in range(0, parameters.level.shape[0], chunk_genes):
            chunk = GeneParameters(*(p[start : start + chunk_genes] for p in parameters))
            pred = positive_output(combine(factors, chunk), self.elu_alpha, self.output_offset)
            parts.append(aggregate_sub_spots(pred.float(), rows_per_spot))
        return torch.cat(parts, dim=1)

    def memory_readout(
        self,
        gene_embeddings: torch.Tensor,
        memory_profiles: torch.Tensor,
        exclude: torch.Tensor | None = None,
        coexpression: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(S, G)`` attention-readout prediction from measured memory profiles alone.

        ``full`` of :meth:`readout_pair` at spot level when the memory is measured: it reads
        the memory genes' profiles and the gene-level parameters only, never the spot
        tokens, so it costs ``O(G x N x S)`` without the spot encoder, attention and head.
        ``memory_profiles``: ``(S, N)``; ``exclude``, ``coexpression``: see
        :meth:`GeneAttentionReadout.forward`.
        """
        if not self.uses_memory:
            raise ValueError("memory_readout needs gene_conditioning 'attention'")
        if coexpression is None:
            coexpression = self.readout.coexpression(memory_profiles)
        full = self.readout.context(gene_embeddings, memory_profiles, exclude, coexpression)
        return positive_output(full, self.elu_alpha, self.output_offset)

    def readout_pair(
        self,
        tokens: torch.Tensor,
        gene_embeddings: torch.Tensor,
        memory_profiles: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        rows_per_spot: int = 1,
        coexpression: torch.Tensor | None = None,
        own: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, full)`` predictions ``(S, G)`` from spot tokens and gene embeddings.

        ``full`` is the model's prediction; ``base`` is the readout without the memory (equal to ``full`` for the ``bilinear``
        and ``additive`` readouts). ``memory_profiles``: see :meth:`forward`;
        ``coexpression``, ``own``: see :meth:`GeneAttentionReadout.forward`.
        """
        if self.head is None:
            base = full = self.readout(tokens, gene_embeddings)
        elif self.uses_memory:
            if memory_profiles is None:
                memory_profiles = self.memory_estimate(tokens, rows_per_spot)
            base, full = self.readout(
                self.head(tokens),
                gene_embeddings,
                memory_profiles,
                exclude,
                rows_per_spot,
                coexpression,
                own,
            )
        else:
            base = full = self.readout(self.head(tokens), gene_embeddings)
        base_out = positive_output(base, self.elu_alpha, self.output_offset)
        if full is base:
            return base_out, base_out
        return base_out, positive_output(full, self.elu_alpha, self.output_offset)


def aggregate_sub_spots(sub_spot_log1p: torch.Tensor, n_sub: int) -> torch.Tensor:
    """``(S * R, G)`` log1p-CP10k of sub-spots -> ``(S, G)`` spot log1p of their mean CP10k.

    CP10k adds up over a spot's area, so a spot's value is the mean of its ``R`` sub-spots'
    CP10k (sub-spots of a spot are consecutive rows).
    """
    if n_sub == 1:
        return sub_spot_log1p
    cp10k = torch.expm1(sub_spot_log1p).view(-1, n_sub, sub_spot_log1p.shape[1]).mean(dim=1)
    return torch.log1p(cp10k)


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

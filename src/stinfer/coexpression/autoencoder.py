"""Transformer autoencoder over co-expression vectors: the gene embeddings (CoxFormer Suppl. S2).

Each gene's row of the completed co-expression matrix ``(C_cox)_{i,:}`` (length ``n_genes``;
32,016 in the paper) is compressed to a 512-d latent ``e_i``, the gene embedding, by an
autoencoder trained with the mean squared reconstruction error.

Tokenisation (the paper does not give it; stinfer's choice): the vector is zero-padded to
``n_tokens * token_length`` with ``token_length = ceil(n_genes / n_tokens)`` and cut into
``n_tokens`` consecutive chunks; each chunk is embedded by one linear layer to ``d_model`` and
gets a learned position embedding (attention alone is blind to order).

Architecture (Suppl. S2): 2 ``TransformerEncoderLayer`` and 2 ``TransformerDecoderLayer``, 8
heads, feed-forward 2048, ReLU. Between them the bottleneck (stinfer's wiring): the encoded
tokens are flattened and mapped linearly to the 512-d latent; the decoder's memory is the
latent mapped back to ``n_tokens`` tokens, and its queries are learned position tokens, so
everything the decoder knows about the gene passes through the latent. A linear layer maps
each decoded token back to its chunk; padding is cropped before the loss.

Training (Suppl. S2): Adam lr 1e-4, cosine annealing (T_max 50, eta_min 1e-6), batch 32, 200
epochs, through :func:`stinfer.train.fit`. Sparse rows are densified per batch only; dense rows
may be a memory map on disk, read a batch at a time.

Geometry term (stinfer's option, ``geometry_weight``; 0 in the paper preset): the squared
difference between the cosine similarities of a batch's latents and a target
(:func:`geometry_loss`), added to the reconstruction error: by default the genes'
co-expression itself, read off the batch's rows (``geometry_target="coexpression"``), or the
cosine of the input rows (``"rows"``). Reconstruction alone fixes no geometry of the latent;
with the term, cosine similarity between embeddings means co-expression.

Partner batches (stinfer's option, ``partner_fraction``; 0 in the paper preset): in shuffled
batches two co-expressed genes almost never meet (a gene's top-K partners are ``K`` of
``n_genes``), so the geometry term sees near-zero targets only and learns to spread genes
apart, never to bring partners together. :class:`PartnerBatchSampler` fills that fraction of
each batch with a top-K partner of another gene of the batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn
from torch.utils.data import DataLoader

from stinfer.errors import InputError
from stinfer.train import TrainerConfig, fit, with_cosine_schedule

logger = logging.getLogger("stinfer")

__all__ = [
    "AutoencoderConfig",
    "AutoencoderResult",
    "AutoencoderTask",
    "CoexpressionAutoencoder",
    "PartnerBatchSampler",
    "RowDensifier",
    "encode_rows",
    "train_autoencoder",
]


GEOMETRY_TARGETS = ("coexpression", "rows", "low_rank")
"""``coexpression``: the batch's co-expression read off its input rows; ``rows``: the cosine of
the input rows; ``low_rank``: the rank-``geometry_rank`` approximation of the input matrix (its
co-expression with the sampling noise of the corpus's small singular directions removed)."""


@dataclass
class AutoencoderConfig:
    """Hyperparameters of the co-expression autoencoder (CoxFormer Suppl. S2 unless marked)."""

    latent_dim: int = 512  # Suppl. S2: embedding dimension
    n_tokens: int = 64  # stinfer: tokens per co-expression vector (not in the paper)
    d_model: int = 512  # stinfer: token width (not in the paper; equal to the latent)
    n_heads: int = 8  # Suppl. S2
    feedforward_dim: int = 2048  # Suppl. S2
    n_encoder_layers: int = 2  # Suppl. S2
    n_decoder_layers: int = 2  # Suppl. S2
    dropout: float = 0.1  # torch.nn.TransformerEncoderLayer default (Suppl. S2 cites it)
    lr: float = 1e-4  # Suppl. S2: Adam
    t_max: int = 50  # Suppl. S2: cosine annealing T_max (epochs)
    eta_min: float = 1e-6  # Suppl. S2
    batch_size: int = 32  # Suppl. S2
    max_epochs: int = 200  # Suppl. S2
    geometry_weight: float = 0.0  # stinfer: weight of geometry_loss (0 = the paper's loss)
    geometry_target: str = "coexpression"  # stinfer: "coexpression", "rows" or "low_rank"
    geometry_rank: int = 64  # stinfer: rank of the "low_rank" target (the SVD baseline's 64)
    partner_fraction: float = 0.0  # stinfer: batch share of graph partners (PartnerBatchSampler)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise InputError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})."
            )
        if self.geometry_target not in GEOMETRY_TARGETS:
            raise InputError(
                f"geometry_target must be one of {GEOMETRY_TARGETS}, got {self.geometry_target!r}."
            )
        if self.geometry_weight < 0:
            raise InputError(f"geometry_weight must be >= 0, got {self.geometry_weight}.")
        if not 0.0 <= self.partner_fraction < 1.0:
            raise InputError(f"partner_fraction must be in [0, 1), got {self.partner_fraction}.")
        if min(self.latent_dim, self.n_tokens, self.d_model, self.batch_size) < 1:
            raise InputError("latent_dim, n_tokens, d_model and batch_size must be positive.")


class CoexpressionAutoencoder(nn.Module):
    """Tokenised Transformer autoencoder: ``(B, n_genes)`` -> ``(B, latent)`` -> ``(B, n_genes)``.

    Parameters
    ----------
    n_genes
        Length of each co-expression vector.
    config
        Architecture fields of :class:`AutoencoderConfig`.
    """

    def __init__(self, n_genes: int, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        config = config or AutoencoderConfig()
        self.n_genes = int(n_genes)
        self.n_tokens = min(config.n_tokens, self.n_genes)
        self.token_length = math.ceil(self.n_genes / self.n_tokens)
        d_model = config.d_model

        def encoder_layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                d_model,
                config.n_heads,
                config.feedforward_dim,
                config.dropout,
                "relu",
                batch_first=True,
            )

        def decoder_layer() -> nn.TransformerDecoderLayer:
            return nn.TransformerDecoderLayer(
                d_model,
                config.n_heads,
                config.feedforward_dim,
                config.dropout,
                "relu",
                batch_first=True,
            )

        self.token_embedding = nn.Linear(self.token_length, d_model)
        self.encoder_positions = nn.Parameter(torch.randn(1, self.n_tokens, d_model) * 0.02)
        self.encoder = nn.TransformerEncoder(
            encoder_layer(), config.n_encoder_layers, enable_nested_tensor=False
        )
        self.to_latent = nn.Linear(self.n_tokens * d_model, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, self.n_tokens * d_model)
        self.decoder_queries = nn.Parameter(torch.randn(1, self.n_tokens, d_model) * 0.02)
        self.decoder = nn.TransformerDecoder(decoder_layer(), config.n_decoder_layers)
        self.token_output = nn.Linear(d_model, self.token_length)

    def tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(B, n_genes)`` -> ``(B, n_tokens, token_length)``, zero-padded at the end."""
        padding = self.n_tokens * self.token_length - self.n_genes
        return nn.functional.pad(vectors, (0, padding)).view(-1, self.n_tokens, self.token_length)

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(B, n_genes)`` co-expression rows -> ``(B, latent_dim)`` gene embeddings."""
        hidden = self.token_embedding(self.tokens(vectors)) + self.encoder_positions
        hidden = self.encoder(hidden)
        return self.to_latent(hidden.flatten(1))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, latent_dim)`` -> ``(B, n_genes)`` reconstructed rows."""
        memory = self.from_latent(latent).view(latent.shape[0], self.n_tokens, -1)
        queries = self.decoder_queries.expand(latent.shape[0], -1, -1)
        decoded = self.token_output(self.decoder(queries, memory))
        return decoded.flatten(1)[:, : self.n_genes]

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(reconstruction, latent)``."""
        latent = self.encode(vectors)
        return self.decode(latent), latent


class RowDensifier:
    """``collate_fn``: row indices -> ``(B, n_genes)`` float32 dense rows (and, with
    ``with_index``, the ``(B,)`` row indices as a second tensor).

    ``matrix`` is a sparse matrix (densified per batch) or a dense array, possibly a
    :class:`numpy.memmap` on disk (rows read per batch, so the whole matrix is never in memory).
    """

    def __init__(self, matrix: sp.spmatrix | np.ndarray, with_index: bool = False) -> None:
        self.with_index = with_index
        if sp.issparse(matrix):
            self.matrix = sp.csr_matrix(matrix, dtype=np.float32)
        else:
            self.matrix = matrix

    def __call__(self, rows: list[int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(rows)
        if sp.issparse(self.matrix):
            block = self.matrix[rows].toarray()
        else:
            order = np.argsort(rows)  # sorted reads from a memmap, then back in batch order
            block = np.empty((rows.size, self.matrix.shape[1]), dtype=np.float32)
            block[order] = self.matrix[rows[order]]
        if self.with_index:
            return torch.from_numpy(block), torch.from_numpy(rows.astype(np.int64))
        return torch.from_numpy(block)


class PartnerBatchSampler(torch.utils.data.Sampler):
    """Batches of gene indices in which a share of the genes are co-expression partners.

    Each epoch walks a fresh permutation of the genes as *anchors*, ``batch_size - n_partners``
    per batch (``n_partners = round(partner_fraction * batch_size)``); the first
    ``n_partners`` anchors of a batch each bring one partner drawn uniformly from their row of
    ``partners`` (a gene without partners brings a uniformly random gene). A gene drawn twice
    in one batch appears once. Every gene is an anchor once per epoch, so an epoch has
    ``ceil(n_genes / (batch_size - n_partners))`` batches.

    Parameters
    ----------
    partners
        ``(n_genes, n_genes)`` sparse adjacency: the stored entries of row ``i`` are gene
        ``i``'s partners (e.g. the top-K correlation graph); values are ignored.
    batch_size, partner_fraction
        As in :class:`AutoencoderConfig`.
    seed
        Seeds the whole sequence of epochs.
    """

    def __init__(
        self, partners: sp.spmatrix, batch_size: int, partner_fraction: float, seed: int = 0
    ) -> None:
        self.partners = sp.csr_matrix(partners)
        if self.partners.shape[0] != self.partners.shape[1]:
            raise InputError(f"partners must be square, got shape {self.partners.shape}.")
        self.n_genes = self.partners.shape[0]
        self.n_partners = min(batch_size - 1, round(partner_fraction * batch_size))
        self.n_anchors = batch_size - self.n_partners
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return math.ceil(self.n_genes / self.n_anchors)

    def __iter__(self):
        anchors = self.rng.permutation(self.n_genes)
        counts = np.diff(self.partners.indptr)
        offset = np.floor(self.rng.random(self.n_genes) * counts[anchors]).astype(np.int64)
        has_partners = counts[anchors] > 0
        drawn = self.rng.integers(0, self.n_genes, anchors.size)  # for genes without partners
        drawn[has_partners] = self.partners.indices[
            self.partners.indptr[anchors[has_partners]] + offset[has_partners]
        ]
        for start in range(0, self.n_genes, self.n_anchors):
            batch_anchors = anchors[start : start + self.n_anchors]
            batch_partners = drawn[start : start + min(self.n_partners, batch_anchors.size)]
            yield pd.unique(np.concatenate([batch_anchors, batch_partners])).tolist()


def geometry_loss(
    latent: torch.Tensor,
    rows: torch.Tensor,
    index: torch.Tensor | None = None,
    pairwise: bool = False,
) -> torch.Tensor:
    """Mean squared difference between the cosine similarities of the latents and a target
    similarity, over the batch's distinct gene pairs.

    Reconstruction alone says nothing about the latent's geometry: a latent that reconstructs
    well may put every gene on one shared direction (cosine ~1 for every pair). With
    ``index`` (the batch's genes, so that ``rows[a, index[b]]`` is the co-expression of genes
    ``a`` and ``b``), the target is that co-expression itself: the cosine of two embeddings
    approximates their genes' co-expression, as the dot product of SVD gene vectors
    approximates their correlation. Without it, the target is the cosine of the input rows;
    with ``pairwise``, ``rows`` is the ``(batch, batch)`` target itself.
    """

    def cosines(vectors: torch.Tensor) -> torch.Tensor:
        unit = nn.functional.normalize(vectors.float(), dim=1)
        return unit @ unit.T

    if pairwise:
        target = rows.float()
    else:
        target = cosines(rows) if index is None else rows[:, index].float()
    off_diagonal = ~torch.eye(latent.shape[0], dtype=torch.bool, device=latent.device)
    difference = (cosines(latent) - target)[off_diagonal]
    return (difference**2).mean() if difference.numel() else latent.sum() * 0.0


class AutoencoderTask(L.LightningModule):
    """Lightning wrapper: MSE reconstruction, Adam + cosine annealing (Suppl. S2).

    ``low_rank`` (``geometry_target="low_rank"``): ``(left, right)`` factors ``(n_genes, r)``
    of the input matrix's rank-``r`` approximation; the target of genes ``a, b`` is
    ``left[a] @ right[b]``.
    """

    def __init__(
        self,
        module: CoexpressionAutoencoder,
        config: AutoencoderConfig,
        low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.config = config
        self.low_rank = low_rank

    def _geometry(self, latent: torch.Tensor, batch: torch.Tensor, index: torch.Tensor):
        target = self.config.geometry_target
        if target == "low_rank":
            left, right = self.low_rank
            genes = index.cpu()
            block = (left[genes] @ right[genes].T).to(latent.device)
            return geometry_loss(latent, block, pairwise=True)
        return geometry_loss(latent, batch, index if target == "coexpression" else None)

    def training_step(self, batch: torch.Tensor, batch_index: int) -> torch.Tensor:
        batch, index = batch
        reconstruction, latent = self.module(batch)
        loss = nn.functional.mse_loss(reconstruction.float(), batch.float())
        self.log(
            "train/mse",
            loss,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch.shape[0],
        )
        if self.config.geometry_weight > 0:
            geometry = self._geometry(latent, batch, index)
            self.log(
                "train/geometry",
                geometry,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=len(batch),
            )
            loss = loss + self.config.geometry_weight * geometry
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.config.lr)
        return with_cosine_schedule(optimizer, self.config.t_max, self.config.eta_min)


@dataclass
class AutoencoderResult:
    """What :func:`train_autoencoder` returns.

    Attributes
    ----------
    embeddings
        ``(n_genes, latent_dim)`` float32 gene embeddings (eval mode, no dropout).
    final_mse, final_mse_nonzero
        Reconstruction MSE over all entries after training (eval mode), and over the
        non-zero entries only.
    history
        Per-epoch ``train/mse`` from :func:`stinfer.train.fit`.
    seconds
        Training plus encoding wall time.
    """

    embeddings: np.ndarray
    final_mse: float
    final_mse_nonzero: float
    history: list = field(default_factory=list)
    seconds: float = 0.0


def encode_rows(
    module: CoexpressionAutoencoder, matrix: sp.spmatrix | np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, dict[str, float]]:
    """Embed every row of ``matrix`` in eval mode.

    Returns
    -------
    embeddings : numpy.ndarray
        ``(n_rows, latent_dim)`` float32.
    errors : dict
        ``mse`` over all entries (the training loss) and ``mse_nonzero`` over the stored
        entries only (most entries of a top-K row are zero, so ``mse`` alone flatters).
    """
    densify = RowDensifier(matrix)
    device = next(module.parameters()).device
    module.eval()
    parts, squared_error, squared_error_nonzero, n_nonzero = [], 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, matrix.shape[0], batch_size):
            batch = densify(list(range(start, min(start + batch_size, matrix.shape[0])))).to(device)
            reconstruction, latent = module(batch)
            error = (reconstruction.float() - batch) ** 2
            squared_error += float(error.sum())
            squared_error_nonzero += float(error[batch != 0].sum())
            n_nonzero += int((batch != 0).sum())
            parts.append(latent.float().cpu().numpy())
    embeddings = np.concatenate(parts) if parts else np.zeros((0, module.to_latent.out_features))
    n_entries = max(1, matrix.shape[0] * matrix.shape[1])
    errors = {
        "mse": squared_error / n_entries,
        "mse_nonzero": squared_error_nonzero / max(1, n_nonzero),
    }
    return embeddings.astype(np.float32), errors


def low_rank_factors(
    matrix: sp.spmatrix | np.ndarray, rank: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U S, V)`` of the rank-``rank`` truncated SVD of ``matrix`` (randomised, seeded;
    scikit-learn's ``randomized_svd``): ``(U S)[a] @ V[b]`` approximates ``matrix[a, b]``."""
    from sklearn.utils.extmath import randomized_svd

    dense = matrix if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float32)
    rank = min(int(rank), min(dense.shape) - 1)
    u, s, vt = randomized_svd(dense, rank, random_state=seed)
    return torch.from_numpy((u * s).astype(np.float32)), torch.from_numpy(vt.T.astype(np.float32))


def train_autoencoder(
    coexpression: sp.spmatrix | np.ndarray,
    config: AutoencoderConfig | None = None,
    trainer: TrainerConfig | None = None,
    partners: sp.spmatrix | None = None,
) -> tuple[AutoencoderResult, CoexpressionAutoencoder]:
    """Train the autoencoder on the rows of ``coexpression`` and embed every gene.

    Parameters
    ----------
    coexpression
        ``(n_genes, n_genes)`` completed co-expression ``C_cox``: sparse (rows densified per
        batch), dense, or a :class:`numpy.memmap` (rows read per batch).
    config
        :class:`AutoencoderConfig` (paper defaults).
    trainer
        Devices, precision, progress bar; ``max_epochs`` and ``seed`` come from ``config``.
        Every gene is embedded, so there is no validation split; the final reconstruction MSE
        is reported instead.
    partners
        Sparse ``(n_genes, n_genes)`` adjacency for :class:`PartnerBatchSampler` (used when
        ``config.partner_fraction > 0``); default: the stored entries of a sparse
        ``coexpression`` (its top-K partners).
    """
    config = config or AutoencoderConfig()
    if sp.issparse(coexpression):
        matrix = sp.csr_matrix(coexpression, dtype=np.float32)
    elif isinstance(coexpression, np.memmap):
        matrix = coexpression
    else:
        matrix = np.asarray(coexpression, dtype=np.float32)
    if matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise InputError(f"the co-expression matrix is empty ({matrix.shape}).")
    torch.manual_seed(config.seed)
    module = CoexpressionAutoencoder(matrix.shape[1], config)
    collate = RowDensifier(matrix, with_index=True)
    if config.partner_fraction > 0:
        if partners is None and not sp.issparse(matrix):
            raise InputError(
                "partner_fraction > 0 with dense co-expression rows needs the partners "
                "adjacency (e.g. the top-K graph)."
            )
        partners = matrix if partners is None else partners
        if partners.shape != (matrix.shape[0], matrix.shape[0]):
            raise InputError(
                f"partners has shape {partners.shape}; expected {(matrix.shape[0],) * 2}."
            )
        sampler = PartnerBatchSampler(
            partners, config.batch_size, config.partner_fraction, config.seed
        )
        loader = DataLoader(np.arange(matrix.shape[0]), batch_sampler=sampler, collate_fn=collate)
    else:
        loader = DataLoader(
            np.arange(matrix.shape[0]),
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate,
        )
    trainer = replace(
        trainer or TrainerConfig(), max_epochs=config.max_epochs, monitor=None, seed=config.seed
    )
    start = time.perf_counter()
    low_rank = None
    if config.geometry_weight > 0 and config.geometry_target == "low_rank":
        low_rank = low_rank_factors(matrix, config.geometry_rank, config.seed)
    fitted = fit(AutoencoderTask(module, config, low_rank), loader, None, trainer)
    embeddings, errors = encode_rows(module, matrix)
    seconds = time.perf_counter() - start
    logger.info(
        "autoencoder: %d genes -> %d-d embeddings, reconstruction MSE %.4g (non-zero entries "
        "%.4g) in %.1f s",
        matrix.shape[0],
        embeddings.shape[1],
        errors["mse"],
        errors["mse_nonzero"],
        seconds,
    )
    result = AutoencoderResult(
        embeddings, errors["mse"], errors["mse_nonzero"], fitted.history, seconds
    )
    return result, module

"""Co-expression completion on the correlation graph with GraphSAGE (CoxFormer Suppl. S1).

The correlation graph (:mod:`stinfer.coexpression.graph`) fixes *which* gene pairs matter; a
label corpus measures the co-expression of some of them. The completion model learns to
predict the co-expression of a graph edge ``(i, j)`` from the two genes' neighbourhoods, so
pairs the label corpus cannot measure (a gene it lacks, or one constant in it) still get a
value. What it needs and what it returns:

- **Node features** ``x`` (``genes x F``): stinfer uses the truncated SVD of each gene's
  standardised expression profile in the graph corpus
  (:func:`~stinfer.coexpression.graph.gene_svd_features`; the paper does not say which
  features it used). ``x_i . x_j`` approximates the graph correlation, so the features carry
  each gene's whole profile, not only its K partners.
- **Targets**: the label corpus's correlation of each graph edge, NaN where it does not
  measure both genes (:func:`~stinfer.coexpression.graph.edge_correlations`). Labelled edges
  are split 8:1:1 (seeded) into train/validation/test.
- **Model** (:class:`GraphSAGECompletion`): 3 ``SAGEConv`` layers (mean aggregation, ReLU
  between layers) give node embeddings ``h``; the edge head is one linear layer on
  ``[h_i, h_j, h_i * h_j, C_cor(i, j)]``: both endpoint embeddings plus the correlation, and
  their element-wise product so a single linear layer can express endpoint similarity. The
  head starts as "co-expression = graph correlation" (weight 1 on ``C_cor``, bias 0) and learns
  the correction; from a random start it needs several times more steps to reach the same
  test R2 (measured on the synthetic modules of the tests).
- **Training** (Suppl. S1): mini-batches of 512 target edges; the seeds are the edges'
  endpoints and a 2-hop subgraph is sampled around them with fanouts [15, 10]
  (:mod:`~stinfer.coexpression.sampling`); MSE loss; Adam, lr 1e-3, cosine annealing
  (T_max 200, eta_min 1e-6), 200 epochs; through the one training path
  (:func:`stinfer.train.fit`), keeping the weights of the best validation MSE
  (``validation_edges``: on a fixed random subset of the validation edges).
- **Full-graph message passing** (``message_passing="full"``, stinfer's option): every step
  runs the GNN over the whole graph, each node aggregating all its K partners, and reads the
  batch's edges off the node embeddings. A top-K graph has ``genes x K`` edges (650,000 for
  13,000 genes), so the whole graph fits in memory and one pass costs a few sparse-dense
  products (:class:`MeanAdjacency`): on such graphs a 2-hop sample around 1,000 seeds already
  reaches most nodes, so the sampled subgraph costs about as much as the full graph plus the
  sampling. Each step then costs the same whatever its number of edges, which is why the
  full mode pairs with larger batches (see the ``fast`` preset of
  :class:`stinfer.models.gene_embeddings.GeneEmbeddingConfig`). With every neighbour sampled
  for ``n_layers`` hops the sampled mode computes exactly the full-graph embeddings of the
  seeds (tested).
- **Inference**: full-graph message passing (every node aggregates all its K partners; the
  mean aggregator makes that the expectation of the sampled aggregation), deterministic.
- **Output** (:class:`CompletionResult`): the completed co-expression matrix ``C_cox``
  (``genes x genes``, sparse): the measured value where the label corpus measures the pair,
  the prediction on the other graph edges, zero elsewhere; test MSE and R2 beside the R2 of
  two naive predictors (the training mean, and the graph correlation itself).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torch_geometric.nn import SAGEConv

from stinfer.coexpression.graph import CorrelationGraph, StandardisedCorpora, correlation_blocks
from stinfer.coexpression.sampling import NeighborSampler
from stinfer.errors import InputError
from stinfer.train import TrainerConfig, fit, with_cosine_schedule

logger = logging.getLogger("stinfer")

__all__ = [
    "CompletionConfig",
    "CompletionResult",
    "CompletionTask",
    "EdgeBatchCollator",
    "EdgeTargetCollator",
    "GraphSAGECompletion",
    "MeanAdjacency",
    "complete_coexpression",
    "dense_completed_coexpression",
    "regression_scores",
    "split_edges",
]


@dataclass
class CompletionConfig:
    """Hyperparameters of the co-expression completion (CoxFormer Suppl. S1 unless marked)."""

    n_node_features: int = 64  # stinfer: SVD components of the gene profiles (not in the paper)
    hidden_dim: int = 128  # stinfer: width of the SAGE layers (not in the paper)
    n_layers: int = 3  # Suppl. S1: L = 3 (deeper over-smooths)
    fanouts: tuple[int, ...] = (15, 10)  # Suppl. S1: 2-hop sampling, [m1, m2] = [15, 10]
    batch_size: int = 512  # Suppl. S1: target edges per mini-batch
    lr: float = 1e-3  # Suppl. S1: Adam
    t_max: int = 200  # Suppl. S1: cosine annealing T_max (epochs)
    eta_min: float = 1e-6  # Suppl. S1
    max_epochs: int = 200  # Suppl. S1
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # issue 5: labelled edges 8:1:1
    message_passing: Literal["sampled", "full"] = "sampled"  # Suppl. S1: sampled subgraphs
    edges_per_epoch: int | None = None  # stinfer: None = every training edge once per epoch
    validation_edges: int | None = None  # stinfer: None = all; else a fixed random subset
    dropout: float = 0.0  # stinfer
    sampler_backend: str = "auto"  # "auto": PyG's sampler if installed, else the fallback
    seed: int = 0

    def __post_init__(self) -> None:
        self.fanouts = tuple(int(f) for f in self.fanouts)
        self.split = tuple(float(f) for f in self.split)
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1) > 1e-6:
            raise InputError(
                f"split must be three non-negative fractions summing to 1, got {self.split}."
            )
        if self.n_layers < 1 or self.hidden_dim < 1 or self.batch_size < 1:
            raise InputError("n_layers, hidden_dim and batch_size must be positive.")
        if self.message_passing not in ("sampled", "full"):
            raise InputError(
                f"message_passing must be 'sampled' or 'full', got {self.message_passing!r}."
            )
        if self.validation_edges is not None and self.validation_edges < 1:
            raise InputError(
                f"validation_edges must be positive or None, got {self.validation_edges}."
            )


# --------------------------------------------------------------------------- module
class _SparseProduct(torch.autograd.Function):
    """``matrix @ x`` with a precomputed transpose for the backward pass (CSR both ways)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, matrix: torch.Tensor, transpose: torch.Tensor):
        ctx.transpose = transpose
        return torch.sparse.mm(matrix, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.sparse.mm(ctx.transpose, grad), None, None


class MeanAdjacency:
    """Mean aggregation over a whole graph as one sparse-dense product.

    ``A`` is the ``(n_nodes, n_nodes)`` row-normalised adjacency, ``A[t, s] = 1 / in_degree(t)``
    for every edge ``s -> t`` (duplicate edges count once), so ``A @ x`` is each node's mean
    over its in-neighbours: PyG's ``SAGEConv(aggr="mean")`` aggregation (0 for a node without
    in-edges). ``A`` and ``A^T`` are kept as CSR, the backward pass is ``A^T @ grad``: much
    faster on a CPU than PyG's gather-scatter over an edge list, and than
    ``torch.sparse.mm(..., reduce="mean")``'s backward (``docs/results.md``).

    Parameters
    ----------
    edge_index
        ``(2, E)`` ``[source, target]`` (messages source -> target).
    num_nodes
        Number of nodes.
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int) -> None:
        pairs = torch.unique(edge_index.long().flip(0), dim=1)  # (target, source), sorted
        degree = torch.bincount(pairs[0], minlength=num_nodes).clamp_min(1)
        values = 1.0 / degree[pairs[0]].float()
        size = (num_nodes, num_nodes)
        matrix = torch.sparse_coo_tensor(pairs, values, size, check_invariants=False).coalesce()
        self.matrix = matrix.to_sparse_csr()
        self.transpose = matrix.t().coalesce().to_sparse_csr()
        self.num_nodes = int(num_nodes)

    def to(self, device: torch.device | str) -> MeanAdjacency:
        """This adjacency on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if self.matrix.device == device:
            return self
        moved = object.__new__(MeanAdjacency)
        moved.matrix, moved.transpose = self.matrix.to(device), self.transpose.to(device)
        moved.num_nodes = self.num_nodes
        return moved

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(n_nodes, F)`` -> ``(n_nodes, F)`` in-neighbour means."""
        return _SparseProduct.apply(x, self.matrix.to(x.dtype), self.transpose.to(x.dtype))


class GraphSAGECompletion(nn.Module):
    """GraphSAGE node encoder + one-layer edge regression head (Suppl. S1).

    Parameters
    ----------
    in_features
        Node feature width ``F``.
    hidden_dim
        Width of every SAGE layer.
    n_layers
        Number of ``SAGEConv`` layers (3 in the paper).
    dropout
        Dropout between layers.
    """

    def __init__(
        self, in_features: int, hidden_dim: int = 128, n_layers: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        widths = [in_features] + [hidden_dim] * n_layers
        self.convs = nn.ModuleList(
            SAGEConv(width_in, width_out, aggr="mean")
            for width_in, width_out in itertools.pairwise(widths)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(3 * hidden_dim + 1, 1)
        with torch.no_grad():  # start from "co-expression = graph correlation", then correct it
            self.head.weight[0, -1] = 1.0
            self.head.bias.zero_()

    def node_embeddings(
        self, x: torch.Tensor, edge_index: torch.Tensor | MeanAdjacency
    ) -> torch.Tensor:
        """``(n_nodes, F)`` features -> ``(n_nodes, hidden)`` node embeddings.

        ``edge_index``: a ``(2, E)`` ``[source, target]`` edge list (a sampled subgraph; PyG's
        message passing) or a :class:`MeanAdjacency` of the whole graph; both compute
        ``SAGEConv``'s ``lin_l(mean of in-neighbours) + lin_r(x)`` with the same weights.
        """
        h = x
        for index, conv in enumerate(self.convs):
            if isinstance(edge_index, MeanAdjacency):
                h = conv.lin_l(edge_index(h)) + conv.lin_r(h)
            else:
                h = conv(h, edge_index)
            if index < len(self.convs) - 1:
                h = self.dropout(torch.relu(h))
        return h

    def predict_edges(
        self, h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, correlation: torch.Tensor
    ) -> torch.Tensor:
        """Co-expression of the edges ``(src[b], dst[b])``: ``(B,)`` from ``h`` and ``(B,)``
        correlations."""
        h_src, h_dst = h[src], h[dst]
        edge = torch.cat([h_src, h_dst, h_src * h_dst, correlation[:, None].to(h.dtype)], dim=1)
        return self.head(edge).squeeze(1)

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor | MeanAdjacency,
        src: torch.Tensor,
        dst: torch.Tensor,
        correlation: torch.Tensor,
    ) -> torch.Tensor:
        return self.predict_edges(self.node_embeddings(x, edge_index), src, dst, correlation)


# --------------------------------------------------------------------------- data
class EdgeBatchCollator:
    """Turn a list of target-edge ids into a sampled subgraph batch (a ``collate_fn``).

    Seeds are the unique endpoints of the batch's edges; the returned dict holds the
    subgraph's node features ``x``, its ``edge_index`` (local), the local endpoints
    ``src``/``dst`` of the target edges, their graph ``correlation`` and ``target``.
    """

    def __init__(
        self,
        sampler: NeighborSampler,
        features: torch.Tensor,
        gene: torch.Tensor,
        partner: torch.Tensor,
        correlation: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        self.sampler = sampler
        self.features = features
        self.gene, self.partner = gene, partner
        self.correlation, self.target = correlation, target

    def __call__(self, edge_ids: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(np.asarray(edge_ids), dtype=torch.int64)
        endpoints = torch.cat([self.gene[ids], self.partner[ids]])
        seeds, local = torch.unique(endpoints, return_inverse=True)
        subgraph = self.sampler.sample(seeds)
        return {
            "x": self.features[subgraph.node],
            "edge_index": subgraph.edge_index,
            "src": local[: ids.numel()],
            "dst": local[ids.numel() :],
            "correlation": self.correlation[ids],
            "target": self.target[ids],
        }


class EdgeTargetCollator:
    """``collate_fn`` of full-graph training: target-edge ids -> their global endpoints
    ``src``/``dst``, graph ``correlation`` and ``target`` (the graph itself stays on the task)."""

    def __init__(
        self,
        gene: torch.Tensor,
        partner: torch.Tensor,
        correlation: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        self.gene, self.partner = gene, partner
        self.correlation, self.target = correlation, target

    def __call__(self, edge_ids: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(np.asarray(edge_ids), dtype=torch.int64)
        return {
            "src": self.gene[ids],
            "dst": self.partner[ids],
            "correlation": self.correlation[ids],
            "target": self.target[ids],
        }


def split_edges(
    n_edges: int, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random train/validation/test split of ``range(n_edges)`` by ``fractions``."""
    order = np.random.default_rng(seed).permutation(n_edges)
    n_train = round(fractions[0] * n_edges)
    n_val = round(fractions[1] * n_edges)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def regression_scores(prediction: np.ndarray, truth: np.ndarray, train_mean: float) -> dict:
    """MSE, R2 (1 - SSE / SST around the truth's mean) and the MSE of predicting ``train_mean``."""
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if truth.size == 0:
        return {"mse": float("nan"), "r2": float("nan"), "mean_baseline_mse": float("nan")}
    sse = float(np.sum((prediction - truth) ** 2))
    sst = float(np.sum((truth - truth.mean()) ** 2))
    return {
        "mse": sse / truth.size,
        "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
        "mean_baseline_mse": float(np.mean((truth - train_mean) ** 2)),
    }


# --------------------------------------------------------------------------- training
class CompletionTask(L.LightningModule):
    """Lightning wrapper: MSE on target-edge batches, Adam + cosine annealing.

    A batch with ``x``/``edge_index`` is a sampled subgraph (:class:`EdgeBatchCollator`);
    without them (:class:`EdgeTargetCollator`) the node embeddings come from full-graph
    message passing over ``features`` and ``adjacency``, given at construction.
    """

    def __init__(
        self,
        module: GraphSAGECompletion,
        config: CompletionConfig,
        features: torch.Tensor | None = None,
        adjacency: MeanAdjacency | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.config = config
        self.register_buffer("features", features, persistent=False)
        self.adjacency = adjacency

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "x" in batch:
            x, edge_index = batch["x"], batch["edge_index"]
        else:
            x, edge_index = self.features, self.adjacency.to(self.device)
        prediction = self.module(x, edge_index, batch["src"], batch["dst"], batch["correlation"])
        return nn.functional.mse_loss(prediction.float(), batch["target"].float())

    def training_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log(
            "train/mse",
            loss,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch["target"].numel(),
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> None:
        loss = self._loss(batch)
        self.log(
            "val/mse",
            loss,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch["target"].numel(),
        )

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.config.lr)
        return with_cosine_schedule(optimizer, self.config.t_max, self.config.eta_min)


@dataclass
class CompletionResult:
    """What :func:`complete_coexpression` returns.

    Attributes
    ----------
    matrix
        ``(n_genes, n_genes)`` CSR ``C_cox``: measured co-expression where known, predictions on
        the other graph edges, zero elsewhere.
    prediction
        ``(n_edges,)`` float32 model prediction for every graph edge (graph edge order).
    measured
        ``(n_edges,)`` bool: the label corpus measures the edge.
    scores
        Test ``mse``, ``r2``, ``mean_baseline_mse`` and ``correlation_copy_r2`` (R2 of
        predicting the graph correlation itself), the split sizes, epochs and seconds.
    history
        Per-epoch metrics from :func:`stinfer.train.fit`.
    """

    matrix: sp.csr_matrix
    prediction: np.ndarray
    measured: np.ndarray
    scores: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def _full_graph_predictions(
    module: GraphSAGECompletion,
    features: torch.Tensor,
    adjacency: MeanAdjacency,
    gene: torch.Tensor,
    partner: torch.Tensor,
    correlation: torch.Tensor,
    chunk: int = 65536,
) -> np.ndarray:
    device = next(module.parameters()).device
    module.eval()
    with torch.no_grad():
        h = module.node_embeddings(features.to(device), adjacency.to(device))
        parts = [
            module.predict_edges(
                h,
                gene[start : start + chunk].to(device),
                partner[start : start + chunk].to(device),
                correlation[start : start + chunk].to(device),
            )
            .float()
            .cpu()
            for start in range(0, gene.numel(), chunk)
        ]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)


def complete_coexpression(
    graph: CorrelationGraph,
    node_features: np.ndarray,
    targets: np.ndarray,
    config: CompletionConfig | None = None,
    trainer: TrainerConfig | None = None,
) -> tuple[CompletionResult, GraphSAGECompletion]:
    """Train the completion model on the labelled graph edges and complete ``C_cox``.

    Parameters
    ----------
    graph
        The top-K correlation graph (its edges are the pairs to predict).
    node_features
        ``(n_genes, F)`` float node features (see the module docstring).
    targets
        ``(n_edges,)`` measured co-expression per graph edge, NaN where unmeasured.
    config
        :class:`CompletionConfig` (paper defaults).
    trainer
        Devices, precision, progress bar; ``max_epochs``, ``monitor`` and ``seed`` are taken
        from ``config``.

    Returns
    -------
    (CompletionResult, GraphSAGECompletion)
        The completed matrix with test scores, and the trained module (best validation epoch).

    Raises
    ------
    InputError
        Shapes disagree, or fewer than 10 edges are labelled.
    """
    config = config or CompletionConfig()
    features = np.asarray(node_features, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.float32)
    if features.shape[0] != graph.n_genes:
        raise InputError(f"{features.shape[0]} node feature rows for {graph.n_genes} genes.")
    if targets.shape != (graph.n_edges,):
        raise InputError(f"{targets.shape} targets for {graph.n_edges} graph edges.")
    measured = np.isfinite(targets)
    labelled = np.flatnonzero(measured)
    if labelled.size < 10:
        raise InputError(
            f"only {labelled.size} graph edges have a measured co-expression in the label "
            "corpus; the completion needs a label corpus that shares genes with the graph."
        )
    train_ids, val_ids, test_ids = (
        labelled[part] for part in split_edges(labelled.size, config.split, config.seed)
    )
    x = torch.from_numpy(features)
    gene = torch.from_numpy(graph.gene)
    partner = torch.from_numpy(graph.partner)
    correlation = torch.from_numpy(graph.correlation)
    target = torch.from_numpy(np.nan_to_num(targets))
    edge_index = graph.message_edge_index()
    adjacency = MeanAdjacency(edge_index, graph.n_genes)
    full = config.message_passing == "full"
    if full:
        backend = "full graph"
        collate = EdgeTargetCollator(gene, partner, correlation, target)
    else:
        sampler = NeighborSampler(edge_index, graph.n_genes, config.fanouts, config.sampler_backend)
        backend = sampler.backend
        collate = EdgeBatchCollator(sampler, x, gene, partner, correlation, target)
    n_samples = config.edges_per_epoch
    train_loader = DataLoader(
        train_ids,
        batch_size=config.batch_size,
        sampler=RandomSampler(train_ids, num_samples=min(n_samples, train_ids.size))
        if n_samples
        else RandomSampler(train_ids),
        collate_fn=collate,
    )
    monitored = val_ids
    if config.validation_edges is not None and config.validation_edges < val_ids.size:
        draw = np.random.default_rng([config.seed, 5])
        monitored = np.sort(draw.choice(val_ids, config.validation_edges, replace=False))
    # full graph: one pass gives every node embedding, so validate in as few batches as fit
    val_batch = max(config.batch_size, 65536) if full else config.batch_size
    val_loader = (
        DataLoader(monitored, batch_size=val_batch, collate_fn=collate) if monitored.size else None
    )
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
    module = GraphSAGECompletion(
        features.shape[1], config.hidden_dim, config.n_layers, config.dropout
    )
    task = CompletionTask(module, config, x if full else None, adjacency if full else None)
    trainer = replace(
        trainer or TrainerConfig(),
        max_epochs=config.max_epochs,
        monitor="val/mse" if val_loader is not None else None,
        monitor_mode="min",
        seed=config.seed,
    )
    logger.info(
        "completion: %d labelled edges (%d train, %d val (%d monitored), %d test), %d "
        "unmeasured, %s message passing",
        labelled.size,
        train_ids.size,
        val_ids.size,
        monitored.size,
        test_ids.size,
        graph.n_edges - labelled.size,
        backend,
    )
    start = time.perf_counter()
    fitted = fit(task, train_loader, val_loader, trainer)
    prediction = _full_graph_predictions(module, x, adjacency, gene, partner, correlation)
    seconds = time.perf_counter() - start

    train_mean = float(targets[train_ids].mean())
    scores = regression_scores(prediction[test_ids], targets[test_ids], train_mean)
    copy = regression_scores(graph.correlation[test_ids], targets[test_ids], train_mean)
    scores.update(
        correlation_copy_r2=copy["r2"],
        correlation_copy_mse=copy["mse"],
        n_train=int(train_ids.size),
        n_val=int(val_ids.size),
        n_test=int(test_ids.size),
        n_unmeasured=int(graph.n_edges - labelled.size),
        epochs=len(fitted.history),
        best_epoch=fitted.best_epoch,
        best_val_mse=fitted.best_score,
        seconds=seconds,
        sampler=backend,
    )
    logger.info(
        "completion: test MSE %.4g, R2 %.3f (graph-correlation copy R2 %.3f) in %.1f s",
        scores["mse"],
        scores["r2"],
        scores["correlation_copy_r2"],
        seconds,
    )
    values = np.where(measured, targets, prediction).astype(np.float32)
    matrix = sp.csr_matrix(
        (values, (graph.gene, graph.partner)), shape=(graph.n_genes, graph.n_genes)
    )
    result = CompletionResult(
        matrix=matrix,
        prediction=prediction,
        measured=measured,
        scores=scores,
        history=fitted.history,
    )
    return result, module


def dense_completed_coexpression(
    corpora: StandardisedCorpora,
    graph: CorrelationGraph,
    completion: CompletionResult,
    path: str,
    block_size: int = 1024,
    device: str = "cpu",
) -> np.memmap:
    """``C_cox`` completed for *every* gene pair, as a float16 memory map on disk.

    The top-K ``C_cox`` row of a gene holds ``K`` values among ``n_genes`` zeros, and on real
    sections most of those values are small (a partner chosen on one half of the cells is, by
    regression to the mean, weakly correlated on the other half), so a top-K row says little
    beyond which partners were chosen. The dense form holds, for every pair that ``corpora``
    measure, their combined correlation; on the graph edges they cannot measure, the
    completion's prediction; 0 on the diagonal and on pairs nobody measures.

    Filled block by block (:func:`~stinfer.coexpression.graph.correlation_blocks`): memory
    stays at two ``cells x block`` matrices beside the map, which takes ``2 n_genes^2`` bytes
    on disk at ``path`` (340 MB for 13,000 genes) and is read a batch of rows at a time.

    Parameters
    ----------
    corpora
        Standardised corpora in the graph's gene order (genes they lack are absent).
    graph, completion
        The correlation graph and its completion (:func:`complete_coexpression`).
    """
    n_genes = graph.n_genes
    if corpora.n_genes != n_genes:
        raise InputError(f"the corpora hold {corpora.n_genes} genes, the graph {n_genes}.")
    rows_out = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float16, shape=(n_genes, n_genes)
    )
    for rows, cols, r in correlation_blocks(corpora, block_size, device):
        block = torch.nan_to_num(r, nan=0.0).cpu().numpy().astype(np.float16)
        rows_out[rows, cols] = block
        if rows != cols:
            rows_out[cols, rows] = block.T
    np.fill_diagonal(rows_out, 0.0)
    present = corpora.present
    unmeasured = ~(present[:, graph.gene] & present[:, graph.partner]).any(axis=0)
    rows_out[graph.gene[unmeasured], graph.partner[unmeasured]] = completion.prediction[
        unmeasured
    ].astype(np.float16)
    rows_out.flush()
    return rows_out

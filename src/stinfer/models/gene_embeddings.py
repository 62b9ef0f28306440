"""CoxFormer gene embeddings over AnnData corpora (CoxFormer Suppl. Sections 1-2).

:class:`CoxFormerEmbeddings` chains the three stages of :mod:`stinfer.coexpression`:

1. the top-K **correlation graph** of the graph corpora
   (:func:`~stinfer.coexpression.graph.build_correlation_graph`);
2. **co-expression completion** with GraphSAGE: targets are the correlations the *label
   corpora* measure on the graph's edges; the model predicts the edges they cannot measure
   (:func:`~stinfer.coexpression.completion.complete_coexpression`);
3. the **Transformer autoencoder** over the rows of the completed matrix ``C_cox``; its 512-d
   bottleneck is each gene's embedding
   (:func:`~stinfer.coexpression.autoencoder.train_autoencoder`). ``autoencoder_input``:
   ``"top_k"`` (the paper) feeds the top-K rows of ``C_cox``; ``"dense"`` (the ``fast``
   preset) feeds ``C_cox`` completed for every pair, the combined correlation over every
   cell of the corpora (graph and label parts) where measured, held on disk as a memory map
   (:func:`~stinfer.coexpression.completion.dense_completed_coexpression`).

:class:`SVDGeneEmbeddings` is the baseline: the truncated SVD of the same standardised corpus.

Label corpora. The paper takes co-expression targets from a corpus other than the graph's.
Pass ``label_corpora`` to choose it. Without it, each graph corpus is split at random (seeded)
into two disjoint halves of its cells (``label_fraction`` = 0.5): the graph is built from one
half and the targets come from the other, so the completion learns something other than
copying its input correlation. ``label_fraction=0`` uses the graph corpora themselves as label
corpora (the completion then only fills pairs they cannot measure).

Presets (named configs, :data:`PRESETS`): ``paper`` holds the paper's hyperparameters;
``fast`` is for a CPU and differs only in (each also stated in :func:`fast_preset`):

- completion: 32 SVD node features (paper preset 64), hidden width 64 (128); full-graph
  message passing (sampled 2-hop subgraphs) with batches of 2,048 target edges (512) and lr
  2e-3 (1e-3); 40 epochs (200) with the cosine period shortened to 40 (200), 65,536 random
  training edges per epoch (all) and a fixed subset of 16,384 validation edges for model
  selection (all);
- autoencoder: 16 tokens (64), ``d_model`` 64 (512), feed-forward 128 (2048): about 40x fewer
  multiply-adds per step; batches of 64 genes (32) with lr 1e-3 (1e-4) for 4 epochs (200)
  with the cosine period shortened to 4 (50);
- autoencoder input and loss: dense ``C_cox`` rows (top-K rows) and a geometry term that
  asks the cosine of two embeddings to approximate their genes' co-expression (none).

K, the fanouts, the batch sizes, learning rates, the 3 GraphSAGE layers, the 2 + 2 Transformer
layers with 8 heads and the 512-d embedding are the same in both.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from stinfer.coexpression.autoencoder import (
    AutoencoderConfig,
    AutoencoderResult,
    CoexpressionAutoencoder,
    train_autoencoder,
)
from stinfer.coexpression.completion import (
    CompletionConfig,
    CompletionResult,
    complete_coexpression,
    dense_completed_coexpression,
)
from stinfer.coexpression.graph import (
    Corpus,
    CorrelationGraph,
    CorrelationGraphConfig,
    as_corpora,
    build_correlation_graph,
    edge_correlations,
    gene_svd_features,
    standardise_corpora,
)
from stinfer.errors import InputError
from stinfer.io.gene_embeddings import (
    embeddings_to_anndata,
    read_gene_embeddings,
    write_gene_embeddings,
)
from stinfer.models.configs import move_fields, override_config, resolve_preset
from stinfer.train import TrainerConfig

logger = logging.getLogger("stinfer")

__all__ = [
    "PRESETS",
    "CoxFormerEmbeddings",
    "GeneEmbeddingConfig",
    "SVDGeneEmbeddings",
    "fast_preset",
    "gene_embedding_config",
    "paper_preset",
    "split_corpus_cells",
    "upgrade_gene_embedding_config_dict",
]

CorporaLike = Sequence[ad.AnnData | Corpus] | Mapping[str, ad.AnnData | Corpus] | ad.AnnData


@dataclass
class GeneEmbeddingConfig:
    """Everything :class:`CoxFormerEmbeddings` needs; defaults are the ``paper`` preset.

    A two-stage model has one section per stage, each with its own ``lr``, ``batch_size``,
    ``max_epochs`` and ``seed`` (``completion``: Suppl. S1; ``autoencoder``: Suppl. S2), the
    ``graph`` both read, and one ``trainer`` with the run settings both stages share (devices,
    precision, progress bar); each stage's ``max_epochs`` and ``seed`` replace the trainer's
    for its fit, and ``trainer.seed`` draws the label cells and the SVD node features.
    """

    graph: CorrelationGraphConfig = field(default_factory=CorrelationGraphConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    label_fraction: float = 0.5  # stinfer: cells per corpus held out for targets (no label corpus)
    autoencoder_input: str = "top_k"  # Suppl. S2: top-K rows of C_cox; "dense": every pair
    preset: str = "paper"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_fraction < 1.0:
            raise InputError(f"label_fraction must be in [0, 1), got {self.label_fraction}.")
        if self.autoencoder_input not in ("top_k", "dense"):
            raise InputError(
                f"autoencoder_input must be 'top_k' or 'dense', got {self.autoencoder_input!r}."
            )


def paper_preset() -> GeneEmbeddingConfig:
    """The paper's hyperparameters (CoxFormer Suppl. S1-S2)."""
    return GeneEmbeddingConfig(preset="paper")


def fast_preset() -> GeneEmbeddingConfig:
    """A CPU-friendly preset; differences from ``paper`` (everything else is the paper's):

    - completion: ``n_node_features`` 32 (64), ``hidden_dim`` 64 (128),
      ``message_passing`` ``"full"`` (``"sampled"``), ``batch_size`` 2,048 (512),
      ``lr`` 2e-3 (1e-3), ``max_epochs`` 40 (200), ``t_max`` 40 (200),
      ``edges_per_epoch`` 65,536 (all training edges), ``validation_edges`` 16,384 (all
      validation edges). Why: on a top-K graph of ~10^4 genes a sampled 2-hop subgraph
      around 1,000 seeds already covers most of the graph, so a step costs a full-graph
      pass either way; with full-graph message passing (exact, no sampling) a step costs
      the same for 512 or 2,048 edges, so larger batches with a larger step size reach the
      sampled mode's test R2 in a quarter of the steps;
    - autoencoder: ``n_tokens`` 16 (64), ``d_model`` 64 (512), ``feedforward_dim`` 128
      (2048), ``batch_size`` 64 (32), ``lr`` 1e-3 (1e-4), ``max_epochs`` 10
      (200), ``t_max`` 10 (50). Why: the small autoencoder's cost is its epochs, and with
      the paper's step size it needs tens of epochs to reach the reconstruction error a
      ten times larger step size reaches in a few;
    - autoencoder input and loss: ``autoencoder_input`` ``"dense"`` (``"top_k"``),
      ``geometry_weight`` 1 (0) and ``partner_fraction`` 0.5 (0). Why (measured in
      ``benchmarks/gene_embedding_quality.py``, figures in ``docs/results``): the
      autoencoder barely learns a top-K row, whose
      ``K`` small values sit among ``n_genes`` zeros, and its bottleneck then puts every
      gene on one shared direction (median pairwise cosine ~1: cosine similarity says
      nothing) and loses co-expression a 64-d SVD of the same corpus keeps. Dense rows
      (:func:`~stinfer.coexpression.completion.dense_completed_coexpression`) carry each
      gene's co-expression with every gene, and the geometry term
      (:func:`~stinfer.coexpression.autoencoder.geometry_loss`) asks the cosine of two
      embeddings to approximate their genes' co-expression. In shuffled batches two
      co-expressed genes almost never meet, so the term would only push genes apart;
      partner batches (:class:`~stinfer.coexpression.autoencoder.PartnerBatchSampler`)
      give it the co-expressed pairs to pull together. Measured alternatives that
      did worse: centring or whitening the output, weighting the non-zero entries of
      the top-K rows, normalising the rows, the cosine of the input rows as the
      geometry target, the completed top-K ``C_cox`` as the target (0 off the graph),
      and 4 epochs instead of 10;
    - geometry target: ``geometry_target`` ``"low_rank"`` (the term is off in the paper):
      the rank-64 truncated SVD of the dense rows, i.e. their co-expression without the
      sampling noise of the corpus's small singular directions (a correlation estimated
      from a few thousand spots is noisy; its leading directions are what another corpus
      shares). Why: with the rows themselves as the target the embeddings trailed the
      64-d SVD baseline on a held-out patient's co-expressed pairs; with the low-rank
      target they lead it in both directions of the HER2ST A/D check
      (``docs/results/gene_embeddings/*_low_rank.md``).
    """
    return GeneEmbeddingConfig(
        completion=CompletionConfig(
            n_node_features=32,
            hidden_dim=64,
            message_passing="full",
            batch_size=2048,
            lr=2e-3,
            max_epochs=40,
            t_max=40,
            edges_per_epoch=65536,
            validation_edges=16384,
        ),
        autoencoder=AutoencoderConfig(
            n_tokens=16,
            d_model=64,
            feedforward_dim=128,
            batch_size=64,
            lr=1e-3,
            max_epochs=10,
            t_max=10,
            geometry_weight=1.0,
            geometry_target="low_rank",
            partner_fraction=0.5,
        ),
        autoencoder_input="dense",
        preset="fast",
    )


PRESETS = {"paper": paper_preset, "fast": fast_preset}


# Fields of older configs -> their place now (stinfer.models.configs.move_fields): the stages'
# `learning_rate`, and the run settings that were flat beside the stages.
GENE_EMBEDDING_MOVED_FIELDS = {
    "completion.learning_rate": "completion.lr",
    "autoencoder.learning_rate": "autoencoder.lr",
    **{
        name: f"trainer.{name}"
        for name in ("seed", "accelerator", "devices", "precision", "progress_bar")
    },
}


def upgrade_gene_embedding_config_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a saved ``config`` or overrides) with the fields of older layouts in their
    place now (:data:`GENE_EMBEDDING_MOVED_FIELDS`): the stages' ``learning_rate`` is ``lr``,
    as in every stinfer config, and the flat ``seed``, ``accelerator``, ``devices``,
    ``precision`` and ``progress_bar`` are the ``trainer``'s; a value under the new name wins
    over the old one (:func:`~stinfer.models.configs.move_fields`)."""
    return move_fields(values, GENE_EMBEDDING_MOVED_FIELDS)


def gene_embedding_config(
    preset: str = "paper", top_k: int | None = None, **overrides: object
) -> GeneEmbeddingConfig:
    """The named preset (``paper`` or ``fast``) with ``top_k`` and ``overrides``, nested as the
    config is (``trainer={"seed": 1}``; older names are moved,
    :func:`upgrade_gene_embedding_config_dict`)."""
    config = resolve_preset(PRESETS, preset, GeneEmbeddingConfig, "gene embedding")
    if overrides:
        overrides = upgrade_gene_embedding_config_dict(overrides)
        config = override_config(config, overrides, "coxformer_embeddings")
    if top_k is not None:
        config = replace(config, graph=replace(config.graph, top_k=int(top_k)))
    return config


def split_corpus_cells(
    corpora: Sequence[Corpus], label_fraction: float, seed: int
) -> tuple[list[Corpus], list[Corpus]]:
    """Split every corpus's cells at random into (graph part, label part), seeded."""
    rng = np.random.default_rng(seed)
    graph_parts, label_parts = [], []
    for corpus in corpora:
        order = rng.permutation(corpus.n_cells)
        n_label = round(label_fraction * corpus.n_cells)
        if n_label < 2 or corpus.n_cells - n_label < 2:
            raise InputError(
                f"corpus {corpus.name}: {corpus.n_cells} cells cannot be split into graph and "
                "label halves; give separate label corpora (--label-corpus, label_corpora=), "
                "--label-fraction 0 (label_fraction=0) or more cells."
            )
        label_rows, graph_rows = np.sort(order[:n_label]), np.sort(order[n_label:])
        graph_parts.append(Corpus(corpus.name, corpus.counts[graph_rows], corpus.gene_names))
        label_parts.append(
            Corpus(f"{corpus.name}:label", corpus.counts[label_rows], corpus.gene_names)
        )
    return graph_parts, label_parts


EMBEDDINGS_FILE = "embeddings.h5ad"  # the embeddings of a saved model, readable on their own
_ARRAYS = ("graph_", "completion_", "completed_")  # saved arrays beside the autoencoder's weights


class CoxFormerEmbeddings:
    """CoxFormer gene embeddings learnt from co-expression in AnnData corpora.

    Parameters
    ----------
    config
        :class:`GeneEmbeddingConfig`; default the ``paper`` preset. See
        :meth:`from_preset` for ``fast``.

    Examples
    --------
    >>> model = CoxFormerEmbeddings.from_preset("fast", top_k=50)
    >>> model.train([slide_a1, slide_a2, slide_d1])
    >>> genes = model.get_embeddings()          # AnnData: obs = genes, X = 512-d vectors
    >>> model.completion.scores["r2"], model.autoencoder_result.final_mse
    """

    model_type = "coxformer_embeddings"  # the registry name, saved in config.json

    def __init__(self, config: GeneEmbeddingConfig | None = None) -> None:
        self.config = config or paper_preset()
        self.graph: CorrelationGraph | None = None
        self.completion: CompletionResult | None = None
        self.autoencoder_result: AutoencoderResult | None = None
        self.autoencoder: CoexpressionAutoencoder | None = None
        self.timings: dict[str, float] = {}
        self.provenance: dict = {}
        self._embeddings: ad.AnnData | None = None

    @classmethod
    def from_preset(
        cls, preset: str = "paper", top_k: int | None = None, **overrides: object
    ) -> CoxFormerEmbeddings:
        """A model with the named preset (``paper`` or ``fast``), see :func:`gene_embedding_config`."""
        return cls(gene_embedding_config(preset, top_k=top_k, **overrides))

    def train(
        self,
        corpora: CorporaLike,
        label_corpora: CorporaLike | None = None,
        layer: str | None = None,
    ) -> CoxFormerEmbeddings:
        """Build the graph, complete the co-expression and train the autoencoder.

        Parameters
        ----------
        corpora
            Graph corpora: AnnData of cells or spots with raw counts (``X`` or
            ``layers[layer]``), a mapping name -> AnnData, or :class:`Corpus` objects. Genes are
            aligned by name (``config.graph.gene_join``).
        label_corpora
            Corpora giving the co-expression targets; default: held-out cells of ``corpora``
            (see the module docstring).
        layer
            Layer holding the raw counts, if not ``X``.

        Returns
        -------
        CoxFormerEmbeddings
            ``self``, trained; :meth:`get_embeddings` returns the embeddings.
        """
        config = self.config
        trainer = config.trainer
        start = time.perf_counter()
        graph_corpora = as_corpora(corpora, layer)
        every_corpus = list(graph_corpora)  # every cell, for the dense co-expression rows
        if label_corpora is not None:
            label_parts = as_corpora(label_corpora, layer)
            every_corpus += label_parts
            label_source = "label corpora"
        elif config.label_fraction > 0:
            graph_corpora, label_parts = split_corpus_cells(
                graph_corpora, config.label_fraction, config.trainer.seed
            )
            label_source = f"held-out cells ({config.label_fraction:g} of each corpus)"
        else:
            label_parts = graph_corpora
            label_source = "the graph corpora themselves"

        standardised = standardise_corpora(graph_corpora, config.graph)
        self.graph = build_correlation_graph(graph_corpora, config.graph, standardised=standardised)
        self.timings["graph_seconds"] = self.graph.info["build_seconds"]

        tick = time.perf_counter()
        features = gene_svd_features(
            standardised, config.completion.n_node_features, seed=config.trainer.seed
        )
        del standardised
        label_standardised = standardise_corpora(
            label_parts, replace(config.graph, gene_join="outer"), genes=self.graph.gene_names
        )
        targets = edge_correlations(
            label_standardised,
            self.graph.gene,
            self.graph.partner,
            config.graph.block_size,
            config.graph.device,
        )
        del label_standardised
        self.timings["features_and_targets_seconds"] = time.perf_counter() - tick

        self.completion, _ = complete_coexpression(
            self.graph, features, targets, config.completion, trainer
        )
        self.timings["completion_seconds"] = self.completion.scores["seconds"]
        with tempfile.TemporaryDirectory(prefix="stinfer-coexpression-") as scratch:
            if config.autoencoder_input == "dense":
                tick = time.perf_counter()
                rows = dense_completed_coexpression(
                    standardise_corpora(
                        every_corpus,
                        replace(config.graph, gene_join="outer"),
                        genes=self.graph.gene_names,
                    ),
                    self.graph,
                    self.completion,
                    os.path.join(scratch, "dense_coexpression.npy"),
                    config.graph.block_size,
                    config.graph.device,
                )
                self.timings["dense_rows_seconds"] = time.perf_counter() - tick
            else:
                rows = self.completion.matrix
            self.autoencoder_result, self.autoencoder = train_autoencoder(
                rows, config.autoencoder, trainer, partners=self.graph.to_sparse()
            )
            del rows
        self.timings["autoencoder_seconds"] = self.autoencoder_result.seconds
        self.timings["total_seconds"] = time.perf_counter() - start
        self.provenance = {
            "method": "CoxFormer gene embeddings (Suppl. S1-S2)",
            "preset": config.preset,
            "top_k": self.graph.top_k,
            "corpora": [c.name for c in graph_corpora],
            "corpus_cells": [c.n_cells for c in graph_corpora],
            "label_corpora": [c.name for c in label_parts],
            "label_corpus_cells": [c.n_cells for c in label_parts],
            "label_source": label_source,
            "autoencoder_input": config.autoencoder_input,
            "n_genes": self.graph.n_genes,
            "n_edges": self.graph.n_edges,
            "completion": dict(self.completion.scores),
            "autoencoder": {
                "final_mse": self.autoencoder_result.final_mse,
                "final_mse_nonzero": self.autoencoder_result.final_mse_nonzero,
                "loss_history": [
                    row.get("train/mse", float("nan")) for row in self.autoencoder_result.history
                ],
            },
            "timings": dict(self.timings),
            "config": json.dumps(asdict(config)),
        }
        self._embeddings = self._embedding_anndata()
        return self

    def _embedding_anndata(self) -> ad.AnnData:
        adata = embeddings_to_anndata(
            self.autoencoder_result.embeddings,
            self.graph.gene_names,
            source="CoxFormerEmbeddings",
            format="coxformer",
            provenance=self.provenance,
        )
        n_edges = np.bincount(self.graph.gene, minlength=self.graph.n_genes)
        measured = np.bincount(
            self.graph.gene,
            weights=self.completion.measured.astype(np.float64),
            minlength=self.graph.n_genes,
        )
        adata.obs["n_partners"] = n_edges.astype(np.int64)
        adata.obs["measured_fraction"] = np.divide(
            measured, n_edges, out=np.zeros(self.graph.n_genes), where=n_edges > 0
        )
        return adata

    def _check_trained(self) -> None:
        if self._embeddings is None:
            raise InputError(
                "the model is not trained yet; call train(corpora) or load(path) first."
            )

    def get_embeddings(self) -> ad.AnnData:
        """Gene embeddings: AnnData with obs = genes (``n_partners``, ``measured_fraction``),
        X = ``(n_genes, 512)`` float32, provenance in ``uns["gene_embeddings"]``."""
        self._check_trained()
        return self._embeddings.copy()

    def completed_coexpression(self) -> sp.csr_matrix:
        """The completed co-expression matrix ``C_cox`` (``genes x genes`` CSR, graph order)."""
        self._check_trained()
        return self.completion.matrix

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save into the folder ``path`` in the one saved-model format
        (:mod:`stinfer.models.persistence`): ``config.json`` (config, timings, gene names),
        ``weights.safetensors`` (the autoencoder's weights, the graph's edges, the completion
        and the completed matrix as CSR arrays) and ``embeddings.h5ad`` (the embeddings with
        their per-gene columns and provenance). The folder is written whole or not at all; an
        earlier saved model there is replaced only with ``overwrite``, any other non-empty
        folder is refused (:func:`stinfer.models.persistence.model_folder`)."""
        from stinfer.models.persistence import model_folder
        from stinfer.train import is_global_zero

        self._check_trained()
        if not is_global_zero():  # a DDP run's other ranks hold the same model: rank 0 writes
            return Path(path)
        with model_folder(path, overwrite) as tmp:
            self._write_files(tmp)
        return Path(path)

    def _write_files(self, folder: Path) -> None:
        from stinfer.models.persistence import write_model_files

        write_gene_embeddings(self._embeddings, folder / EMBEDDINGS_FILE)
        matrix = self.completion.matrix.tocsr()
        arrays = {
            "graph_gene": self.graph.gene,
            "graph_partner": self.graph.partner,
            "graph_correlation": self.graph.correlation,
            "completion_measured": self.completion.measured,
            "completion_prediction": self.completion.prediction,
            "completed_data": matrix.data,
            "completed_indices": matrix.indices,
            "completed_indptr": matrix.indptr,
        }
        state = {
            "timings": self.timings,
            "gene_names": [str(g) for g in self.graph.gene_names],
            "top_k": int(self.graph.top_k),
            "completed_shape": [int(n) for n in matrix.shape],
        }
        write_model_files(
            folder, self.model_type, asdict(self.config), state, self.autoencoder, arrays
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CoxFormerEmbeddings:
        """Load a model saved by :meth:`save` (safetensors, JSON and h5ad: nothing is
        unpickled). Folders saved before the format had ``model_type`` (``autoencoder.pt``,
        ``graph.npz``, ``completed.npz``) load too, their weights with ``weights_only=True``;
        a folder of another model type is an :class:`InputError`."""
        from stinfer.models.persistence import LEGACY_LAYOUTS, read_saved_model

        saved = read_saved_model(path, cls.model_type, LEGACY_LAYOUTS["coxformer_embeddings"])
        folder = saved.directory
        raw = upgrade_gene_embedding_config_dict(
            saved.config["config"] if saved.format_version == 0 else saved.config
        )
        config = GeneEmbeddingConfig(
            graph=CorrelationGraphConfig(**raw.pop("graph")),
            completion=CompletionConfig(**raw.pop("completion")),
            autoencoder=AutoencoderConfig(**raw.pop("autoencoder")),
            trainer=TrainerConfig(**raw.pop("trainer", {})),
            **raw,
        )
        model = cls(config)
        if saved.format_version == 0:
            model.timings = saved.config.get("timings", {})
            with np.load(folder / "graph.npz") as arrays:
                gene_names = arrays["gene_names"].astype(str)
                top_k = int(arrays["top_k"])
                arrays = {name: arrays[name] for name in arrays.files}
            matrix = sp.load_npz(folder / "completed.npz").tocsr()
            state = torch.load(folder / "autoencoder.pt", map_location="cpu", weights_only=True)
        else:
            model.timings = saved.state.get("timings", {})
            gene_names, top_k = saved.state["gene_names"], int(saved.state["top_k"])
            state = saved.tensors()
            prefixed = {n: state.pop(n).numpy() for n in list(state) if n.startswith(_ARRAYS)}
            arrays = {
                "gene": prefixed["graph_gene"],
                "partner": prefixed["graph_partner"],
                "correlation": prefixed["graph_correlation"],
                "measured": prefixed["completion_measured"],
                "prediction": prefixed["completion_prediction"],
            }
            matrix = sp.csr_matrix(
                (
                    prefixed["completed_data"],
                    prefixed["completed_indices"],
                    prefixed["completed_indptr"],
                ),
                shape=tuple(saved.state["completed_shape"]),
            )
        model.graph = CorrelationGraph(
            gene_names=pd.Index(np.asarray(gene_names, dtype=str)),
            gene=arrays["gene"],
            partner=arrays["partner"],
            correlation=arrays["correlation"],
            top_k=top_k,
        )
        model.completion = CompletionResult(
            matrix=matrix, prediction=arrays["prediction"], measured=arrays["measured"]
        )
        model.autoencoder = CoexpressionAutoencoder(model.graph.n_genes, config.autoencoder)
        model.autoencoder.load_state_dict(state)
        model._embeddings = read_gene_embeddings(folder / EMBEDDINGS_FILE)
        model.provenance = dict(model._embeddings.uns.get("gene_embeddings", {}))
        return model


class SVDGeneEmbeddings:
    """Baseline gene embeddings: the truncated SVD of the standardised expression corpus.

    Each corpus is normalised to log1p-CP10k and each gene standardised within it, exactly as
    for the correlation graph (:func:`~stinfer.coexpression.graph.standardise_corpora`); the
    stacked ``(cells, genes)`` matrix ``Z`` (never formed densely) is decomposed by randomised
    SVD and gene ``i`` gets ``V_k[i] S_k``, so ``e_i . e_j`` is the rank-``k`` approximation of
    the correlation numerator (:func:`~stinfer.coexpression.graph.gene_svd_features`). This is
    the linear decomposition a learned embedding must beat on the same corpus (pair AUC, gene
    label AUC: :mod:`stinfer.evaluate.gene_level`); ``stinfer embed-genes --method svd``.

    Parameters
    ----------
    n_components
        Embedding width (64 by default).
    graph
        Normalisation settings (``method``, ``gene_join``, ``combine``, ``min_cells``).
    n_iter
        Power iterations of the randomised SVD (Halko et al. 2011); 10 brings the components
        to within about 1e-4 of an exact SVD where the spectrum is not degenerate (the
        completion's node features use 4, where exactness matters less).
    seed
        Seed of the randomised SVD.
    """

    def __init__(
        self,
        n_components: int = 64,
        graph: CorrelationGraphConfig | None = None,
        n_iter: int = 10,
        seed: int = 0,
    ) -> None:
        if n_components < 1:
            raise InputError(f"n_components must be at least 1, got {n_components}.")
        self.n_components = int(n_components)
        self.graph = graph or CorrelationGraphConfig()
        self.n_iter = int(n_iter)
        self.seed = int(seed)
        self._embeddings: ad.AnnData | None = None

    def train(self, corpora: CorporaLike, layer: str | None = None) -> SVDGeneEmbeddings:
        """Standardise ``corpora`` (raw counts, as for :class:`CoxFormerEmbeddings`) and
        decompose them; returns ``self``."""
        start = time.perf_counter()
        parts = as_corpora(corpora, layer)
        standardised = standardise_corpora(parts, self.graph)
        vectors = gene_svd_features(
            standardised, self.n_components, n_iter=self.n_iter, seed=self.seed
        )
        provenance = {
            "method": "truncated SVD of the standardised log1p-CP10k corpus (baseline)",
            "n_components": self.n_components,
            "corpora": [c.name for c in parts],
            "corpus_cells": [c.n_cells for c in parts],
            "n_genes": standardised.n_genes,
            "seconds": time.perf_counter() - start,
            "config": json.dumps(
                {"graph": asdict(self.graph), "n_iter": self.n_iter, "seed": self.seed}
            ),
        }
        self._embeddings = embeddings_to_anndata(
            vectors,
            standardised.gene_names,
            source="SVDGeneEmbeddings",
            format="svd",
            provenance=provenance,
        )
        return self

    def get_embeddings(self) -> ad.AnnData:
        """Gene embeddings: AnnData with obs = genes, X = ``(n_genes, n_components)`` float32."""
        if self._embeddings is None:
            raise InputError("the model is not trained yet; call train(corpora) first.")
        return self._embeddings.copy()

"""Gene co-expression: correlation graph, GNN completion and the Transformer autoencoder.

The three stages of CoxFormer's gene embeddings (Suppl. Sections 1-2), as pure pieces that
take arrays and :class:`~stinfer.coexpression.graph.Corpus`/AnnData corpora; the user-facing
model that chains them is :class:`stinfer.models.gene_embeddings.CoxFormerEmbeddings`.
"""

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

__all__ = [
    "Corpus",
    "CorrelationGraph",
    "CorrelationGraphConfig",
    "as_corpora",
    "build_correlation_graph",
    "edge_correlations",
    "gene_svd_features",
    "standardise_corpora",
]

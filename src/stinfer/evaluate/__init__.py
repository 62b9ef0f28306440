"""Evaluation: the papers' expression metrics, domain recovery and (later) their protocols.

See :mod:`stinfer.evaluate.metrics` for the metric definitions pinned in ``docs/DESIGN.md``.
"""

from stinfer.evaluate.metrics import (
    ExpressionMetrics,
    cluster_ari,
    cluster_domains,
    depth_normalise,
    evaluate_anndata,
    evaluate_expression,
    hest_pcc_top50,
    mse_log1p,
    per_gene_pearson,
    per_gene_spearman,
    top_variable_genes,
)

__all__ = [
    "ExpressionMetrics",
    "cluster_ari",
    "cluster_domains",
    "depth_normalise",
    "evaluate_anndata",
    "evaluate_expression",
    "hest_pcc_top50",
    "mse_log1p",
    "per_gene_pearson",
    "per_gene_spearman",
    "top_variable_genes",
]

"""Evaluation: the papers' protocols, benchmarks, domain recovery and reports.

The metrics themselves live one layer down, in :mod:`stinfer.metrics` (the definitions pinned
in ``docs/DESIGN.md`` "Metrics"), so that models can use them too; they are re-exported here
for users who look for them under ``stinfer.evaluate``.
"""

from stinfer.metrics import (
    DomainClustering,
    ExpressionMetrics,
    cluster_ari,
    cluster_domains,
    depth_normalise,
    domain_ari,
    evaluate_anndata,
    evaluate_expression,
    fit_domains,
    hest_pcc_top50,
    mse_log1p,
    per_gene_partial_pearson,
    per_gene_pearson,
    per_gene_spearman,
    top_variable_genes,
)

__all__ = [
    "DomainClustering",
    "ExpressionMetrics",
    "cluster_ari",
    "cluster_domains",
    "depth_normalise",
    "domain_ari",
    "evaluate_anndata",
    "evaluate_expression",
    "fit_domains",
    "hest_pcc_top50",
    "mse_log1p",
    "per_gene_partial_pearson",
    "per_gene_pearson",
    "per_gene_spearman",
    "top_variable_genes",
]

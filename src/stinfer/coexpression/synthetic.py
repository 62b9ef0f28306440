"""Synthetic expression corpora with known co-expression structure, for tests and benchmarks.

- :func:`planted_module_corpus`: genes in modules driven by shared latent factors, so genes of
  one module are correlated and genes of different modules are not; the ground truth for
  "do the embeddings recover the modules?".
- :func:`sparse_count_corpus`: large sparse count matrices at a chosen density, for timing the
  correlation graph.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["planted_module_corpus", "sparse_count_corpus"]


def planted_module_corpus(
    n_cells: int = 2000,
    n_modules: int = 6,
    genes_per_module: int = 20,
    n_background_genes: int = 0,
    loading_range: tuple[float, float] = (0.6, 1.0),
    seed: int = 0,
    gene_prefix: str = "g",
) -> tuple[ad.AnnData, np.ndarray]:
    """Poisson counts whose log-rates follow one latent factor per module.

    ``log rate[c, g] = base[g] + loading[g] * factor[c, module[g]]`` with standard normal
    factors, ``base ~ U(0, 1)`` and ``loading ~ U(loading_range)``; background genes have no
    factor. Gene ``g`` is named ``f"{gene_prefix}{g}"``, so corpora drawn with different seeds
    share gene names and module structure (``module`` depends only on the sizes).

    Returns
    -------
    (anndata.AnnData, numpy.ndarray)
        Cells x genes raw counts (CSR float32, ``obs`` named ``cell0``...), and ``(n_genes,)``
        module labels (``-1`` for background genes).
    """
    rng = np.random.default_rng(seed)
    n_module_genes = n_modules * genes_per_module
    n_genes = n_module_genes + n_background_genes
    module = np.full(n_genes, -1, dtype=np.int64)
    module[:n_module_genes] = np.repeat(np.arange(n_modules), genes_per_module)
    factors = rng.standard_normal((n_cells, max(n_modules, 1)))
    base = rng.uniform(0.0, 1.0, n_genes)
    loading = np.where(module >= 0, rng.uniform(*loading_range, n_genes), 0.0)
    log_rate = base[None, :] + loading[None, :] * factors[:, np.maximum(module, 0)]
    counts = rng.poisson(np.exp(log_rate)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"{gene_prefix}{g}" for g in range(n_genes)]),
    )
    return adata, module


def sparse_count_corpus(
    n_cells: int, n_genes: int, density: float = 0.05, seed: int = 0, n_programs: int = 20
) -> sp.csr_matrix:
    """A ``(n_cells, n_genes)`` CSR float32 count matrix with about ``density`` non-zeros.

    Non-zero positions are drawn per cell with a gene-specific detection probability (so genes
    differ in sparsity, like real data), values are ``1 + Poisson`` with a rate that depends on
    one of ``n_programs`` cell programs, giving real correlations. Built row-block by
    row-block, without a dense ``cells x genes`` matrix.
    """
    rng = np.random.default_rng(seed)
    detection = np.clip(rng.gamma(2.0, density / 2.0, n_genes), 1e-4, 0.9)
    detection *= density / detection.mean()
    detection = np.clip(detection, 1e-4, 0.95)
    program_of_gene = rng.integers(0, n_programs, n_genes)
    blocks = []
    block_cells = max(1, int(2e7 // max(n_genes, 1)))
    for start in range(0, n_cells, block_cells):
        rows = min(block_cells, n_cells - start)
        activity = rng.gamma(1.0, 1.0, (rows, n_programs)).astype(np.float32)
        mask = rng.random((rows, n_genes), dtype=np.float32) < detection[None, :].astype(np.float32)
        cell, gene = np.nonzero(mask)
        values = 1.0 + rng.poisson(activity[cell, program_of_gene[gene]])
        blocks.append(
            sp.csr_matrix(
                (values.astype(np.float32), (cell, gene)), shape=(rows, n_genes), dtype=np.float32
            )
        )
    return sp.vstack(blocks, format="csr")

"""The gene-gene correlation graph: each gene's top-K most correlated partners.

CoxFormer Suppl. Section 1 builds a global gene graph from a correlation matrix ``C_cor``: for
every gene ``i`` it keeps the ``K`` partners ``j`` with the largest ``(C_cor)_{i,j}`` as directed
edges ``(i, j)`` carrying the correlation. This module computes that graph exactly, at atlas
scale, without ever holding a dense genes x genes matrix:

1. **Normalise** each corpus (cells x genes raw counts) to log1p-CP10k
   (:func:`stinfer.preprocess.normalise_log1p_cp10k`); for Spearman, replace each gene's values
   by their ranks within the corpus (zeros share the lowest rank and are shifted to stay 0, so
   the matrix stays sparse).
2. **Align genes by name** across corpora: ``gene_join="inner"`` keeps genes every corpus
   measures (the default, like the rest of stinfer); ``"outer"`` keeps the union, and a gene
   missing from a corpus is *absent* there: that corpus contributes nothing to its pairs.
   Genes detected in fewer than ``min_cells`` cells over all corpora are dropped.
3. **Standardise** each gene within each corpus (mean and population sd from one pass over
   column blocks), so ``z_i . z_j / n_cells`` is the Pearson correlation in that corpus.
4. **Combine corpora**: ``combine="mean"`` averages the per-corpus correlations over the
   corpora that measure both genes; ``"cells"`` weights each corpus by its number of cells,
   which equals concatenating the cells after per-corpus standardisation. Both come from one
   kernel: corpus ``c`` enters with weight ``w_c`` (1 or ``n_c``), the numerator is
   ``sum_c w_c r_c`` and the denominator ``sum_c w_c [c measures both]``.
5. **Block kernel**: genes are cut into blocks of ``block_size``; for each block pair
   ``I <= J`` (the matrix is symmetric, so half the work) both blocks are densified and
   standardised (``cells x block`` float32, the only dense chunk), one GEMM gives
   ``C[I, J]``, and a running top-K per gene (``genes x K``) absorbs ``C[I, J]`` for the rows
   of ``I`` and ``C[I, J]^T`` for the rows of ``J``. Memory is ``O(genes * K + cells * block)``
   beside the sparse input; time is one dense GEMM of ``cells x genes^2 / 2`` multiply-adds
   (BLAS, all cores; or a GPU with ``device="cuda"``).

Why dense blocks rather than sparse products: at the 5-10 % density of single-cell and ST
matrices, a sparse x dense product does ``density`` times fewer multiply-adds but runs many
times slower per multiply-add than a float32 GEMM on the same cores, more than the density
saves (``python benchmarks/coexpression.py --kernel-check``; figures in ``docs/results.md``),
so densifying one block at a time is the faster exact kernel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from stinfer.errors import InputError
from stinfer.io.slide_data import check_counts, slide_id
from stinfer.preprocess import normalise_log1p_cp10k

logger = logging.getLogger("stinfer")

__all__ = [
    "Corpus",
    "CorrelationGraph",
    "CorrelationGraphConfig",
    "StandardisedCorpora",
    "as_corpora",
    "as_corpus",
    "build_correlation_graph",
    "correlation_blocks",
    "edge_correlations",
    "gene_svd_features",
    "sparse_column_ranks",
    "standardise_corpora",
    "top_k_partners",
]


@dataclass
class CorrelationGraphConfig:
    """How the correlation graph is built (CoxFormer Suppl. S1; stinfer choices marked)."""

    top_k: int = 50  # CoxFormer Suppl. S1: K = 50
    method: Literal["pearson", "spearman"] = "pearson"  # stinfer: Pearson; Spearman optional
    gene_join: Literal["inner", "outer"] = "inner"  # stinfer: genes every corpus measures
    combine: Literal["mean", "cells"] = "mean"  # stinfer: average per-corpus correlations
    rank_by: Literal["signed", "absolute"] = "signed"  # Suppl. S1: "most correlated" partners
    min_cells: int = 10  # stinfer: drop genes detected in fewer cells (noisy correlations)
    target_sum: float = 1e4  # log1p-CP10k, as everywhere in stinfer
    block_size: int = 1024  # genes densified at once; memory ~ 2 x cells x block x 4 bytes
    device: str = "cpu"  # torch device of the block GEMMs ("cuda" on a GPU machine)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise InputError(f"top_k must be at least 1, got {self.top_k}.")
        for name, value, allowed in (
            ("method", self.method, ("pearson", "spearman")),
            ("gene_join", self.gene_join, ("inner", "outer")),
            ("combine", self.combine, ("mean", "cells")),
            ("rank_by", self.rank_by, ("signed", "absolute")),
        ):
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
        if self.block_size < 1:
            raise InputError(f"block_size must be positive, got {self.block_size}.")
        if self.min_cells < 0:
            raise InputError(f"min_cells must be >= 0, got {self.min_cells}.")


# --------------------------------------------------------------------------- corpora
@dataclass(frozen=True)
class Corpus:
    """One expression corpus: raw counts (cells x genes, CSR float32) and gene names."""

    name: str
    counts: sp.csr_matrix
    gene_names: pd.Index

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])


def as_corpus(
    data: ad.AnnData | Corpus, name: str | None = None, layer: str | None = None
) -> Corpus:
    """Return ``data`` as a :class:`Corpus`, checking that it holds raw counts.

    Parameters
    ----------
    data
        An AnnData of cells or spots (raw counts in ``X``, or in ``layers[layer]``) or a Corpus.
    name
        The corpus name used in messages and provenance; default ``uns["stinfer"]["sample_id"]``
        when present, else ``"corpus"``.

    Raises
    ------
    InputError
        Negative, non-finite or non-integer values (normalised data), duplicated gene names, or
        a missing layer.
    """
    if isinstance(data, Corpus):
        return data
    if not isinstance(data, ad.AnnData):
        raise InputError(f"a corpus must be an AnnData (cells x genes), got {type(data).__name__}.")
    if name is None:
        name = slide_id(data, default="corpus")
    if layer is not None and layer not in data.layers:
        raise InputError(f"{name}: no layer {layer!r}; layers are {list(data.layers)}.")
    matrix = data.layers[layer] if layer is not None else data.X
    genes = pd.Index([str(g) for g in data.var_names])
    if not genes.is_unique:
        duplicated = genes[genes.duplicated()].unique()
        raise InputError(
            f"{name}: {len(duplicated)} gene names occur more than once (e.g. {duplicated[0]}); "
            "make them unique (AnnData.var_names_make_unique) before building the graph."
        )
    counts = check_counts(matrix, f"corpus {name}")
    return Corpus(name=name, counts=counts, gene_names=genes)


def as_corpora(
    corpora: Sequence[ad.AnnData | Corpus] | Mapping[str, ad.AnnData | Corpus] | ad.AnnData,
    layer: str | None = None,
) -> list[Corpus]:
    """Return a list of :class:`Corpus`; a mapping names them by its keys.

    Corpus names are made unique (``A1``, ``A1-1``) so provenance stays readable.
    """
    if isinstance(corpora, ad.AnnData | Corpus):
        corpora = [corpora]
    if isinstance(corpora, Mapping):
        items = [as_corpus(data, name=str(key), layer=layer) for key, data in corpora.items()]
    else:
        items = [as_corpus(data, layer=layer) for data in corpora]
    if not items:
        raise InputError("no corpus given; pass at least one AnnData of cells or spots.")
    seen: dict[str, int] = {}
    unique = []
    for corpus in items:
        count = seen.get(corpus.name, 0)
        seen[corpus.name] = count + 1
        if count:
            corpus = Corpus(f"{corpus.name}-{count}", corpus.counts, corpus.gene_names)
        unique.append(corpus)
    return unique


# --------------------------------------------------------------------------- standardisation
def sparse_column_ranks(matrix: sp.csc_matrix, block_size: int = 1024) -> sp.csc_matrix:
    """Per-column average ranks of a non-negative sparse matrix, shifted so zeros stay 0.

    Zeros tie at the lowest rank ``(n_zero + 1) / 2``; every value is shifted by that rank, so
    the zeros stay implicit and the Pearson correlation of the result is the Spearman
    correlation of the input (correlation is shift-invariant). Vectorised over the non-zeros
    of ``block_size`` columns at a time.

    Parameters
    ----------
    matrix
        ``(n_cells, n_genes)`` CSC with non-negative entries and no explicit zeros.

    Returns
    -------
    scipy.sparse.csc_matrix
        Same sparsity pattern, float32 shifted ranks.
    """
    matrix = sp.csc_matrix(matrix)
    n_cells, n_genes = matrix.shape
    ranks = np.empty(matrix.nnz, dtype=np.float32)
    indptr = matrix.indptr
    for start in range(0, n_genes, block_size):
        stop = min(start + block_size, n_genes)
        lo, hi = indptr[start], indptr[stop]
        if hi == lo:
            continue
        values = matrix.data[lo:hi]
        counts = np.diff(indptr[start : stop + 1])
        column = np.repeat(np.arange(stop - start), counts)
        order = np.lexsort((values, column))
        sorted_values, sorted_column = values[order], column[order]
        position = np.arange(hi - lo) - (indptr[start:stop][sorted_column] - lo)
        new_group = np.ones(hi - lo, dtype=bool)
        new_group[1:] = (sorted_column[1:] != sorted_column[:-1]) | (
            sorted_values[1:] != sorted_values[:-1]
        )
        group = np.cumsum(new_group) - 1
        mean_position = np.bincount(group, position) / np.bincount(group)
        n_zero = (n_cells - counts)[sorted_column]
        # 1-based rank among all n_cells values, minus the zeros' average rank.
        shifted = n_zero + mean_position[group] + 1.0 - (n_zero + 1.0) / 2.0
        block_ranks = np.empty(hi - lo, dtype=np.float32)
        block_ranks[order] = shifted
        ranks[lo:hi] = block_ranks
    return sp.csc_matrix((ranks, matrix.indices.copy(), indptr.copy()), shape=matrix.shape)


@dataclass
class StandardisedCorpora:
    """Normalised expression of several corpora in one gene order, ready for the block kernel.

    Attributes
    ----------
    gene_names
        ``(n_genes,)`` the common gene order.
    corpus_names, n_cells
        One entry per corpus.
    expression
        Per corpus, ``(n_cells_c, n_genes)`` CSC float32: log1p-CP10k values (or shifted ranks
        for Spearman), zero columns for genes the corpus lacks.
    means, inv_stds
        ``(n_corpora, n_genes)`` float64 per-gene mean and ``1 / sd`` within each corpus;
        ``inv_stds`` is 0 where the gene is absent or constant in that corpus.
    weights
        ``(n_corpora,)`` combination weights ``w_c`` (1 for ``"mean"``, ``n_c`` for ``"cells"``).
    """

    gene_names: pd.Index
    corpus_names: list[str]
    n_cells: np.ndarray
    expression: list[sp.csc_matrix]
    means: np.ndarray
    inv_stds: np.ndarray
    weights: np.ndarray
    method: str = "pearson"

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def present(self) -> np.ndarray:
        """``(n_corpora, n_genes)`` bool: the corpus measures the gene with non-zero variance."""
        return self.inv_stds > 0

    @property
    def cell_scales(self) -> np.ndarray:
        """``sqrt(w_c / n_c)``: after this scaling, stacked blocks give ``sum_c w_c r_c``."""
        return np.sqrt(self.weights / np.maximum(self.n_cells, 1))

    def dense_block(self, start: int, stop: int) -> np.ndarray:
        """``(sum_c n_c, stop - start)`` float32: standardised, scaled columns of all corpora.

        ``block[:, a] . block[:, b] = sum_c w_c r_c(a, b)``, the numerator of the combined
        correlation. This is the only dense matrix the kernel ever builds.
        """
        out = np.empty((int(self.n_cells.sum()), stop - start), dtype=np.float32)
        row = 0
        for index, matrix in enumerate(self.expression):
            n = matrix.shape[0]
            view = out[row : row + n]
            if n:
                matrix[:, start:stop].toarray(out=view)
            view -= self.means[index, start:stop].astype(np.float32)
            view *= (self.inv_stds[index, start:stop] * self.cell_scales[index]).astype(np.float32)
            row += n
        return out

    def pair_weights(self, rows: slice, cols: slice) -> np.ndarray:
        """``(|rows|, |cols|)`` denominator ``sum_c w_c [c measures both genes]``."""
        present = self.present.astype(np.float64)
        return (present[:, rows] * self.weights[:, None]).T @ present[:, cols]


def _gene_order(corpora: Sequence[Corpus], join: str) -> pd.Index:
    if join == "inner":
        genes = corpora[0].gene_names
        for corpus in corpora[1:]:
            genes = genes[genes.isin(corpus.gene_names)]
        return genes
    return pd.Index(pd.unique(np.concatenate([c.gene_names.to_numpy() for c in corpora])))


def _select_columns(matrix: sp.csc_matrix, source: np.ndarray) -> sp.csc_matrix:
    """Columns ``source`` of a CSC matrix (``-1``: an empty column), without densifying."""
    source = np.asarray(source, dtype=np.int64)
    if source.size == matrix.shape[1] and np.array_equal(source, np.arange(source.size)):
        return matrix
    safe = np.maximum(source, 0)
    counts = np.where(source >= 0, np.diff(matrix.indptr)[safe], 0)
    indptr = np.zeros(source.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    gather = np.repeat(matrix.indptr[safe] - indptr[:-1], counts) + np.arange(indptr[-1])
    return sp.csc_matrix(
        (matrix.data[gather], matrix.indices[gather], indptr), shape=(matrix.shape[0], source.size)
    )


def _column_moments(matrix: sp.csc_matrix, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and ``1 / sd`` (population sd; 0 for constant columns) of a sparse
    matrix, from float64 sums of values and squares, ``block_size`` columns at a time."""
    n_rows, n_columns = matrix.shape
    means = np.zeros(n_columns)
    inv_stds = np.zeros(n_columns)
    if n_rows == 0:
        return means, inv_stds
    for start in range(0, n_columns, block_size):
        stop = min(start + block_size, n_columns)
        block = matrix[:, start:stop]
        mean = np.asarray(block.sum(axis=0, dtype=np.float64)).ravel() / n_rows
        squares = np.asarray(block.power(2).sum(axis=0, dtype=np.float64)).ravel() / n_rows
        std = np.sqrt(np.maximum(squares - mean**2, 0.0))
        constant = std <= 1e-6 * np.maximum(1.0, np.abs(mean))
        means[start:stop] = mean
        inv_stds[start:stop] = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))
    return means, inv_stds


def standardise_corpora(
    corpora: Sequence[Corpus],
    config: CorrelationGraphConfig | None = None,
    genes: Sequence[str] | None = None,
) -> StandardisedCorpora:
    """Normalise, align and standardise corpora (steps 1-3 of the module docstring).

    Parameters
    ----------
    corpora
        Raw-count corpora (see :func:`as_corpora`).
    config
        ``method``, ``gene_join``, ``combine``, ``min_cells``, ``target_sum``, ``block_size``.
    genes
        A fixed gene order (e.g. the graph's genes when standardising a label corpus): genes a
        corpus lacks, or that are detected in fewer than ``min_cells`` cells over the given
        corpora, are *absent* (zero weight) instead of dropped.

    Raises
    ------
    InputError
        When no gene is left after alignment and filtering.
    """
    config = config or CorrelationGraphConfig()
    corpora = list(corpora)
    fixed = genes is not None
    gene_names = (
        pd.Index([str(g) for g in genes]) if fixed else _gene_order(corpora, config.gene_join)
    )
    if len(gene_names) == 0:
        raise InputError(
            "the corpora share no gene names; check that they use the same gene naming "
            "(symbols vs Ensembl ids), or use gene_join='outer'."
        )
    columns, sources = [], []
    detected = np.zeros(len(gene_names), dtype=np.int64)
    for corpus in corpora:
        normalised = normalise_log1p_cp10k(corpus.counts, target_sum=config.target_sum).tocsc()
        normalised.sort_indices()
        source = corpus.gene_names.get_indexer(gene_names)
        detected += np.where(source >= 0, np.diff(normalised.indptr)[np.maximum(source, 0)], 0)
        columns.append(normalised)
        sources.append(source)
    keep = detected >= max(config.min_cells, 1)
    if not fixed:
        if not keep.any():
            raise InputError(
                f"no gene is detected in at least {config.min_cells} cells of the corpora; "
                "lower --min-cells (min_cells=) or check that the corpora hold raw counts."
            )
        gene_names = gene_names[keep]
        sources = [source[keep] for source in sources]
        keep = keep[keep]
    expression = [_select_columns(m, s) for m, s in zip(columns, sources, strict=True)]
    del columns
    if config.method == "spearman":
        expression = [sparse_column_ranks(m, config.block_size) for m in expression]
    n_corpora, n_genes = len(corpora), len(gene_names)
    means = np.zeros((n_corpora, n_genes))
    inv_stds = np.zeros((n_corpora, n_genes))
    for index, matrix in enumerate(expression):
        means[index], inv_stds[index] = _column_moments(matrix, config.block_size)
    inv_stds[:, ~keep] = 0.0
    n_cells = np.array([c.n_cells for c in corpora], dtype=np.float64)
    weights = np.ones(n_corpora) if config.combine == "mean" else n_cells.copy()
    return StandardisedCorpora(
        gene_names=gene_names,
        corpus_names=[c.name for c in corpora],
        n_cells=n_cells,
        expression=expression,
        means=means,
        inv_stds=inv_stds,
        weights=weights,
        method=config.method,
    )


# --------------------------------------------------------------------------- block kernel
def correlation_blocks(
    corpora: StandardisedCorpora,
    block_size: int = 1024,
    device: str | torch.device = "cpu",
    needed: np.ndarray | None = None,
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(rows, cols, r)`` for every gene-block pair ``rows <= cols``.

    ``r`` is the ``(|rows|, |cols|)`` combined correlation (float32 tensor on ``device``),
    NaN where no corpus measures both genes. ``needed[I, J]`` (bool, ``n_blocks x n_blocks``)
    skips pairs nobody asked for. The block ``J`` is densified once per outer step and each
    ``I <= J`` once per pair; only two dense ``cells x block`` matrices exist at a time.
    """
    n_genes = corpora.n_genes
    n_blocks = -(-n_genes // block_size)
    device = torch.device(device)
    for j in range(n_blocks):
        if needed is not None and not needed[: j + 1, j].any():
            continue
        cols = slice(j * block_size, min((j + 1) * block_size, n_genes))
        block_j = torch.from_numpy(corpora.dense_block(cols.start, cols.stop)).to(device)
        for i in range(j + 1):
            if needed is not None and not needed[i, j]:
                continue
            rows = slice(i * block_size, min((i + 1) * block_size, n_genes))
            if i == j:
                block_i = block_j
            else:
                block_i = torch.from_numpy(corpora.dense_block(rows.start, rows.stop)).to(device)
            numerator = block_i.T @ block_j
            denominator = torch.from_numpy(corpora.pair_weights(rows, cols)).to(device)
            r = numerator / denominator.to(numerator.dtype)
            r[denominator <= 0] = torch.nan
            yield rows, cols, r.clamp_(-1.0, 1.0)


class _RunningTopK:
    """Per-row top-K (largest key) over column blocks: ``(rows, K)`` keys, values, indices.

    Each block first gives its own top-K per row (one ``topk`` over the block), which is then
    merged with the running top-K: the top-K of the union equals the top-K of the running set
    and the block's top-K, and only ``2K`` candidates per row are concatenated and gathered.
    """

    def __init__(self, n_rows: int, k: int, device: torch.device) -> None:
        self.keys = torch.full((n_rows, k), -torch.inf, device=device)
        self.values = torch.zeros((n_rows, k), device=device)
        self.index = torch.full((n_rows, k), -1, dtype=torch.int64, device=device)
        self.k = k

    def update(
        self,
        rows: slice,
        col_start: int,
        values: torch.Tensor,
        keys: torch.Tensor,
        transposed: bool = False,
    ) -> None:
        """Absorb a block whose row ``a`` / column ``b`` is gene ``rows.start + a`` /
        ``col_start + b``; with ``transposed``, ``values``/``keys`` are ``(cols, rows)``."""
        dim = 0 if transposed else 1
        k = min(self.k, keys.shape[dim])
        block_keys, block_top = torch.topk(keys, k, dim=dim, sorted=False)
        block_values = values.gather(dim, block_top)
        if transposed:
            block_keys, block_top, block_values = block_keys.T, block_top.T, block_values.T
        all_keys = torch.cat([self.keys[rows], block_keys], dim=1)
        top = torch.topk(all_keys, self.k, dim=1, sorted=False).indices
        self.keys[rows] = all_keys.gather(1, top)
        self.values[rows] = torch.cat([self.values[rows], block_values], dim=1).gather(1, top)
        candidates = torch.cat([self.index[rows], block_top + col_start], dim=1)
        self.index[rows] = candidates.gather(1, top)


def top_k_partners(
    corpora: StandardisedCorpora,
    top_k: int = 50,
    rank_by: str = "signed",
    block_size: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Each gene's ``top_k`` partners by combined correlation, self excluded (Suppl. S1).

    Returns
    -------
    partners : numpy.ndarray
        ``(n_genes, top_k)`` int64 partner indices, best first; ``-1`` where a gene has fewer
        than ``top_k`` measurable partners (only with ``gene_join="outer"``).
    correlations : numpy.ndarray
        ``(n_genes, top_k)`` float32 signed correlations (NaN where the partner is ``-1``).
    """
    device = torch.device(device)
    running = _RunningTopK(corpora.n_genes, top_k, device)
    for rows, cols, r in correlation_blocks(corpora, block_size, device):
        keys = torch.nan_to_num(r.abs() if rank_by == "absolute" else r, nan=-torch.inf)
        if rows == cols:
            keys.fill_diagonal_(-torch.inf)
        running.update(rows, cols.start, r, keys)
        if rows != cols:
            running.update(cols, rows.start, r, keys, transposed=True)
    order = torch.sort(running.keys, dim=1, descending=True).indices
    keys = running.keys.gather(1, order).cpu().numpy()
    partners = running.index.gather(1, order).cpu().numpy()
    values = running.values.gather(1, order).cpu().numpy().astype(np.float32)
    missing = ~np.isfinite(keys)
    partners[missing] = -1
    values[missing] = np.nan
    return partners, values


def edge_correlations(
    corpora: StandardisedCorpora,
    gene: np.ndarray,
    partner: np.ndarray,
    block_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Combined correlation of the gene pairs ``(gene[e], partner[e])`` (indices into
    ``corpora.gene_names``), NaN where no corpus measures both; only block pairs that hold an
    edge are computed. Used for the co-expression targets of the completion (Suppl. S1).
    """
    gene = np.asarray(gene, dtype=np.int64)
    partner = np.asarray(partner, dtype=np.int64)
    out = np.full(gene.shape, np.nan, dtype=np.float32)
    if gene.size == 0:
        return out
    n_blocks = -(-corpora.n_genes // block_size)
    low = np.minimum(gene, partner)
    high = np.maximum(gene, partner)
    key = (low // block_size) * n_blocks + high // block_size
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    needed = np.zeros((n_blocks, n_blocks), dtype=bool)
    unique_keys = np.unique(sorted_key)
    needed[unique_keys // n_blocks, unique_keys % n_blocks] = True
    for rows, cols, r in correlation_blocks(corpora, block_size, device, needed=needed):
        pair_key = (rows.start // block_size) * n_blocks + cols.start // block_size
        lo, hi = np.searchsorted(sorted_key, [pair_key, pair_key + 1])
        edges = order[lo:hi]
        r_host = r.cpu().numpy()
        out[edges] = r_host[low[edges] - rows.start, high[edges] - cols.start]
    return out


# --------------------------------------------------------------------------- node features
def gene_svd_features(
    corpora: StandardisedCorpora,
    n_components: int = 64,
    n_oversamples: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """Gene node features: truncated SVD of the standardised, stacked expression profiles.

    With ``Z`` the ``(cells, genes)`` matrix of :meth:`StandardisedCorpora.dense_block` (never
    formed: products go through the sparse matrices with implicit centring), returns
    ``V_k S_k``, shape ``(n_genes, n_components)`` float32, so that ``f_i . f_j`` approximates
    the correlation numerator ``sum_c w_c r_c(i, j)``: a gene's features summarise its whole
    expression profile, not only its top-K partners. Randomised SVD (Halko et al. 2011) with
    ``n_iter`` power iterations; components are capped at ``min(cells, genes)``.
    """
    n_genes = corpora.n_genes
    n_total = int(corpora.n_cells.sum())
    rank = max(1, min(n_components, n_genes, n_total))
    width = min(rank + n_oversamples, n_genes, n_total)
    scale = corpora.inv_stds * corpora.cell_scales[:, None]  # (corpora, genes)
    offsets = corpora.means * scale

    def z_times(matrix: np.ndarray) -> np.ndarray:  # (genes, w) -> (cells, w)
        blocks = [
            x @ (scale[c][:, None] * matrix) - offsets[c] @ matrix
            for c, x in enumerate(corpora.expression)
        ]
        return np.vstack(blocks)

    def zt_times(matrix: np.ndarray) -> np.ndarray:  # (cells, w) -> (genes, w)
        out = np.zeros((n_genes, matrix.shape[1]))
        row = 0
        for c, x in enumerate(corpora.expression):
            part = matrix[row : row + x.shape[0]]
            out += scale[c][:, None] * (x.T @ part) - offsets[c][:, None] * part.sum(axis=0)
            row += x.shape[0]
        return out

    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(z_times(rng.standard_normal((n_genes, width))))
    for _ in range(n_iter):
        genes_side, _ = np.linalg.qr(zt_times(basis))
        basis, _ = np.linalg.qr(z_times(genes_side))
    small = zt_times(basis).T  # (width, genes) = Q^T Z
    _, singular, vt = np.linalg.svd(small, full_matrices=False)
    features = (vt[:rank].T * singular[:rank]).astype(np.float32)
    if features.shape[1] < n_components:
        features = np.pad(features, ((0, 0), (0, n_components - features.shape[1])))
    return features


# --------------------------------------------------------------------------- the graph
@dataclass
class CorrelationGraph:
    """The top-K correlation graph (CoxFormer Suppl. S1).

    Edges are directed ``(gene[e], partner[e])`` with ``partner`` among the ``top_k`` most
    correlated partners of ``gene``; a gene's edges are contiguous, best partner first.

    Attributes
    ----------
    gene_names
        ``(n_genes,)`` node names.
    gene, partner
        ``(n_edges,)`` int64 node indices.
    correlation
        ``(n_edges,)`` float32 signed correlation ``(C_cor)_{gene, partner}``.
    info
        Provenance: corpora, cells, config, build seconds.
    """

    gene_names: pd.Index
    gene: np.ndarray
    partner: np.ndarray
    correlation: np.ndarray
    top_k: int
    info: dict = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def n_edges(self) -> int:
        return int(self.gene.size)

    def to_sparse(self) -> sp.csr_matrix:
        """``(n_genes, n_genes)`` CSR with the correlation at ``(gene, partner)``."""
        return sp.csr_matrix(
            (self.correlation, (self.gene, self.partner)), shape=(self.n_genes, self.n_genes)
        )

    def message_edge_index(self) -> torch.Tensor:
        """``(2, n_edges)`` PyG ``edge_index`` ``[partner, gene]``: messages flow from each
        gene's top-K partners into it, so a node's sampled neighbours are its partners."""
        return torch.from_numpy(np.stack([self.partner, self.gene]))

    def neighbors(self, gene: str) -> pd.Series:
        """The partners of ``gene`` with their correlations, best first."""
        if gene not in self.gene_names:
            raise InputError(f"gene {gene!r} is not in the graph ({self.n_genes} genes).")
        mask = self.gene == self.gene_names.get_loc(gene)
        return pd.Series(self.correlation[mask], index=self.gene_names[self.partner[mask]])


def build_correlation_graph(
    corpora: Sequence[ad.AnnData | Corpus] | Mapping[str, ad.AnnData | Corpus] | ad.AnnData,
    config: CorrelationGraphConfig | None = None,
    standardised: StandardisedCorpora | None = None,
) -> CorrelationGraph:
    """Build the top-K correlation graph of one or more corpora (Suppl. S1).

    Parameters
    ----------
    corpora
        AnnData objects (cells or spots x genes, raw counts in ``X``), a mapping name ->
        AnnData, or :class:`Corpus` objects. Ignored when ``standardised`` is given.
    config
        See :class:`CorrelationGraphConfig` (K, Pearson/Spearman, gene join, combination).
    standardised
        Already standardised corpora (from :func:`standardise_corpora`), to reuse them.

    Returns
    -------
    CorrelationGraph
        ``n_genes * K`` directed edges (fewer when ``K >= n_genes`` or with ``"outer"`` joins).

    Examples
    --------
    >>> graph = build_correlation_graph([slide_a, slide_b], CorrelationGraphConfig(top_k=50))
    >>> graph.neighbors("ERBB2").head()
    """
    config = config or CorrelationGraphConfig()
    start = time.perf_counter()
    if standardised is None:
        standardised = standardise_corpora(as_corpora(corpora), config)
    n_genes = standardised.n_genes
    top_k = min(config.top_k, n_genes - 1)
    if top_k < 1:
        raise InputError(f"a correlation graph needs at least 2 genes; the corpora give {n_genes}.")
    if top_k < config.top_k:
        logger.warning(
            "top_k=%d but only %d genes: keeping %d partners.", config.top_k, n_genes, top_k
        )
    partners, values = top_k_partners(
        standardised, top_k, config.rank_by, config.block_size, config.device
    )
    valid = partners >= 0
    gene = np.broadcast_to(np.arange(n_genes)[:, None], partners.shape)[valid]
    seconds = time.perf_counter() - start
    info = {
        "corpora": list(standardised.corpus_names),
        "n_cells": [int(n) for n in standardised.n_cells],
        "config": asdict(config),
        "build_seconds": seconds,
    }
    logger.info(
        "correlation graph: %d genes x top-%d from %d cells in %d corpora (%.1f s)",
        n_genes,
        top_k,
        int(standardised.n_cells.sum()),
        len(standardised.corpus_names),
        seconds,
    )
    return CorrelationGraph(
        gene_names=standardised.gene_names,
        gene=np.ascontiguousarray(gene, dtype=np.int64),
        partner=partners[valid].astype(np.int64),
        correlation=values[valid].astype(np.float32),
        top_k=top_k,
        info=info,
    )

"""Preprocessing of slide counts: normalisation, Moran's I, gene selection and gene alignment.

Everything here takes slides in the layout of :mod:`stinfer.io.slide_data` (raw counts in
``X``, spot centres in ``obsm["spatial"]``) and never modifies its input.

Gene selection follows STEvs D.1.4 as pinned in ``docs/DESIGN.md`` "Genes": spatially
variable genes (SVGs) by Moran's I with a Benjamini-Hochberg adjusted p-value below 0.05,
called SVG in at least two slices of the group, restricted to genes every slice measures;
highly variable genes (HVGs) fill the panel when too few SVGs pass.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from sklearn.neighbors import NearestNeighbors

from stinfer.errors import InputError
from stinfer.io.slide_data import as_dense, slide_id

logger = logging.getLogger("stinfer")

CP10K_TARGET_SUM = 1e4
_GENE_CHUNK = 2048  # genes densified at once by the Moran's I kernel (bounds memory)

__all__ = [
    "align_genes",
    "grid_adjacency",
    "grid_type",
    "highly_variable_genes",
    "morans_i",
    "normalise_log1p_cp10k",
    "normalize_log1p_cp10k",
    "select_genes",
    "spatial_weights",
    "spatially_variable_genes",
]


# --------------------------------------------------------------------------- normalisation
def normalise_log1p_cp10k(
    counts: np.ndarray | sp.spmatrix,
    target_sum: float = CP10K_TARGET_SUM,
    spot_totals: np.ndarray | None = None,
) -> np.ndarray | sp.csr_matrix:
    """Return ``log1p(counts / spot_total * target_sum)``, per spot (row), as a new matrix.

    The scanpy ``normalize_total(target_sum=1e4)`` + ``log1p`` convention ("log1p-CP10k"),
    used for Moran's I, HVGs, the depth-normalised metrics and the HEST-style PCC. Spots whose
    total is 0 stay 0. The input is never modified.

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` non-negative counts, dense or sparse. The spot total is taken
        over the columns given, so pass the full gene set for library-size normalisation and a
        gene panel for panel normalisation.
    target_sum
        Counts each spot is scaled to before ``log1p``.
    spot_totals
        ``(n_spots,)`` totals to divide by; default the row sums of ``counts``. Lets a caller
        normalise a block of genes by the totals of the whole panel.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        Same shape; CSR when the input is sparse, dense otherwise. float32 input stays float32,
        anything else becomes float64.

    Raises
    ------
    InputError
        When ``counts`` holds negative or non-finite values (already log-transformed or scaled
        data cannot be normalised again).
    """
    dtype = np.float32 if counts.dtype == np.float32 else np.float64
    if sp.issparse(counts):
        matrix = sp.csr_matrix(counts, dtype=dtype, copy=True)
        _check_nonnegative(matrix.data, "counts")
        scale = _safe_scale(_spot_totals(matrix, spot_totals), target_sum)
        matrix.data *= np.repeat(scale, np.diff(matrix.indptr)).astype(dtype)
        np.log1p(matrix.data, out=matrix.data)
        return matrix
    matrix = np.array(counts, dtype=dtype, copy=True)
    if matrix.ndim != 2:
        raise InputError(f"counts must be a 2-D spots x genes matrix, got shape {matrix.shape}.")
    _check_nonnegative(matrix, "counts")
    scale = _safe_scale(_spot_totals(matrix, spot_totals), target_sum)
    matrix *= scale[:, None].astype(dtype)
    np.log1p(matrix, out=matrix)
    return matrix


normalize_log1p_cp10k = normalise_log1p_cp10k
"""The earlier, American spelling of :func:`normalise_log1p_cp10k`, kept for existing code."""


def _spot_totals(matrix: np.ndarray | sp.csr_matrix, spot_totals: np.ndarray | None) -> np.ndarray:
    if spot_totals is None:
        return np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    totals = np.asarray(spot_totals, dtype=np.float64).ravel()
    if totals.shape != (matrix.shape[0],):
        raise InputError(f"{totals.size} spot totals for {matrix.shape[0]} spots.")
    return totals


def _safe_scale(totals: np.ndarray, target_sum: float) -> np.ndarray:
    """Per-spot factor ``target_sum / total``, 0 where the total is 0."""
    scale = np.zeros_like(totals, dtype=np.float64)
    np.divide(target_sum, totals, out=scale, where=totals > 0)
    return scale


def _check_nonnegative(values: np.ndarray, name: str) -> None:
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise InputError(f"{name} holds NaN or infinite values.")
    if values.min() < 0:
        raise InputError(
            f"{name} holds negative values (min {values.min():g}); non-negative counts are "
            "expected, not scaled or centred data."
        )


# --------------------------------------------------------------------------- Moran's I
def spatial_weights(
    coords: np.ndarray, n_neighbors: int = 6, radius: float | None = None
) -> sp.csr_matrix:
    """Row-standardised spatial weight matrix ``W`` over spots.

    Each spot is linked to its ``n_neighbors`` nearest other spots (6 = the hexagonal Visium
    ring, squidpy's default for generic coordinates), or, when ``radius`` is given, to every
    other spot within ``radius`` (same units as ``coords``); on a square legacy-ST grid pass
    ``n_neighbors=4`` or a radius, since 6 would pick 2 of the 4 equidistant diagonals (slides
    with array coordinates get grid neighbours from :func:`grid_adjacency` instead, the
    default of :func:`morans_i`). Rows are divided by their sum (PySAL's ``transform="r"``, squidpy's ``transformation=True``); a spot without neighbours
    keeps an all-zero row.

    Parameters
    ----------
    coords
        ``(n_spots, 2)`` spot centres, e.g. ``slide.obsm["spatial"]``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_spots, n_spots)`` float64, zero diagonal, rows summing to 1 (or 0).
    """
    coords = np.asarray(coords, dtype=np.float64)
    n_spots = coords.shape[0]
    if coords.ndim != 2 or n_spots < 3:
        raise InputError(
            f"Moran's I needs at least 3 spots with 2-D coordinates, got {coords.shape}."
        )
    if not np.all(np.isfinite(coords)):
        raise InputError("spot coordinates hold NaN or infinite values.")
    search = NearestNeighbors().fit(coords)
    if radius is not None:
        adjacency = search.radius_neighbors_graph(None, radius=radius, mode="connectivity")
    else:
        if not 1 <= n_neighbors < n_spots:
            raise InputError(f"n_neighbors must be in [1, {n_spots - 1}], got {n_neighbors}.")
        adjacency = search.kneighbors_graph(None, n_neighbors=n_neighbors, mode="connectivity")
    adjacency = sp.csr_matrix(adjacency, dtype=np.float64)
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    return _row_standardise(adjacency, f"radius={radius}")


def _row_standardise(adjacency: sp.csr_matrix, neighbourhood: str) -> sp.csr_matrix:
    """``adjacency`` with rows divided by their sums; isolated spots keep a zero row (logged)."""
    row_sums = np.asarray(adjacency.sum(axis=1)).ravel()
    n_isolated = int(np.sum(row_sums == 0))
    if n_isolated:
        logger.warning(
            "%d of %d spots have no spatial neighbour (%s).",
            n_isolated,
            adjacency.shape[0],
            neighbourhood,
        )
    return sp.csr_matrix(sp.diags(_safe_scale(row_sums, 1.0)) @ adjacency)


GRID_OFFSETS = {
    # Visium: rows of a hexagonal lattice, columns of a row 2 apart, odd rows shifted by one.
    "hex": ((0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)),
    # Legacy ST: a square lattice, rook neighbours.
    "square": ((-1, 0), (1, 0), (0, -1), (0, 1)),
}
"""``(d_row, d_col)`` of the grid neighbours of a spot, as squidpy's ``coord_type="grid"``."""


def _grid_positions(array_row: np.ndarray, array_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positions = []
    for name, values in (("array_row", array_row), ("array_col", array_col)):
        values = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError(
                f"obs[{name!r}] holds missing or non-integer values; grid neighbours need whole "
                "array coordinates (pass n_neighbors= to use k nearest spots instead)."
            )
        positions.append(values.astype(np.int64))
    if positions[0].shape != positions[1].shape:
        raise InputError(
            f"{positions[0].size} array_row values but {positions[1].size} array_col values."
        )
    return positions[0], positions[1]


def grid_type(array_row: np.ndarray, array_col: np.ndarray) -> Literal["hex", "square"]:
    """``"hex"`` (Visium) when every ``array_row + array_col`` has the same parity, else ``"square"``.

    Visium numbers a hexagonal lattice so that even rows hold even columns and odd rows odd
    columns (``row + col`` always even); a square legacy-ST grid holds both parities.
    """
    array_row, array_col = _grid_positions(array_row, array_col)
    return "hex" if np.unique((array_row + array_col) % 2).size <= 1 else "square"


def grid_adjacency(
    array_row: np.ndarray, array_col: np.ndarray, grid: Literal["hex", "square"] | None = None
) -> sp.csr_matrix:
    """Binary, symmetric adjacency of spots that are grid neighbours (squidpy ``coord_type="grid"``).

    Six neighbours ``(r, c +- 2)``, ``(r +- 1, c +- 1)`` on Visium's hexagonal grid, four
    ``(r +- 1, c)``, ``(r, c +- 1)`` on a square legacy-ST grid (:data:`GRID_OFFSETS`); spots on
    the tissue edge have fewer. Found by a join on integer grid keys, without a loop over spots.

    Parameters
    ----------
    array_row, array_col
        ``(n_spots,)`` integer grid coordinates, e.g. ``slide.obs["array_row"]``.
    grid
        ``"hex"`` or ``"square"``; default detected by :func:`grid_type`.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_spots, n_spots)`` float64 of 0/1, zero diagonal.

    Raises
    ------
    InputError
        When coordinates are missing or non-integer, or two spots share a grid position (e.g.
        several slides concatenated: compute per slide).
    """
    array_row, array_col = _grid_positions(array_row, array_col)
    grid = grid or grid_type(array_row, array_col)
    if grid not in GRID_OFFSETS:
        raise InputError(f"grid must be 'hex' or 'square', got {grid!r}.")
    n_spots = array_row.size
    row, col = array_row - array_row.min() + 1, array_col - array_col.min() + 2
    width = int(col.max()) + 3
    spot_at = pd.Index(row * width + col)
    if not spot_at.is_unique:
        raise InputError(
            f"{int(spot_at.duplicated().sum())} spots share a grid position with another; grid "
            "neighbours need one slide at a time (or pass n_neighbors= for k nearest spots)."
        )
    sources, targets = [], []
    for d_row, d_col in GRID_OFFSETS[grid]:
        neighbour = spot_at.get_indexer((row + d_row) * width + (col + d_col))
        found = neighbour >= 0
        sources.append(np.flatnonzero(found))
        targets.append(neighbour[found])
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    return sp.csr_matrix(
        (np.ones(sources.size), (sources, targets)), shape=(n_spots, n_spots), dtype=np.float64
    )


def _moran_weights(
    data: ad.AnnData | np.ndarray | sp.spmatrix,
    coords: np.ndarray,
    n_neighbors: int | None,
    radius: float | None,
) -> sp.csr_matrix:
    """Grid neighbours when the slide has array coordinates and no neighbourhood is asked for,
    else :func:`spatial_weights` (``n_neighbors`` nearest spots, default 6, or a radius).

    When most spots have no grid neighbour the spots do not tile the grid (e.g. a subsample of
    a slide), so the 6 nearest spots are used instead, with a warning.
    """
    on_grid = (
        isinstance(data, ad.AnnData)
        and n_neighbors is None
        and radius is None
        and {"array_row", "array_col"} <= set(data.obs.columns)
    )
    if not on_grid:
        return spatial_weights(
            coords, n_neighbors=6 if n_neighbors is None else n_neighbors, radius=radius
        )
    if data.n_obs < 3:
        raise InputError(f"Moran's I needs at least 3 spots, got {data.n_obs}.")
    array_row, array_col = data.obs["array_row"].to_numpy(), data.obs["array_col"].to_numpy()
    grid = grid_type(array_row, array_col)
    adjacency = grid_adjacency(array_row, array_col, grid)
    n_isolated = int(np.sum(np.diff(adjacency.indptr) == 0))
    if n_isolated > data.n_obs / 2:
        logger.warning(
            "Moran's I: %d of %d spots have no %s-grid neighbour (the spots do not tile the "
            "grid); using the 6 nearest spots instead.",
            n_isolated,
            data.n_obs,
            grid,
        )
        return spatial_weights(coords, n_neighbors=6)
    logger.debug("Moran's I on %s-grid neighbours of %d spots.", grid, data.n_obs)
    return _row_standardise(adjacency, f"{grid} grid")


def _weight_moments(weights: sp.csr_matrix) -> tuple[float, float, float]:
    """PySAL's ``s0, s1, s2`` of a weight matrix (Cliff & Ord 1981)."""
    s0 = float(weights.sum())
    symmetric = weights + weights.T
    s1 = float(symmetric.multiply(symmetric).sum()) / 2.0
    s2 = float(
        np.sum(
            (np.asarray(weights.sum(axis=1)).ravel() + np.asarray(weights.sum(axis=0)).ravel()) ** 2
        )
    )
    return s0, s1, s2


def morans_i(
    data: ad.AnnData | np.ndarray | sp.spmatrix,
    coords: np.ndarray | None = None,
    *,
    n_neighbors: int | None = None,
    radius: float | None = None,
    genes: Sequence[str] | None = None,
    gene_names: Sequence[str] | None = None,
    normalise: bool = True,
    alternative: Literal["greater", "two-sided"] = "greater",
) -> pd.DataFrame:
    """Global Moran's I of every gene, with analytic p-values and BH-FDR.

    ``I = n / S0 * (z' W z) / (z' z)`` with ``z`` the centred expression of a gene and ``W``
    the row-standardised spatial weights; computed for a chunk of genes at once with one
    sparse product. By default ``W`` links grid neighbours, as squidpy's
    ``spatial_neighbors(coord_type="grid")``: 6 on Visium's hexagonal grid, 4 on a square
    legacy-ST grid (:func:`grid_adjacency` on ``obs["array_row"]``/``obs["array_col"]``, the
    grid told apart by :func:`grid_type`); without array coordinates, or when ``n_neighbors``
    or ``radius`` is given, the k nearest spots in ``coords`` (:func:`spatial_weights`, k = 6
    by default). The p-value uses the normality assumption of PySAL/esda ``Moran`` (squidpy's
    ``pval_norm``): ``E[I] = -1/(n-1)`` and
    ``Var[I] = (n^2 S1 - n S2 + 3 S0^2) / ((n-1)(n+1) S0^2) - E[I]^2``.

    ``alternative="greater"`` (default) tests for positive autocorrelation (``p = P(Z >= z)``),
    which is what "spatially variable" means. For genes with ``I > E[I]`` this equals squidpy's
    default one-tailed ``pval_norm``; squidpy instead takes the lower tail when ``I < E[I]``,
    which would call strongly dispersed (checkerboard) genes significant. ``"two-sided"`` gives
    ``2 P(Z >= |z|)``.

    Parameters
    ----------
    data
        A slide AnnData (raw counts in ``X``, coordinates in ``obsm["spatial"]``) or a
        ``(n_spots, n_genes)`` matrix.
    coords
        ``(n_spots, 2)`` spot centres; defaults to ``data.obsm["spatial"]`` for an AnnData.
    n_neighbors, radius
        Neighbourhood of :func:`spatial_weights` instead of the grid neighbours.
    genes
        Genes to test (default all). Normalisation still uses every gene of ``data``, so the
        library size is the spot's full total.
    gene_names
        Names of the matrix columns when ``data`` is a matrix (default ``"0"``, ``"1"``, ...).
    normalise
        Apply :func:`normalise_log1p_cp10k` first (set False for already normalised data).

    Returns
    -------
    pandas.DataFrame
        Indexed by gene (input order), columns ``I``, ``pval``, ``pval_fdr`` (Benjamini-Hochberg
        via :func:`scipy.stats.false_discovery_control`). A gene that is constant over the
        spots has no defined I: all three are NaN and it does not count as a hypothesis.
    """
    matrix, names, coords = _expression_and_coords(data, coords, gene_names)
    if genes is not None:
        position = pd.Index(names).get_indexer(list(genes))
        if np.any(position < 0):
            missing = [g for g, p in zip(genes, position, strict=True) if p < 0]
            raise InputError(
                f"morans_i: {len(missing)} genes are not in the data (e.g. {missing[:5]})."
            )
    else:
        position = np.arange(len(names))
    if normalise:
        matrix = normalise_log1p_cp10k(matrix)
    weights = _moran_weights(data, coords, n_neighbors, radius)
    if matrix.shape[0] != weights.shape[0]:
        raise InputError(
            f"{matrix.shape[0]} spots of expression but {weights.shape[0]} coordinates."
        )
    statistic = _morans_i_columns(matrix, position, weights)
    pval = _moran_pvalues(statistic, weights, alternative)
    pval_fdr = np.full_like(pval, np.nan)
    tested = np.isfinite(pval)
    if tested.any():
        pval_fdr[tested] = stats.false_discovery_control(pval[tested], method="bh")
    index = pd.Index(np.asarray(names, dtype=object)[position], name="gene")
    return pd.DataFrame({"I": statistic, "pval": pval, "pval_fdr": pval_fdr}, index=index)


def _expression_and_coords(
    data: ad.AnnData | np.ndarray | sp.spmatrix,
    coords: np.ndarray | None,
    gene_names: Sequence[str] | None,
) -> tuple[np.ndarray | sp.csc_matrix, list[str], np.ndarray]:
    if isinstance(data, ad.AnnData):
        if coords is None:
            if "spatial" not in data.obsm:
                raise InputError(
                    "the AnnData has no obsm['spatial'] spot coordinates; pass coords=."
                )
            coords = data.obsm["spatial"]
        matrix, names = data.X, [str(g) for g in data.var_names]
    else:
        if coords is None:
            raise InputError("morans_i on a matrix needs coords= (n_spots, 2) spot centres.")
        matrix = data
        n_genes = data.shape[1]
        names = (
            [str(i) for i in range(n_genes)] if gene_names is None else [str(g) for g in gene_names]
        )
        if len(names) != n_genes:
            raise InputError(f"{len(names)} gene names for a matrix with {n_genes} columns.")
    if sp.issparse(matrix):
        matrix = sp.csc_matrix(matrix)
    return matrix, names, np.asarray(coords, dtype=np.float64)


def _morans_i_columns(
    matrix: np.ndarray | sp.spmatrix, position: np.ndarray, weights: sp.csr_matrix
) -> np.ndarray:
    """Moran's I of the columns ``position`` of ``matrix``, NaN for constant columns."""
    n_spots = matrix.shape[0]
    s0 = weights.sum()
    statistic = np.full(len(position), np.nan)
    matrix = sp.csc_matrix(matrix) if sp.issparse(matrix) else matrix
    for start in range(0, len(position), _GENE_CHUNK):
        columns = position[start : start + _GENE_CHUNK]
        block = matrix[:, columns]
        block = as_dense(block)
        centred = np.asarray(block, dtype=np.float64) - block.mean(axis=0, dtype=np.float64)
        numerator = np.einsum("ij,ij->j", centred, weights @ centred)
        denominator = np.einsum("ij,ij->j", centred, centred)
        constant = np.ptp(block, axis=0) == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            chunk = n_spots / s0 * numerator / denominator
        chunk[constant] = np.nan
        statistic[start : start + len(columns)] = chunk
    return statistic


def _moran_pvalues(
    statistic: np.ndarray, weights: sp.csr_matrix, alternative: Literal["greater", "two-sided"]
) -> np.ndarray:
    """Analytic p-values of Moran's I under the normality assumption (PySAL ``p_norm``)."""
    n_spots = weights.shape[0]
    s0, s1, s2 = _weight_moments(weights)
    expected = -1.0 / (n_spots - 1)
    variance = (n_spots**2 * s1 - n_spots * s2 + 3 * s0**2) / (
        (n_spots - 1) * (n_spots + 1) * s0**2
    ) - expected**2
    z_score = (statistic - expected) / np.sqrt(variance)
    if alternative == "greater":
        return stats.norm.sf(z_score)
    if alternative == "two-sided":
        return np.minimum(2.0 * stats.norm.sf(np.abs(z_score)), 1.0)
    raise InputError(f"alternative must be 'greater' or 'two-sided', got {alternative!r}.")


# --------------------------------------------------------------------------- gene selection
def _slide_name(slide: ad.AnnData, index: int) -> str:
    """The slide's id, or its position in the list for an AnnData without one."""
    return slide_id(slide, default=f"slide {index}")


def _check_slides(slides: Sequence[ad.AnnData]) -> list[ad.AnnData]:
    slides = list(slides)
    if not slides:
        raise InputError("no slides given: gene selection needs at least one slide.")
    for index, slide in enumerate(slides):
        if not isinstance(slide, ad.AnnData):
            raise InputError(f"slide {index} is a {type(slide).__name__}, not an AnnData.")
    return slides


def _shared_expressed_genes(slides: list[ad.AnnData], min_spot_fraction: float) -> list[str]:
    """Genes in every slide and detected (count > 0) in >= ``min_spot_fraction`` of each slide's spots.

    Order follows the first slide's ``var_names``.
    """
    shared = pd.Index(slides[0].var_names)
    for slide in slides[1:]:
        shared = shared[shared.isin(slide.var_names)]
    if len(shared) == 0:
        names = ", ".join(_slide_name(s, i) for i, s in enumerate(slides))
        raise InputError(f"the slides ({names}) share no gene names; check the gene identifiers.")
    keep = np.ones(len(shared), dtype=bool)
    for slide in slides:
        counts = slide[:, shared].X
        detected = (counts > 0).sum(axis=0)
        keep &= np.asarray(detected).ravel() >= min_spot_fraction * slide.n_obs
    genes = [str(g) for g in shared[keep]]
    if not genes:
        raise InputError(
            f"no shared gene is detected in at least {min_spot_fraction:.1%} of the spots of every "
            "slide; check that the slides hold raw counts under the same gene names, or give the "
            "panel as a gene list (`stinfer train --genes FILE`; genes= in Python, or lower "
            "min_spot_fraction=)."
        )
    dropped = len(shared) - len(genes)
    if dropped:
        logger.info(
            "gene selection: %d of %d shared genes dropped (detected in < %.1f%% of spots on some slide).",
            dropped,
            len(shared),
            100 * min_spot_fraction,
        )
    return genes


def spatially_variable_genes(
    slides: Sequence[ad.AnnData],
    genes: Sequence[str] | None = None,
    *,
    fdr: float = 0.05,
    min_slides: int = 2,
    min_spot_fraction: float = 0.01,
    n_neighbors: int | None = None,
    radius: float | None = None,
) -> pd.DataFrame:
    """Moran's I of the cohort's genes on every slide, and which genes count as SVGs.

    Parameters
    ----------
    slides
        The slides of one group (e.g. a patient's serial sections), raw counts in ``X``.
    genes
        Genes to test; default: genes in every slide detected in at least ``min_spot_fraction``
        of each slide's spots.
    fdr
        A gene is an SVG on a slide when its BH-adjusted p-value is below ``fdr``.
    min_slides
        It is an SVG of the group when that holds on at least ``min(min_slides, n_slides)``
        slides (STEvs D.1.4: "in at least two samples").

    Returns
    -------
    pandas.DataFrame
        Indexed by gene: ``I_<slide>`` and ``pval_fdr_<slide>`` per slide, ``n_significant``,
        ``mean_I`` (mean Moran's I over slides), ``is_svg``; sorted by ``mean_I`` descending,
        ties kept in input order.
    """
    slides = _check_slides(slides)
    if genes is None:
        genes = _shared_expressed_genes(slides, min_spot_fraction)
    genes = list(genes)
    required = min(min_slides, len(slides))
    table = pd.DataFrame(index=pd.Index(genes, name="gene"))
    significant = np.zeros(len(genes), dtype=int)
    statistics = []
    for index, slide in enumerate(slides):
        name = _slide_name(slide, index)
        result = morans_i(slide, genes=genes, n_neighbors=n_neighbors, radius=radius)
        table[f"I_{name}"] = result["I"].to_numpy()
        table[f"pval_fdr_{name}"] = result["pval_fdr"].to_numpy()
        significant += (result["pval_fdr"].to_numpy() < fdr).astype(int)
        statistics.append(result["I"].to_numpy())
    table["n_significant"] = significant
    with np.errstate(invalid="ignore"):
        table["mean_I"] = np.nanmean(np.vstack(statistics), axis=0) if genes else []
    table["is_svg"] = table["n_significant"] >= required
    return table.sort_values("mean_I", ascending=False, kind="stable", na_position="last")


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's thread count after the block, when torch is loaded.

    scanpy's numba kernels run on numba's OpenMP layer, which shares torch's ``libgomp`` and
    sets its thread count to every core at launch (``NUMBA_NUM_THREADS``), whatever
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` said: a run limited to one thread would
    then train on two and oversubscribe a shared machine.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def highly_variable_genes(slides: Sequence[ad.AnnData], genes: Sequence[str]) -> list[str]:
    """Rank ``genes`` by scanpy's Seurat-flavour normalised dispersion, most variable first.

    Each slide is log1p-CP10k normalised with its full library, restricted to ``genes``, and
    the slides are stacked; :func:`scanpy.pp.highly_variable_genes` (``flavor="seurat"``) then
    gives each gene's dispersion normalised within its mean bin. Genes without a normalised
    dispersion (a bin of one gene) rank last; ties keep the order of ``genes``.
    """
    import scanpy as sc  # deferred: scanpy is slow to import and only the HVG path needs it

    slides = _check_slides(slides)
    genes = list(genes)
    blocks = [
        normalise_log1p_cp10k(sp.csr_matrix(slide.X))[:, slide.var_names.get_indexer(genes)]
        for slide in slides
    ]
    stacked = ad.AnnData(X=sp.vstack(blocks).tocsr(), var=pd.DataFrame(index=pd.Index(genes)))
    with torch_threads_kept():
        sc.pp.highly_variable_genes(stacked, flavor="seurat", n_top_genes=len(genes))
    dispersion = stacked.var["dispersions_norm"].to_numpy(dtype=np.float64)
    dispersion = np.where(np.isfinite(dispersion), dispersion, -np.inf)
    order = np.argsort(-dispersion, kind="stable")
    return [genes[i] for i in order]


def select_genes(
    slides: Sequence[ad.AnnData],
    method: Literal["svg", "hvg"] = "svg",
    n_genes: int = 300,
    min_slides: int = 2,
    fdr: float = 0.05,
    *,
    min_spot_fraction: float = 0.01,
    n_neighbors: int | None = None,
    radius: float | None = None,
) -> list[str]:
    """The gene panel of a group of slides (STEvs D.1.4; ``docs/DESIGN.md`` "Genes").

    1. Candidates: genes present in every slide (intersection of ``var_names``) and detected
       (count > 0) in at least ``min_spot_fraction`` of the spots of every slide, so no slide
       contributes a gene it (almost) never measures: such a gene would be constant in that
       slide's truth and count as correlation 0.
    2. ``method="svg"``: Moran's I per slide (:func:`morans_i`, log1p-CP10k, grid-neighbour
       weights, or k-NN ones with ``n_neighbors``); SVG of the group when the BH-adjusted
       p < ``fdr`` on at least ``min(min_slides, n_slides)`` slides; ranked by mean Moran's I
       over the slides.
    3. When fewer than ``n_genes`` SVGs pass, or ``method="hvg"``, the panel is filled with
       the most highly variable remaining candidates (:func:`highly_variable_genes`); the fill
       is logged as a warning.

    Deterministic: no randomness, ties keep the first slide's gene order.

    Parameters
    ----------
    slides
        One group's slides, raw counts in ``X`` and spot centres in ``obsm["spatial"]``.
    n_genes
        Panel size; fewer are returned when fewer candidates exist.

    Returns
    -------
    list of str
        Gene names, SVGs first (by mean Moran's I), then HVG fill.
    """
    slides = _check_slides(slides)
    if method not in ("svg", "hvg"):
        raise InputError(f"method must be 'svg' or 'hvg', got {method!r}.")
    if n_genes < 1:
        raise InputError(f"n_genes must be positive, got {n_genes}.")
    candidates = _shared_expressed_genes(slides, min_spot_fraction)
    selected: list[str] = []
    if method == "svg":
        table = spatially_variable_genes(
            slides,
            candidates,
            fdr=fdr,
            min_slides=min_slides,
            n_neighbors=n_neighbors,
            radius=radius,
        )
        selected = [str(g) for g in table.index[table["is_svg"]][:n_genes]]
        logger.info(
            "gene selection: %d SVGs (FDR < %g on >= %d slides) among %d candidates; %d kept.",
            int(table["is_svg"].sum()),
            fdr,
            min(min_slides, len(slides)),
            len(candidates),
            len(selected),
        )
    if len(selected) < n_genes and len(selected) < len(candidates):
        chosen = set(selected)
        remaining = [g for g in candidates if g not in chosen]
        fill = highly_variable_genes(slides, remaining)[: n_genes - len(selected)]
        if method == "svg":
            logger.warning(
                "gene selection: only %d SVGs pass; filling the panel with %d highly variable genes.",
                len(selected),
                len(fill),
            )
        selected += fill
    return selected


def align_genes(slides: Sequence[ad.AnnData], genes: Sequence[str]) -> list[ad.AnnData]:
    """Subset every slide to ``genes``, in that order (new AnnData objects; inputs untouched).

    Raises
    ------
    InputError
        When ``genes`` holds duplicates, or a slide lacks some of them (naming the slide, by
        ``uns["stinfer"]["sample_id"]`` or position, and the missing genes).
    """
    slides = _check_slides(slides)
    genes = [str(g) for g in genes]
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(duplicated):
        raise InputError(f"the gene list holds duplicates: {', '.join(duplicated[:5])}.")
    aligned = []
    for index, slide in enumerate(slides):
        missing = [g for g in genes if g not in slide.var_names]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise InputError(
                f"{_slide_name(slide, index)}: {len(missing)} of {len(genes)} genes are missing "
                f"({shown}); select genes on the whole cohort with select_genes()."
            )
        aligned.append(slide[:, genes].copy())
    return aligned

"""Normalisation, Moran's I and gene selection match direct references and planted signals."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from stinfer.errors import InputError
from stinfer.preprocess import (
    align_genes,
    grid_adjacency,
    grid_type,
    highly_variable_genes,
    morans_i,
    normalise_log1p_cp10k,
    select_genes,
    spatial_weights,
    spatially_variable_genes,
)


def _grid(side: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return np.column_stack([cols.ravel(), rows.ravel()]).astype(float) * 100.0


def _reference_morans_i(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Moran's I and its one-sided normal p-value, gene by gene (PySAL formulas)."""
    n = len(values)
    z = values - values.mean()
    s0 = weights.sum()
    statistic = (
        n / s0 * sum(weights[i, j] * z[i] * z[j] for i in range(n) for j in range(n)) / np.sum(z**2)
    )
    s1 = 0.5 * np.sum((weights + weights.T) ** 2)
    s2 = np.sum((weights.sum(axis=1) + weights.sum(axis=0)) ** 2)
    expected = -1 / (n - 1)
    variance = (n**2 * s1 - n * s2 + 3 * s0**2) / ((n**2 - 1) * s0**2) - expected**2
    return statistic, stats.norm.sf((statistic - expected) / np.sqrt(variance))


def _slide(counts: np.ndarray, coords: np.ndarray, genes: list[str], sample_id: str) -> ad.AnnData:
    slide = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=[f"{sample_id}_{i}" for i in range(len(counts))]),
        var=pd.DataFrame(index=genes),
    )
    slide.obsm["spatial"] = coords
    slide.uns["stinfer"] = {"sample_id": sample_id}
    return slide


def test_normalise_log1p_cp10k_matches_formula_and_leaves_input_untouched():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, (10, 6)).astype(float)
    counts[2] = 0
    original = counts.copy()
    totals = counts.sum(axis=1, keepdims=True)
    expected = np.where(totals > 0, np.log1p(counts / np.where(totals > 0, totals, 1) * 1e4), 0)
    np.testing.assert_allclose(normalise_log1p_cp10k(counts), expected, rtol=1e-12)
    sparse = sp.csr_matrix(counts)
    result = normalise_log1p_cp10k(sparse)
    assert sp.issparse(result)
    np.testing.assert_allclose(result.toarray(), expected, rtol=1e-12)
    np.testing.assert_array_equal(counts, original)
    np.testing.assert_array_equal(sparse.toarray(), original)


def test_the_earlier_spelling_normalize_log1p_cp10k_still_works():
    from stinfer.preprocess import normalize_log1p_cp10k

    assert normalize_log1p_cp10k is normalise_log1p_cp10k


def test_spatial_weights_are_row_standardised_knn_without_self():
    weights = spatial_weights(_grid(5), n_neighbors=4)
    np.testing.assert_allclose(np.asarray(weights.sum(axis=1)).ravel(), 1.0)
    assert weights.diagonal().sum() == 0
    assert np.all(np.diff(weights.indptr) == 4)


def test_morans_i_equals_loop_reference_and_fdr_equals_scipy():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 1000, (40, 2))
    counts = rng.poisson(2.0, (40, 7)).astype(float)
    counts[:, 2] += np.round(coords[:, 0] / 100)  # a spatial trend
    result = morans_i(counts, coords, n_neighbors=5, gene_names=list("abcdefg"))
    weights = spatial_weights(coords, n_neighbors=5).toarray()
    normalised = normalise_log1p_cp10k(counts)
    for gene, name in enumerate("abcdefg"):
        statistic, pval = _reference_morans_i(normalised[:, gene], weights)
        assert result.loc[name, "I"] == pytest.approx(statistic, abs=1e-10)
        assert result.loc[name, "pval"] == pytest.approx(pval, rel=1e-8, abs=1e-300)
    np.testing.assert_allclose(
        result["pval_fdr"], stats.false_discovery_control(result["pval"], method="bh")
    )
    two_sided = morans_i(counts, coords, n_neighbors=5, alternative="two-sided")
    z = stats.norm.isf(result["pval"].to_numpy())
    np.testing.assert_allclose(two_sided["pval"], 2 * stats.norm.sf(np.abs(z)), rtol=1e-6)


def test_planted_smooth_gene_is_significant_and_noise_is_not():
    rng = np.random.default_rng(2)
    coords = _grid(20)
    smooth = 5 + 20 * np.exp(-np.sum((coords - 1000) ** 2, axis=1) / (2 * 500**2))
    counts = np.column_stack([rng.poisson(smooth), rng.poisson(10, (400, 3))]).astype(float)
    shuffled = counts.copy()
    shuffled[:, 0] = rng.permutation(counts[:, 0])
    result = morans_i(counts, coords)
    assert result["pval"].iloc[0] < 1e-10 and result["I"].iloc[0] > 0.3
    noise = morans_i(shuffled, coords)
    assert noise["pval_fdr"].min() > 0.05


def test_constant_gene_has_no_moran_statistic_and_is_not_a_hypothesis():
    rng = np.random.default_rng(3)
    counts = rng.poisson(4, (30, 3)).astype(float)
    counts[:, 1] = 0
    result = morans_i(counts, rng.uniform(0, 10, (30, 2)))
    assert result.iloc[1].isna().all()
    finite = result["pval"].notna()
    np.testing.assert_allclose(
        result.loc[finite, "pval_fdr"], stats.false_discovery_control(result.loc[finite, "pval"])
    )


def _square_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """``array_row``, ``array_col`` of a ``side`` x ``side`` legacy-ST grid."""
    return np.indices((side, side)).reshape(2, -1)


def _hex_grid(n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``array_row``, ``array_col`` of a Visium grid: ``row + col`` even, rows 2 columns apart."""
    rows, cols = np.indices((n_rows, n_cols)).reshape(2, -1)
    on_lattice = rows % 2 == cols % 2
    return rows[on_lattice], cols[on_lattice]


def _grid_slide(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, hexagonal: bool):
    """A slide of ``values`` on a grid, spot centres in microns (Visium or ST pitch)."""
    if hexagonal:
        coords = np.column_stack([cols * 50.0, rows * 50.0 * np.sqrt(3)])
    else:
        coords = np.column_stack([cols * 200.0, rows * 200.0])
    slide = ad.AnnData(
        X=np.asarray(values, dtype=np.float64).reshape(len(rows), -1),
        obs=pd.DataFrame(
            {"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(len(rows))]
        ),
    )
    slide.obsm["spatial"] = coords
    return slide


def _dense_morans_i(values: np.ndarray, adjacency: np.ndarray) -> np.ndarray:
    """Moran's I of every column with row-standardised ``adjacency``, dense numpy."""
    weights = adjacency / adjacency.sum(axis=1, keepdims=True)
    z = values - values.mean(axis=0)
    return len(values) / weights.sum() * np.sum(z * (weights @ z), axis=0) / np.sum(z**2, axis=0)


def test_grid_adjacency_links_4_neighbours_on_a_square_grid_and_6_on_a_hex_grid():
    rows, cols = _square_grid(5)
    square = grid_adjacency(rows, cols)
    degree = np.diff(square.indptr).reshape(5, 5)
    assert grid_type(rows, cols) == "square"
    assert (degree[1:-1, 1:-1] == 4).all() and degree[0, 0] == 2 and degree[0, 2] == 3
    assert (square != square.T).nnz == 0 and square.diagonal().sum() == 0
    centre = 12  # (2, 2)
    linked = sorted(zip(rows[square[centre].indices], cols[square[centre].indices], strict=True))
    assert linked == [(1, 2), (2, 1), (2, 3), (3, 2)]

    rows, cols = _hex_grid(7, 14)
    hexagonal = grid_adjacency(rows, cols)
    assert grid_type(rows, cols) == "hex"
    interior = (rows > 0) & (rows < 6) & (cols > 1) & (cols < 12)
    assert (np.diff(hexagonal.indptr)[interior] == 6).all()
    assert (hexagonal != hexagonal.T).nnz == 0
    slide = _grid_slide(np.zeros(len(rows)), rows, cols, hexagonal=True)
    source, target = hexagonal.nonzero()
    distances = np.linalg.norm(
        slide.obsm["spatial"][source] - slide.obsm["spatial"][target], axis=1
    )
    np.testing.assert_allclose(distances, 100.0)  # every grid neighbour is one pitch away


def test_grid_adjacency_refuses_two_spots_on_one_grid_position():
    with pytest.raises(InputError, match="share a grid position"):
        grid_adjacency(np.array([0, 0, 1]), np.array([0, 0, 1]))


@pytest.mark.parametrize("hexagonal", [True, False], ids=["visium_hex", "st_square"])
def test_morans_i_of_a_slide_uses_grid_neighbours_and_equals_dense_reference_and_scanpy(
    hexagonal,
):
    import scanpy as sc

    rows, cols = _hex_grid(12, 24) if hexagonal else _square_grid(12)
    rng = np.random.default_rng(5)
    values = np.column_stack(
        [cols + rng.normal(0, 3, len(rows)), rng.normal(size=len(rows)), np.sin(rows / 2.0)]
    )
    slide = _grid_slide(values, rows, cols, hexagonal)
    result = morans_i(slide, normalise=False)
    adjacency = grid_adjacency(rows, cols).toarray()
    expected = _dense_morans_i(values, adjacency)
    np.testing.assert_allclose(result["I"], expected, rtol=1e-10)
    weights = sp.csr_matrix(adjacency / adjacency.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(result["I"], sc.metrics.morans_i(weights, values.T), rtol=1e-6)
    _, pval = _reference_morans_i(values[:, 0], weights.toarray())
    assert result["pval"].iloc[0] == pytest.approx(pval, rel=1e-8, abs=1e-300)
    if not hexagonal:  # k = 6 nearest spots would add 2 of the 4 equidistant diagonals
        assert not np.allclose(result["I"], morans_i(slide, normalise=False, n_neighbors=6)["I"])
    no_grid = slide.copy()
    no_grid.obs = no_grid.obs.drop(columns=["array_row", "array_col"])
    knn = _dense_morans_i(values, spatial_weights(slide.obsm["spatial"], 6).toarray() > 0)
    np.testing.assert_allclose(morans_i(no_grid, normalise=False)["I"], knn, rtol=1e-10)
    scattered = slide[::5].copy()  # a subsample: most spots have no grid neighbour left
    knn = _dense_morans_i(values[::5], spatial_weights(scattered.obsm["spatial"], 6).toarray() > 0)
    np.testing.assert_allclose(morans_i(scattered, normalise=False)["I"], knn, rtol=1e-10)


def test_checkerboard_has_morans_i_minus_one_and_a_smooth_gradient_a_positive_one():
    rows, cols = _square_grid(6)
    checkerboard = ((rows + cols) % 2).astype(float)
    # Closed form: every neighbour of a spot has the opposite centred value, so z'Wz = -z'z
    # with row-standardised W and S0 = n: I = -1 exactly.
    statistic = morans_i(_grid_slide(checkerboard, rows, cols, False), normalise=False)["I"]
    assert statistic.iloc[0] == pytest.approx(-1.0, abs=1e-12)
    gradient = rows + cols / 10.0
    statistic = morans_i(_grid_slide(gradient, rows, cols, False), normalise=False)["I"]
    adjacency = grid_adjacency(rows, cols).toarray()
    assert statistic.iloc[0] == pytest.approx(_dense_morans_i(gradient[:, None], adjacency)[0])
    assert statistic.iloc[0] > 0.6


def _cohort(rng: np.random.Generator, n_slides: int = 3) -> list[ad.AnnData]:
    """Slides sharing SVG_A (strong), SVG_B (weaker), SVG_C (SVG on slide 0 only)
    and 80 Poisson noise genes; ONLY_ONE is on slide 1 only.

    The noise genes carry most of each spot's library, as in real data, so CP10k normalisation
    does not imprint the SVGs' pattern on them.
    """
    coords = _grid(15)
    x, y = coords[:, 0] / 1400, coords[:, 1] / 1400
    slides = []
    for index in range(n_slides):
        columns = {
            "SVG_A": rng.poisson(2 + 30 * x),
            "SVG_B": rng.poisson(5 + 8 * y),
            "SVG_C": rng.poisson(2 + 30 * (y if index == 0 else rng.permutation(y))),
        }
        for noise in range(80):
            columns[f"N{noise}"] = rng.poisson(rng.gamma(2, 3), len(coords))
        if index == 1:
            columns["ONLY_ONE"] = rng.poisson(5 + 30 * x)
        genes = list(columns)[::-1] if index == 2 else list(columns)
        slides.append(
            _slide(np.column_stack([columns[g] for g in genes]), coords, genes, f"S{index}")
        )
    return slides


def test_svg_table_calls_exactly_the_planted_genes():
    slides = _cohort(np.random.default_rng(4))
    table = spatially_variable_genes(slides)
    assert set(table.index[table["is_svg"]]) == {"SVG_A", "SVG_B"}
    assert table.loc["SVG_C", "n_significant"] == 1
    assert "ONLY_ONE" not in table.index
    single = spatially_variable_genes(slides[:1])
    assert set(single.index[:3]) == {"SVG_A", "SVG_B", "SVG_C"}  # by Moran's I
    assert single.loc[["SVG_A", "SVG_B", "SVG_C"], "is_svg"].all()


def test_select_genes_returns_planted_svgs_first_and_respects_min_slides(caplog):
    slides = _cohort(np.random.default_rng(4))
    with caplog.at_level(logging.WARNING, logger="stinfer"):
        panel = select_genes(slides, n_genes=5)
    assert panel[:2] == ["SVG_A", "SVG_B"]
    assert len(panel) == 5 and len(set(panel)) == 5
    assert "ONLY_ONE" not in panel
    assert "highly variable" in caplog.text  # SVG_C is SVG on one slide only: HVG fill
    candidates = [g for g in slides[0].var_names if g not in ("SVG_A", "SVG_B")]
    assert panel[2:] == highly_variable_genes(slides, candidates)[:3]  # HVG fill, in rank
    single = select_genes(slides[:1], n_genes=3)
    assert single == ["SVG_A", "SVG_C", "SVG_B"]  # min(2, 1) = 1 slide suffices; by I
    assert select_genes(slides, n_genes=5) == panel  # deterministic


def test_select_genes_hvg_method_puts_an_overdispersed_gene_first():
    rng = np.random.default_rng(5)
    coords, means = _grid(15), rng.gamma(2, 3, 300)
    genes = [f"N{g}" for g in range(300)] + ["BURSTY"]
    slides = []
    for index in range(2):
        counts = rng.poisson(means, (len(coords), 300))
        bursty = rng.negative_binomial(0.2, 0.2 / (0.2 + 6.0), len(coords))
        slides.append(_slide(np.column_stack([counts, bursty]), coords, genes, f"S{index}"))
    panel = select_genes(slides, method="hvg", n_genes=4)
    assert panel[0] == "BURSTY" and len(panel) == 4
    with pytest.raises(InputError, match="method"):
        select_genes(slides, method="moran")


HVG_THREADS_SCRIPT = """
import numpy as np, scipy.sparse as sp, anndata as ad, torch
torch.set_num_threads(1)
from stinfer.preprocess import highly_variable_genes
counts = sp.csr_matrix(np.random.default_rng(0).poisson(3.0, (500, 40)).astype(np.float32))
slide = ad.AnnData(counts)
highly_variable_genes([slide], list(slide.var_names))
print(torch.get_num_threads())
"""


def test_hvg_ranking_leaves_torch_on_the_threads_it_was_given():
    """scanpy's numba (OpenMP) kernels reset the OpenMP thread count shared with torch; a
    one-thread run must stay on one thread after gene selection (fresh process: numba sets it
    when its threading layer first launches)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", HVG_THREADS_SCRIPT], capture_output=True, text=True, check=True
    )
    assert result.stdout.split()[-1] == "1"


def test_align_genes_orders_genes_and_names_slide_with_missing_genes():
    slides = _cohort(np.random.default_rng(6), n_slides=3)
    aligned = align_genes(slides, ["N3", "SVG_A"])
    for original, subset in zip(slides, aligned, strict=True):
        assert subset.var_names.tolist() == ["N3", "SVG_A"]
        np.testing.assert_array_equal(subset.X.toarray(), original[:, ["N3", "SVG_A"]].X.toarray())
    assert slides[0].n_vars == 83
    with pytest.raises(InputError, match=r"S0: 1 of 2 genes are missing \(ONLY_ONE\)"):
        align_genes(slides, ["SVG_A", "ONLY_ONE"])

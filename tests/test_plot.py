"""Figures a paper can use: shared colour scales, labelled colourbars, titles, scale bars."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import scipy.sparse as sp

from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.plot import (
    SCALE_BAR_GID,
    nice_length,
    plot_slide_overview,
    plot_spatial_maps,
    robust_limit,
    save_figure,
)

GENES = ["G000", "G001"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    config = SyntheticConfig(target_spots=60, n_genes=20, n_sections=1, seed=2)
    return make_synthetic_sections(tmp_path_factory.mktemp("images"), config)[0]


@pytest.fixture()
def prediction(slide):
    """A "prediction" on another scale than the truth: three times the true mean, plus one."""
    predicted = slide.copy()
    predicted.X = np.asarray(slide.layers["true_mean"], dtype=np.float32) * 3 + 1
    return predicted


def _scale_bars(ax) -> list:
    return [artist for artist in ax.get_children() if artist.get_gid() == SCALE_BAR_GID]


def _colourbar_axes(fig, panels) -> list:
    return [ax for ax in fig.axes if ax not in set(np.ravel(panels))]


def test_truth_and_prediction_of_a_gene_share_one_colour_scale(slide, prediction):
    fig = plot_spatial_maps(slide, {"model": prediction}, GENES)
    axes = np.array(fig.axes[: 2 * len(GENES)]).reshape(len(GENES), 2)
    for row in range(len(GENES)):
        truth_norm = axes[row, 0].collections[0].norm
        predicted_norm = axes[row, 1].collections[0].norm
        assert (truth_norm.vmin, truth_norm.vmax) == (predicted_norm.vmin, predicted_norm.vmax)
    # one colourbar per gene, not per panel
    assert len(_colourbar_axes(fig, axes)) == len(GENES)
    plt.close(fig)


def test_every_colourbar_is_labelled(slide, prediction):
    maps = plot_spatial_maps(slide, {"model": prediction}, GENES)
    overview = plot_slide_overview(slide, GENES[0])
    for fig, n_panels in ((maps, 2 * len(GENES)), (overview, 3)):
        colourbars = _colourbar_axes(fig, fig.axes[:n_panels])
        assert colourbars
        assert all(ax.get_ylabel().strip() for ax in colourbars)
        plt.close(fig)


def test_map_titles_name_the_slide_and_the_per_gene_pcc(slide, prediction):
    sample = slide.uns["stinfer"]["sample_id"]
    pcc = {"model": {gene: 0.5 for gene in GENES}}
    fig = plot_spatial_maps(slide, {"model": prediction}, GENES, pcc)
    titles = [ax.get_title() for ax in fig.axes[: 2 * len(GENES)]]
    assert all(sample in title for title in titles)
    assert all("PCC 0.50" in title for title in titles[1::2])
    plt.close(fig)


def test_a_scale_bar_is_drawn_only_when_the_pixel_size_is_known(slide, prediction):
    fig = plot_slide_overview(slide, GENES[0])
    assert _scale_bars(fig.axes[0])
    plt.close(fig)
    fig = plot_spatial_maps(slide, {"model": prediction}, GENES)
    assert _scale_bars(fig.axes[0])
    plt.close(fig)

    unknown = slide.copy()
    unknown.uns["stinfer"] = {**slide.uns["stinfer"], "pixel_size_um": None}
    fig = plot_slide_overview(unknown, GENES[0])
    assert not any(_scale_bars(ax) for ax in fig.axes)
    plt.close(fig)


def test_scale_bar_lengths_are_round_numbers():
    assert [nice_length(x) for x in (0.7, 3.0, 19.0, 260.0, 1000.0)] == [0.5, 2, 10, 200, 1000]


def test_one_outlying_spot_does_not_set_the_count_scale(slide, tmp_path):
    counts = slide.X.toarray()
    counts[0, 0] = 50 * counts[:, 0].max() + 500
    outlier = slide.copy()
    outlier.X = sp.csr_matrix(counts)
    assert robust_limit(counts[:, 0]) < counts[:, 0].max()
    fig = plot_slide_overview(outlier, "G000")
    norm = fig.axes[2].collections[0].norm
    assert norm.vmin == 0 and 0 < norm.vmax < counts[:, 0].max()
    save_figure(fig, tmp_path / "overview.png")
    assert (tmp_path / "overview.png").stat().st_size > 0


def test_robust_limit_never_collapses_the_scale():
    assert robust_limit(np.zeros(10)) == 1.0
    assert robust_limit(np.r_[np.zeros(200), 7.0]) == 7.0  # a gene seen in under 1% of spots
    assert robust_limit(np.array([np.nan, np.inf])) == 1.0


def test_many_models_wrap_onto_rows_of_at_most_max_columns_panels(slide, prediction):
    eight = {f"model {index}": prediction for index in range(8)}
    four = {f"model {index}": prediction for index in range(4)}
    fig = plot_spatial_maps(slide, eight, GENES, max_columns=5)
    narrow = plot_spatial_maps(slide, four, GENES, max_columns=5)
    panels = fig.axes[: 2 * 5 * len(GENES)]
    assert panels[0].get_subplotspec().get_gridspec().get_geometry() == (2 * len(GENES), 5)
    titles = [ax.get_title() for ax in panels if ax.get_visible()]
    for gene in GENES:
        gene_titles = [title for title in titles if title.startswith(f"{gene} ")]
        assert gene_titles[0].endswith("measured")
        for name in eight:
            assert sum(title.endswith(f"\n{name}") for title in gene_titles) == 1
    # the truth opens each gene's first row; the one spare panel of each gene is hidden
    assert [ax.get_visible() for ax in panels].count(False) == len(GENES)
    assert _scale_bars(panels[0]) and _scale_bars(panels[2 * 5])
    assert len(_colourbar_axes(fig, panels)) == len(GENES)
    assert fig.get_size_inches()[0] == narrow.get_size_inches()[0]
    plt.close(fig)
    plt.close(narrow)

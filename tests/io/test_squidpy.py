"""squidpy reads what stinfer writes, with no extra arguments (optional: needs squidpy).

squidpy is not a dependency of stinfer (it pulls in dask, spatialdata, geopandas, ...), so these
tests skip where it is not installed; install it beside stinfer (`pip install squidpy`) to run
them. scanpy's own plotting is tested in test_scanpy_spatial.py on every kind of slide.
"""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest
from PIL import Image

from stinfer.io import make_slide, prepare_for_h5ad
from stinfer.io.atomic import write_h5ad

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sq = pytest.importorskip("squidpy", reason="squidpy is optional; pip install squidpy to run")


def written_slide(tmp_path, with_image: bool) -> ad.AnnData:
    rows, cols = np.divmod(np.arange(64), 8)
    xy = np.stack([cols, rows], axis=1) * 50.0 + 40.0
    image = None
    if with_image:
        image = tmp_path / "he.png"
        Image.fromarray(np.full((480, 480, 3), 200, np.uint8)).save(image)
    slide = make_slide(
        np.random.default_rng(0).poisson(3.0, (64, 3)),
        [f"{r}x{c}" for r, c in zip(rows, cols, strict=True)],
        ["A", "B", "C"],
        xy,
        sample_id="S1",
        source_format="synthetic",
        source="test",
        image_path=None if image is None else str(image),
        pixel_size_um=1.0,
        spot_diameter_px=25.0,
    )
    slide.obs["array_row"], slide.obs["array_col"] = rows, cols
    write_h5ad(prepare_for_h5ad(slide), tmp_path / "s.h5ad")
    return ad.read_h5ad(tmp_path / "s.h5ad")


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "counts-only"])
def test_squidpy_plots_and_builds_grid_neighbours_without_arguments(tmp_path, with_image):
    adata = written_slide(tmp_path, with_image)
    sq.pl.spatial_scatter(adata, color="A")
    axes = plt.gcf().axes
    assert axes and axes[0].get_title() == "A"
    plt.close("all")
    sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=4)
    degree = np.asarray(adata.obsp["spatial_connectivities"].sum(axis=1)).ravel()
    assert degree.max() == 4 and degree.min() == 2  # a square grid: corners have 2

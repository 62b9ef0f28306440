"""The slide accessors of stinfer.io.slide_data: names, coordinates, gene-panel counts, dense/sparse."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stinfer.errors import InputError
from stinfer.io.slide_data import (
    as_csr,
    as_dense,
    check_genes,
    image_pixel_size_um,
    make_slide,
    panel_counts,
    panel_counts_csr,
    slide_id,
    slide_spot_names,
    spot_coordinates_px,
    spot_coordinates_um,
    spot_obs,
)


def small_slide(pixel_size_um: float | None = 0.5, image_scale: float = 1.0) -> ad.AnnData:
    counts = np.array([[1, 0, 3], [0, 2, 0], [4, 0, 5]])
    xy = np.array([[10.0, 0.0], [20.0, 0.0], [30.0, 6.0]])
    return make_slide(
        counts,
        ["s0", "s1", "s2"],
        ["A", "B", "C"],
        xy,
        sample_id="C2",
        source_format="h5ad",
        source="test",
        pixel_size_um=pixel_size_um,
        image_scale=image_scale,
    )


def test_slide_id_reads_the_sample_id_and_falls_back_only_when_asked():
    slide = small_slide()
    assert slide_id(slide) == "C2"
    bare = ad.AnnData(np.zeros((2, 2)))
    assert slide_id(bare, default="slide 3") == "slide 3"
    with pytest.raises(InputError, match="no uns\\['stinfer'\\]"):
        slide_id(bare)


def test_spot_names_carry_the_sample_id_once_and_keep_the_file_id_in_obs():
    slide = small_slide()
    assert list(slide.obs_names) == ["C2_s0", "C2_s1", "C2_s2"]
    assert list(slide.obs["spot_id"]) == ["s0", "s1", "s2"]
    assert isinstance(slide.obs["sample_id"].dtype, pd.CategoricalDtype)
    assert list(slide.obs["sample_id"]) == ["C2"] * 3
    assert list(slide_spot_names("C2", ["C2_s0", "s1"])) == ["C2_s0", "C2_s1"]
    # a slide rebuilt from its own names (a stinfer-written h5ad) is not prefixed twice
    again = make_slide(
        slide.X,
        slide.obs_names,
        slide.var_names,
        slide.obsm["spatial"],
        sample_id="C2",
        source_format="h5ad",
        source="test",
        obs_columns=slide.obs[["spot_id", "sample_id"]],
    )
    assert list(again.obs_names) == list(slide.obs_names)
    assert list(again.obs["spot_id"]) == ["s0", "s1", "s2"]


def test_spots_of_two_slides_with_the_same_ids_stay_apart_when_concatenated():
    first = small_slide()
    second = make_slide(
        np.ones((3, 3)),
        ["s0", "s1", "s2"],
        ["A", "B", "C"],
        np.zeros((3, 2)),
        sample_id="C3",
        source_format="h5ad",
        source="test",
    )
    both = ad.concat([first, second])
    assert both.obs_names.is_unique and both.n_obs == 6
    assert list(both.obs["sample_id"]) == ["C2"] * 3 + ["C3"] * 3
    assert list(both.obs["spot_id"]) == ["s0", "s1", "s2"] * 2


def test_spot_obs_copies_names_grid_and_sample_of_the_slide():
    slide = make_slide(
        np.ones((2, 1)),
        ["1x2", "3x4"],
        ["A"],
        np.zeros((2, 2)),
        sample_id="C2",
        source_format="legacy-st",
        source="test",
        array_row=[2, 4],
        array_col=[1, 3],
        obs_columns=pd.DataFrame({"domain": ["tumour", "stroma"]}),
    )
    obs = spot_obs(slide)
    assert list(obs.index) == ["C2_1x2", "C2_3x4"]
    assert list(obs.columns) == ["sample_id", "spot_id", "array_row", "array_col"]
    assert list(obs["array_row"]) == [2, 4] and list(obs["array_col"]) == [1, 3]
    bare = ad.AnnData(np.zeros((2, 1)))
    bare.uns["stinfer"] = {"sample_id": "S9"}
    assert list(spot_obs(bare)["sample_id"]) == ["S9", "S9"]


def test_coordinates_are_pixels_or_microns_and_centre_moves_the_origin():
    slide = small_slide(pixel_size_um=0.5)
    np.testing.assert_array_equal(spot_coordinates_px(slide), [[10, 0], [20, 0], [30, 6]])
    np.testing.assert_allclose(spot_coordinates_um(slide), [[5, 0], [10, 0], [15, 3]])
    np.testing.assert_allclose(
        spot_coordinates_um(slide, centre_px=[20.0, 2.0]), [[-5, -1], [0, -1], [5, 2]]
    )
    unknown = small_slide(pixel_size_um=None)
    np.testing.assert_allclose(spot_coordinates_um(unknown), spot_coordinates_px(unknown))
    del unknown.obsm["spatial"]
    with pytest.raises(InputError, match="no obsm\\['spatial'\\]"):
        spot_coordinates_px(unknown)


def test_image_pixel_size_divides_the_slide_pixel_size_by_the_image_scale():
    assert image_pixel_size_um(small_slide(pixel_size_um=0.5, image_scale=0.25)) == 2.0
    assert image_pixel_size_um(small_slide(pixel_size_um=None)) is None


def test_panel_counts_follow_the_gene_order_dense_or_sparse_and_name_missing_genes():
    slide = small_slide()
    dense = panel_counts(slide, ["C", "A"])
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, [[3, 1], [0, 0], [5, 4]])
    assert panel_counts(slide, ["C", "A"], dtype=np.float64).dtype == np.float64
    sparse = panel_counts_csr(slide, ["C", "A"])
    assert sp.isspmatrix_csr(sparse) and sparse.dtype == np.float32
    np.testing.assert_array_equal(sparse.toarray(), dense)
    with pytest.raises(InputError, match="'C2' lacks 1 of the 2 genes"):
        check_genes(slide, ["A", "ERBB2"])
    with pytest.raises(InputError, match="ERBB2"):
        panel_counts(slide, ["A", "ERBB2"])


def test_as_dense_and_as_csr_convert_either_way_without_copying_what_fits():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert as_dense(array) is array
    assert as_dense(array, np.float32) is array
    np.testing.assert_array_equal(as_dense(sp.csr_matrix(array), np.float64), array)
    csr = as_csr(array)
    assert sp.isspmatrix_csr(csr) and csr.dtype == np.float32
    np.testing.assert_array_equal(as_csr(sp.csc_matrix(array)).toarray(), array)

"""The slide accessors of stinfer.io.slide_data: names, coordinates, gene-panel counts, dense/sparse."""

from __future__ import annotations

import anndata as ad
import numpy as np
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
    spot_coordinates_px,
    spot_coordinates_um,
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

"""The one convention for the expression values of every prediction (X counts, log1p layer)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from stinfer.errors import InputError
from stinfer.io.prediction_layout import (
    annotate_counts,
    annotate_log1p_cp10k,
    expected_counts,
)


def consistent(prediction: ad.AnnData) -> None:
    library = prediction.obs["library_size"].to_numpy(dtype=np.float64)[:, None]
    expected = np.log1p(np.asarray(prediction.X, dtype=np.float64) / library * 1e4)
    np.testing.assert_allclose(prediction.layers["log1p_cp10k"], expected, rtol=1e-5, atol=1e-6)


def test_a_count_prediction_gets_the_log1p_cp10k_layer_over_its_predicted_genes():
    counts = np.array([[1.0, 3.0, 6.0], [0.5, 0.5, 1.0]], dtype=np.float32)
    prediction = annotate_counts(ad.AnnData(X=counts.copy()))
    consistent(prediction)
    np.testing.assert_allclose(prediction.obs["library_size"], [10.0, 2.0])
    record = prediction.uns["stinfer"]["expression"]
    assert record["normalisation_panel"] == "the 3 predicted genes"


def test_a_log1p_prediction_is_back_transformed_with_the_measured_panels_library():
    values = np.log1p(np.array([[1000.0, 20.0], [5.0, 0.0]], dtype=np.float32))
    prediction = annotate_log1p_cp10k(ad.AnnData(X=values.copy()), np.array([500.0, 0.0]), 40)
    np.testing.assert_allclose(prediction.X, [[50.0, 1.0], [5.0, 0.0]], rtol=1e-5)  # 0: CP10k
    np.testing.assert_allclose(prediction.layers["log1p_cp10k"], values)
    consistent(prediction)
    record = prediction.uns["stinfer"]["expression"]
    assert record["normalisation_panel"] == "the measured panel of 40 genes"


def test_both_kinds_state_the_same_convention():
    counts = annotate_counts(ad.AnnData(X=np.ones((2, 2), dtype=np.float32)))
    log1p = annotate_log1p_cp10k(ad.AnnData(X=np.ones((2, 2), dtype=np.float32)), np.ones(2), 5)
    first, second = (p.uns["stinfer"]["expression"] for p in (counts, log1p))
    assert set(first) == set(second)
    for key in ("X", "library_size", "layers"):
        assert first[key] == second[key]


def test_evaluation_refuses_an_older_file_with_log1p_in_x():
    older = ad.AnnData(X=np.ones((2, 2), dtype=np.float32))
    older.uns["coxformer_spatial"] = {"scale": "log1p_cp10k"}
    with pytest.raises(InputError, match="re-run `stinfer impute`"):
        expected_counts(older)
    plain = ad.AnnData(X=np.ones((2, 2), dtype=np.float32))  # e.g. written by another tool
    assert expected_counts(plain) is plain.X

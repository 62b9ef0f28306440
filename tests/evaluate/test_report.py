"""The benchmark report: mean +/- sd tables with the best in bold."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stinfer.evaluate.report import format_table


def test_best_is_bold_lowest_mse_highest_correlation_and_ties_share_it():
    stats = pd.DataFrame(
        {
            "model": ["a", "b", "c"],
            "mse_mean": [0.5, 0.2, 0.3],
            "mse_sd": [0.01, 0.02, np.nan],
            "pcc_median_mean": [0.4, 0.4, 0.1],
            "pcc_median_sd": [0.1, 0.1, 0.1],
            "ari_truth_mean": [0.9, 0.9, 0.9],
        }
    )
    table = format_table(
        stats, "model", [("mse", "MSE"), ("pcc_median", "PCC"), ("ari_truth", "ref")]
    )
    lines = table.splitlines()
    assert lines[0] == "| model | MSE | PCC | ref |"
    assert lines[2] == "| a | 0.500 ± 0.010 | **0.400 ± 0.100** | 0.900 |"
    assert lines[3] == "| b | **0.200 ± 0.020** | **0.400 ± 0.100** | 0.900 |"
    assert lines[4] == "| c | 0.300 | 0.100 ± 0.100 | 0.900 |"  # one run: no sd


def test_columns_without_values_are_left_out():
    stats = pd.DataFrame({"model": ["a"], "mse_mean": [0.1], "ari_mean": [np.nan]})
    assert format_table(stats, "model", [("mse", "MSE"), ("ari", "ARI")]).splitlines()[0] == (
        "| model | MSE |"
    )

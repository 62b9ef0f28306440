"""Held-out genes protocol: the split, the shuffled control, the metrics, the full protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stinfer.errors import InputError
from stinfer.evaluate.held_out_genes import (
    held_out_genes_evaluation,
    held_out_metrics,
    shuffle_embeddings,
    split_genes,
)


def test_split_is_seeded_disjoint_and_holds_out_the_fraction():
    genes = [f"g{i}" for i in range(101)]
    train, test = split_genes(genes, 0.2, seed=4)
    assert len(test) == 20 and len(train) == 81
    assert not set(train) & set(test) and set(train) | set(test) == set(genes)
    assert split_genes(genes, 0.2, seed=4) == (train, test)
    assert split_genes(genes, 0.2, seed=5)[1] != test
    with pytest.raises(InputError):
        split_genes(genes[:2], 0.2)


def test_shuffled_embeddings_keep_genes_and_vectors_but_not_their_pairing():
    table = pd.DataFrame(np.arange(20.0).reshape(10, 2), index=[f"g{i}" for i in range(10)])
    shuffled = shuffle_embeddings(table, seed=0)
    assert list(shuffled.index) == list(table.index)
    assert sorted(map(tuple, shuffled.to_numpy())) == sorted(map(tuple, table.to_numpy()))
    assert not np.array_equal(shuffled.to_numpy(), table.to_numpy())


def test_held_out_metrics_use_log1p_cp10k_correlations_and_log1p_mse():
    rng = np.random.default_rng(2)
    truth = rng.random((30, 4)) * 3
    pred = truth + 0.1 * rng.standard_normal((30, 4))
    metrics = held_out_metrics(pred, truth)
    pcc = [np.corrcoef(np.clip(pred[:, g], 0, None), truth[:, g])[0, 1] for g in range(4)]
    assert metrics["pcc_median"] == pytest.approx(np.median(pcc))
    assert metrics["mse"] == pytest.approx(np.mean((np.clip(pred, 0, None) - truth) ** 2))
    assert metrics["n_test_genes"] == 4


def test_model_beats_both_baselines_on_held_out_planted_module_genes(tmp_path):
    """Issue 6 acceptance (synthetic): median PCC >= 0.6, above mean profile and tuned k-NN."""
    from stinfer.data.synthetic import (
        SyntheticConfig,
        make_synthetic_sections,
        planted_gene_embeddings,
    )
    from stinfer.models.coxformer_spatial import coxformer_spatial_config

    config = SyntheticConfig(n_sections=1, target_spots=400, n_genes=200, seed=3)
    slide = make_synthetic_sections(tmp_path, config)[0]
    embeddings = planted_gene_embeddings(config, dim=32)
    model_config = coxformer_spatial_config("fast", progress_bar=False, min_spot_fraction=0.05)
    result = held_out_genes_evaluation(slide, embeddings, "location", model_config, 0.2, seed=0)
    metrics = result["metrics"]
    for name, values in metrics.items():
        print(name, {k: v for k, v in values.items() if k != "cv_pcc_median"})
    model = metrics["coxformer"]["pcc_median"]
    assert model >= 0.6
    assert model > metrics["knn"]["pcc_median"] and model > metrics["mean_profile"]["pcc_median"]
    assert metrics["coxformer_shuffled"]["pcc_median"] < model - 0.2

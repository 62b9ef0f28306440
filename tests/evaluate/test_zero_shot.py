"""Zero-shot genes from H&E alone: STEvs predicts the panel, the CoxFormer readout the rest."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections, planted_gene_embeddings
from stinfer.errors import InputError
from stinfer.evaluate.zero_shot import zero_shot_evaluation
from stinfer.models.coxformer_spatial import coxformer_spatial_config
from stinfer.models.stevs import fast_preset
from stinfer.models.zero_shot import predict_unmeasured_genes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYNTHETIC = SyntheticConfig(n_sections=2, target_spots=250, n_genes=80, seed=3)


def quick_stevs():
    config = fast_preset()
    config.training.test_time_augmentation = False
    config.trainer = dataclasses.replace(config.trainer, max_epochs=20, progress_bar=False)
    return config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    train, test = make_synthetic_sections(tmp_path_factory.mktemp("zero_shot"), SYNTHETIC)
    embeddings = planted_gene_embeddings(SYNTHETIC, dim=32)
    readout = coxformer_spatial_config(
        "fast",
        training={"min_spot_fraction": 0.05},
        trainer={"progress_bar": False, "max_epochs": 40},
    )
    result = zero_shot_evaluation(
        [train],
        test,
        embeddings,
        n_panel_genes=60,
        seed=0,
        stevs_config=quick_stevs(),
        coxformer_config=readout,
        oracle=False,
    )
    return result, test, embeddings, readout


def test_zero_shot_beats_the_mean_profile_and_shuffled_embeddings_on_planted_modules(evaluated):
    """Held-out genes share programs with panel genes; the embeddings say which: the readout
    over the STEvs-predicted panel must use that, the shuffled table cannot."""
    result = evaluated[0]
    metrics = result["metrics"]
    for name, values in metrics.items():
        print(name, values)
    assert set(result["held_out_genes"]).isdisjoint(result["panel_genes"])
    assert len(result["held_out_genes"]) == 12 and len(result["panel_genes"]) == 48
    assert set(result["stevs"].genes) == set(result["panel_genes"])
    zero = metrics["zero_shot"]["pcc_median_depthnorm"]
    assert zero > metrics["mean_profile"]["pcc_median_depthnorm"] + 0.1
    assert zero > metrics["zero_shot_shuffled"]["pcc_median_depthnorm"] + 0.1
    assert zero > 0.3


def test_the_zero_shot_path_never_reads_the_test_slides_counts(evaluated, monkeypatch):
    """Poisoned test counts: the readout is handed the very same slide (the STEvs-predicted
    panel), and that slide is all it learns from; the readout itself is replaced by a recorder,
    so the check costs no training."""
    import stinfer.models.zero_shot as zero_shot

    result, test, embeddings, readout = evaluated
    handed: list = []

    class Recorder:
        def __init__(self, slide, table, genes, modality, config):
            handed.append((slide, list(genes), modality))
            raise RuntimeError("recorded")

    monkeypatch.setattr(zero_shot, "CoxFormerSpatial", Recorder)
    poisoned = test.copy()
    poisoned.X = np.random.default_rng(0).poisson(40.0, poisoned.shape).astype(np.float32)
    genes = result["held_out_genes"][:4]
    for slide in (test, poisoned):
        with pytest.raises(RuntimeError, match="recorded"):
            predict_unmeasured_genes(result["stevs"], slide, embeddings, genes, config=readout)
    (clean, clean_genes, modality), (dirty, dirty_genes, _) = handed
    np.testing.assert_array_equal(np.asarray(clean.X), np.asarray(dirty.X))
    assert clean.uns["stinfer"]["counts_are_predicted"] and modality == "spatial"
    assert clean_genes == dirty_genes == result["panel_genes"]
    expected = result["stevs"].predict(test).X
    np.testing.assert_allclose(np.asarray(clean.X), np.clip(expected, 0, None), rtol=1e-6)
    assert list(clean.obs_names) == list(test.obs_names)


def test_genes_in_the_panel_or_without_an_embedding_are_refused(evaluated):
    result, test, embeddings, _ = evaluated
    with pytest.raises(InputError, match="in the STEvs panel"):
        predict_unmeasured_genes(result["stevs"], test, embeddings, result["panel_genes"][:1])
    with pytest.raises(InputError, match="no embedding"):
        predict_unmeasured_genes(result["stevs"], test, embeddings, ["not_a_gene"])

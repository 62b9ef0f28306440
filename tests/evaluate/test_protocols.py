"""Protocols: seeded splits, cross-slice pairs, leave-one-patient-out, leakage-free runs."""

from __future__ import annotations

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stinfer.data.patches import PatchSpec
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.errors import InputError
from stinfer.evaluate.protocols import (
    SPLIT_KEY,
    aggregate,
    cross_slice_pairs,
    intra_slice_split,
    leave_one_patient_out,
    run_protocol,
    run_unit,
    strip_counts,
)
from stinfer.metrics import ExpressionMetrics
from stinfer.models.baselines import (
    CoordinateKNN,
    MeanExpression,
    PatchFeatureRidge,
    PatchFeatureRidgeConfig,
    prediction_anndata,
)

SMALL_PATCHES = PatchSpec(patch_size_um=160, target_pixel_size_um=8.0)  # 20 px: fast on a CPU


@pytest.fixture(scope="module")
def sections(tmp_path_factory) -> list[ad.AnnData]:
    config = SyntheticConfig(target_spots=120, n_genes=30, seed=3)
    return make_synthetic_sections(tmp_path_factory.mktemp("synthetic"), config)


# --------------------------------------------------------------------------- splits
def test_intra_slice_split_is_seeded_disjoint_covering_and_7_1_2():
    train, val, test = intra_slice_split(100, seed=7)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val, test])), np.arange(100))
    again = intra_slice_split(100, seed=7)
    for first, second in zip((train, val, test), again, strict=True):
        np.testing.assert_array_equal(first, second)
    assert not np.array_equal(intra_slice_split(100, seed=8)[2], test)


@pytest.mark.parametrize("n_spots", [3, 17, 181, 4000])
def test_intra_slice_split_covers_every_spot_once_for_any_size(n_spots):
    parts = intra_slice_split(n_spots, seed=0)
    assert sum(map(len, parts)) == n_spots
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n_spots))
    assert len(parts[2]) == max(1, round(0.2 * n_spots))


def test_intra_slice_split_rejects_ratios_that_do_not_sum_to_one():
    with pytest.raises(InputError, match="summing to 1"):
        intra_slice_split(10, 0, ratios=(0.7, 0.2, 0.2))


def test_cross_slice_pairs_train_on_each_and_test_on_every_other():
    pairs = cross_slice_pairs(["C2", "C3", "C4"])
    assert pairs == [
        ("C2", "C3"),
        ("C2", "C4"),
        ("C3", "C2"),
        ("C3", "C4"),
        ("C4", "C2"),
        ("C4", "C3"),
    ]
    with pytest.raises(InputError):
        cross_slice_pairs(["C2"])


def test_leave_one_patient_out_holds_out_each_patient_from_metadata_or_a_mapping(sections):
    slides = {f"s{i}": section for i, section in enumerate(sections)}
    folds = leave_one_patient_out(slides, {"s0": "A", "s1": "B", "s2": "A"})
    assert folds == [(["s1"], ["s0", "s2"]), (["s0", "s2"], ["s1"])]
    tagged = [section.copy() for section in sections]
    for section, patient in zip(tagged, ["P1", "P2", "P3"], strict=True):
        section.uns["stinfer"] = {**section.uns["stinfer"], "patient_id": patient}
    assert len(leave_one_patient_out(tagged)) == 3
    with pytest.raises(InputError, match="patient_id"):
        leave_one_patient_out(sections)


# --------------------------------------------------------------------------- leakage
def test_strip_counts_keeps_positions_and_drops_all_expression(sections):
    slide = sections[0].copy()
    slide.obs["total_counts"] = np.asarray(slide.X.sum(axis=1)).ravel()
    stripped = strip_counts(slide)
    assert stripped.shape == slide.shape
    assert sp.issparse(stripped.X) and stripped.X.nnz == 0
    assert list(stripped.obs.columns) == ["sample_id", "spot_id", "array_row", "array_col"]
    assert not stripped.layers and list(stripped.obsm) == ["spatial"]
    np.testing.assert_array_equal(stripped.obsm["spatial"], slide.obsm["spatial"])
    assert stripped.uns["stinfer"]["image_path"] == slide.uns["stinfer"]["image_path"]


class ReadsTheCounts:
    """A cheating model: predicts whatever counts the test slide carries."""

    def __init__(self, train_slides, genes):
        self.genes = genes

    def train(self):
        return {"train_seconds": 0.0}

    def predict(self, slide, patches=None):
        return prediction_anndata(slide, self.genes, slide[:, self.genes].X.toarray() + 1.0)


def poisoned(slide: ad.AnnData, seed: int) -> ad.AnnData:
    """The slide with its counts (X, a layer, a QC column) replaced by random large values."""
    rng = np.random.default_rng(seed)
    poison = sp.csr_matrix(rng.poisson(500, slide.shape).astype(np.float32))
    out = slide.copy()
    out.X = poison
    out.layers["counts"] = poison.copy()
    out.obs["total_counts"] = np.asarray(poison.sum(axis=1)).ravel()
    return out


FACTORIES = {
    "mean": lambda slides, genes, seed: MeanExpression(slides, genes),
    "knn": lambda slides, genes, seed: CoordinateKNN(slides, genes),
    "ridge": lambda slides, genes, seed: PatchFeatureRidge(
        slides, genes, PatchFeatureRidgeConfig(patch=SMALL_PATCHES)
    ),
    "cheat": lambda slides, genes, seed: ReadsTheCounts(slides, genes),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_cross_slice_predictions_do_not_change_when_the_test_slide_counts_are_poisoned(
    sections, name
):
    train, test = sections[0], sections[1]
    genes = list(train.var_names[:20])
    clean, dirty = {}, {}
    run_protocol(
        FACTORIES[name], [train, test], genes, "cross_slice", model_name=name, predictions=clean
    )
    run_protocol(
        FACTORIES[name],
        [train, poisoned(test, 1)],
        genes,
        "cross_slice",
        model_name=name,
        predictions=dirty,
    )
    key = (name, "cross_slice", "synthetic_section1", "synthetic_section2", 0)
    np.testing.assert_array_equal(dirty[key].X, clean[key].X)
    # the poison did reach the run where the poisoned slide trains, so the check has teeth
    reverse = (name, "cross_slice", "synthetic_section2", "synthetic_section1", 0)
    if name in ("mean", "knn", "ridge"):
        assert not np.array_equal(dirty[reverse].X, clean[reverse].X)


def test_run_unit_trains_once_and_scores_each_stripped_test_slide_with_its_cost(sections):
    genes = list(sections[0].var_names)
    built, seen, after = [], [], []

    def build():
        built.append(1)
        return CoordinateKNN([sections[0]], genes)

    def per_prediction(model, unit):
        seen.append(unit.prediction)
        return {"hook_total": float(unit.prediction.X.sum())}

    unit = run_unit(
        build,
        [("second", sections[1]), ("third", sections[2])],
        genes,
        on_prediction=per_prediction,
        after_predictions=after.append,
    )
    assert len(built) == 1 and after == [unit.model]
    assert [row["test_slice"] for row in unit.rows] == ["second", "third"]
    assert [p.prediction for p in unit.predictions] == seen
    for row, done in zip(unit.rows, unit.predictions, strict=True):
        assert row["mode"] == "fused" and row["hook_total"] == float(done.prediction.X.sum())
        assert row["pcc_median"] == done.evaluation.summary()["pcc_median"]
        assert row["train_seconds"] > 0 and row["predict_seconds"] > 0
        assert row["cpu_seconds"] > 0 and row["peak_rss_mb"] >= row["rss_increase_mb"] >= 0
    with pytest.raises(InputError, match="lacks 1 of the genes"):
        run_unit(build, [("second", sections[1])], [*genes, "not_a_gene"])


def test_run_protocol_cross_slice_rows_and_aggregate(sections):
    genes = list(sections[0].var_names)
    start = time.perf_counter()
    df = run_protocol(FACTORIES["knn"], sections, genes, "cross_slice", seeds=(0, 1))
    elapsed = time.perf_counter() - start
    assert len(df) == 3 * 2 * 2
    assert set(df["model"]) == {"CoordinateKNN"}
    assert not (df["train_slice"] == df["test_slice"]).any()
    metric_columns = set(ExpressionMetrics.__dataclass_fields__) - {"per_gene"}
    assert metric_columns <= set(df.columns)
    # each run's own clock readings: positive, and together within the wall time of the call
    assert (df["train_seconds"] > 0).all() and (df["predict_seconds"] > 0).all()
    assert df["train_seconds"].sum() + df["predict_seconds"].sum() <= elapsed
    assert (df["peak_rss_mb"] > 50).all()  # MiB: at least the Python process itself
    assert (df["n_genes"] == len(genes)).all()
    summary = aggregate(df)
    assert len(summary) == 1 and summary.loc[0, "n_runs"] == 12
    assert summary.loc[0, "pcc_median_mean"] == pytest.approx(df["pcc_median"].mean())
    assert summary.loc[0, "pcc_median_sd"] == pytest.approx(df["pcc_median"].std(ddof=1))


@pytest.mark.parametrize("reported", [None, 123.0])
def test_train_and_predict_seconds_are_the_runs_own_times(sections, reported):
    """``train_seconds`` is what the model's ``train()`` reports, else the measured time of
    building and training it; ``predict_seconds`` is the time of ``predict``. A model that
    sleeps 50 ms in each shows it."""

    class Sleepy(MeanExpression):
        def train(self):
            time.sleep(0.05)
            super().train()
            return {} if reported is None else {"train_seconds": reported}

        def predict(self, slide, patches=None):
            time.sleep(0.05)
            return super().predict(slide, patches)

    genes = list(sections[0].var_names)
    start = time.perf_counter()
    df = run_protocol(lambda s, g, seed: Sleepy(s, g), sections[:2], genes, "cross_slice")
    elapsed = time.perf_counter() - start
    assert len(df) == 2
    assert (df["predict_seconds"] >= 0.05).all()
    if reported is None:
        assert (df["train_seconds"] >= 0.05).all()
        assert df["train_seconds"].sum() + df["predict_seconds"].sum() <= elapsed
    else:
        assert (df["train_seconds"] == reported).all()
        assert df["predict_seconds"].sum() <= elapsed


def test_intra_slice_trains_on_train_and_val_spots_and_tests_on_the_rest(sections):
    seen = []

    class Spy(MeanExpression):
        def __init__(self, slides, genes):
            super().__init__(slides, genes)
            seen.append(slides[0])

        def predict(self, slide, patches=None):
            seen.append(slide)
            return super().predict(slide, patches)

    slide = sections[2]
    df = run_protocol(
        lambda s, g, seed: Spy(s, g), [slide], list(slide.var_names), "intra_slice", seeds=(5,)
    )
    training, test = seen
    assert set(training.obs[SPLIT_KEY]) == {"train", "val"}
    assert set(training.obs_names).isdisjoint(test.obs_names)
    assert set(training.obs_names) | set(test.obs_names) == set(slide.obs_names)
    assert test.X.nnz == 0
    _, val_idx, test_idx = intra_slice_split(slide.n_obs, 5)
    assert list(test.obs_names) == list(slide.obs_names[test_idx])
    assert (training.obs[SPLIT_KEY] == "val").sum() == len(val_idx)
    row = df.iloc[0]
    assert (row["train_slice"], row["test_slice"], row["n_spots"]) == (
        slide.uns["stinfer"]["sample_id"],
        slide.uns["stinfer"]["sample_id"],
        len(test_idx),
    )


def test_aggregate_gives_mean_and_sample_sd_per_model_and_protocol():
    df = pd.DataFrame(
        {
            "model": ["a", "a", "a", "b"],
            "protocol": ["cross_slice"] * 4,
            "train_slice": ["x", "y", "x", "x"],
            "test_slice": ["y", "x", "y", "y"],
            "seed": [0, 0, 1, 0],
            "pcc_median": [0.1, 0.2, 0.6, 0.5],
        }
    )
    summary = aggregate(df).set_index("model")
    assert summary.loc["a", "pcc_median_mean"] == pytest.approx(0.3)
    assert summary.loc["a", "pcc_median_sd"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert summary.loc["a", "n_runs"] == 3
    assert np.isnan(summary.loc["b", "pcc_median_sd"])

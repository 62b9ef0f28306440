"""The benchmark runner: config parsing, the grid, leakage, resuming after a kill, the report."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest

from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.errors import InputError
from stinfer.evaluate import benchmark as bench
from stinfer.evaluate.benchmark import parse_config, run_benchmark
from stinfer.evaluate.benchmark_layout import CELLS_DIR, MANIFEST
from stinfer.evaluate.robustness import ImageDegradation
from stinfer.io.atomic import write_h5ad
from stinfer.io.slide_data import prepare_for_h5ad
from stinfer.models.baselines import MeanExpression

TINY = {"target_spots": 60, "n_genes": 20, "seed": 1}
CHEAP_MODELS = [
    {"name": "Mean", "type": "mean"},
    {"name": "kNN", "type": "coordinate_knn", "n_neighbors": 5},
    {"name": "Ridge", "type": "feature_ridge", "features": "color"},
]


def _raw(**changes) -> dict:
    raw = {
        "name": "tiny",
        "cohorts": [
            {
                "name": "syn",
                "format": "synthetic",
                "synthetic": TINY,
                "genes": {"method": "hvg", "n_genes": 12},
            }
        ],
        "protocols": ["cross_slice", "intra_slice"],
        "models": CHEAP_MODELS,
        "patch": {"patch_size_um": 160, "target_pixel_size_um": 8.0},
        "domains": {"key": "domain"},
        "figures": {"umap": False},
    }
    raw.update(changes)
    return raw


def _cell_mtimes(out) -> dict[str, float]:
    return {
        entry.name: (entry / "done.json").stat().st_mtime_ns
        for entry in (out / CELLS_DIR).iterdir()
        if (entry / "done.json").is_file()
    }


# --------------------------------------------------------------------------- config
def test_config_errors_name_the_bad_key():
    with pytest.raises(InputError, match="unknown top-level keys \\['modles'\\]"):
        parse_config({**_raw(), "modles": []})
    with pytest.raises(InputError, match="type 'ridge' is not one of"):
        parse_config(_raw(models=[{"name": "r", "type": "ridge"}]))
    with pytest.raises(InputError, match="only STEvs has modes"):
        parse_config(_raw(models=[{"type": "mean", "modes": ["image"]}]))
    with pytest.raises(InputError, match="unknown protocols"):
        parse_config(_raw(protocols=["cross_patient"]))
    with pytest.raises(InputError, match="repeated"):
        parse_config(_raw(models=[{"type": "mean"}, {"type": "mean"}]))
    with pytest.raises(InputError, match=r"module\.fusoin"):
        parse_config(_raw(ablations={"variants": [{"name": "x", "module": {"fusoin": "poe"}}]}))


def test_data_root_is_substituted_or_demanded():
    raw = _raw(
        cohorts=[{"name": "c", "format": "h5ad", "root": "${data_root}", "slides": ["a.h5ad"]}]
    )
    with pytest.raises(InputError, match="--data-root"):
        parse_config(raw)
    assert parse_config(raw, data_root="/data/x").cohorts[0].root == "/data/x"


def test_ablations_expand_into_stevs_models_of_their_own_table():
    config = parse_config(
        _raw(ablations={"base": "fast", "common": {"epochs": 2}, "variants": ["concat"]})
    )
    ablations = [m for m in config.models if m.group == "ablation"]
    assert [m.name for m in ablations] == ["STEvs", "STEvs concat"]
    assert ablations[1].options == {"preset": "fast", "epochs": 2, "module": {"fusion": "concat"}}


def test_the_example_configs_parse(tmp_path):
    from stinfer.evaluate.benchmark import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
    her2st = load_config(os.path.join(root, "her2st_patient_c.yaml"), data_root="/d/her2st")
    assert [s["sample_id"] for s in her2st.cohorts[0].slides] == ["C2", "C3", "C4"]
    assert {m.type for m in her2st.models} == {
        "mean",
        "coordinate_knn",
        "feature_ridge",
        "stnet",
        "stevs",
    }
    synthetic = load_config(os.path.join(root, "synthetic_ci.yaml"))
    assert any(m.group == "ablation" for m in synthetic.models)
    degraded = load_config(os.path.join(root, "her2st_patient_c_degraded.yaml"), "/d/her2st")
    assert [c.name for c in degraded.cohorts] == [
        "patient_c",
        "patient_c_lowres",
        "patient_c_blur",
        "patient_c_stain",
        "patient_c_heavy",
    ]
    assert [c.image_degradation for c in degraded.cohorts] == [
        None,
        ImageDegradation(pixel_size_um=12.7),
        ImageDegradation(blur_sigma_um=8.0),
        ImageDegradation(stain_variation=0.15),
        ImageDegradation(pixel_size_um=60.0, stain_variation=0.3),
    ]
    for cohort in degraded.cohorts:
        assert [s["sample_id"] for s in cohort.slides] == ["C2", "C3", "C4"]
        assert cohort.slides[0]["counts"] == "counts/C2.tsv.gz"
    assert degraded.protocols == ("cross_slice",) and degraded.seeds == (0, 1, 2)
    assert degraded.robustness is None
    calibration = load_config(os.path.join(root, "her2st_fusion_calibration.yaml"), "/d/her2st")
    calibrated = [m for m in calibration.models if m.name == "STEvs calibrated"]
    assert calibrated[0].options["training"] == {"fusion_calibration": "validation"}


def test_image_degradation_parses_and_names_a_bad_key_or_value():
    def cohort(degradation) -> dict:
        return {
            "name": "syn",
            "format": "synthetic",
            "synthetic": TINY,
            "image_degradation": degradation,
        }

    config = parse_config(_raw(cohorts=[cohort({"pixel_size_um": 12.7, "seed": 3})]))
    assert config.cohorts[0].image_degradation == ImageDegradation(pixel_size_um=12.7, seed=3)
    assert parse_config(_raw()).cohorts[0].image_degradation is None
    with pytest.raises(
        InputError, match=r"cohorts\[0\]\.image_degradation: unknown keys \['blur'\]"
    ):
        parse_config(_raw(cohorts=[cohort({"blur": 8})]))
    with pytest.raises(InputError, match=r"image_degradation\.stain_variation must be"):
        parse_config(_raw(cohorts=[cohort({"stain_variation": -1})]))
    with pytest.raises(InputError, match="expected a mapping"):
        parse_config(_raw(cohorts=[cohort(12.7)]))


def test_a_degraded_cohort_reads_new_images_and_shares_no_cells_with_the_sharp_one(tmp_path):
    from stinfer.data.patches import PatchSpec, patch_cache_key

    config = parse_config(_raw(protocols=["cross_slice"]))
    sharp_cohort = config.cohorts[0]
    degraded_cohort = dataclasses.replace(
        sharp_cohort, image_degradation=ImageDegradation(blur_sigma_um=4.0)
    )
    sharp = bench.load_cohort(sharp_cohort, tmp_path)
    degraded = bench.load_cohort(degraded_cohort, tmp_path)
    folder = tmp_path / "syn" / "degraded"
    spec = PatchSpec(patch_size_um=160, target_pixel_size_um=8.0)
    for before, after in zip(sharp, degraded, strict=True):
        assert os.path.dirname(after.uns["stinfer"]["image_path"]) == str(folder.resolve())
        assert os.path.isfile(before.uns["stinfer"]["image_path"])
        assert patch_cache_key(before, spec) != patch_cache_key(after, spec)
    genes = [str(g) for g in sharp[0].var_names[:12]]
    sharp_keys = {cell.key for cell in bench.make_cells(config, sharp_cohort, sharp, genes)}
    degraded_keys = {
        cell.key for cell in bench.make_cells(config, degraded_cohort, degraded, genes)
    }
    assert sharp_keys and degraded_keys and not sharp_keys & degraded_keys


# --------------------------------------------------------------------------- the grid
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run of the cheap models on a tiny synthetic cohort."""
    out = tmp_path_factory.mktemp("bench") / "results"
    result = run_benchmark(parse_config(_raw()), out, progress=None)
    return out, result


def test_results_have_one_row_per_model_protocol_train_test_and_seed(finished):
    out, result = finished
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 3 * (6 + 3)  # 3 models x (6 cross-slice pairs + 3 intra-slice)
    cross = results[results["protocol"] == "cross_slice"]
    sections = [f"synthetic_section{k}" for k in (1, 2, 3)]
    assert sorted(map(tuple, cross[["train_slice", "test_slice"]].to_numpy())) == sorted(
        (a, b) for _ in range(3) for a in sections for b in sections if a != b
    )
    intra = results[results["protocol"] == "intra_slice"]
    assert (intra["train_slice"] == intra["test_slice"]).all()
    for column in (
        "mse",
        "pcc_median",
        "scc_median",
        "pcc_median_depthnorm",
        "scc_median_depthnorm",
        "hest_pcc_top50",
        "n_constant_genes",
        "ari",
        "ari_truth",
        "train_seconds",
        "predict_seconds",
        "peak_rss_mb",
    ):
        assert column in results and results[column].notna().all(), column
    assert (results.loc[results["model"] == "Mean", "pcc_median"] == 0).all()
    assert result.n_computed == result.n_cells == 18 and result.n_reused == 0


def test_summary_is_in_the_paper_layout_with_the_best_in_bold(finished):
    out, _ = finished
    text = (out / "summary.md").read_text()
    assert "### cross-slice" in text and "### intra-slice" in text
    assert (
        "| model | MSE ↓ | PCC ↑ | SCC ↑ | PCC-dn ↑ | SCC-dn ↑ | HEST PCC ↑ | ARI ↑ | ARI of true counts | runs |"
        in text
    )
    assert "±" in text and "**" in text
    assert "### Runtime and memory per run" in text
    results = pd.read_csv(out / "results.csv")
    cross = results[results["protocol"] == "cross_slice"]
    best = cross.groupby("model")["pcc_median"].mean().idxmax()
    row = next(line for line in text.splitlines() if line.startswith(f"| {best} |"))
    assert row.split("|")[3].strip().startswith("**")  # its PCC cell is bold
    assert {p.name for p in (out / "figures").iterdir()} >= {"metrics_syn.png"}
    assert any(p.name.startswith("maps_syn_") for p in (out / "figures").iterdir())


def test_a_rerun_recomputes_nothing(finished):
    out, _ = finished
    before = _cell_mtimes(out)
    again = run_benchmark(parse_config(_raw()), out, progress=None, figures=False)
    assert again.n_computed == 0 and again.n_reused == 18
    assert _cell_mtimes(out) == before
    pd.testing.assert_frame_equal(again.results, pd.read_csv(out / "results.csv"))


def test_changing_one_models_options_recomputes_only_its_cells(tmp_path):
    out = tmp_path / "results"
    raw = _raw(protocols=["cross_slice"], models=CHEAP_MODELS[:2], domains=None)
    run_benchmark(parse_config(raw), out, progress=None, figures=False)
    models = [dict(m) for m in CHEAP_MODELS[:2]]
    models[1]["n_neighbors"] = 3
    result = run_benchmark(
        parse_config({**raw, "models": models}), out, progress=None, figures=False
    )
    assert result.n_computed == 3 and result.n_reused == 3
    assert (result.results["model"] == "kNN").sum() == 6


class _Interrupt(BaseException):
    """A kill (Ctrl-C, SIGTERM): stops the run, unlike a cell's error, which is recorded."""


def test_a_killed_run_resumes_without_recomputing_finished_cells(tmp_path, monkeypatch):
    out = tmp_path / "results"
    trained: list[tuple[str, ...]] = []

    def counting_mean(kind, slides, genes, seed, options, patches):
        names = (*(s.uns["stinfer"]["sample_id"] for s in slides), str(len(slides[0])))
        if len(trained) == 4 and os.environ.get("STINFER_TEST_KILL") == "1":
            raise _Interrupt("killed")  # dies mid-cell, after 4 finished cells
        trained.append(names)
        return MeanExpression(slides, genes)

    monkeypatch.setattr(bench, "build_model", counting_mean)
    config = parse_config(_raw(models=[{"name": "Mean", "type": "mean"}]))
    monkeypatch.setenv("STINFER_TEST_KILL", "1")
    with pytest.raises(_Interrupt):
        run_benchmark(config, out, progress=None, figures=False)
    assert len(trained) == 4
    finished = _cell_mtimes(out)
    assert len(finished) == 4
    assert len(pd.read_csv(out / "results.csv")) == 3 * 2 + 1  # written after every cell
    (out / CELLS_DIR / "stale.partial").mkdir()  # a half-written cell is never read
    monkeypatch.setenv("STINFER_TEST_KILL", "0")
    result = run_benchmark(config, out, progress=None, figures=False)
    assert result.n_reused == 4 and result.n_computed == 2
    assert len(trained) == 6 and len(set(trained)) == 6  # every cell trained exactly once
    assert {k: v for k, v in _cell_mtimes(out).items() if k in finished} == finished
    assert len(result.results) == 6 + 3


def test_an_existing_folder_that_is_not_a_benchmark_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = parse_config(_raw(models=[{"type": "mean"}], protocols=["cross_slice"]))
    for overwrite in (False, True):  # --overwrite never deletes what stinfer did not write
        with pytest.raises(InputError, match="not a stinfer benchmark output"):
            run_benchmark(config, out, progress=None, overwrite=overwrite)
        assert (out / "notes.txt").read_text() == "mine"
        assert {p.name for p in out.iterdir()} == {"notes.txt"}


def test_overwrite_replaces_only_the_runs_own_outputs(tmp_path):
    out = tmp_path / "results"
    config = parse_config(_raw(models=[{"type": "mean"}], protocols=["cross_slice"]))
    run_benchmark(config, out, progress=None, figures=False)
    (out / "notes.txt").write_text("mine")  # a user's file beside the run's outputs
    stale = out / CELLS_DIR / "from-an-earlier-config"
    stale.mkdir()
    run_benchmark(config, out, progress=None, overwrite=True, figures=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert not stale.exists() and (out / "results.csv").is_file() and (out / MANIFEST).is_file()


def test_cross_slice_predictions_ignore_the_test_slides_counts(tmp_path):
    """Poison a test slide's counts: the predictions of models trained elsewhere do not move."""
    slides = make_synthetic_sections(tmp_path / "img", SyntheticConfig(**TINY))
    paths = []
    for slide in slides:
        path = tmp_path / f"{slide.uns['stinfer']['sample_id']}.h5ad"
        write_h5ad(prepare_for_h5ad(slide), path)
        paths.append(str(path))
    genes = [str(g) for g in slides[0].var_names[:12]]
    raw = _raw(
        cohorts=[
            {
                "name": "c",
                "format": "h5ad",
                "slides": paths,
                "genes": {"method": "list", "genes": genes},
            }
        ],
        protocols=["cross_slice"],
        models=CHEAP_MODELS[1:],
        domains=None,
    )
    first = run_benchmark(parse_config(raw), tmp_path / "clean", progress=None, figures=False)
    poisoned = slides[1].copy()
    poisoned.X = poisoned.X * 0 + np.random.default_rng(0).poisson(500, poisoned.shape)
    write_h5ad(prepare_for_h5ad(poisoned), paths[1], overwrite=True)
    second = run_benchmark(parse_config(raw), tmp_path / "poisoned", progress=None, figures=False)
    test_name = slides[1].uns["stinfer"]["sample_id"]
    for result in (first, second):
        assert (result.results["test_slice"] == test_name).sum() == 2 * 2
    clean_dir = sorted((tmp_path / "clean" / CELLS_DIR).glob("*section1*"))
    poison_dir = sorted((tmp_path / "poisoned" / CELLS_DIR).glob("*section1*"))
    import anndata as ad

    for clean, dirty in zip(clean_dir, poison_dir, strict=True):
        for path in (clean / "predictions").glob(f"*{test_name}.h5ad"):
            np.testing.assert_array_equal(
                ad.read_h5ad(path).X, ad.read_h5ad(dirty / "predictions" / path.name).X
            )


def test_stevs_gives_single_modality_rows_latents_and_umaps_from_one_training(tmp_path):
    raw = _raw(
        cohorts=[
            {
                "name": "syn",
                "format": "synthetic",
                "synthetic": {**TINY, "target_spots": 40, "n_sections": 2},
                "genes": {"method": "hvg", "n_genes": 12},
            }
        ],
        protocols=["cross_slice"],
        models=[
            {
                "name": "STEvs",
                "type": "stevs",
                "preset": "fast",
                "epochs": 1,
                "training": {"test_time_augmentation": False},
                "modes": ["fused", "image", "spatial"],
            }
        ],
        patch={},
        figures={"umap": True},
        uncertainty={"levels": [0.5, 0.9], "samples": 4, "figure_genes": 2},
    )
    result = run_benchmark(parse_config(raw), tmp_path / "out", progress=None)
    assert result.n_computed == 2  # one training per train slice ...
    assert sorted(result.results["model"].unique()) == [  # ... three rows per test slice
        "STEvs",
        "STEvs (image only)",
        "STEvs (spatial only)",
    ]
    assert (result.results["mode"].value_counts() == 2).all()
    # the fused rows say how much the product of experts trusted each expert (weights sum to 1)
    fused = result.results[result.results["mode"] == "fused"]
    weights = fused["image_expert_weight"] + fused["spatial_expert_weight"]
    np.testing.assert_allclose(weights, 1.0, atol=1e-5)
    assert result.results.loc[result.results["mode"] != "fused", "image_expert_weight"].isna().all()
    assert "Which expert the fused model trusted" in (tmp_path / "out" / "summary.md").read_text()
    figures = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    assert {"umap_syn_STEvs_fused.png", "umap_syn_STEvs_image.png"} <= figures
    latents = np.load(next((tmp_path / "out" / CELLS_DIR).glob("*")) / "latents.npz")
    assert {k.split("/")[0] for k in latents.files} >= {"fused", "image", "spatial", "obs_names"}
    # uncertainty: coverage before and after the calibration, per prediction, and the maps
    for column in ("coverage_50", "pit_coverage_90", "width_90", "sd_error_spearman"):
        for name in (column, f"{column}_uncalibrated"):
            values = result.results[name]
            assert values.notna().all() and values.between(-1, 1e6).all(), name
    assert result.results["coverage_90"].between(0, 1).all()
    assert (result.results["width_90"] >= result.results["width_50"]).all()
    maps = list((tmp_path / "out" / CELLS_DIR).glob("*/uncertainty_*.png"))
    assert len(maps) == 6  # three modes x two test slides


def test_leave_one_patient_out_trains_once_per_fold_on_the_other_patients(tmp_path):
    cohort = {
        **_raw()["cohorts"][0],
        "patient_ids": {"syn_section1": "p1", "syn_section2": "p1", "syn_section3": "p2"},
        "synthetic": {**TINY, "sample_prefix": "syn"},
    }
    raw = _raw(
        cohorts=[cohort],
        protocols=["leave_one_patient_out"],
        models=[{"name": "Mean", "type": "mean"}],
        domains=None,
    )
    result = run_benchmark(parse_config(raw), tmp_path / "out", progress=None, figures=False)
    assert result.n_cells == 2
    pairs = set(map(tuple, result.results[["train_slice", "test_slice"]].to_numpy()))
    assert pairs == {
        ("syn_section3", "syn_section1"),
        ("syn_section3", "syn_section2"),
        ("syn_section1+syn_section2", "syn_section3"),
    }

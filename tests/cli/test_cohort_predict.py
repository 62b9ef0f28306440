"""`stinfer predict --slides/--manifest --out-dir`: a cohort, one task per slide, on Ray when asked."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stinfer.cli import main
from stinfer.cohort import SUMMARY_COLUMNS, predict_cohort
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.io.atomic import write_h5ad
from stinfer.io.slide_data import prepare_for_h5ad

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stinfer(command: str) -> int:
    """Run one `stinfer` command line (split on spaces) in-process; its exit status."""
    return main(command.split())


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    sections = make_synthetic_sections(
        folder / "images", SyntheticConfig(seed=5, target_spots=120, n_genes=30, n_sections=3)
    )
    paths = []
    for section in sections:
        path = folder / f"{section.uns['stinfer']['sample_id']}.h5ad"
        write_h5ad(prepare_for_h5ad(section), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def knn_run(slide_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "knn"
    assert stinfer(f"train --model coordinate_knn --train {slide_files[0]} --out {out}") == 0
    return out


@pytest.fixture(scope="module")
def single_predictions(knn_run, slide_files, tmp_path_factory) -> dict[str, ad.AnnData]:
    """Each slide predicted alone with `stinfer predict --slide --out`, by stem."""
    folder = tmp_path_factory.mktemp("single")
    predictions = {}
    for path in slide_files:
        out = folder / path.name
        assert stinfer(f"predict --run {knn_run} --slide {path} --out {out}") == 0
        predictions[path.stem] = ad.read_h5ad(out)
    return predictions


def read_summary(out_dir: Path) -> pd.DataFrame:
    summary = pd.read_csv(out_dir / "summary.csv", keep_default_na=False)
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    return summary.set_index("slide")


def test_each_slide_of_a_cohort_is_predicted_as_predict_slide_predicts_it(
    knn_run, slide_files, single_predictions, tmp_path, capsys
):
    out_dir = tmp_path / "preds"
    slides = " ".join(str(path) for path in slide_files)
    assert stinfer(f"predict --run {knn_run} --slides {slides} --out-dir {out_dir}") == 0
    assert "3 slides, 3 predicted, 0 skipped (output exists), 0 failed" in capsys.readouterr().out
    summary = read_summary(out_dir)
    assert list(summary.index) == [path.stem for path in slide_files]
    assert set(summary["status"]) == {"done"} and set(summary["error"]) == {""}
    for path in slide_files:
        cohort = ad.read_h5ad(out_dir / f"{path.stem}.h5ad")
        single = single_predictions[path.stem]
        np.testing.assert_array_equal(cohort.X, single.X)
        assert list(cohort.var_names) == list(single.var_names)
        assert summary.loc[path.stem, "spots"] == cohort.n_obs
        assert summary.loc[path.stem, "output"] == str(out_dir / f"{path.stem}.h5ad")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [*(f"{p.stem}.h5ad" for p in slide_files), "summary.csv"]
    )


def test_a_rerun_skips_written_slides_and_keeps_their_summary_rows(
    knn_run, slide_files, tmp_path, capsys
):
    out_dir = tmp_path / "preds"
    first, second = slide_files[0], slide_files[1]
    assert stinfer(f"predict --run {knn_run} --slides {first} --out-dir {out_dir}") == 0
    written = out_dir / f"{first.stem}.h5ad"
    mtime = written.stat().st_mtime_ns
    before = read_summary(out_dir).loc[first.stem]
    capsys.readouterr()
    assert stinfer(f"predict --run {knn_run} --slides {first} {second} --out-dir {out_dir}") == 0
    assert "1 predicted, 1 skipped" in capsys.readouterr().out
    assert written.stat().st_mtime_ns == mtime
    summary = read_summary(out_dir)
    assert summary.loc[first.stem, "status"] == "skipped"
    assert summary.loc[first.stem, "spots"] == before["spots"]
    assert summary.loc[first.stem, "seconds"] == before["seconds"]
    assert summary.loc[second.stem, "status"] == "done"
    assert stinfer(f"predict --run {knn_run} --slides {first} --out-dir {out_dir} --overwrite") == 0
    assert read_summary(out_dir).loc[first.stem, "status"] == "done"


def test_a_corrupt_slide_fails_alone_with_its_error_and_exit_status_1(
    knn_run, slide_files, tmp_path, capsys
):
    corrupt = tmp_path / "broken.h5ad"
    corrupt.write_bytes(b"not an HDF5 file at all")
    out_dir = tmp_path / "preds"
    slides = f"{slide_files[0]} {corrupt} {slide_files[1]}"
    assert stinfer(f"predict --run {knn_run} --slides {slides} --out-dir {out_dir}") == 1
    printed = capsys.readouterr()
    assert f"failed: broken ({corrupt})" in printed.err
    summary = read_summary(out_dir)
    assert summary.loc["broken", "status"] == "failed"
    assert str(corrupt) in summary.loc["broken", "error"]
    assert "\n" not in summary.loc["broken", "error"]
    assert not (out_dir / "broken.h5ad").exists()
    for path in slide_files[:2]:
        assert summary.loc[path.stem, "status"] == "done"
        assert (out_dir / f"{path.stem}.h5ad").is_file()


def test_a_manifest_names_outputs_and_resolves_paths_from_its_folder(
    knn_run, slide_files, tmp_path
):
    manifest = slide_files[0].parent / "cohort.csv"
    manifest.write_text(f"path,name\n{slide_files[0].name},first\n{slide_files[1].name},\n")
    out_dir = tmp_path / "preds"
    assert stinfer(f"predict --run {knn_run} --manifest {manifest} --out-dir {out_dir}") == 0
    summary = read_summary(out_dir)
    assert list(summary.index) == ["first", slide_files[1].stem]
    assert (out_dir / "first.h5ad").is_file()


def test_repeated_names_and_mixed_or_missing_outputs_are_refused_before_any_work(
    knn_run, slide_files, tmp_path, capsys
):
    manifest = tmp_path / "twice.csv"
    manifest.write_text(f"path,name\n{slide_files[0]},same\n{slide_files[1]},same\n")
    out_dir = tmp_path / "preds"
    assert stinfer(f"predict --run {knn_run} --manifest {manifest} --out-dir {out_dir}") == 2
    assert "slide name 'same' is given to 2 slides" in capsys.readouterr().err
    assert stinfer(f"predict --run {knn_run} --slides {slide_files[0]} --out {out_dir}") == 2
    assert "--out-dir" in capsys.readouterr().err
    assert stinfer(f"predict --run {knn_run} --slide {slide_files[0]} --out-dir {out_dir}") == 2
    assert "--out" in capsys.readouterr().err
    assert not out_dir.exists()
    with pytest.raises(SystemExit) as exited:
        stinfer(f"predict --run {knn_run} --slide {slide_files[0]} --slides {slide_files[1]}")
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_workers_without_ray_warn_naming_the_install_and_predict_here(
    knn_run, slide_files, tmp_path, caplog, monkeypatch, single_predictions
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out_dir = tmp_path / "preds"
    command = f"predict --run {knn_run} --slides {slide_files[0]} --out-dir {out_dir} --workers 2"
    with caplog.at_level(logging.WARNING, logger="stinfer"):
        assert stinfer(command) == 0
    assert 'pip install -e ".[distributed]"' in caplog.text
    here = ad.read_h5ad(out_dir / f"{slide_files[0].stem}.h5ad")
    np.testing.assert_array_equal(here.X, single_predictions[slide_files[0].stem].X)


def test_a_stevs_cohort_predicts_each_slide_as_predict_slide_does(slide_files, tmp_path):
    run = tmp_path / "stevs"
    assert (
        stinfer(
            f"train --model stevs --train {slide_files[0]} --genes svg --n-genes 10 "
            f"--preset fast --epochs 1 --no-progress --out {run}"
        )
        == 0
    )
    single = tmp_path / "single.h5ad"
    slide = slide_files[1]
    assert stinfer(f"predict --run {run} --slide {slide} --out {single} --no-tta") == 0
    out_dir = tmp_path / "preds"
    assert stinfer(f"predict --run {run} --slides {slide} --out-dir {out_dir} --no-tta") == 0
    cohort, alone = ad.read_h5ad(out_dir / f"{slide.stem}.h5ad"), ad.read_h5ad(single)
    np.testing.assert_array_equal(cohort.X, alone.X)
    np.testing.assert_array_equal(cohort.layers["nb_theta"], alone.layers["nb_theta"])


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason='Ray is not installed (pip install -e ".[distributed]"): --workers > 1 runs on Ray',
)
def test_ray_workers_write_the_same_predictions_as_one_process(knn_run, slide_files, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        on_ray = predict_cohort(knn_run, slide_files, tmp_path / "ray", workers=2)
    finally:
        ray.shutdown()
    here = predict_cohort(knn_run, slide_files, tmp_path / "here", workers=1)
    assert list(on_ray["status"]) == list(here["status"]) == ["done"] * len(slide_files)
    assert list(on_ray["spots"]) == list(here["spots"])
    assert list(on_ray["path"]) == [str(path) for path in slide_files]
    assert list(on_ray["output"]) == [str(tmp_path / "ray" / f"{p.stem}.h5ad") for p in slide_files]
    for path in slide_files:
        name = f"{path.stem}.h5ad"
        parallel, sequential = (
            ad.read_h5ad(tmp_path / "ray" / name),
            ad.read_h5ad(tmp_path / "here" / name),
        )
        np.testing.assert_array_equal(parallel.X, sequential.X)

"""`stinfer train` -> `predict` -> `evaluate` on synthetic slides, as a user runs them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from stinfer.cli import main
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.io.atomic import write_h5ad
from stinfer.io.slide_data import prepare_for_h5ad
from stinfer.metrics import evaluate_anndata

ISSUE_KEYS = {
    "mse",
    "pcc_median",
    "scc_median",
    "pcc_mean",
    "pcc_median_depthnorm",
    "n_genes",
    "n_spots",
    "n_constant_genes",
}


def assert_expression_convention(prediction: ad.AnnData, panel: str) -> None:
    """X expected counts, layers["log1p_cp10k"] its log1p CP10k with the library uns names."""
    record = prediction.uns["stinfer"]["expression"]
    assert record["X"] == "expected_counts" and record["normalisation_panel"] == panel
    assert record["library_size"] == "obs/library_size"
    library = prediction.obs["library_size"].to_numpy(dtype=np.float64)[:, None]
    expected = np.log1p(np.asarray(prediction.X, dtype=np.float64) / library * 1e4)
    np.testing.assert_allclose(prediction.layers["log1p_cp10k"], expected, rtol=1e-4, atol=1e-5)


def stinfer(command: str) -> int:
    """Run one `stinfer` command line (split on spaces) in-process; its exit status."""
    return main(command.split())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    sections = make_synthetic_sections(
        folder / "images", SyntheticConfig(seed=5, target_spots=150, n_genes=30, n_sections=2)
    )
    paths = []
    for section in sections:
        path = folder / f"{section.uns['stinfer']['sample_id']}.h5ad"
        write_h5ad(prepare_for_h5ad(section), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def run_folder(slide_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "c2"
    status = stinfer(
        f"train --model stevs --train {slide_files[0]} --genes svg --n-genes 20 --preset fast "
        f"--epochs 2 --no-progress --out {out}"
    )
    assert status == 0
    return out


def test_train_writes_a_loadable_run_with_its_history(run_folder):
    names = {p.name for p in run_folder.iterdir()}
    assert {"config.json", "weights.safetensors", "train_history.json"} <= names
    history = json.loads((run_folder / "train_history.json").read_text())
    assert len(history["history"]) == 2 and history["train_seconds"] > 0
    saved = json.loads((run_folder / "config.json").read_text())
    assert saved["model_type"] == "stevs" and len(saved["state"]["genes"]) == 20


def test_train_logs_each_epoch_once_without_third_party_noise_and_reports_its_best_val_pcc(
    slide_files, tmp_path, caplog, capfd
):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    status = stinfer(
        f"train --model stevs --train {slide_files[0]} --genes svg --n-genes 20 --preset fast "
        f"--epochs 3 --no-progress --out {out}"
    )
    assert status == 0
    printed = capfd.readouterr()
    messages = [record.getMessage() for record in caplog.records]
    # the fast preset averages weights from epoch 2: its BatchNorm pass is not an epoch
    epochs = [m.split(":")[0] for m in messages if m.startswith("epoch ")]
    assert epochs == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    summary = next(m for m in messages if m.startswith("STEvs trained in"))
    assert re.search(r"best val median PCC -?\d\.\d{4} at epoch [1-3] of 3", summary), summary
    assert "None" not in summary and "best val median PCC" in printed.out
    history = json.loads((out / "train_history.json").read_text())
    logged = [row["val/pcc_median"] for row in history["history"]]
    assert len(logged) == 3 and history["best_val_pcc_median"] == max(logged)
    everything = caplog.text + printed.err
    for noise in ("Tip:", "litlogger", "LeafSpec", "GPU available", "many workers", "categorical"):
        assert noise not in everything, noise
    assert everything.count("`Trainer.fit` stopped: `max_epochs=3` reached") == 1
    assert "max_epochs=4" not in everything


def test_train_predict_evaluate_round_trip_gives_the_issue_keys(run_folder, slide_files, tmp_path):
    pred = tmp_path / "pred.h5ad"
    metrics = tmp_path / "metrics.json"
    assert (
        stinfer(f"predict --run {run_folder} --slide {slide_files[1]} --out {pred} --mode image")
        == 0
    )
    prediction = ad.read_h5ad(pred)
    assert prediction.n_vars == 20 and "nb_theta" in prediction.layers
    assert_expression_convention(prediction, "the 20 predicted genes")
    assert stinfer(f"evaluate --pred {pred} --truth {slide_files[1]} --out {metrics}") == 0
    summary = json.loads(metrics.read_text())
    assert ISSUE_KEYS <= set(summary)
    assert summary["n_genes"] == 20 and summary["n_spots"] == prediction.n_obs
    expected = evaluate_anndata(prediction, ad.read_h5ad(slide_files[1])).summary()
    np.testing.assert_allclose(summary["pcc_median"], expected["pcc_median"])
    assert (tmp_path / "metrics.per_gene.csv").is_file()


def test_predict_with_uncertainty_writes_intervals_that_evaluate_scores(
    run_folder, slide_files, tmp_path, capsys
):
    pred, metrics = tmp_path / "pred.h5ad", tmp_path / "metrics.json"
    command = f"predict --run {run_folder} --slide {slide_files[1]} --out {pred} --uncertainty"
    assert stinfer(f"{command} --levels 0.5,0.8 --samples 6") == 0
    prediction = ad.read_h5ad(pred)
    assert {"predictive_mean", "predictive_sd", "lower_80", "upper_80"} <= set(prediction.layers)
    assert (prediction.layers["lower_80"] <= prediction.layers["lower_50"]).all()
    assert prediction.uns["stinfer"]["uncertainty"]["calibrated"]
    assert stinfer(f"evaluate --pred {pred} --truth {slide_files[1]} --out {metrics}") == 0
    scored = json.loads(metrics.read_text())["uncertainty"]
    assert 0.0 <= scored["pit_coverage_80"] <= 1.0 and scored["width_80"] >= scored["width_50"]
    assert "pit_coverage_80" in capsys.readouterr().out
    assert stinfer(f"{command} --levels 0.5,1.2 --overwrite") == 2
    assert "--levels/--samples: interval levels must lie in (0, 1)" in capsys.readouterr().err
    assert stinfer(f"{command} --levels a,b --overwrite") == 2
    assert "comma-separated numbers" in capsys.readouterr().err


def test_outputs_are_never_overwritten_silently(run_folder, slide_files, tmp_path, capsys):
    pred = tmp_path / "pred.h5ad"
    args = ["predict", "--run", str(run_folder), "--slide", str(slide_files[1]), "--out", str(pred)]
    assert main(args) == 0
    assert "mean expert weight: image 0." in capsys.readouterr().out  # fused: which it trusted
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    train = ["train", "--train", str(slide_files[0]), "--genes", "hvg", "--n-genes", "5"]
    assert main([*train, "--epochs", "1", "--no-progress", "--out", str(run_folder)]) == 2


def test_user_errors_exit_2_with_one_line_and_no_traceback(slide_files, tmp_path, capsys):
    genes = tmp_path / "genes.txt"
    genes.write_text("not_a_gene\n")
    status = stinfer(f"train --train {slide_files[0]} --genes {genes} --out {tmp_path / 'run'}")
    assert status == 2
    err = capsys.readouterr().err
    assert "lacks" in err and "Traceback" not in err
    assert (
        stinfer(f"predict --run {tmp_path} --slide {slide_files[1]} --out {tmp_path / 'p.h5ad'}")
        == 2
    )
    assert "not a saved model; missing config.json" in capsys.readouterr().err


def test_visium_hd_prepare_train_predict_streams_every_bin_to_the_output(tmp_path, monkeypatch):
    """A generated Visium HD folder, as a user runs it: prepare the 8-um bins, train on them
    (two slides: the multi-slide path), predict every bin without test-time augmentation. The
    prediction streams from the tiled TIFF in chunks (forced here) and equals the in-memory one."""
    import stinfer.models.stevs as stevs_module
    from stinfer.data.synthetic_hd import make_visium_hd_folder
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.models.stevs import STEvs

    folder = make_visium_hd_folder(tmp_path / "outs", n_bins_side=24, n_genes=40, seed=2)
    slide = tmp_path / "hd.h5ad"
    assert (
        stinfer(
            f"prepare --format visium-hd --path {folder.outs_dir} --bin-size 8 "
            f"--image {folder.image_path} --out {slide}"
        )
        == 0
    )
    run = tmp_path / "run"
    assert (
        stinfer(
            f"train --train {slide} {slide} --genes svg --n-genes 10 --preset fast --epochs 1 "
            f"--no-progress --out {run}"
        )
        == 0
    )
    monkeypatch.setattr(stevs_module, "IN_MEMORY_PATCH_BYTES", 0)
    out = tmp_path / "pred.h5ad"
    assert stinfer(f"predict --run {run} --slide {slide} --no-tta --out {out}") == 0
    predicted = ad.read_h5ad(out, backed="r")
    bins = read_h5ad_slide(slide)
    assert predicted.shape == (bins.n_obs, 10) and list(predicted.obs_names) == list(bins.obs_names)
    model = STEvs.load(run)
    model.config.training.test_time_augmentation = False
    monkeypatch.setattr(stevs_module, "IN_MEMORY_PATCH_BYTES", 1 << 30)
    np.testing.assert_array_equal(predicted.X[:], model.predict(bins).X)
    assert stinfer(f"predict --run {run} --slide {slide} --out {out}") == 2  # exists: refused

"""`stinfer benchmark`: one command from YAML to results.csv, summary.md and figures; reruns resume."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import yaml

from stinfer.cli import main

CONFIG = {
    "name": "cli_tiny",
    "cohorts": [
        {
            "name": "syn",
            "format": "synthetic",
            "synthetic": {"target_spots": 50, "n_genes": 20, "seed": 2, "n_sections": 2},
            "genes": {"method": "hvg", "n_genes": 10},
        }
    ],
    "protocols": ["cross_slice"],
    "models": [
        {"name": "Mean", "type": "mean"},
        {"name": "Ridge", "type": "feature_ridge", "features": "color"},
    ],
    "patch": {"patch_size_um": 160, "target_pixel_size_um": 8.0},
    "robustness": {"models": ["Ridge"], "alphas": [0.0, 0.5]},
    "figures": {"umap": False},
}


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_benchmark_writes_results_summary_and_figures_then_resumes(tmp_path, config_path, capsys):
    out = tmp_path / "results"
    assert main(["benchmark", "--config", str(config_path), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "4 cells: 4 computed, 0 reused" in first
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 * 2 and set(results["model"]) == {"Mean", "Ridge"}
    robustness = pd.read_csv(out / "robustness.csv")
    assert sorted(robustness["alpha"].unique()) == [0.0, 0.5] and set(robustness["model"]) == {
        "Ridge"
    }
    summary = (out / "summary.md").read_text()
    assert "Reproduce: `stinfer benchmark --config" in summary
    assert "### Robustness: blue shift of the test images" in summary
    figures = {p.name for p in (out / "figures").iterdir()}
    assert "metrics_syn.png" in figures and "blue_shift_syn.png" in figures
    assert any(name.startswith("maps_syn_") for name in figures)

    assert main(["benchmark", "--config", str(config_path), "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert second.count("done earlier, skipped") == 4 and "0 computed, 4 reused" in second


def test_publish_copies_the_tables_and_keeps_a_users_file(tmp_path, config_path, capsys):
    out, docs = tmp_path / "results", tmp_path / "docs"
    args = ["benchmark", "--config", str(config_path), "--out", str(out), "--no-figures"]
    assert main([*args, "--publish", str(docs)]) == 0
    published = docs / "cli_tiny"
    assert (published / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (published / "results.csv").read_bytes() == (out / "results.csv").read_bytes()
    assert "--publish" in (published / "summary.md").read_text()  # the reproduce line says so
    assert main([*args, "--publish", str(docs)]) == 0  # its own earlier output is replaced

    (published / "summary.md").write_text("my notes\n")
    capsys.readouterr()
    assert main([*args, "--publish", str(docs)]) == 2
    assert "not written by `stinfer benchmark`" in capsys.readouterr().err
    assert (published / "summary.md").read_text() == "my notes\n"


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, capsys):
    needs_root = tmp_path / "root.yaml"
    needs_root.write_text(
        yaml.safe_dump(
            {
                **CONFIG,
                "cohorts": [
                    {"name": "c", "format": "h5ad", "root": "${data_root}", "slides": ["a.h5ad"]}
                ],
            }
        )
    )
    assert main(["benchmark", "--config", str(needs_root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "Traceback" not in err
    missing = tmp_path / "nope.yaml"
    assert main(["benchmark", "--config", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    config_path = tmp_path / "ok.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    assert main(["benchmark", "--config", str(config_path), "--out", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    overwrite = ["benchmark", "--config", str(config_path), "--out", str(busy), "--overwrite"]
    assert main(overwrite) == 2  # --overwrite never deletes a folder stinfer did not write
    assert "not a stinfer benchmark output" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["x.txt"] and (busy / "x.txt").read_text() == "x"


def test_failed_cells_are_named_on_stderr_with_exit_1_and_without_ray_workers_run_here(
    tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    broken = {"name": "Broken", "type": "coordinate_knn", "n_neighbors": 0}
    raw = {**CONFIG, "models": [CONFIG["models"][0], broken]}
    raw.pop("robustness")
    config_path = tmp_path / "broken.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    out, docs = tmp_path / "results", tmp_path / "docs"
    command = ["benchmark", "--config", str(config_path), "--out", str(out), "--no-figures"]
    assert main([*command, "--workers", "2", "--publish", str(docs)]) == 1
    captured = capsys.readouterr()
    assert "Ray is not installed" in caplog.text  # a warning; the cells ran in this process
    assert "4 cells: 2 computed, 0 reused, 2 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if "failed: syn__Broken__" in line]
    assert len(failed) == 2 and all("n_neighbors must be >= 1" in line for line in failed)
    assert len(pd.read_csv(out / "failures.csv")) == 2 and not docs.exists()  # not published


def test_help_tells_the_whole_story(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    text = capsys.readouterr().out
    for phrase in (
        "--config",
        "--data-root",
        "results.csv",
        "summary.md",
        "resumes",
        "--overwrite",
        "--workers",
        "failures.csv",
    ):
        assert phrase in text

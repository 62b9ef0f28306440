"""The benchmark's cells on Ray workers (``workers=2``) write what one process writes; a cell
that raises is recorded and the others finish, in both ways."""

from __future__ import annotations

import importlib.util
import sys

import pandas as pd
import pytest

from stinfer.evaluate import benchmark as bench
from stinfer.evaluate.benchmark import parse_config, run_benchmark
from stinfer.evaluate.benchmark_layout import CELL_DONE, CELLS_DIR, FAILURES_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = [
    {"name": "Mean", "type": "mean"},
    {"name": "kNN", "type": "coordinate_knn", "n_neighbors": 5},
    {"name": "Broken", "type": "coordinate_knn", "n_neighbors": 0},  # raises when built
    {  # seeded training: the same numbers on a worker as here, given the same torch threads
        "name": "STEvs",
        "type": "stevs",
        "preset": "fast",
        "epochs": 1,
        "training": {"test_time_augmentation": False},
        "protocols": ["cross_slice"],
    },
]
RAW = {
    "name": "workers",
    "cohorts": [
        {
            "name": "syn",
            "format": "synthetic",
            "synthetic": {"target_spots": 40, "n_genes": 20, "seed": 3, "n_sections": 2},
            "genes": {"method": "hvg", "n_genes": 8},
        }
    ],
    "protocols": ["cross_slice", "intra_slice"],
    "models": MODELS,
    "figures": {"umap": False},
}
BROKEN = "CoordinateKNNConfig.n_neighbors must be >= 1"
TIMING = ("seconds", "rss", "gpu_mb")  # columns that measure the run, not the model


def measured(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` without the columns of time and memory."""
    return table[[c for c in table.columns if not any(word in c for word in TIMING)]]


def cell_rows(out) -> dict[str, pd.DataFrame]:
    return {
        folder.name: measured(pd.read_csv(folder / "rows.csv"))
        for folder in sorted((out / CELLS_DIR).iterdir())
        if (folder / CELL_DONE).is_file()
    }


def summary_without_runtime(out) -> list[str]:
    """``summary.md`` without its time stamp, its runtime table (one cohort: the end) and the
    seconds columns of the other tables."""
    text = (out / "summary.md").read_text().split("### Runtime and memory per run")[0]
    lines, timed = [], []
    for line in text.splitlines():
        cells = line.split("|")
        if line.startswith("| model |"):
            timed = [i for i, cell in enumerate(cells) if cell.strip().endswith(" s")]
        elif not line.startswith("|"):
            timed = []
        if not line.startswith("Written "):
            lines.append("|".join(c for i, c in enumerate(cells) if i not in timed))
    return lines


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The grid computed in this process, one cell after the other."""
    out = tmp_path_factory.mktemp("sequential") / "results"
    return run_benchmark(parse_config(RAW), out, progress=None, figures=False)


def test_a_failing_cell_is_recorded_and_the_other_cells_finish(sequential):
    out = sequential.out
    assert sequential.n_cells == 3 * 4 + 2 and sequential.n_computed == 10
    failures = pd.read_csv(out / FAILURES_FILE)
    pd.testing.assert_frame_equal(failures, sequential.failures, check_dtype=False)
    assert len(failures) == 4 and set(failures["model"]) == {"Broken"}
    assert failures["error"].str.contains(BROKEN).all()
    assert set(sequential.results["model"]) == {"Mean", "kNN", "STEvs"}
    assert len(sequential.results) == 10
    assert not [p for p in (out / CELLS_DIR).iterdir() if "Broken" in p.name]  # nor .partial


def test_fixing_the_failed_model_computes_only_its_cells_and_clears_the_failures(
    sequential, tmp_path
):
    out, raw = tmp_path / "results", {**RAW, "models": MODELS[:3]}
    run_benchmark(parse_config(raw), out, progress=None, figures=False)
    fixed = {**RAW, "models": [*MODELS[:2], {**MODELS[2], "n_neighbors": 3}]}
    result = run_benchmark(parse_config(fixed), out, progress=None, figures=False)
    assert (result.n_computed, result.n_reused) == (4, 8) and result.failures.empty
    assert not (out / FAILURES_FILE).exists()


def test_workers_without_ray_warn_and_run_in_this_process(
    sequential, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    raw = {**RAW, "protocols": ["cross_slice"], "models": MODELS[:1]}
    result = run_benchmark(parse_config(raw), tmp_path / "out", progress=None, workers=2)
    assert (
        "Ray is not installed" in caplog.text and 'pip install -e ".[distributed]"' in caplog.text
    )
    assert result.n_computed == 2 and result.failures.empty


# --------------------------------------------------------------------------- on Ray
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason='Ray is not installed (pip install -e ".[distributed]"): --workers > 1 runs on Ray',
)


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory, sequential):
    """The same grid on a local Ray with 2 CPUs, 2 workers (one Ray session for the module).

    Each task gets the torch threads of the sequential run (one: ``one_torch_thread``), not
    cores // 2: torch's CPU sums depend on the thread count, and this pins the rest.
    """
    import ray
    import torch

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        out, lines = tmp_path_factory.mktemp("ray") / "results", []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bench, "threads_per_worker", lambda workers: torch.get_num_threads())
            result = run_benchmark(
                parse_config(RAW), out, progress=lines.append, figures=False, workers=2
            )
        assert "14 cells on 2 Ray workers, 1 torch thread(s) each" in lines
        yield result
    finally:
        ray.shutdown()


@needs_ray
def test_ray_workers_write_the_same_tables_cells_and_failures_as_one_process(on_ray, sequential):
    assert (on_ray.n_computed, on_ray.n_reused) == (sequential.n_computed, 0)
    for name in ("results.csv", FAILURES_FILE):
        pd.testing.assert_frame_equal(
            measured(pd.read_csv(on_ray.out / name)), measured(pd.read_csv(sequential.out / name))
        )
    parallel, alone = cell_rows(on_ray.out), cell_rows(sequential.out)
    assert list(parallel) == list(alone) and len(parallel) == 10
    for cell, rows in parallel.items():
        pd.testing.assert_frame_equal(rows, alone[cell], obj=cell)
    assert summary_without_runtime(on_ray.out) == summary_without_runtime(sequential.out)


@needs_ray
def test_a_rerun_on_ray_skips_every_finished_cell_and_retries_the_failed_ones(on_ray):
    done = {p.name: (p / CELL_DONE).stat().st_mtime_ns for p in (on_ray.out / CELLS_DIR).iterdir()}
    again = run_benchmark(parse_config(RAW), on_ray.out, progress=None, figures=False, workers=2)
    assert (again.n_computed, again.n_reused, len(again.failures)) == (0, 10, 4)
    assert {
        p.name: (p / CELL_DONE).stat().st_mtime_ns for p in (on_ray.out / CELLS_DIR).iterdir()
    } == done

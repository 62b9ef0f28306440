"""``benchmarks/design_figures.py`` at ``--smoke`` sizes, run as a user runs it (a subprocess).

The figures that need no data (the STEvs step profile, the mean aggregations, the attention
dropout) must each write one Markdown section with a table and positive timings to the CSV;
figures whose data are absent are skipped with a message; ``--only`` reruns one figure and
keeps the others' sections and rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "design_figures.py"
NO_DATA_FIGURES = ("stevs_step_profile", "mean_aggregation", "attention_dropout")


def run_script(*arguments: str, workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--threads",
            "1",
            "--workdir",
            str(workdir),
            *arguments,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("design_figures") / "design_figures.md"
    missing = out.parent / "no_her2st"
    run_script(
        "--only",
        *NO_DATA_FIGURES,
        "jpeg_decode",
        "--her2st",
        str(missing),
        "--out",
        str(out),
        workdir=out.parent / "work",
    )
    return out


def test_smoke_writes_one_table_per_figure_and_positive_timings(smoke):
    text = smoke.read_text()
    for name in NO_DATA_FIGURES:
        assert f"\n## {name}: " in text
    assert text.count("\n| --- |") == len(NO_DATA_FIGURES)
    assert "smoke (tiny: not figures) sizes" in text
    rows = pd.read_csv(smoke.with_suffix(".csv"))
    assert set(rows["figure"]) == set(NO_DATA_FIGURES)
    timings = rows[rows["field"].str.endswith("_ms")]
    assert set(timings["figure"]) == set(NO_DATA_FIGURES)
    assert (timings["value"].astype(float) > 0).all()


def test_figure_without_its_data_is_skipped_with_a_message(smoke):
    assert "jpeg_decode" not in smoke.read_text()


def test_only_reruns_one_figure_and_keeps_the_others(smoke, tmp_path):
    out = tmp_path / smoke.name
    out.write_text(smoke.read_text())
    out.with_suffix(".csv").write_text(smoke.with_suffix(".csv").read_text())
    done = run_script("--only", "attention_dropout", "--out", str(out), workdir=tmp_path)
    assert "attention_dropout (" in done.stdout
    text = out.read_text()
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("## ")] == [
        f"## {name}" for name in NO_DATA_FIGURES
    ]
    before = pd.read_csv(smoke.with_suffix(".csv"))
    after = pd.read_csv(out.with_suffix(".csv"))
    kept = before[before["figure"] != "attention_dropout"].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        after[after["figure"] != "attention_dropout"].reset_index(drop=True), kept
    )

"""`stinfer evaluate`: scores a prediction against its own section, refuses anything else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from stinfer.cli import main
from stinfer.io.slide_data import make_slide, prepare_for_h5ad
from stinfer.models.baselines import prediction_anndata

GENES = [f"G{index}" for index in range(6)]


def write_section(folder: Path, sample_id: str, seed: int) -> Path:
    """A 5 x 5 legacy-ST-like section (spot ids ``<x>x<y>``, shared by every section)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.divmod(np.arange(25), 5)
    slide = make_slide(
        sp.csr_matrix(rng.poisson(5.0, size=(25, len(GENES))).astype(np.float32)),
        [f"{col}x{row}" for row, col in zip(rows, cols, strict=True)],
        GENES,
        np.stack([cols, rows], axis=1) * 100.0,
        sample_id=sample_id,
        source_format="synthetic",
        source="test",
        array_row=rows,
        array_col=cols,
    )
    path = folder / f"{sample_id}.h5ad"
    prepare_for_h5ad(slide).write_h5ad(path)
    prediction = prediction_anndata(slide, GENES, rng.gamma(5.0, 1.0, size=(25, len(GENES))))
    prepare_for_h5ad(prediction).write_h5ad(folder / f"{sample_id}_pred.h5ad")
    return path


@pytest.fixture
def sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_section(tmp_path, "C3", seed=0)
    write_section(tmp_path, "C4", seed=1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_prediction_of_its_own_section_is_scored(sections: Path) -> None:
    argv = ["evaluate", "--pred", "C3_pred.h5ad", "--truth", "C3.h5ad", "--out", "m.json"]
    assert main(argv) == 0
    assert json.loads((sections / "m.json").read_text())["n_spots"] == 25


def test_prediction_of_another_section_exits_2_naming_both_sample_ids(
    sections: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["evaluate", "--pred", "C3_pred.h5ad", "--truth", "C4.h5ad", "--out", "m.json"]
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    assert "'C3'" in message and "'C4'" in message and "--force" in message
    assert not (sections / "m.json").exists()


def test_force_scores_another_section_pairing_spots_by_spot_id(sections: Path) -> None:
    argv = ["evaluate", "--pred", "C3_pred.h5ad", "--truth", "C4.h5ad", "--out", "m.json"]
    assert main([*argv, "--force"]) == 0
    assert json.loads((sections / "m.json").read_text())["n_spots"] == 25


def test_swapped_pred_and_truth_exit_2_with_the_hint(
    sections: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["evaluate", "--pred", "C3.h5ad", "--truth", "C3_pred.h5ad", "--out", "m.json"]
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    assert "--truth must hold raw counts; did you swap --pred and --truth?" in message
    # --force is about sections: it does not make a prediction acceptable as the truth
    assert main([*argv, "--force"]) == 2


def test_help_documents_force(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--force" in capsys.readouterr().out

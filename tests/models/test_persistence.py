"""The saved-model folder is written whole or not at all, and never over files stinfer did not
write (:mod:`stinfer.models.persistence`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stinfer.errors import InputError
from stinfer.io.atomic import TEMP_TAG
from stinfer.models.persistence import read_model_header, read_model_weights, write_model_folder


def save(folder: Path, value: float, overwrite: bool = False) -> Path:
    arrays = {"mean_counts": np.full(3, value, dtype=np.float32)}
    return write_model_folder(
        folder, "mean", {}, {"genes": ["a", "b", "c"]}, None, arrays, overwrite
    )


def test_overwrite_replaces_an_earlier_model_folder_whole(tmp_path: Path) -> None:
    folder = save(tmp_path / "run", 1.0)
    (folder / "train_history.json").write_text("{}")  # written by the earlier `stinfer train`
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        save(folder, 2.0)
    assert float(read_model_weights(folder)["mean_counts"][0]) == 1.0

    save(folder, 2.0, overwrite=True)
    assert {p.name for p in folder.iterdir()} == {"config.json", "weights.safetensors"}
    assert float(read_model_weights(folder)["mean_counts"][0]) == 2.0
    assert read_model_header(folder).model_type == "mean"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary left beside it


def test_a_users_file_in_a_model_folder_blocks_overwrite_and_survives(tmp_path: Path) -> None:
    folder = save(tmp_path / "run", 1.0)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"stinfer did not write \(notes.txt\)"):
        save(folder, 2.0, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert float(read_model_weights(folder)["mean_counts"][0]) == 1.0


def test_a_folder_that_is_not_a_saved_model_is_never_written_into(tmp_path: Path) -> None:
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "draft.tex").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="is not a saved model stinfer wrote"):
            save(folder, 1.0, overwrite)
    assert [p.name for p in folder.iterdir()] == ["draft.tex"]
    assert not any(TEMP_TAG in p.name for p in tmp_path.iterdir())

    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_model_header(save(empty, 1.0)).model_type == "mean"

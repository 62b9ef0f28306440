"""Atomic outputs: all or nothing, never over an existing file unasked, usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output, check_writable, write_text


def test_output_appears_only_when_complete_and_failures_leave_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.json"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        assert not target.exists()
        raise RuntimeError("writer failed")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []

    write_text("{}", target)
    assert target.read_text() == "{}"


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("earlier")
    with pytest.raises(InputError, match=r"result.json: already exists; pass --overwrite"):
        write_text("new", target)
    assert target.read_text() == "earlier"
    write_text("new", target, overwrite=True)
    assert target.read_text() == "new"


def test_outputs_follow_the_umask_not_owner_only(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        path = write_text("x", tmp_path / "shared.txt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_unwritable_destinations_are_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(InputError, match=r"folder: is a directory"):
        check_writable(tmp_path / "folder")
    with pytest.raises(InputError, match=r"file.txt is not a folder stinfer may write to"):
        check_writable(tmp_path / "file.txt" / "deeper" / "out.h5ad")
    assert check_writable(tmp_path / "new" / "out.h5ad") == tmp_path / "new" / "out.h5ad"

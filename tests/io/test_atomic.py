"""Atomic outputs: all or nothing, never over an existing file unasked, usual permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stinfer.errors import InputError
from stinfer.io.atomic import TEMP_TAG, atomic_folder, atomic_output, check_writable, write_text


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


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_killed_runs_leftover_temporaries_are_removed_by_the_next_write(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getppid()
    leftover_file = tmp_path / f".result.json.{TEMP_TAG}-{dead}-abc123.json"
    leftover_file.write_text("half")
    _age(leftover_file, 60)
    leftover_folder = tmp_path / f".run.{TEMP_TAG}-{dead}-xyz"
    (leftover_folder / "inner").mkdir(parents=True)
    _age(leftover_folder, 60)
    running = tmp_path / f".other.json.{TEMP_TAG}-{alive}-def456.json"  # its writer still runs
    running.write_text("in progress")
    _age(running, 60)
    recent = tmp_path / f".new.json.{TEMP_TAG}-{dead}-ghi789.json"  # too recent to judge
    recent.write_text("")
    user_file = tmp_path / ".result.json.backup"  # not stinfer's pattern
    user_file.write_text("mine")

    write_text("{}", tmp_path / "result.json")

    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"result.json", running.name, recent.name, user_file.name}


def test_files_are_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if sys.platform == "linux" else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_text("x", tmp_path / "flushed.txt")
    assert len(synced) == 2
    if sys.platform == "linux":
        assert TEMP_TAG in synced[0] and synced[1] == str(tmp_path)


def test_a_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []

    previous = os.umask(0o027)
    try:
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("new")
    finally:
        os.umask(previous)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o750

    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert [p.name for p in target.iterdir()] == ["b.txt"]  # replaced whole, nothing mixed in
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_earlier_folder_left_aside_by_a_killed_swap_is_put_back(tmp_path: Path) -> None:
    aside = tmp_path / f".run.{TEMP_TAG}-{_dead_pid()}-abc.replaced"  # killed between renames
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    _age(aside, 60)
    write_text("x", tmp_path / "other.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "run"]
    assert (tmp_path / "run" / "config.json").read_text() == "{}"
